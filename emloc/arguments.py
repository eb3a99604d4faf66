"""Command-line parsing that answers every mistake in one line: argparse, without the usage dump.

Every ``emloc`` entry point (the stage commands, ``emloc bundle``, ``emloc export``) parses with
:class:`OneLineParser`: a parser error becomes an :class:`~emloc.errors.EmlocError` naming the flag, its valid
values where it has some, and where to read more; and a value that begins with ``-`` is taken as the value of
the flag before it (``--memory-budget -1GB`` reaches the same check as ``--memory-budget=-1GB``).
"""
from __future__ import annotations

import argparse
import sys

from emloc.errors import EmlocError


def lower_case(text: str) -> str:
    """The ``type`` of a flag whose choices are lower-case words: ``--allocation Global`` means ``global``."""
    return text.lower()


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one-line :class:`EmlocError` s (subparsers inherit it)."""

    def error(self, message: str):
        raise EmlocError(f"{self._with_choices(message)}: see `{self.prog} --help`")

    def _with_choices(self, message: str) -> str:
        """argparse's message, plus the valid values when a flag was given none."""
        if not message.endswith("expected one argument"):
            return message
        flag = message.split(":")[0].removeprefix("argument ").split("/")[0]
        action = self._option_string_actions.get(flag)
        choices = getattr(action, "choices", None)
        return f"{message} (one of {', '.join(map(str, choices))})" if choices else message

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown flag is reported by the subcommand it was given to (its help lists
        the flags that exist)."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            self._innermost(namespace).error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace

    def _innermost(self, namespace) -> argparse.ArgumentParser:
        """The (sub)parser of the subcommand that ``namespace`` chose, or this parser."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(namespace, action.dest, None) or "")
                if isinstance(chosen, OneLineParser):
                    return chosen._innermost(namespace)
        return self

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(dash_values_joined(args, self), namespace)


def _is_option(token: str, option_strings: list[str]) -> bool:
    """Whether argparse would read ``token`` as one of the options (or an abbreviation of one)."""
    name = token.split("=", 1)[0]
    return token == "--" or any(option == name or (name.startswith("--") and option.startswith(name))
                                for option in option_strings)


def dash_values_joined(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``--flag -value`` -> ``--flag=-value`` for flags that take one value, when ``-value`` is no option."""
    takes_value = {option for action in parser._actions if action.nargs is None and action.option_strings
                   for option in action.option_strings}
    options = [option for action in parser._actions for option in action.option_strings]
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        following = argv[i + 1] if i + 1 < len(argv) else None
        if (token in takes_value and following is not None and following.startswith("-")
                and not _is_option(following, options)):
            out.append(f"{token}={following}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out
