"""User-facing errors: one line that names the problem and says what to do."""


class EmlocError(Exception):
    """A problem with the user's input (data, config, model, run directory).

    The CLI prints ``str(error)`` on one line and exits with code 2; it never shows a traceback.
    """
