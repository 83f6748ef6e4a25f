"""`nuwa-train eval`: one pruner, or the comparison table of every pruner at several budgets.

Every row is measured with the hard path and `generate` on every record of the user's files (or of a
synthetic split); retention is relative to a reference model with all vision tokens (an export's base
model, or the model itself). The table is printed and written as JSON and Markdown, next to the
per-record predictions and a PNG of the kept tokens of each pruner on a few images.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..errors import UsageError
from ..evaluation import EvalResult, evaluate, question_collator
from ..export import (
    NUWA_CONFIG_NAME,
    is_adapter_export,
    load_exported_model,
    read_nuwa_config,
    recorded_base_model,
    untrained_budget_note,
)
from ..io import write_atomically
from ..models import adapter_for, attach_nuwa
from ..models.families import family_of
from ..models.loading import ModelPathError
from ..pruning import SELECTORS, NuwaConfig, NuwaConfigError
from ..pruning.within_budget import fastv_within_budget
from ..viz import kept_tokens, plot_kept_tokens
from .arguments import add_command, int_list, positive_int

# (row label, method): the training-free table, every registered selector in the registry's display order.
NAME = "eval"
SUMMARY = "VQA / grounding with a pruner (hard path, generate), or the comparison table of all pruners (--compare)"
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
        return {
            "method": self.label,
            "budget": self.budget,
            "note": self.note,
            "vision_tokens": None if r is None else r.average_vision_tokens,
            "vqa_em": None if r is None else r.vqa_exact_match,
            "grounding_acc50": None if r is None else r.grounding_acc50,
            "grounding_miou": None if r is None else r.grounding_miou,
            "vqa_retention": None if r is None else retention(r.vqa_exact_match, self.reference.vqa_exact_match),
            "grounding_retention": None if r is None else retention(r.grounding_acc50, self.reference.grounding_acc50),
            "num_vqa": None if r is None else r.num_vqa,
            "num_grounding": None if r is None else r.num_grounding,
            "unparseable": None if r is None else r.unparseable,
        }


def table_header(title: str) -> str:
    """The title and column lines of the results table (printed once, before its rows arrive)."""
    return (
        f"## {title}\n\n| method | budget | vision tokens / layer | VQA EM | grounding Acc@0.5 | grounding mIoU "
        "| VQA retention | grounding retention | note |\n|---|---|---|---|---|---|---|---|---|"
    )


def table_row(row: dict) -> str:
    """One line of the results table (a `Row.as_dict()`)."""

    def cell(value, kind="{:.3f}"):
        return "-" if value is None else kind.format(value)

    return (
        f"| {row['method']} | {row['budget'] or 'all'} | {cell(row['vision_tokens'], '{:.1f}')} | "
        f"{cell(row['vqa_em'])} | {cell(row['grounding_acc50'])} | {cell(row['grounding_miou'])} | "
        f"{cell(row['vqa_retention'], '{:.1%}')} | {cell(row['grounding_retention'], '{:.1%}')} | "
        f"{row['note']} |"
    )


def markdown_table(rows: list[dict], title: str) -> str:
    return "\n".join([table_header(title), *map(table_row, rows)]) + "\n"


def write_table(rows: list[dict], out_dir: Path, name: str, title: str, extra: dict | None = None) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown_table(rows, title)
    (out_dir / f"{name}.md").write_text(text)
    (out_dir / f"{name}.json").write_text(json.dumps({"rows": rows, **(extra or {})}, indent=2))
    return text


def overlay(model, processor, records: list[dict], configs: list[tuple[str, NuwaConfig]], path: Path) -> Path:
    """Kept tokens of each pruner on the first few records' images (hard path, one image at a time)."""
    collator = question_collator(model, processor)  # the questions evaluation asks
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


EVAL_FORMATS = ("llava", "refcoco", "sharegpt")  # `--data FORMAT=PATH`: the data module's file keys
PREDICTIONS_NAME = "predictions.jsonl"


def parse_data_sources(values: list[str]) -> dict[str, list[str]]:
    """`--data FORMAT=PATH` (repeatable) -> {format: [paths]}; a bad entry is an error naming it."""
    sources: dict[str, list[str]] = {}
    for value in values:
        kind, separator, path = value.partition("=")
        if not separator or kind not in EVAL_FORMATS or not path:
            raise UsageError(f"--data {value!r} must be FORMAT=PATH with FORMAT one of {', '.join(EVAL_FORMATS)}")
        sources.setdefault(kind, []).append(path)
    return sources


def _evaluation_records(
    model_path: str,
    image_side: int | None,
    split: str,
    images: int,
    data: dict[str, list[str]] | None,
    limit: int | None,
) -> tuple[list[dict], str]:
    """Every record of the user's files (or of a synthetic split), up to `limit`, and what they are.

    `image_side`: the largest short side the model's processor uses (bigger images are decoded reduced)."""
    from ..data.records import FileRecords, SyntheticRecords

    if data:
        dataset = FileRecords(
            data.get("llava", []),
            data.get("refcoco", []),
            "raise",
            min_image_side=image_side,
            sharegpt_files=data.get("sharegpt", []),
        )
        described = ", ".join(f"{kind}={path}" for kind, paths in data.items() for path in paths)
    else:
        dataset = SyntheticRecords(synthetic_config_for(model_path), split, images)
        described = f"{split} split"
    count = len(dataset) if limit is None else min(limit, len(dataset))
    return [dataset[i] for i in range(count)], described


def write_predictions(path: Path, results: dict[str, EvalResult]) -> Path:
    """One JSON line per scored record and setting: what was asked for, what the model said, whether it scored."""
    lines = [
        json.dumps({"setting": label, **prediction})
        for label, result in results.items()
        for prediction in result.to_dict(with_predictions=True)["predictions"]
    ]
    return write_atomically(path, lambda staging: staging.write_text("\n".join(lines) + "\n", encoding="utf-8"))


@dataclass(frozen=True)
class Setting:
    """One pruned row of an evaluation: its label, the exact configuration that runs, and where it came from."""

    label: str
    config: NuwaConfig
    source: str = ""
    warning: str = ""  # e.g. a budget the model was not fine-tuned at
    adjusted: str = ""  # a setting changed so that the budget can be met (`fastv_within_budget`)

    @property
    def note(self) -> str:
        ran = [self.source] if self.source else []
        if self.config.method == "nuwa":
            ran.append(f"stage 2 at layer {self.config.stage2_layer}")
        return "; ".join(ran + [text for text in (self.adjusted, self.warning) if text])


def within_budget(setting: Setting, model) -> Setting:
    """`setting` as it can run on `model` (FastV's layer moved earlier when its own cannot meet the budget)."""
    adapter = adapter_for(model)
    try:
        config, adjusted = fastv_within_budget(
            setting.config, adapter.grid or setting.config.reference_grid, len(adapter.decoder_layers)
        )
    except NuwaConfigError:  # no layer can: its row says why
        return setting
    return replace(setting, config=config, adjusted=adjusted) if adjusted else setting


def evaluation_settings(
    trained: NuwaConfig | None,
    source: str,
    method: str | None,
    budgets: list[int] | None,
    compare: bool,
    compare_budgets: tuple[int, ...],
) -> list[Setting]:
    """The pruned rows to run. `trained`: the settings the model was fine-tuned with (an export's nuwa_config.json
    or a recipe's model.pruning) supply every knob the flags do not; `budgets`: one row per budget (default: the
    trained or default budget); compare runs every pruner at every `compare_budgets`."""
    base = trained or NuwaConfig()
    source = source if trained is not None else ""
    if compare:
        return [
            Setting(label, replace(base, method=name, budget=budget), source)
            for budget in compare_budgets
            for label, name in TRAINING_FREE
        ]
    config = replace(base, method=method) if method else base
    if config.method == "none":
        return []
    flags = [name for name, value in (("method", method), ("budget", budgets)) if value]
    if trained is not None and flags:
        source += f", {', '.join(flags)} from the flags"
    return [Setting(config.method, replace(config, budget=budget), source) for budget in budgets or [config.budget]]


def trained_settings(model: str) -> tuple[str, NuwaConfig | None, str]:
    """(model directory, the pruning it was trained with or None, where that was read): `model` is an export
    (its nuwa_config.json), a fine-tuning recipe (its model.model_path and model.pruning) or a plain model."""
    if model.endswith((".yaml", ".yml")):
        import yaml

        if not Path(model).is_file():
            raise UsageError(
                f"recipe {model} does not exist (--model takes a model directory, an export or a fine-tuning recipe)"
            )
        try:
            recipe = yaml.safe_load(Path(model).read_text()) or {}
        except yaml.YAMLError as error:
            raise UsageError(f"recipe {model} is not valid YAML: {error}") from None
        section = recipe.get("model") if isinstance(recipe, dict) else None
        if not isinstance(section, dict) or "model_path" not in section:
            raise UsageError(f"recipe {model} has no model.model_path")
        try:
            pruning = NuwaConfig.from_dict(section.get("pruning") or {})
        except NuwaConfigError as error:
            raise NuwaConfigError(f"recipe {model}, model.pruning: {error}") from None
        return resolve_model_path(section["model_path"]), pruning, f"model.pruning of {model}"
    path = resolve_model_path(model)
    return path, read_nuwa_config(path), f"{NUWA_CONFIG_NAME} of the export"


def _reference(model_path: str, reference: str | None) -> tuple[str | None, str]:
    """The model whose full-token scores retention is measured against (None: the evaluated model itself)."""
    chosen = reference or recorded_base_model(model_path)
    if chosen is None:
        return None, "the model itself, all tokens"
    if reference is None and not _is_model_dir(chosen):
        return None, f"the model itself, all tokens (its recorded base model {chosen} is not on this machine)"
    chosen = resolve_model_path(chosen)
    if Path(chosen).resolve() == Path(model_path).resolve():
        return None, "the model itself, all tokens"
    return chosen, f"{chosen}, all tokens"


RESULTS_NAME = "results"  # OUT/results.json, OUT/results.md
OVERLAY_NAME = "kept_tokens.png"


def run_eval(
    model: str,
    out_dir: Path,
    *,
    method: str | None = None,
    budget: list[int] | None = None,
    compare: bool = False,
    budgets: tuple[int, ...] = PAPER_BUDGETS,
    reference: str | None = None,
    data: dict[str, list[str]] | None = None,
    split: str = "test",
    images: int = 250,
    limit: int | None = None,
    batch_size: int = 64,
) -> dict:
    """Score the model with all tokens and with each pruned setting; retention is against `reference` (default:
    an export's recorded base model, else the model itself). Writes results.json / results.md,
    predictions.jsonl and the kept-token overlay to `out_dir`."""
    from ..logs import print_text, report_console
    from ..models.loading import load_processor

    console = report_console()
    model_path, trained, source = trained_settings(model)
    settings = [
        replace(setting, warning=untrained_budget_note(model_path, setting.config.budget))
        for setting in evaluation_settings(trained, source, method, budget, compare, tuple(budgets))
    ]
    vlm, processor = load_exported_model(model_path), load_processor(model_path)
    vlm.eval()
    settings = [within_budget(setting, vlm) for setting in settings]
    image_side = family_of(vlm).image_side(processor)
    records, described = _evaluation_records(model_path, image_side, split, images, data, limit)
    reference_path, reference_label = _reference(model_path, reference)
    title = f"{model_path}: {described}, {len(records)} records; retention vs {reference_label}"
    print_text(console, table_header(title))  # then each row as it is scored (progress bars go to stderr)
    own = evaluate(vlm, processor, records, pruning=None, batch_size=batch_size, description="full tokens")
    scored = {"full tokens": own}
    rows = [Row("full tokens", None, own, own)]
    if reference_path is not None:
        base, base_processor = load_exported_model(reference_path), load_processor(reference_path)
        full = evaluate(
            base.eval(),
            base_processor,
            records,
            pruning=None,
            batch_size=batch_size,
            description="reference, full tokens",
        )
        del base
        scored["reference, full tokens"] = full
        rows = [
            Row("reference, full tokens", None, full, full, note=reference_path),
            Row("full tokens", None, own, full),
        ]
    for row in rows:
        print_text(console, table_row(row.as_dict()))
    for setting in settings:
        name = f"{setting.label} @ {setting.config.budget}"
        try:
            result = evaluate(vlm, processor, records, pruning=setting.config, batch_size=batch_size, description=name)
        except NuwaConfigError as error:  # a budget this method cannot meet: noted, no scores
            rows.append(Row(setting.label, setting.config.budget, None, rows[0].reference, note=str(error)))
        else:
            scored[name] = result
            rows.append(Row(setting.label, setting.config.budget, result, rows[0].reference, note=setting.note))
        print_text(console, table_row(rows[-1].as_dict()))
    table = [row.as_dict() for row in rows]
    write_predictions(out_dir / PREDICTIONS_NAME, scored)
    write_table(
        table,
        out_dir,
        RESULTS_NAME,
        title,
        {"model": model_path, "reference": reference_label, "data": described, "records": len(records)},
    )
    shown = [
        setting for setting in settings if setting.config.budget == (budgets[0] if compare else setting.config.budget)
    ]
    configs = [("full tokens", NuwaConfig(method="none"))] + [
        (f"{s.label} @ {s.config.budget}", s.config) for s in shown
    ]
    picture = overlay(vlm, processor, records, configs, out_dir / OVERLAY_NAME)
    print_text(
        console,
        f"\nwrote {out_dir / (RESULTS_NAME + '.md')}, {out_dir / (RESULTS_NAME + '.json')}, "
        f"{out_dir / PREDICTIONS_NAME}, {picture}",
    )
    return {"rows": table}


def _is_model_dir(path: str) -> bool:
    """A HF model directory (config.json) or an adapter-only export (adapter_config.json, loaded onto its base)."""
    return (Path(path) / "config.json").is_file() or is_adapter_export(path)


def resolve_model_path(model: str) -> str:
    """`model` if it is a HF model directory or an export, else an error saying what `--model` accepts."""
    if not Path(model).exists():
        raise ModelPathError(
            f"model {model!r} does not exist (tried {Path(model).resolve()}); pass a HF model "
            f"directory, an export or a fine-tuning recipe (.yaml): nuwa-train never downloads"
        )
    if not _is_model_dir(model):
        raise ModelPathError(
            f"{model} is neither a HF model directory (no config.json), an adapter-only export "
            f"(no adapter_config.json) nor a recipe (.yaml)"
        )
    return model


def synthetic_config_for(model_path: str):
    """The synthetic data a model was trained on, if its directory says so (the shipped base does)."""
    from ..data.synthetic import SyntheticConfig
    from ..lightning.data import as_synthetic_config

    recipe = Path(model_path) / "recipe.yaml"
    if recipe.is_file():
        import yaml

        settings = yaml.safe_load(recipe.read_text()).get("eval_data") or {}
        return as_synthetic_config(settings)
    return SyntheticConfig()


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..pruning.selectors import METHODS

    evaluate = add_command(subparsers, NAME, SUMMARY)
    evaluate.add_argument(
        "--model",
        default="data/tiny_base",
        help="a HF model directory, an export (merged or adapter-only: runs its nuwa_config.json), "
        "or a fine-tuning recipe (.yaml: its model.model_path with its model.pruning)",
    )
    evaluate.add_argument(
        "--reference",
        metavar="MODEL",
        help="model whose full-token scores retention is measured against (default: an export's "
        "recorded base model, else the model itself)",
    )
    evaluate.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="FORMAT=PATH",
        help="score your files instead of the synthetic split (repeatable; FORMAT: llava, refcoco, "
        "sharegpt; PATH: a JSON / JSONL file or a save_to_disk folder); every record is scored "
        "(default: the synthetic --split)",
    )
    evaluate.add_argument("--limit", type=positive_int, help="score only the first N records (default: all)")
    evaluate.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test"],
        help="synthetic split scored when no --data is given",
    )
    evaluate.add_argument("--images", type=positive_int, default=250, help="synthetic images (two records each)")
    defaults = NuwaConfig()
    evaluate.add_argument(
        "--method",
        choices=METHODS,
        help=f"pruner: {', '.join(METHODS)} (default: the export's or recipe's, else {defaults.method})",
    )
    evaluate.add_argument(
        "--budget",
        type=int_list,
        help=f"average tokens per image on the 24x24 grid, or several "
        f"(comma-separated: one row each; default: the export's or "
        f"recipe's, else {defaults.budget})",
    )
    evaluate.add_argument("--compare", action="store_true", help="every pruner at every --budgets")
    evaluate.add_argument(
        "--budgets", type=int_list, default=list(PAPER_BUDGETS), help="budgets of --compare (comma-separated)"
    )
    evaluate.add_argument("--batch-size", type=positive_int, default=64, help="records generated per batch")
    evaluate.add_argument(
        "--out",
        default="outputs/eval",
        help="directory for results.json, results.md, predictions.jsonl, kept_tokens.png",
    )
    evaluate.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    """The handler: looks `run_eval` up when called, so that a test may replace it."""
    run_eval(
        args.model,
        Path(args.out),
        method=args.method,
        budget=args.budget,
        compare=args.compare,
        budgets=tuple(args.budgets),
        reference=args.reference,
        data=parse_data_sources(args.data),
        split=args.split,
        images=args.images,
        limit=args.limit,
        batch_size=args.batch_size,
    )
