"""`nuwa-train export-data`: synthetic records written as files a user's own data would be in."""

from __future__ import annotations

import argparse

from .arguments import add_command, count, positive_int

NAME = "export-data"
SUMMARY = "write synthetic records as files: LLaVA + RefCOCO JSON, or ShareGPT (ms-swift) conversations"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    export_data = add_command(subparsers, NAME, SUMMARY)
    export_data.add_argument("out", help="target directory (images in images/)")
    export_data.add_argument(
        "--format",
        choices=["llava-refcoco", "sharegpt"],
        default="sharegpt",
        help="sharegpt: one multi-turn conversation per image, boxes behind <ref-object>/<bbox> "
        "placeholders (written in the model's box format when training)",
    )
    export_data.add_argument("--split", default="test", choices=["train", "val", "test"], help="synthetic split")
    export_data.add_argument("--images", type=positive_int, default=24, help="images to write")
    export_data.add_argument("--vqa-per-image", type=count, default=4, help="sharegpt: VQA turns per conversation")
    export_data.add_argument(
        "--grounding-per-image", type=count, default=1, help="sharegpt: referring-expression turns per conversation"
    )
    export_data.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from ..data.formats import export_split
    from ..data.records import export_conversations
    from ..data.synthetic import SyntheticConfig

    config = SyntheticConfig()
    if args.format == "sharegpt":
        paths = [
            export_conversations(
                args.out, config, args.split, args.images, args.vqa_per_image, args.grounding_per_image
            )
        ]
    else:
        paths = export_split(args.out, config, args.split, args.images)
    print("wrote " + ", ".join(map(str, paths)) + f" and {args.images} images")
