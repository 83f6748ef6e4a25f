"""`nuwa-train demo`, the README's main job: pruning-aware fine-tuning on the shipped tiny base.

1. Evaluate the base with all tokens and with training-free Nüwa at the recipe's budget (~11%).
2. Fine-tune LoRA with pruning in the loop: Nüwa (soft selection), and for a fair comparison the same
   recipe with the VisionZip-like (hard, not differentiable) and FastV (soft stage 2) selectors.
3. Evaluate each with the hard path, export the Nüwa model (merged, `load_pruned`-ready), and write
   the table (Markdown + JSON), the training curves and the kept-token overlay (PNG).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import yaml

from .compare import Row, overlay, synthetic_config_for, write_table
from .evaluation import evaluate
from .export import export_module, load_pruned
from .io import write_atomically
from .models import detach_nuwa
from .pruning import NuwaConfig, NuwaConfigError
from .viz import plot_training_curves

# (row label, method, training selection mode, extra pruning settings)
FINE_TUNES = (("Nüwa, fine-tuned", "nuwa", "soft", {}),
              ("VisionZip-like, fine-tuned", "visionzip", "hard", {}),
              ("FastV, fine-tuned", "fastv", "soft", {"fastv_layer": 1}))
CHECKPOINT_EVERY = 25  # steps between `last.ckpt` writes of each fine-tune
RUN_SETTINGS_NAME = "run_settings.yaml"  # a fine-tune's resolved settings, checked before resuming it


def _fine_tune(recipe: Path, run_dir: Path, method: str, mode: str, extra: dict, max_steps: int | None,
               console):
    """Fit one recipe variant; its logs and checkpoints go under `run_dir`."""
    from .lightning import NuwaDataModule, NuwaFineTuner
    from .lightning.cli import NuwaCLI

    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(run_dir), "name": "csv", "version": 0}}]
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(run_dir / "checkpoints"), "save_last": True, "save_top_k": 0,
                                "every_n_train_steps": CHECKPOINT_EVERY}}]
    args = ["--config", str(recipe), "--model.pruning.method", method, "--model.selection.mode", mode,
            "--trainer.default_root_dir", str(run_dir), "--trainer.logger", json.dumps(loggers),
            "--trainer.callbacks", json.dumps(callbacks)]
    for key, value in extra.items():
        args += [f"--model.pruning.{key}", str(value)]
    if max_steps is not None:  # a shorter run anneals over the same share of its steps as the recipe
        recipe_settings = yaml.safe_load(recipe.read_text())
        share = recipe_settings["model"]["selection"]["anneal_steps"] / recipe_settings["trainer"]["max_steps"]
        log_every = min(recipe_settings["trainer"].get("log_every_n_steps", 50), max_steps)  # a short run logs too
        args += ["--trainer.max_steps", str(max_steps), "--model.selection.anneal_steps",
                 str(max(1, round(share * max_steps))), "--trainer.log_every_n_steps", str(log_every)]
    cli = NuwaCLI(NuwaFineTuner, NuwaDataModule, args=args, run=False, save_config_kwargs={"overwrite": True})
    last = _resumable_checkpoint(run_dir, cli.parser.dump(cli.config, skip_none=False), console)
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path=str(last) if last is not None else None)
    return cli.model, run_dir / "csv" / "version_0" / "metrics.csv"


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


def _grid(model) -> tuple[int, int]:
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    return side, side


def _depth(model) -> int:
    return model.config.text_config.num_hidden_layers


def run_demo(recipe: str = "recipes/default.yaml", out: str = "outputs/demo", test_images: int = 250,
             max_steps: int | None = None, batch_size: int = 64) -> dict:
    from rich.console import Console

    from .data.records import SyntheticRecords
    from .models import load_vlm

    console, start = Console(), time.perf_counter()
    recipe, out_dir = Path(recipe), Path(out)
    settings = yaml.safe_load(recipe.read_text())
    base = Path(settings["model"]["model_path"])
    if not (base / "config.json").is_file():
        raise SystemExit(f"nuwa-train demo: no base model at {base}; train it with "
                         f"`nuwa-train pretrain-base recipes/tiny_base.yaml` (about 4 hours on 2 CPU cores)")
    # The recipe's pruning settings (budget, stage-2 layer, ...) serve the training-free row too, so the
    # rows differ only in whether the model was fine-tuned.
    nuwa = replace(NuwaConfig.from_dict(settings["model"].get("pruning", {})), method="nuwa")
    budget = nuwa.budget
    model, processor = load_vlm(str(base))
    model.eval()
    dataset = SyntheticRecords(synthetic_config_for(str(base)), "test", test_images)
    records = [dataset[i] for i in range(len(dataset))]

    console.rule(f"1/3  the base model on {len(records)} test records")
    full = evaluate(model, processor, records, batch_size=batch_size, description="full tokens")
    free = evaluate(model, processor, records, pruning=nuwa, batch_size=batch_size,
                    description=f"Nüwa, training-free @ {budget}")
    rows = [Row("full tokens", None, full, full), Row("Nüwa, training-free", budget, free, full)]

    console.rule("2/3  pruning-aware LoRA fine-tuning")
    curves, fine_tuned = {}, {}
    for label, method, mode, extra in FINE_TUNES:
        console.print(f"[bold]{label}[/bold]: method={method}, training selection={mode}")
        try:
            replace(nuwa, method=method, **extra).plan(_grid(model), _depth(model))
        except NuwaConfigError as error:  # e.g. FastV on an LLM too shallow for this budget
            console.print(f"skipped: {error}")
            rows.append(Row(label, budget, None, full, note=str(error)))
            continue
        module, metrics_csv = _fine_tune(recipe, out_dir / "runs" / method, method, mode, extra, max_steps,
                                         console)
        curves[label] = metrics_csv
        module.eval()
        result = evaluate(module.base_model, processor, records, pruning=module.pruning, batch_size=batch_size,
                          description=label)
        rows.append(Row(label, budget, result, full))
        fine_tuned[method] = module

    console.rule("3/3  export, table and pictures")
    export_dir = export_module(fine_tuned["nuwa"], out_dir / "export", merge=True)
    table = [row.as_dict() for row in rows]
    title = f"Main job: {base} on {len(records)} test records, budget {budget} (of 576 on LLaVA-1.5's grid)"
    text = write_table(table, out_dir, "results", title, {"recipe": str(recipe), "test_records": len(records),
                                                           "minutes": (time.perf_counter() - start) / 60})
    curves_png = plot_training_curves(curves, out_dir / "training_curves.png")
    exported = load_pruned(export_dir)
    detach_nuwa(exported)
    overlay_png = overlay(model, processor, records, [("Nüwa, training-free", nuwa)],
                          out_dir / "kept_tokens_base.png")
    overlay_ft_png = overlay(exported, processor, records, [("Nüwa, fine-tuned", nuwa)],
                             out_dir / "kept_tokens_fine_tuned.png")
    console.print(text)
    for path in (out_dir / "results.md", out_dir / "results.json", curves_png, overlay_png, overlay_ft_png,
                 export_dir):
        console.print(f"wrote {path}")
    console.print(f"load the adapted model with: nuwa_train.load_pruned({str(export_dir)!r})")
    return {"rows": table}
