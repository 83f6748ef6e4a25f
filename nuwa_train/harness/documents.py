"""What the local lmms-eval tasks (tasks/nuwa/*.yaml) call: documents are the project's own records.

lmms-eval loads each task's file with `datasets` (the JSON rows); `process_docs` numbers them, and every
other hook reads the record `FileRecords` makes of the same row, so prompts, images and scoring are those
of `nuwa-train eval --data` on that file. Files come from environment variables (lmms-eval has no task
arguments): `NUWA_SYNTHETIC_DIR` (default outputs/lmms_synthetic: a folder written by
`nuwa-train export-data DIR --format llava-refcoco`),
`NUWA_REFCOCO_FILE` (your RefCOCO-style JSON) and `NUWA_REFCOCO_REC_FILE` (lmms-eval's RefCOCO fields).
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from ..data.formats import LLAVA_FILE, REFCOCO_FILE
from .scoring import score

# Where each task's file comes from (read when a task loads, so a test or a `--config` `env:` block can set it).
# Unset, the user-file paths say what to do (`datasets` reports them as not found).
DATA_FILES = {
    "synthetic_vqa": lambda: str(_synthetic_dir() / LLAVA_FILE),
    "synthetic_grounding": lambda: str(_synthetic_dir() / REFCOCO_FILE),
    "refcoco": lambda: os.environ.get("NUWA_REFCOCO_FILE", "set NUWA_REFCOCO_FILE to your RefCOCO-style JSON"),
    "refcoco_rec": lambda: os.environ.get(
        "NUWA_REFCOCO_REC_FILE",
        "set NUWA_REFCOCO_REC_FILE to a RefCOCO JSON with lmms-eval's fields (image, bbox, answer, question_id)",
    ),
}


def _synthetic_dir() -> Path:
    return Path(os.environ.get("NUWA_SYNTHETIC_DIR", "outputs/lmms_synthetic"))


def data_file(name: str) -> str:
    """The absolute path of a task's file (`!function utils.<NAME>_FILE` in the YAMLs)."""
    return str(Path(DATA_FILES[name]()).resolve())


SOURCE, INDEX = "nuwa_source", "nuwa_index"  # the columns process_docs adds


@cache
def _records(path: str, file_format: str):
    from ..data.records import FileRecords

    files = {"llava": ([path], []), "refcoco": ([], [path])}[file_format]
    return FileRecords(*files, on_error="raise")


def _numbered(dataset, path: str, file_format: str):
    return dataset.map(lambda _, index: {SOURCE: f"{file_format}={path}", INDEX: index}, with_indices=True)


def record(doc: dict) -> dict:
    file_format, _, path = doc[SOURCE].partition("=")
    return _records(path, file_format)[doc[INDEX]]


def synthetic_vqa_docs(dataset):
    return _numbered(dataset, data_file("synthetic_vqa"), "llava")


def synthetic_grounding_docs(dataset):
    return _numbered(dataset, data_file("synthetic_grounding"), "refcoco")


def refcoco_docs(dataset):
    return _numbered(dataset, data_file("refcoco"), "refcoco")


def doc_to_visual(doc: dict) -> list:
    return [record(doc)["image"]]


def doc_to_text(doc: dict) -> str:
    """The question; a grounding task sends the referring expression, which the model asks its own way."""
    row = record(doc)
    return row["expression"] if row["task"] == "grounding" else row["prompt"]


def doc_to_target(doc: dict) -> str:
    return record(doc)["answer"]


def process_vqa(doc: dict, results: list[str]) -> dict:
    return {"vqa_em": float(score(record(doc), results[0]).correct)}


def process_grounding(doc: dict, results: list[str]) -> dict:
    prediction = score(record(doc), results[0])
    return {
        "grounding_acc50": float(prediction.correct),
        "grounding_miou": prediction.iou or 0.0,
        "unparseable": float(prediction.iou is None),
    }


def total(values: list[float]) -> float:
    return float(sum(values))


def refcoco_rec_docs(dataset):
    """lmms-eval's own refcoco_bbox_rec preprocessing, on a local file whose images are paths next to it."""
    import datasets
    from lmms_eval.tasks.refcoco.utils_rec import refcoco_bbox_rec_preprocess_dataset

    root = Path(data_file("refcoco_rec")).parent
    dataset = dataset.map(lambda doc: {"image": str(root / doc["image"])})
    return refcoco_bbox_rec_preprocess_dataset(dataset.cast_column("image", datasets.Image()))
