"""Scoring shared by the local lmms-eval tasks and `nuwa-train eval`: one record, one answer, one codec.

A grounding answer is read in the box format of the model that wrote it (LLaVA's padded square, Qwen2.5-VL's
resized pixels ...), which only the model knows: the `nuwa` model publishes its collator here when it loads,
and the tasks' `process_results` read answers with it.
"""

from __future__ import annotations

from ..data.collate import VisionLanguageCollator, as_image
from ..data.formats import reduced
from ..evaluation import Prediction, score_answer

_reader: VisionLanguageCollator | None = None
_image_side: int | None = None  # the largest short side the model's processor uses (its family's reading)


def publish_answer_reader(collator: VisionLanguageCollator, image_side: int | None) -> None:
    global _reader, _image_side
    _reader, _image_side = collator, image_side


def score(record: dict, text: str) -> Prediction:
    """`record`'s answer scored exactly as `nuwa-train eval` scores it."""
    if _reader is None:
        raise RuntimeError(
            "the nuwa_* lmms-eval tasks read answers in the box format of the `nuwa` model: run them with --model nuwa"
        )
    # The image as `nuwa-train eval` holds it: decoded reduced to what the processor uses (its boxes' frame).
    image = reduced(as_image(record["image"], f"record {record.get('id')!r}"), _image_side)
    return score_answer({**record, "image": image}, text, _reader)
