"""`nuwa-train eval`: one pruner, or the comparison table of every pruner at several budgets.

Every row is measured with the hard path and `generate`; retention is relative to the same model with
all vision tokens. The table is printed and written as JSON and Markdown, with a PNG of the kept
tokens of each pruner on a few test images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .evaluation import EvalResult, evaluate
from .export import NUWA_CONFIG_NAME, read_nuwa_config
from .io import write_atomically
from .models import attach_nuwa
from .pruning import SELECTORS, NuwaConfig, NuwaConfigError
from .viz import kept_tokens, plot_kept_tokens

# (row label, method): the training-free table, every registered selector in the registry's display order.
TRAINING_FREE = tuple((selector.label, name) for name, selector in SELECTORS.items() if name != "none")
PAPER_BUDGETS = (64, 128, 192)  # of 576 on LLaVA-1.5: about 11%, 22% and 33% of the vision tokens
OVERLAY_IMAGES = 4


@dataclass
class Row:
    label: str
    budget: int | None
    result: EvalResult | None
    reference: EvalResult
    note: str = ""

    def as_dict(self) -> dict:
        def retention(value, full):
            return None if value is None or not full else value / full

        r = self.result
        return {"method": self.label, "budget": self.budget, "note": self.note,
                "vision_tokens": None if r is None else r.average_vision_tokens,
                "vqa_em": None if r is None else r.vqa_exact_match,
                "grounding_acc50": None if r is None else r.grounding_acc50,
                "grounding_miou": None if r is None else r.grounding_miou,
                "vqa_retention": None if r is None else retention(r.vqa_exact_match, self.reference.vqa_exact_match),
                "grounding_retention": None if r is None else retention(r.grounding_acc50,
                                                                        self.reference.grounding_acc50),
                "num_vqa": None if r is None else r.num_vqa, "num_grounding": None if r is None else r.num_grounding,
                "unparseable": None if r is None else r.unparseable}


def markdown_table(rows: list[dict], title: str) -> str:
    def cell(value, kind="{:.3f}"):
        return "-" if value is None else kind.format(value)

    lines = [f"## {title}", "", "| method | budget | vision tokens / layer | VQA EM | grounding Acc@0.5 | grounding mIoU "
             "| VQA retention | grounding retention | note |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['budget'] or 'all'} | {cell(row['vision_tokens'], '{:.1f}')} | "
                     f"{cell(row['vqa_em'])} | {cell(row['grounding_acc50'])} | {cell(row['grounding_miou'])} | "
                     f"{cell(row['vqa_retention'], '{:.1%}')} | {cell(row['grounding_retention'], '{:.1%}')} | "
                     f"{row['note']} |")
    return "\n".join(lines) + "\n"


def write_table(rows: list[dict], out_dir: Path, name: str, title: str, extra: dict | None = None) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown_table(rows, title)
    (out_dir / f"{name}.md").write_text(text)
    (out_dir / f"{name}.json").write_text(json.dumps({"rows": rows, **(extra or {})}, indent=2))
    return text


def overlay(model, processor, records: list[dict], configs: list[tuple[str, NuwaConfig]], path: Path) -> Path:
    """Kept tokens of each pruner on the first few records' images (hard path, one image at a time)."""
    from .data.collate import VisionLanguageCollator
    from .data.synthetic import SyntheticConfig
    from .models.families import base_model, box_format_for

    codec = box_format_for(base_model(model).config.model_type, processor.tokenizer,
                           loc_prompt_template=SyntheticConfig.grounding_template)  # the question evaluation asks
    collator = VisionLanguageCollator(processor, padding_side="left", with_answer=False, box_format=codec)
    grounding = [r for r in records if r.get("task") == "grounding"]  # one per image; spatial questions
    picked = (grounding or records)[:OVERLAY_IMAGES]
    rows, grid = [], None
    for label, config in configs:
        try:
            handle = attach_nuwa(model, config)
        except NuwaConfigError:  # a budget this method cannot meet: no row, as in the table
            continue
        grid = handle.adapter.grid
        with handle, torch.no_grad():
            kept = []
            for record in picked:
                model(**collator([record]))
                kept.append(kept_tokens(handle))
            rows.append((label, kept))
    return plot_kept_tokens([r["image"] for r in picked], rows, grid, path)


def compare_training_free(model, processor, records: list[dict], budgets=PAPER_BUDGETS, methods=TRAINING_FREE,
                          batch_size: int = 64, console=None) -> list[dict]:
    """Full tokens, then every training-free pruner at every budget (a budget a method cannot meet is noted)."""
    reference = evaluate(model, processor, records, pruning=None, batch_size=batch_size, description="full tokens")
    rows = [Row("full tokens", None, reference, reference).as_dict()]
    for budget in budgets:
        for label, method in methods:
            config = NuwaConfig(method=method, budget=budget)
            try:
                result = evaluate(model, processor, records, pruning=config, batch_size=batch_size,
                                  description=f"{label} @ {budget}")
                rows.append(Row(label, budget, result, reference).as_dict())
            except NuwaConfigError as error:
                rows.append(Row(label, budget, None, reference, note=str(error)).as_dict())
        if console is not None:
            console.print(markdown_table(rows, "so far"))
    return rows


EVAL_FORMATS = ("llava", "refcoco", "sharegpt")  # `--data FORMAT=PATH`: the data module's file keys
PREDICTIONS_NAME = "predictions.jsonl"


def parse_data_sources(values: list[str]) -> dict[str, list[str]]:
    """`--data FORMAT=PATH` (repeatable) -> {format: [paths]}; a bad entry is an error naming it."""
    sources: dict[str, list[str]] = {}
    for value in values:
        kind, separator, path = value.partition("=")
        if not separator or kind not in EVAL_FORMATS or not path:
            raise SystemExit(f"nuwa-train eval: --data {value!r} must be FORMAT=PATH with FORMAT one of "
                             f"{', '.join(EVAL_FORMATS)}")
        sources.setdefault(kind, []).append(path)
    return sources


def _evaluation_records(model_path: str, processor, split: str, images: int, data: dict[str, list[str]] | None,
                        limit: int | None) -> tuple[list[dict], str]:
    """Every record of the user's files (or of a synthetic split), up to `limit`, and what they are."""
    from .data.collate import needed_image_side
    from .data.records import FileRecords, SyntheticRecords

    if data:
        dataset = FileRecords(data.get("llava", []), data.get("refcoco", []), "raise",
                              min_image_side=needed_image_side(processor), sharegpt_files=data.get("sharegpt", []))
        described = ", ".join(f"{kind}={path}" for kind, paths in data.items() for path in paths)
    else:
        dataset = SyntheticRecords(synthetic_config_for(model_path), split, images)
        described = f"{split} split"
    count = len(dataset) if limit is None else min(limit, len(dataset))
    return [dataset[i] for i in range(count)], described


def write_predictions(path: Path, results: dict[str, EvalResult]) -> Path:
    """One JSON line per scored record and setting: what was asked for, what the model said, whether it scored."""
    lines = [json.dumps({"setting": label, **prediction}) for label, result in results.items()
             for prediction in result.to_dict(with_predictions=True)["predictions"]]
    return write_atomically(path, lambda staging: staging.write_text("\n".join(lines) + "\n", encoding="utf-8"))


def run_eval(model_path: str, split: str, images: int, out_dir: Path, method: str | None, budget: int,
             budgets: tuple[int, ...], batch_size: int, data: dict[str, list[str]] | None = None,
             limit: int | None = None, overrides: dict | None = None) -> dict:
    """`overrides`: the pruning flags the user gave; an export's `nuwa_config.json` (the settings it was trained
    with) supplies the rest. Without `overrides`, `method` and `budget` are the whole setting."""
    from rich.console import Console

    from .models import load_vlm

    console = Console()
    model_path = resolve_model_path(model_path)
    model, processor = load_vlm(model_path)
    model.eval()
    records, described = _evaluation_records(model_path, processor, split, images, data, limit)
    if method is not None:
        reference = evaluate(model, processor, records, pruning=None, batch_size=batch_size,
                             description="full tokens")
        pruning, note = NuwaConfig(method=method, budget=budget), ""
        trained = read_nuwa_config(model_path) if overrides is not None else None
        if trained is not None:
            pruning = replace(trained, **overrides)
            method, budget = pruning.method, pruning.budget
            note = (f"{NUWA_CONFIG_NAME} of the export" + (f", {', '.join(overrides)} from the flags" if overrides
                                                           else "") + f"; stage 2 at layer {pruning.stage2_layer}")
        pruning = None if method == "none" else pruning
        result = reference if pruning is None else evaluate(model, processor, records, pruning=pruning,
                                                            batch_size=batch_size)
        rows = [Row("full tokens", None, reference, reference).as_dict()]
        scored = {"full tokens": reference}
        if pruning is not None:
            rows.append(Row(method, budget, result, reference, note=note).as_dict())
            scored[f"{method} @ {budget}"] = result
        write_predictions(out_dir / PREDICTIONS_NAME, scored)
        name, configs = f"eval_{method}_{budget}", [(method, pruning or NuwaConfig(method="none"))]
    else:
        rows = compare_training_free(model, processor, records, budgets, batch_size=batch_size, console=console)
        name = "compare"
        configs = [("full tokens", NuwaConfig(method="none"))] + [
            (f"{label} @ {budgets[0]}", NuwaConfig(method=m, budget=budgets[0])) for label, m in TRAINING_FREE]
    title = f"{model_path}: {described}, {len(records)} records"
    text = write_table(rows, out_dir, name, title, {"model": model_path, "data": described, "records": len(records)})
    picture = overlay(model, processor, records, configs, out_dir / f"{name}_kept_tokens.png")
    console.print(text)
    console.print(f"wrote {out_dir / (name + '.md')}, {out_dir / (name + '.json')}, {picture}")
    return {"rows": rows}


def resolve_model_path(model: str) -> str:
    """A model directory, or a fine-tuning recipe (its `model.model_path`)."""
    if model.endswith((".yaml", ".yml")):
        import yaml

        recipe = yaml.safe_load(Path(model).read_text())
        try:
            return recipe["model"]["model_path"]
        except (KeyError, TypeError):
            raise SystemExit(f"nuwa-train eval: recipe {model} has no model.model_path") from None
    if not (Path(model) / "config.json").is_file():
        raise SystemExit(f"nuwa-train eval: {model} is neither a HF model directory (no config.json) nor a recipe")
    return model


def synthetic_config_for(model_path: str):
    """The synthetic data a model was trained on, if its directory says so (the shipped base does)."""
    from .data.synthetic import SyntheticConfig
    from .lightning.data import as_synthetic_config

    recipe = Path(model_path) / "recipe.yaml"
    if recipe.is_file():
        import yaml

        settings = yaml.safe_load(recipe.read_text()).get("eval_data") or {}
        return as_synthetic_config(settings)
    return SyntheticConfig()
