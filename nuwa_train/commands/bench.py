"""`nuwa-train bench`: prefill latency full vs Nüwa-pruned, decode and training steps, data start-up time.

The measurements live in the `nuwa_train.bench` package; this module is the command's flags and what they run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .arguments import add_command, count, int_list, names, positive_int

NAME = "bench"
SUMMARY = "prefill latency full vs Nüwa-pruned, and aggregation cost by grid size"
DEFAULT_OUT = "outputs/bench"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = add_command(subparsers, NAME, SUMMARY)
    bench.add_argument(
        "--shapes",
        type=names,
        default=["tiny", "llava15"],
        help="model shapes to time (comma-separated): tiny, llava15, llava15-7b (real widths, bf16)",
    )
    bench.add_argument(
        "--methods",
        type=names,
        help="selectors timed beside the full prefill (comma-separated; default: nuwa,visionzip,fastv)",
    )
    bench.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda or cuda:N (CUDA events and max allocated memory; "
        "without a GPU the run is skipped with a message)",
    )
    bench.add_argument(
        "--full-depth",
        action="store_true",
        help="run every real decoder layer (llava15-7b: 32 instead of 16 measured on a CPU)",
    )
    bench.add_argument(
        "--decode", metavar="SHAPE", help="also time decoding (32 tokens after a ~600-token prompt; default: not timed)"
    )
    bench.add_argument(
        "--train-shape",
        metavar="SHAPE",
        help="also time a training step per selection mode vs plain LoRA on this shape's widths (default: not timed)",
    )
    bench.add_argument(
        "--suite",
        choices=["gpu"],
        help="gpu: the whole GPU suite (llava15-7b at full depth: prefill, decode, training; "
        "--device cuda), written to outputs/bench_gpu (default: the suite the flags describe)",
    )
    bench.add_argument(
        "--budgets",
        type=int_list,
        default=[64, 128, 192],
        help="average vision tokens per image on the 24x24 reference grid",
    )
    bench.add_argument("--repeats", type=positive_int, default=5, help="timed runs per setting (median reported)")
    bench.add_argument(
        "--threads",
        type=count,
        default=int(os.environ.get("OMP_NUM_THREADS", 0) or 0),
        help="torch threads (default: OMP_NUM_THREADS or torch's default)",
    )
    bench.add_argument(
        "--out",
        help="directory for bench.md, bench.json, bench.png (default: outputs/bench, "
        "outputs/bench_gpu for --suite gpu)",
    )
    bench.add_argument(
        "--training",
        metavar="MODEL_DIR",
        help="instead: training step time / peak memory of each selection mode vs plain LoRA (default: not run)",
    )
    bench.add_argument("--batch-size", type=positive_int, default=16, help="batch size of --training")
    bench.add_argument(
        "--train-steps",
        type=positive_int,
        help="timed optimizer steps per training mode (and depth), after the warm-up ones (default: "
        "bench.training's TRAINING_STEPS for --training, SHAPE_TRAINING_STEPS for --train-shape)",
    )
    bench.add_argument(
        "--data-startup",
        type=positive_int,
        metavar="RECORDS",
        help="instead: seconds to the first training step on a generated file of RECORDS records "
        "(one image file each; default: not run)",
    )
    bench.add_argument("--model", default="data/tiny_base", help="model directory of --data-startup")
    bench.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    import torch

    from ..bench import SHAPES
    from ..bench.prefill import METHOD_LABELS
    from ..errors import UsageError

    methods = [method for method in METHOD_LABELS if method != "none"]
    for flag, given, known in (
        ("--shapes", args.shapes, SHAPES),
        ("--decode", [args.decode] if args.decode else [], SHAPES),
        ("--train-shape", [args.train_shape] if args.train_shape else [], SHAPES),
        ("--methods", args.methods or [], methods),
    ):
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise UsageError(f"unknown {flag} {', '.join(unknown)}; choose from {', '.join(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data_startup:
        _data_startup(args)
    elif args.training:
        _training(args, torch.get_num_threads())
    else:
        _suite(args)


def _data_startup(args: argparse.Namespace) -> None:
    import tempfile

    from ..bench import time_data_startup, write_startup_dataset

    with tempfile.TemporaryDirectory(prefix="nuwa-startup-") as scratch:
        llava_file = write_startup_dataset(Path(scratch), args.data_startup)
        result = time_data_startup(args.model, llava_file)
    out = Path(args.out or DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_startup.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result) + f"\nwrote {out / 'data_startup.json'}")


def _training(args: argparse.Namespace, threads: int) -> None:
    from ..bench import time_training, training_markdown
    from ..bench.training import TRAINING_STEPS

    rows = time_training(args.training, args.train_steps or TRAINING_STEPS, args.batch_size, threads=threads)
    text = training_markdown(rows, args.training, args.batch_size)
    out = Path(args.out or DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    (out / "training.md").write_text(text)
    print(text + f"\nwrote {out / 'training.md'}")


def bench_suite(args: argparse.Namespace):
    """The BenchSuite and output folder the bench flags ask for (`--suite gpu`: the preset, flags unused)."""
    from ..bench import GPU_SUITE, BenchSuite
    from ..bench.prefill import PREFILL_METHODS
    from ..bench.suite import GPU_SUITE_OUT
    from ..bench.training import SHAPE_TRAINING_STEPS

    if args.suite == "gpu":
        return GPU_SUITE, Path(args.out or GPU_SUITE_OUT)
    suite = BenchSuite(
        shapes=tuple(args.shapes),
        budgets=tuple(args.budgets),
        repeats=args.repeats,
        methods=tuple(args.methods or PREFILL_METHODS),
        device=args.device,
        full_depth=args.full_depth,
        decode=args.decode,
        training=args.train_shape,
        training_steps=args.train_steps or SHAPE_TRAINING_STEPS,
    )
    return suite, Path(args.out or DEFAULT_OUT)


def _suite(args: argparse.Namespace) -> None:
    from ..bench import run_bench
    from ..timing import DeviceUnavailable

    suite, out = bench_suite(args)
    try:
        run_bench(suite, out)
    except DeviceUnavailable as reason:  # a GPU suite on a machine without one: nothing to measure, not a failure
        print(f"nuwa-train bench: skipped, {reason}")
