"""`nuwa-train pretrain-base`: train the tiny base VLM from scratch (`nuwa_train.pretrain`'s LightningCLI)."""

from __future__ import annotations

import argparse

from .arguments import add_command

NAME = "pretrain-base"
SUMMARY = (
    "train the tiny base VLM from scratch (LightningCLI recipe as the positional argument or --config; "
    "resumable; `pretrain-base --help` lists its flags)"
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    # Its flags are LightningCLI's: `pretrain-base --help` is passed on to it.
    pretrain = add_command(subparsers, NAME, SUMMARY, add_help=False)
    pretrain.add_argument("rest", nargs=argparse.REMAINDER, help="the recipe and LightningCLI flags")
    pretrain.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """The pretraining CLI's exit status (the command's)."""
    from ..pretrain.cli import main as pretrain_main

    return pretrain_main(args.rest)
