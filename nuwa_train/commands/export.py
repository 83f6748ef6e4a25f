"""`nuwa-train export`: a fit checkpoint as a plain HF directory (LoRA merged), or its adapter alone.

The export itself is library code (`nuwa_train.export`, whose `load_pruned` loads the result).
"""

from __future__ import annotations

import argparse

from .arguments import add_command

NAME = "export"
SUMMARY = "merge LoRA from a fit checkpoint into a plain HF directory"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    export = add_command(subparsers, NAME, SUMMARY)
    export.add_argument(
        "checkpoint",
        help="a run folder of `nuwa-train fit` (its checkpoints/last.ckpt, e.g. "
        "runs/default/latest: the newest run) or a .ckpt file it wrote",
    )
    export.add_argument("out", help="target directory (written atomically)")
    export.add_argument("--adapter-only", action="store_true", help="write the LoRA adapter instead of merging")
    export.add_argument(
        "--model-path",
        help="base model directory, if it moved since training (default: the one recorded in the checkpoint)",
    )
    export.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from ..export import export_checkpoint

    target = export_checkpoint(args.checkpoint, args.out, merge=not args.adapter_only, model_path=args.model_path)
    kind = "adapter" if args.adapter_only else "merged model"
    print(f"exported the {kind} to {target} (load it with nuwa_train.load_pruned({str(target)!r}))")
