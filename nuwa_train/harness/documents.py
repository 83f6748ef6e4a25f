"""What the local lmms-eval tasks (tasks/nuwa/*.yaml) call: documents are the project's own records.

lmms-eval loads each task's file with `datasets` (the JSON rows); `process_docs` numbers them, and every
other hook reads the record `FileRecords` makes of the same row, so prompts, images and scoring are those
of `nuwa-train eval --data` on that file. Files come from environment variables (lmms-eval has no task
arguments): `NUWA_SYNTHETIC_DIR` (a folder `nuwa-train export-data DIR --format llava-refcoco` wrote),
`NUWA_REFCOCO_FILE` (your RefCOCO-style JSON) and `NUWA_REFCOCO_REC_FILE` (lmms-eval's RefCOCO fields).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from ..data.formats import LLAVA_FILE, REFCOCO_FILE
from .scoring import score

SYNTHETIC_DIR = Path(os.environ.get("NUWA_SYNTHETIC_DIR", "outputs/lmms_synthetic")).resolve()
SYNTHETIC_VQA_FILE = str(SYNTHETIC_DIR / LLAVA_FILE)
SYNTHETIC_GROUNDING_FILE = str(SYNTHETIC_DIR / REFCOCO_FILE)
# Unset, the path itself says what to do (it is what `datasets` reports as not found).
USER_REFCOCO_FILE = os.environ.get("NUWA_REFCOCO_FILE", "set NUWA_REFCOCO_FILE to your RefCOCO-style JSON")
REFCOCO_REC_FILE = os.environ.get("NUWA_REFCOCO_REC_FILE", "set NUWA_REFCOCO_REC_FILE to a RefCOCO JSON with "
                                                           "lmms-eval's fields (image, bbox, answer, question_id)")
SOURCE, INDEX = "nuwa_source", "nuwa_index"  # the columns process_docs adds


@lru_cache(maxsize=None)
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
    return _numbered(dataset, SYNTHETIC_VQA_FILE, "llava")


def synthetic_grounding_docs(dataset):
    return _numbered(dataset, SYNTHETIC_GROUNDING_FILE, "refcoco")


def refcoco_docs(dataset):
    return _numbered(dataset, str(Path(USER_REFCOCO_FILE).resolve()), "refcoco")


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
    return {"grounding_acc50": float(prediction.correct), "grounding_miou": prediction.iou or 0.0,
            "unparseable": float(prediction.iou is None)}


def total(values: list[float]) -> float:
    return float(sum(values))


def refcoco_rec_docs(dataset):
    """lmms-eval's own refcoco_bbox_rec preprocessing, on a local file whose images are paths next to it."""
    import datasets
    from lmms_eval.tasks.refcoco.utils_rec import refcoco_bbox_rec_preprocess_dataset

    root = Path(REFCOCO_REC_FILE).resolve().parent
    dataset = dataset.map(lambda doc: {"image": str(root / doc["image"])})
    return refcoco_bbox_rec_preprocess_dataset(dataset.cast_column("image", datasets.Image()))
