"""Evaluate a VLM on VQA + grounding records with greedy `generate`, optionally with hard pruning.

`evaluate(model, processor, data, pruning=NuwaConfig(...))` attaches the pruner (tokens physically
dropped, original position ids), generates greedily on left-padded batches, detaches, and scores:
VQA exact match, grounding Acc@IoU>=0.5 and mean IoU (boxes parsed by the model's box format, data/boxes.py,
or with `tokens_to_box` when no format is known), accuracy per
question kind, unparseable grounding answers, and the average number of vision tokens per image that
each decoder layer sees (counted on the pruned sequences; all tokens without pruning).
"""

from __future__ import annotations

import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .data.boxes import BoxFormat
from .data.collate import VisionLanguageCollator, as_image
from .data.geometry import box_iou, iou, to_box01
from .data.schema import TEXT_TASK
from .data.synthetic import (
    RELATIONS,
    Record,
    SyntheticConfig,
    render,
    tokens_to_box,
)
from .pruning import NuwaConfig

IOU_THRESHOLD = 0.5
_RELATION_PHRASES = tuple(phrase for phrase, _, _ in RELATIONS.values())
_VQA_KINDS = (
    ("what colour", "colour"),
    ("what shape", "shape"),
    ("how many", "count"),
    ("is there", "existence"),
    ("what is", "spatial"),
)


def question_kind(task: str, prompt: str) -> str:
    """The question kind of a record from its text (for rows that do not carry it, e.g. loaded JSON)."""
    text = prompt.lower().strip()
    if task == "grounding":
        return "relational" if any(phrase in text for phrase in _RELATION_PHRASES) else "attribute"
    for start, kind in _VQA_KINDS:
        if text.startswith(start):
            return kind
    return "other"


def normalise_answer(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation: the exact-match comparison form."""
    return re.sub(r"\s+", " ", text.lower()).strip().rstrip(".?!").strip()


@dataclass
class Prediction:
    id: str
    task: str
    kind: str
    answer: str
    prediction: str
    correct: bool
    iou: float | None = None


@dataclass
class EvalResult:
    method: str
    budget: int | None
    num_vqa: int
    num_grounding: int
    vqa_exact_match: float | None
    grounding_acc50: float | None
    grounding_miou: float | None
    unparseable: int  # grounding answers that are not exactly one box
    per_kind: dict[str, float]  # kind -> accuracy (exact match for VQA, IoU>=0.5 for grounding)
    per_kind_count: dict[str, int]
    vision_tokens_total: int  # per image, unpruned
    average_vision_tokens: float  # per image, averaged over decoder layers
    seconds: float
    predictions: list[Prediction] = field(default_factory=list, repr=False)

    def to_dict(self, with_predictions: bool = False) -> dict:
        data = asdict(self)
        if not with_predictions:
            data.pop("predictions")
        return data


def _rows(data: object, synthetic_config: SyntheticConfig | None, limit: int | None) -> list[dict]:
    """Records of any supported kind as dicts with id, image, prompt, answer, task, box, kind."""
    rows = []
    for position, item in enumerate(data if isinstance(data, Iterable) else [data]):
        if limit is not None and len(rows) >= limit:
            break
        if isinstance(item, Record):
            config = synthetic_config or SyntheticConfig()
            rows.append(
                dict(
                    id=item.id,
                    image=render(item.scene, config),
                    prompt=item.prompt,
                    answer=item.answer,
                    task=item.task,
                    box=item.box,
                    kind=item.kind,
                    expression=item.expression,
                )
            )
            continue
        if not isinstance(item, Mapping):
            raise TypeError(f"record {position}: expected a Record or a mapping, got {type(item).__name__}")
        row = dict(item)
        if row.get("task") == TEXT_TASK:  # text-only records train; there is no image answer to score
            continue
        missing = [key for key in ("image", "prompt", "answer") if row.get(key) is None]
        if missing:
            raise ValueError(f"record {position} (id {row.get('id')!r}): missing field(s) {missing}")
        row.setdefault("id", str(position))
        if row.get("task") is None:
            row["task"] = "grounding" if tokens_to_box(row["answer"]) is not None else "vqa"
        if row["task"] == "grounding" and row.get("box") is None:
            row["box"] = tokens_to_box(row["answer"])
        if row.get("kind") is None:
            row["kind"] = question_kind(row["task"], row["prompt"])
        rows.append(row)
    return rows


def question_collator(
    model, processor, box_format: BoxFormat | None = None, synthetic_config: SyntheticConfig | None = None
) -> VisionLanguageCollator:
    """Left-padded questions without answers, grounding asked in `box_format` (default: the model's own)."""
    from .models.families import base_model, box_format_for

    if box_format is None:
        box_format = box_format_for(
            base_model(model).config.model_type,
            processor.tokenizer,
            loc_prompt_template=(synthetic_config or SyntheticConfig()).grounding_template,
        )
    return VisionLanguageCollator(processor, padding_side="left", with_answer=False, box_format=box_format)


def progress_bar(enabled: bool = True) -> Progress:
    """Evaluation's progress, on stderr: stdout holds the results (a table, an answer) that a pipe may read."""
    from rich.console import Console

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
        console=Console(stderr=True),
    )


@torch.no_grad()
def evaluate(
    model,
    processor,
    data,
    *,
    pruning: NuwaConfig | None = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    limit: int | None = None,
    synthetic_config: SyntheticConfig | None = None,
    coordinate_bins: int | None = None,
    progress: bool = True,
    description: str | None = None,
    box_format: BoxFormat | None = None,
) -> EvalResult:
    """Greedy-generate an answer for every record and score it (see the module docstring).

    data: a `datasets.Dataset` in the loaders' schema, mappings with image/prompt/answer (task/box
    optional), or synthetic `Record`s (rendered with `synthetic_config`). `limit` caps the records.
    `pruning`: the setting to evaluate; None evaluates what the model runs (all tokens, or the setting of
    an attached handle such as `load_pruned`'s). `NuwaConfig(method="none")` runs all tokens in any case.
    `box_format`: how grounding is asked and answered (default: the model's own, `box_format_for`).
    `max_new_tokens`: default, what an answer in that format needs (`BoxFormat.max_answer_tokens`).
    """
    from .models import (  # late import: models pull in the pruning stack
        adapter_for,
        attach_nuwa,
    )
    from .models.families import base_model

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bins = coordinate_bins or (synthetic_config or SyntheticConfig()).coordinate_bins
    rows = _rows(data, synthetic_config, limit)
    if not rows:
        raise ValueError("no records to evaluate")
    tokenizer = processor.tokenizer
    collator = question_collator(model, processor, box_format, synthetic_config)
    max_new_tokens = max_new_tokens or collator.box_format.max_answer_tokens
    image_token_id = adapter_for(model).image_token_id
    was_training = model.training
    model.eval()
    attached = getattr(base_model(model), "_nuwa", None)
    if attached is not None and not attached.active:  # inside `handle.paused()`: the model runs all tokens
        attached = None
    handle, setting = None, nullcontext()
    if pruning is not None and attached is not None:  # the model's own handle, switched for the evaluation
        handle, setting = attached, attached.using(pruning)
    elif pruning is not None:
        handle = attach_nuwa(model, pruning)
    elif attached is not None:  # e.g. a `load_pruned` model: evaluate and report what it runs
        handle, pruning = attached, attached.config
    predictions: list[Prediction] = []
    images_seen, unpruned_tokens, tokens_per_layer = 0, 0, 0.0
    start = time.perf_counter()
    name = description or f"eval {pruning.method if pruning else 'full'}"
    try:
        with setting, progress_bar(progress) as bar:
            task = bar.add_task(name, total=len(rows))
            for first in range(0, len(rows), batch_size):
                chunk = rows[first : first + batch_size]
                batch = collator(chunk)
                texts = generate_answers(model, tokenizer, batch, max_new_tokens)
                unpruned = int((batch["input_ids"] == image_token_id).sum())
                unpruned_tokens += unpruned
                images_seen += len(chunk)
                tokens_per_layer += handle.vision_tokens_per_layer().mean().item() if handle is not None else unpruned
                for row, text in zip(chunk, texts):
                    predictions.append(_score(row, text, bins, collator))
                bar.advance(task, len(chunk))
    finally:
        if handle is not None and handle is not attached:
            handle.detach()
        model.train(was_training)
    return _summarise(
        predictions,
        pruning,
        round(unpruned_tokens / images_seen),
        tokens_per_layer / images_seen,
        time.perf_counter() - start,
    )


def generate_answers(model, tokenizer, batch: dict, max_new_tokens: int) -> list[str]:
    """Greedy answers of one left-padded batch, decoded without the prompt and special tokens."""
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def score_answer(record: Mapping, text: str, collator: VisionLanguageCollator) -> Prediction:
    """One record's generated answer scored as `evaluate` scores it (the lmms-eval tasks use this)."""
    return _score(_rows([record], None, None)[0], text, SyntheticConfig.coordinate_bins, collator)


def _score(row: dict, text: str, bins: int, collator: VisionLanguageCollator | None = None) -> Prediction:
    """One prediction scored; a grounding answer no box can be read from scores IoU 0 and counts as unparseable."""
    text = text.strip()
    if row["task"] == "grounding":
        truth = tuple(row["box"])
        codec = None if collator is None else collator.box_format
        if codec is None:  # the records' own answers: coordinate tokens or 0-1000 integers
            box = tokens_to_box(text, bins)
            overlap = iou(box, truth) if box is not None else 0.0
        else:
            box = codec.parse(text, collator.image_frame(as_image(row["image"], f"record {row['id']!r}")))
            overlap = box_iou(box, to_box01(truth)) if box is not None else 0.0
        return Prediction(
            str(row["id"]),
            "grounding",
            row["kind"],
            _expected(row, collator),
            text,
            overlap >= IOU_THRESHOLD,
            overlap if box is not None else None,
        )
    expected = _expected(row, collator)
    return Prediction(
        str(row["id"]), "vqa", row["kind"], expected, text, normalise_answer(text) == normalise_answer(expected)
    )


def _expected(row: dict, collator: VisionLanguageCollator | None) -> str:
    """The answer the model is trained to give (what predictions.jsonl shows): `<ref-object>` / `<bbox>`
    placeholders and grounding boxes written in the collator's box format, else the record's own answer."""
    if collator is None or (not row.get("objects") and (collator.box_format is None or row["task"] != "grounding")):
        return row["answer"]
    return replace(collator, with_answer=True, counts=Counter()).validate(row, 0).answer


def _summarise(
    predictions: list[Prediction], pruning: NuwaConfig | None, vision_total: int, average: float, seconds: float
) -> EvalResult:
    vqa = [p for p in predictions if p.task == "vqa"]
    grounding = [p for p in predictions if p.task == "grounding"]
    by_kind: dict[str, list[bool]] = defaultdict(list)
    for p in predictions:
        by_kind[p.kind].append(p.correct)

    def mean(values):
        return sum(values) / len(values) if values else None

    return EvalResult(
        method=pruning.method if pruning else "none",
        budget=pruning.budget if pruning and pruning.method != "none" else None,
        num_vqa=len(vqa),
        num_grounding=len(grounding),
        vqa_exact_match=mean([p.correct for p in vqa]),
        grounding_acc50=mean([p.correct for p in grounding]),
        grounding_miou=mean([p.iou or 0.0 for p in grounding]),
        unparseable=sum(p.iou is None for p in grounding),
        per_kind={kind: mean(values) for kind, values in sorted(by_kind.items())},
        per_kind_count={kind: len(values) for kind, values in sorted(by_kind.items())},
        vision_tokens_total=vision_total,
        average_vision_tokens=float(average),
        seconds=seconds,
        predictions=predictions,
    )
