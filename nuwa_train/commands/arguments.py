"""What every command's parser shares: the help format and the number parsers of its flags.

A bad number is refused while the command line is parsed (argparse's usage error, exit status 2), before a
model is loaded.
"""

from __future__ import annotations

import argparse


def _integer(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1, "a positive integer")


def count(text: str) -> int:
    return _integer(text, 0, "an integer >= 0")


def int_list(text: str) -> list[int]:
    """Comma-separated budgets: average vision tokens per image, so positive integers."""
    what = "comma-separated positive integers"
    values = [_integer(part, 1, what) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values


def names(text: str) -> list[str]:
    """Comma-separated names (shapes, methods): checked against the known ones by the command."""
    return text.split(",")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help: appended as "(default: ...)" unless the help already says what the
    default is, or the option is a switch (off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.nargs == 0 or action.default is None:
            return text
        return super()._get_help_string(action)


def add_command(subparsers: argparse._SubParsersAction, name: str, summary: str, **settings) -> argparse.ArgumentParser:
    """A subcommand's parser: its summary is both its line in `nuwa-train --help` and its own description."""
    return subparsers.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter, **settings)
