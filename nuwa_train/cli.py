"""The `nuwa-train` command line (also `python -m nuwa_train`).

A user error (a missing model directory, a bad config value or data file, an unusable checkpoint, a full disk or
a permission refused) ends the command with one line on stderr and exit status 1; a malformed command line exits
with status 2 (argparse).
`nuwa-train --debug COMMAND ...` (or NUWA_DEBUG=1) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys

from .commands import COMMAND_MODULES
from .commands.arguments import HelpFormatter
from .commands.lightning import LIGHTNING_COMMANDS

DEBUG_FLAG = "--debug"
DEBUG_ENV = "NUWA_DEBUG"
# OSErrors the user fixes outside the program (free space or quota, permissions, a read-only mount). Others (a bad
# file descriptor, a missing file the code should have checked) may be bugs, so they keep their traceback.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})


def build_parser() -> argparse.ArgumentParser:
    """`nuwa-train`'s parser: each command module of COMMAND_MODULES adds its subcommands."""
    parser = argparse.ArgumentParser(prog="nuwa-train", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        DEBUG_FLAG,
        action="store_true",
        help=f"before the command: show the full traceback of an error (also {DEBUG_ENV}=1)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__package__}.commands.{name}").add_parser(subparsers)
    return parser


def user_errors() -> tuple[type[Exception], ...]:
    """The project's errors a user can act on (a path, a config value, a data record, a checkpoint): the message
    names what to fix, so the command prints it alone."""
    from .data.collate import CollateError
    from .data.formats import DatasetFormatError
    from .errors import UsageError
    from .export import ExportError
    from .io import UnsafeCheckpointError
    from .lightning.module import NonFiniteTrainingError
    from .models.base import NuwaInputError, UnsupportedModelError
    from .models.loading import ModelPathError
    from .pruning import NuwaConfigError
    from .timing import DeviceUnavailable

    return (
        UsageError,
        ModelPathError,
        NuwaConfigError,
        ExportError,
        DatasetFormatError,
        CollateError,
        UnsafeCheckpointError,
        NuwaInputError,
        UnsupportedModelError,
        DeviceUnavailable,
        NonFiniteTrainingError,
    )


def environment_error_line(error: OSError) -> str:
    """The error and its notes on one line: a note says what was left as it was (e.g. a checkpoint kept whole)."""
    return "; ".join([str(error), *getattr(error, "__notes__", ())])


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether to show tracebacks (a leading --debug, or NUWA_DEBUG set and not 0), and argv without the flag."""
    debug = os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    while argv[:1] == [DEBUG_FLAG]:
        debug, argv = True, argv[1:]
    return debug, argv


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, argv = debug_requested(argv)
    from .logs import quiet_startup_notices

    quiet_startup_notices()  # before the libraries are imported: some of their notices print at import
    # Before any computation: threads inherit the floating-point mode of the thread that creates them, so
    # flushing subnormals later (e.g. in a LightningModule's setup) misses the worker pool an earlier
    # evaluation started. Near-zero keep probabilities otherwise make soft steps ~10x slower on CPUs.
    import torch

    torch.set_flush_denormal(True)
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:  # LightningCLI parses their arguments itself
            from .commands import lightning

            lightning.run(argv)
            return
        args = build_parser().parse_args(argv)
        status = args.handler(args)
        if status is not None:  # a command that ends with an exit status of its own (pretrain-base)
            raise SystemExit(status)
    except user_errors() as error:
        if debug:
            raise
        raise SystemExit(f"{_error_prefix(argv)}{error}") from None
    except OSError as error:
        if debug or error.errno not in ENVIRONMENT_ERRNOS:
            raise
        raise SystemExit(f"{_error_prefix(argv)}{environment_error_line(error)}") from None


def _error_prefix(argv: list[str]) -> str:
    command = f" {argv[0]}" if argv else ""
    return f"nuwa-train{command}: error: "


if __name__ == "__main__":
    main()
