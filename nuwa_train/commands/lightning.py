"""`nuwa-train fit | validate | test`: LightningCLI's commands on a recipe (`nuwa_train.lightning.cli`).

LightningCLI parses their command line itself, so `main` hands them the arguments before argparse sees them;
the subparsers only list them in `nuwa-train --help`.
"""

from __future__ import annotations

import argparse
import warnings

from .arguments import add_command

LIGHTNING_COMMANDS = ("fit", "validate", "test")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    for name in LIGHTNING_COMMANDS:
        add_command(
            subparsers,
            name,
            f"LightningCLI {name}: --config recipes/<name>.yaml [--section.key value]; `{name} --help` lists its flags",
        )


def run(argv: list[str]) -> None:
    """`argv`: the command line from the command name on (less --debug)."""
    from ..lightning.checkpoints import TrainingStopped
    from ..lightning.cli import run as run_lightning_cli

    # The arguments are the command line's: LightningCLI's warning about getting both does not apply.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        run_lightning_cli(argv)
    except TrainingStopped as stopped:  # Ctrl-C / SIGTERM during a validation: saved, a clean stop
        print(f"nuwa-train {argv[0]}: {stopped}; last.ckpt holds that step (resume: --ckpt_path last)")
