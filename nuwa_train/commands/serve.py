"""`nuwa-train serve`: a model behind vLLM's OpenAI-compatible server, stage-1 Nüwa pruned.

The server, its flags and its handler live in `nuwa_train.serving.server`.
"""

from __future__ import annotations

import argparse

from .arguments import add_command

NAME = "serve"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..serving.server import SERVE_SUMMARY, add_serve_arguments

    add_serve_arguments(add_command(subparsers, NAME, SERVE_SUMMARY))
