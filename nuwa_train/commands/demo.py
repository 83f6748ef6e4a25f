"""`nuwa-train demo`, the README's main job: pruning-aware fine-tuning on the shipped tiny base.

1. Evaluate the base with all tokens and with training-free Nüwa at the recipe's budget (~11%).
2. Fine-tune LoRA with pruning in the loop: Nüwa (soft selection), and for a fair comparison the same
   recipe with the VisionZip-like (hard, not differentiable) and FastV (soft stage 2) selectors.
3. Evaluate each with the hard path, export the Nüwa model (merged, `load_pruned`-ready), and write
   the table (Markdown + JSON), the training curves and the kept-token overlay (PNG).

The recipe is parsed once, by NuwaCLI's parser; each fine-tune edits a copy of those settings and NuwaCLI builds
its module, data module and trainer from them, as `nuwa-train fit` would.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from jsonargparse import Namespace

from ..errors import UsageError
from ..evaluation import evaluate
from ..export import export_module, load_pruned
from ..io import write_atomically
from ..model_card import write_model_card
from ..models import detach_nuwa
from ..models.loading import ModelPathError
from ..pruning import NuwaConfig, NuwaConfigError
from ..viz import plot_training_curves
from .arguments import add_command, names, positive_int
from .eval import Row, overlay, synthetic_config_for, write_table

NAME = "demo"
SUMMARY = "the main job: fine-tune with pruning on the tiny base, compare, export"


class FineTune(NamedTuple):
    """One fine-tuned row: the recipe with this method and training selection mode."""

    label: str
    method: str
    mode: str
    pruning: dict  # pruning settings this method needs beyond the recipe's (they replace the recipe's values)


FINE_TUNES = (
    FineTune("Nüwa, fine-tuned", "nuwa", "soft", {}),
    FineTune("VisionZip-like, fine-tuned", "visionzip", "hard", {}),
    FineTune("FastV, fine-tuned", "fastv", "soft", {"fastv_layer": 1}),
)
CHECKPOINT_EVERY = 25  # steps between `last.ckpt` writes of each fine-tune
RUN_SETTINGS_NAME = "run_settings.yaml"  # a fine-tune's resolved settings, checked before resuming it
# The public import paths, as recipes name them: a fine-tune's settings dump (what resuming compares) stays the same.
CSV_LOGGER = "lightning.pytorch.loggers.CSVLogger"
MODEL_CHECKPOINT = "lightning.pytorch.callbacks.ModelCheckpoint"


def _component(class_path: str, **init_args) -> Namespace:
    """A logger or callback in the form the parsed config holds it (LightningCLI instantiates it)."""
    return Namespace(class_path=class_path, init_args=Namespace(**init_args))


def fine_tune_settings(recipe: Namespace, fine_tune: FineTune, run_dir: Path, max_steps: int | None) -> Namespace:
    """The parsed recipe with one fine-tune's method, selection mode, run directory and (shortened) schedule.

    Its logs and checkpoints go under `run_dir` only: the recipe's loggers and callbacks are replaced by a CSV
    logger (the training curves) and a `last.ckpt` every CHECKPOINT_EVERY steps (the resume point).
    """
    settings = recipe.clone()
    settings.model.pruning.method = fine_tune.method
    settings.model.selection.mode = fine_tune.mode
    for key, value in fine_tune.pruning.items():
        settings[f"model.pruning.{key}"] = value  # NuwaCLI rejects a key NuwaConfig does not have
    settings.trainer.default_root_dir, settings.run_name = str(run_dir.parent), run_dir.name  # NuwaCLI's run folder
    settings.trainer.logger = [_component(CSV_LOGGER, save_dir=str(run_dir), name="csv", version=0)]
    settings.trainer.callbacks = [
        _component(
            MODEL_CHECKPOINT,
            dirpath=str(run_dir / "checkpoints"),
            save_last=True,
            save_top_k=0,
            every_n_train_steps=CHECKPOINT_EVERY,
        )
    ]
    if max_steps is not None:  # a shorter run anneals over the same share of its steps as the recipe
        anneal_share = recipe.model.selection.anneal_steps / recipe.trainer.max_steps
        settings.trainer.max_steps = max_steps
        settings.model.selection.anneal_steps = max(1, round(anneal_share * max_steps))
        settings.trainer.log_every_n_steps = min(recipe.trainer.log_every_n_steps, max_steps)  # a short run logs too
    return settings


def build_fine_tune(settings: Namespace):
    """NuwaCLI builds the run as `nuwa-train fit` does: seeded, with the weights-only checkpoint reader."""
    from ..lightning import NuwaDataModule, NuwaFineTuner
    from ..lightning.cli import NuwaCLI

    return NuwaCLI(NuwaFineTuner, NuwaDataModule, args=settings, run=False)


def _fine_tune(settings: Namespace, console):
    """Fit one fine-tune (resuming its interrupted run if the settings are the same); the module and its curves."""
    cli = build_fine_tune(settings)
    run_dir = Path(cli.trainer.default_root_dir)
    last = _resumable_checkpoint(run_dir, cli.parser.dump(cli.config, skip_none=False), console)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=str(last) if last is not None else None)
    return cli.model, Path(cli.trainer.logger.experiment.metrics_file_path)


def _resumable_checkpoint(run_dir: Path, settings: str, console) -> Path | None:
    """`last.ckpt` of an interrupted run with exactly these settings, else None (and a clean `run_dir`).

    A run left by a different recipe or command line is started afresh: resuming it would report the old
    settings' model under the new ones (e.g. a finished run would not train at all).
    """
    last, recorded = run_dir / "checkpoints" / "last.ckpt", run_dir / RUN_SETTINGS_NAME
    same = recorded.is_file() and recorded.read_text() == settings
    if same and last.is_file():
        console.print(f"resuming the interrupted run from {last}")
        return last
    if run_dir.exists():
        console.print(f"{run_dir}: {'no checkpoint yet' if same else 'a run with other settings'}; starting afresh")
        shutil.rmtree(run_dir)
    write_atomically(recorded, lambda staging: staging.write_text(settings))  # never half a file that could match
    return None


def _pruning(settings: Namespace) -> NuwaConfig:
    """The pruning config parsed settings hold (a fine-tune's is checked against the model before it trains)."""
    return NuwaConfig.from_dict(settings.model.pruning.as_dict())


def _grid(model) -> tuple[int, int]:
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    return side, side


def _depth(model) -> int:
    return model.config.text_config.num_hidden_layers


def run_demo(
    recipe: str = "recipes/default.yaml",
    out: str = "outputs/demo",
    test_images: int = 250,
    max_steps: int | None = None,
    batch_size: int = 64,
    methods: tuple[str, ...] = tuple(f.method for f in FINE_TUNES),
) -> dict:
    from ..data.records import SyntheticRecords
    from ..lightning.cli import parse_recipe
    from ..logs import print_text, report_console
    from ..models import load_vlm

    unknown = sorted(set(methods) - {f.method for f in FINE_TUNES})
    if unknown or "nuwa" not in methods:
        raise UsageError(
            f"--methods {','.join(methods)} must include nuwa (the exported model) and name only "
            f"{', '.join(f.method for f in FINE_TUNES)}"
        )
    console, start = report_console(), time.perf_counter()
    recipe_path, out_dir = Path(recipe), Path(out)
    recipe_settings = parse_recipe(recipe_path)  # the one read: the base, the training-free row, every fine-tune
    base = Path(recipe_settings.model.model_path)
    if not (base / "config.json").is_file():
        raise ModelPathError(
            f"no base model at {base}; train it with `nuwa-train pretrain-base "
            f"recipes/tiny_base.yaml` (about 4 hours on 2 CPU cores)"
        )
    # The recipe's pruning settings (budget, stage-2 layer, ...) serve the training-free row too, so the
    # rows differ only in whether the model was fine-tuned.
    nuwa = replace(_pruning(recipe_settings), method="nuwa")
    budget = nuwa.budget
    model, processor = load_vlm(str(base))
    model.eval()
    dataset = SyntheticRecords(synthetic_config_for(str(base)), "test", test_images)
    records = [dataset[i] for i in range(len(dataset))]

    console.rule(f"1/3  the base model on {len(records)} test records")
    full = evaluate(model, processor, records, batch_size=batch_size, description="full tokens")
    free = evaluate(
        model, processor, records, pruning=nuwa, batch_size=batch_size, description=f"Nüwa, training-free @ {budget}"
    )
    rows = [Row("full tokens", None, full, full), Row("Nüwa, training-free", budget, free, full)]

    console.rule("2/3  pruning-aware LoRA fine-tuning")
    curves, fine_tuned = {}, {}
    for fine_tune in (f for f in FINE_TUNES if f.method in methods):
        label, method = fine_tune.label, fine_tune.method
        extra = "".join(f", {key}={value}" for key, value in fine_tune.pruning.items())
        console.print(f"[bold]{label}[/bold]: method={method}, training selection={fine_tune.mode}{extra}")
        settings = fine_tune_settings(recipe_settings, fine_tune, out_dir / "runs" / method, max_steps)
        try:
            _pruning(settings).plan(_grid(model), _depth(model))
        except NuwaConfigError as error:  # e.g. FastV on an LLM too shallow for this budget
            console.print(f"skipped: {error}")
            rows.append(Row(label, budget, None, full, note=str(error)))
            continue
        module, metrics_csv = _fine_tune(settings, console)
        curves[label] = metrics_csv
        module.eval()
        result = evaluate(
            module.base_model, processor, records, pruning=module.pruning, batch_size=batch_size, description=label
        )
        rows.append(Row(label, budget, result, full))
        fine_tuned[method] = module

    console.rule("3/3  export, table and pictures")
    export_dir = export_module(fine_tuned["nuwa"], out_dir / "export", merge=True)
    table = [row.as_dict() for row in rows]
    grid_height, grid_width = nuwa.reference_grid  # the budget's grid (LLaVA-1.5's 24x24 unless the recipe says)
    title = (
        f"Main job: {base} on {len(records)} test records, budget {budget} "
        f"(of {grid_height * grid_width} on the {grid_height}x{grid_width} reference grid)"
    )
    text = write_table(
        table,
        out_dir,
        "results",
        title,
        {"recipe": str(recipe_path), "test_records": len(records), "minutes": (time.perf_counter() - start) / 60},
    )
    write_model_card(export_dir, evaluation=text)  # the export's README.md carries the table it was measured in
    curves_png = plot_training_curves(curves, out_dir / "training_curves.png")
    exported = load_pruned(export_dir)
    detach_nuwa(exported)
    overlay_png = overlay(model, processor, records, [("Nüwa, training-free", nuwa)], out_dir / "kept_tokens_base.png")
    overlay_ft_png = overlay(
        exported, processor, records, [("Nüwa, fine-tuned", nuwa)], out_dir / "kept_tokens_fine_tuned.png"
    )
    print_text(console, text)
    for path in (out_dir / "results.md", out_dir / "results.json", curves_png, overlay_png, overlay_ft_png, export_dir):
        console.print(f"wrote {path}")
    console.print(f"load the adapted model with: nuwa_train.load_pruned({str(export_dir)!r})")
    return {"rows": table}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    demo = add_command(subparsers, NAME, SUMMARY)
    demo.add_argument("--recipe", default="recipes/default.yaml", help="the fine-tuning recipe every row trains with")
    demo.add_argument("--out", default="outputs/demo", help="directory for the runs, exports and the report")
    demo.add_argument("--test-images", type=positive_int, default=250, help="synthetic test images (two records each)")
    demo.add_argument(
        "--max-steps", type=positive_int, help="override the recipe's trainer.max_steps (default: the recipe's)"
    )
    demo.add_argument(
        "--methods",
        type=names,
        help="fine-tuned rows, comma-separated (default: nuwa,visionzip,fastv); nuwa is always needed",
    )
    demo.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    chosen = {"methods": tuple(args.methods)} if args.methods else {}
    run_demo(args.recipe, args.out, args.test_images, args.max_steps, **chosen)
