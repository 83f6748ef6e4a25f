"""The `nuwa-train` command line (also `python -m nuwa_train`).

A user error (a missing model directory, a bad config value or data file, an unusable checkpoint) ends the
command with one line on stderr and exit status 1; a malformed command line exits with status 2 (argparse).
`nuwa-train --debug COMMAND ...` (or NUWA_DEBUG=1) shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

DEBUG_FLAG = "--debug"
DEBUG_ENV = "NUWA_DEBUG"


def _integer(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1, "a positive integer")


def _count(text: str) -> int:
    return _integer(text, 0, "an integer >= 0")


def _int_list(text: str) -> list[int]:
    """Comma-separated budgets: average vision tokens per image, so positive integers."""
    what = "comma-separated positive integers"
    values = [_integer(part, 1, what) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return values


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help: appended as "(default: ...)" unless the help already says what the
    default is, or the option is a switch (off unless given)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.nargs == 0 or action.default is None:
            return text
        return super()._get_help_string(action)


def _bench(args: argparse.Namespace) -> None:
    import torch

    from .bench import SHAPES
    from .bench.prefill import METHOD_LABELS
    from .errors import UsageError

    methods = [method for method in METHOD_LABELS if method != "none"]
    for flag, names, known in (("--shapes", args.shapes, SHAPES),
                               ("--decode", [args.decode] if args.decode else [], SHAPES),
                               ("--train-shape", [args.train_shape] if args.train_shape else [], SHAPES),
                               ("--methods", args.methods or [], methods)):
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise UsageError(f"unknown {flag} {', '.join(unknown)}; choose from {', '.join(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data_startup:
        import tempfile

        from .bench import time_data_startup, write_startup_dataset

        with tempfile.TemporaryDirectory(prefix="nuwa-startup-") as scratch:
            llava_file = write_startup_dataset(Path(scratch), args.data_startup)
            result = time_data_startup(args.model, llava_file)
        out = Path(args.out or "outputs/bench")
        out.mkdir(parents=True, exist_ok=True)
        (out / "data_startup.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result) + f"\nwrote {out / 'data_startup.json'}")
        return
    if args.training:
        from .bench import time_training, training_markdown
        from .bench.training import TRAINING_STEPS

        rows = time_training(args.training, args.train_steps or TRAINING_STEPS, args.batch_size,
                             threads=torch.get_num_threads())
        text = training_markdown(rows, args.training, args.batch_size)
        out = Path(args.out or "outputs/bench")
        out.mkdir(parents=True, exist_ok=True)
        (out / "training.md").write_text(text)
        print(text + f"\nwrote {out / 'training.md'}")
        return
    _run_bench_suite(args)


def bench_suite(args: argparse.Namespace):
    """The BenchSuite and output folder the bench flags ask for (`--suite gpu`: the preset, flags unused)."""
    from .bench import GPU_SUITE, BenchSuite
    from .bench.prefill import PREFILL_METHODS
    from .bench.suite import GPU_SUITE_OUT
    from .bench.training import SHAPE_TRAINING_STEPS

    if args.suite == "gpu":
        return GPU_SUITE, Path(args.out or GPU_SUITE_OUT)
    suite = BenchSuite(shapes=tuple(args.shapes), budgets=tuple(args.budgets), repeats=args.repeats,
                       methods=tuple(args.methods or PREFILL_METHODS), device=args.device, full_depth=args.full_depth,
                       decode=args.decode, training=args.train_shape,
                       training_steps=args.train_steps or SHAPE_TRAINING_STEPS)
    return suite, Path(args.out or "outputs/bench")


def _run_bench_suite(args: argparse.Namespace) -> None:
    from .bench import run_bench
    from .timing import DeviceUnavailable

    suite, out = bench_suite(args)
    try:
        run_bench(suite, out)
    except DeviceUnavailable as reason:  # a GPU suite on a machine without one: nothing to measure, not a failure
        print(f"nuwa-train bench: skipped, {reason}")


def _export(args: argparse.Namespace) -> None:
    from .export import export_checkpoint

    target = export_checkpoint(args.checkpoint, args.out, merge=not args.adapter_only, model_path=args.model_path)
    kind = "adapter" if args.adapter_only else "merged model"
    print(f"exported the {kind} to {target} (load it with nuwa_train.load_pruned({str(target)!r}))")


def _pretrain_base(args: argparse.Namespace) -> None:
    from .pretrain.cli import main as pretrain_main

    raise SystemExit(pretrain_main(args.rest))


def _eval(args: argparse.Namespace) -> None:
    from .compare import parse_data_sources, run_eval

    run_eval(args.model, Path(args.out), method=args.method, budget=args.budget, compare=args.compare,
             budgets=tuple(args.budgets), reference=args.reference, data=parse_data_sources(args.data),
             split=args.split, images=args.images, limit=args.limit, batch_size=args.batch_size)


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    chosen = {"methods": tuple(args.methods)} if args.methods else {}
    run_demo(args.recipe, args.out, args.test_images, args.max_steps, **chosen)


def _export_data(args: argparse.Namespace) -> None:
    from .data.formats import export_split
    from .data.sharegpt import export_conversations
    from .data.synthetic import SyntheticConfig

    config = SyntheticConfig()
    if args.format == "sharegpt":
        paths = [export_conversations(args.out, config, args.split, args.images, args.vqa_per_image,
                                      args.grounding_per_image)]
    else:
        paths = export_split(args.out, config, args.split, args.images)
    print("wrote " + ", ".join(map(str, paths)) + f" and {args.images} images")


LIGHTNING_COMMANDS = ("fit", "validate", "test")


def build_parser() -> argparse.ArgumentParser:
    from .compare import PAPER_BUDGETS
    from .pruning import NuwaConfig
    from .pruning.selectors import METHODS

    parser = argparse.ArgumentParser(prog="nuwa-train", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"before the command: show the full traceback of an error (also {DEBUG_ENV}=1)")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, **settings) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter,
                                   **settings)

    bench = command("bench", "prefill latency full vs Nüwa-pruned, and aggregation cost by grid size")
    bench.add_argument("--shapes", type=lambda s: s.split(","), default=["tiny", "llava15"],
                       help="model shapes to time (comma-separated): tiny, llava15, llava15-7b (real widths, bf16)")
    bench.add_argument("--methods", type=lambda s: s.split(","),
                       help="selectors timed beside the full prefill (comma-separated; default: nuwa,visionzip,fastv)")
    bench.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (CUDA events and max allocated memory; "
                                                       "without a GPU the run is skipped with a message)")
    bench.add_argument("--full-depth", action="store_true",
                       help="run every real decoder layer (llava15-7b: 32 instead of 16 measured on a CPU)")
    bench.add_argument("--decode", metavar="SHAPE",
                       help="also time decoding (32 tokens after a ~600-token prompt; default: not timed)")
    bench.add_argument("--train-shape", metavar="SHAPE",
                       help="also time a training step per selection mode vs plain LoRA on this shape's widths "
                            "(default: not timed)")
    bench.add_argument("--suite", choices=["gpu"],
                       help="gpu: the whole GPU suite (llava15-7b at full depth: prefill, decode, training; "
                            "--device cuda), written to outputs/bench_gpu (default: the suite the flags describe)")
    bench.add_argument("--budgets", type=_int_list, default=[64, 128, 192],
                       help="average vision tokens per image on the 24x24 reference grid")
    bench.add_argument("--repeats", type=_positive_int, default=5, help="timed runs per setting (median reported)")
    bench.add_argument("--threads", type=_count, default=int(os.environ.get("OMP_NUM_THREADS", 0) or 0),
                       help="torch threads (default: OMP_NUM_THREADS or torch's default)")
    bench.add_argument("--out", help="directory for bench.md, bench.json, bench.png (default: outputs/bench, "
                                     "outputs/bench_gpu for --suite gpu)")
    bench.add_argument("--training", metavar="MODEL_DIR",
                       help="instead: training step time / peak memory of each selection mode vs plain LoRA "
                            "(default: not run)")
    bench.add_argument("--batch-size", type=_positive_int, default=16, help="batch size of --training")
    bench.add_argument("--train-steps", type=_positive_int,
                       help="timed optimizer steps per training mode (and depth), after the warm-up ones (default: "
                            "bench.training's TRAINING_STEPS for --training, SHAPE_TRAINING_STEPS for --train-shape)")
    bench.add_argument("--data-startup", type=_positive_int, metavar="RECORDS",
                       help="instead: seconds to the first training step on a generated file of RECORDS records "
                            "(one image file each; default: not run)")
    bench.add_argument("--model", default="data/tiny_base", help="model directory of --data-startup")
    bench.set_defaults(handler=_bench)

    demo = command("demo", "the main job: fine-tune with pruning on the tiny base, compare, export")
    demo.add_argument("--recipe", default="recipes/default.yaml", help="the fine-tuning recipe every row trains with")
    demo.add_argument("--out", default="outputs/demo", help="directory for the runs, exports and the report")
    demo.add_argument("--test-images", type=_positive_int, default=250, help="synthetic test images (two records each)")
    demo.add_argument("--max-steps", type=_positive_int,
                      help="override the recipe's trainer.max_steps (default: the recipe's)")
    demo.add_argument("--methods", type=lambda s: s.split(","),
                      help="fine-tuned rows, comma-separated (default: nuwa,visionzip,fastv); nuwa is always needed")
    demo.set_defaults(handler=_demo)

    evaluate = command("eval", "VQA / grounding with a pruner (hard path, generate), or the comparison table of all "
                               "pruners (--compare)")
    evaluate.add_argument("--model", default="data/tiny_base",
                          help="a HF model directory, an export (merged or adapter-only: runs its nuwa_config.json), "
                               "or a fine-tuning recipe (.yaml: its model.model_path with its model.pruning)")
    evaluate.add_argument("--reference", metavar="MODEL",
                          help="model whose full-token scores retention is measured against (default: an export's "
                               "recorded base model, else the model itself)")
    evaluate.add_argument("--data", action="append", default=[], metavar="FORMAT=PATH",
                          help="score your files instead of the synthetic split (repeatable; FORMAT: llava, refcoco, "
                               "sharegpt; PATH: a JSON / JSONL file or a save_to_disk folder); every record is scored "
                               "(default: the synthetic --split)")
    evaluate.add_argument("--limit", type=_positive_int, help="score only the first N records (default: all)")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"],
                          help="synthetic split scored when no --data is given")
    evaluate.add_argument("--images", type=_positive_int, default=250, help="synthetic images (two records each)")
    defaults = NuwaConfig()
    evaluate.add_argument("--method", choices=METHODS, help=f"pruner: {', '.join(METHODS)} (default: the export's or "
                                                            f"recipe's, else {defaults.method})")
    evaluate.add_argument("--budget", type=_int_list, help=f"average tokens per image on the 24x24 grid, or several "
                                                           f"(comma-separated: one row each; default: the export's or "
                                                           f"recipe's, else {defaults.budget})")
    evaluate.add_argument("--compare", action="store_true", help="every pruner at every --budgets")
    evaluate.add_argument("--budgets", type=_int_list, default=list(PAPER_BUDGETS),
                          help="budgets of --compare (comma-separated)")
    evaluate.add_argument("--batch-size", type=_positive_int, default=64, help="records generated per batch")
    evaluate.add_argument("--out", default="outputs/eval",
                          help="directory for results.json, results.md, predictions.jsonl, kept_tokens.png")
    evaluate.set_defaults(handler=_eval)

    export = command("export", "merge LoRA from a fit checkpoint into a plain HF directory")
    export.add_argument("checkpoint", help="a run folder of `nuwa-train fit` (its checkpoints/last.ckpt, e.g. "
                                           "runs/default/latest: the newest run) or a .ckpt file it wrote")
    export.add_argument("out", help="target directory (written atomically)")
    export.add_argument("--adapter-only", action="store_true", help="write the LoRA adapter instead of merging")
    export.add_argument("--model-path", help="base model directory, if it moved since training (default: the one "
                                             "recorded in the checkpoint)")
    export.set_defaults(handler=_export)

    pretrain = command("pretrain-base", "train the tiny base VLM from scratch (LightningCLI recipe as the positional "
                                        "argument or --config; resumable; `pretrain-base --help` lists its flags)",
                       add_help=False)
    pretrain.add_argument("rest", nargs=argparse.REMAINDER, help="the recipe and LightningCLI flags")
    pretrain.set_defaults(handler=_pretrain_base)

    export_data = command("export-data", "write synthetic records as files: LLaVA + RefCOCO JSON, or ShareGPT "
                                         "(ms-swift) conversations")
    export_data.add_argument("out", help="target directory (images in images/)")
    export_data.add_argument("--format", choices=["llava-refcoco", "sharegpt"], default="sharegpt",
                             help="sharegpt: one multi-turn conversation per image, boxes behind <ref-object>/<bbox> "
                                  "placeholders (written in the model's box format when training)")
    export_data.add_argument("--split", default="test", choices=["train", "val", "test"], help="synthetic split")
    export_data.add_argument("--images", type=_positive_int, default=24, help="images to write")
    export_data.add_argument("--vqa-per-image", type=_count, default=4, help="sharegpt: VQA turns per conversation")
    export_data.add_argument("--grounding-per-image", type=_count, default=1,
                             help="sharegpt: referring-expression turns per conversation")
    export_data.set_defaults(handler=_export_data)

    from .chat import CHAT_SUMMARY, add_chat_arguments

    add_chat_arguments(command("chat", CHAT_SUMMARY))
    from .serving.server import SERVE_SUMMARY, add_serve_arguments

    add_serve_arguments(command("serve", SERVE_SUMMARY))
    for name in LIGHTNING_COMMANDS:
        command(name, f"LightningCLI {name}: --config recipes/<name>.yaml [--section.key value]; "
                      f"`{name} --help` lists its flags")
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

    return (UsageError, ModelPathError, NuwaConfigError, ExportError, DatasetFormatError, CollateError,
            UnsafeCheckpointError, NuwaInputError, UnsupportedModelError, DeviceUnavailable, NonFiniteTrainingError)


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
        if argv and argv[0] in LIGHTNING_COMMANDS:
            from .lightning.checkpoints import TrainingStopped
            from .lightning.cli import run

            # The arguments are the command line's (less --debug): LightningCLI's warning about getting both
            # does not apply.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
            try:
                run(argv)
            except TrainingStopped as stopped:  # Ctrl-C / SIGTERM during a validation: saved, a clean stop
                print(f"nuwa-train {argv[0]}: {stopped}; last.ckpt holds that step (resume: --ckpt_path last)")
            return
        args = build_parser().parse_args(argv)
        args.handler(args)
    except user_errors() as error:
        if debug:
            raise
        command = f" {argv[0]}" if argv else ""
        raise SystemExit(f"nuwa-train{command}: error: {error}") from None


if __name__ == "__main__":
    main()
