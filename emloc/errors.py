"""User-facing errors: one line that names the problem and says what to do."""


class EmlocError(Exception):
    """A problem with the user's input (data, config, model, run directory).

    The CLI prints ``str(error)`` on one line and exits with code 2; it never shows a traceback.
    """


def report_errors(command) -> int:
    """Run ``command()``, a command-line entry point's body: an :class:`EmlocError` becomes its one line on
    stderr and exit code 2 (never a traceback); otherwise exit code 0."""
    import sys
    try:
        command()
    except EmlocError as error:
        print(f"emloc: error: {error}", file=sys.stderr)
        return 2
    return 0
