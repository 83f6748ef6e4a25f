"""Records as torch datasets: the synthetic benchmark generated on demand, or a user's files; and the synthetic
conversations written as ms-swift files (`export_conversations`, which reads SyntheticRecords: it lives here so that
sharegpt.py, whose rows this module reads, never imports this module)."""

from __future__ import annotations

import bisect
import json
import logging
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from .formats import (
    IMAGE_DIR,
    IMAGE_TOKEN,
    DatasetFormatError,
    FieldError,
    LoadReport,
    PathLike,
    parse_llava_json,
    parse_refcoco_json,
    read_image_sized,
)
from .sharegpt import CONVERSATIONS_FILE, conversation_row, parse_sharegpt_json, resolve_objects
from .synthetic import SyntheticConfig, generate_scene, make_grounding, make_vqa, render

logger = logging.getLogger(__name__)


class IndexedRecords(Dataset):
    """A map-style dataset whose iteration ends after len(self) records.

    Without `__iter__`, Python iterates by calling `__getitem__(0, 1, ...)` until IndexError; these datasets answer
    any index (FileRecords wraps it around to stand in for a skipped record, SyntheticRecords generates further
    images), so `list(data)` or `for row in data` would never end."""

    def __iter__(self):
        return (self[index] for index in range(len(self)))


class SyntheticRecords(IndexedRecords):
    """Record i of a split, generated on demand (deterministic by seed, split and index).

    Each image yields `vqa_per_image` VQA records and `grounding_per_image` grounding records,
    consecutive and alternating while both last (vqa, grounding, vqa, ...): more supervision per
    rendered image and per vision-tower pass, or a different balance of the two tasks.
    `conversation=True`: each image yields ONE record, a conversation whose turns are those questions in that
    order, grounding turns written with ms-swift's `<ref-object>` / `<bbox>` placeholders (its `objects`), so the
    collator asks and answers them in any family's box format (`loc_tokens`: the single-turn records' text).
    """

    def __init__(
        self,
        config: SyntheticConfig,
        split: str,
        num_images: int,
        vqa_per_image: int = 1,
        grounding_per_image: int = 1,
        conversation: bool = False,
    ):
        self.config, self.split, self.num_images = config, split, num_images
        self.tasks = self.tasks_per_image(vqa_per_image, grounding_per_image)
        self.conversation = conversation
        self._last_image: tuple | None = None  # (index, scene, rendered image): an image's records come in a row

    @staticmethod
    def tasks_per_image(vqa_per_image: int, grounding_per_image: int, key_prefix: str = "") -> list[tuple]:
        """(record maker, draw) for each record of an image; bad counts raise naming `key_prefix` + the key."""
        counts = {"vqa_per_image": vqa_per_image, "grounding_per_image": grounding_per_image}
        for key, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key_prefix}{key}={value!r} must be an int >= 0")
        if not any(counts.values()):
            raise ValueError(
                f"{key_prefix}vqa_per_image and {key_prefix}grounding_per_image are both 0: the images yield no records"
            )
        return [
            (make, draw)
            for draw in range(max(vqa_per_image, grounding_per_image))
            for make, count in ((make_vqa, vqa_per_image), (make_grounding, grounding_per_image))
            if draw < count
        ]

    @property
    def records_per_image(self) -> int:
        return 1 if self.conversation else len(self.tasks)

    def __len__(self) -> int:
        return self.num_images * self.records_per_image

    def __getitem__(self, index: int) -> dict:
        image, position = divmod(index, self.records_per_image)
        scene, pixels = self._scene(image)
        if self.conversation:
            return {
                **conversation_row([make(scene, self.config, draw) for make, draw in self.tasks], self.config),
                "image": pixels,
            }
        make, draw = self.tasks[position]
        return make(scene, self.config, draw).as_row(pixels)

    def _scene(self, image: int):
        """Layout and rendering of one image, reused while its records are read one after another."""
        if self._last_image is None or self._last_image[0] != image:
            scene = generate_scene(self.config, self.split, image)
            self._last_image = (image, scene, render(scene, self.config))
        return self._last_image[1:]


def export_conversations(
    out_dir: PathLike,
    config: SyntheticConfig,
    split: str,
    num_images: int,
    vqa_per_image: int = 4,
    grounding_per_image: int = 1,
    start: int = 0,
) -> Path:
    """Images [start, start + num_images) of a synthetic split as ms-swift records, one conversation per image
    (`conversations.jsonl`, boxes as `norm_1000` objects behind the placeholders) plus their PNG images."""
    out = Path(out_dir)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    data = SyntheticRecords(config, split, start + num_images, vqa_per_image, grounding_per_image, conversation=True)
    lines = []
    for index in range(start, start + num_images):
        row = data[index]
        image = f"{IMAGE_DIR}/{generate_scene(config, split, index).image_name}"
        row["image"].save(out / image)
        messages = [dict(m) for m in row["messages"]]
        messages[0]["content"] = f"{IMAGE_TOKEN}{messages[0]['content']}"
        record = {"id": row["id"], "messages": messages, "images": [image]}
        if row["objects"]:
            record["objects"] = row["objects"]
        lines.append(json.dumps(record))
    path = out / CONVERSATIONS_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class FileRecords(IndexedRecords):
    """LLaVA-conversation, RefCOCO-style and ShareGPT-style files, concatenated (rows as dicts).

    Start-up reads only the JSON and the image folders' listings (no image file is opened), so it costs the same
    on every rank whatever the images weigh. A record's image is decoded when the record is used, reduced to
    what the processor needs (`min_image_side`); one that cannot be read raises naming the file and record, or
    with `on_error="skip"` is replaced by the next readable record and counted in `access_reports`.
    A file that yields no record at all is an error that lists why its records were skipped.
    """

    records_per_image = 1  # each record its own (data.group_by_image groups the synthetic records only)

    def __init__(
        self,
        llava_files: list[str],
        refcoco_files: list[str],
        on_error: str,
        allow_outside_root: bool = False,
        min_image_side: int | None = None,
        text_only: str = "keep",
        sharegpt_files: list[str] = (),
    ):
        options = dict(on_error=on_error, allow_outside_root=allow_outside_root, check_images=False)
        parsed = [parse_llava_json(path, **options, text_only=text_only) for path in llava_files]
        parsed += [parse_refcoco_json(path, **options) for path in refcoco_files]
        parsed += [parse_sharegpt_json(spec, **options, text_only=text_only) for spec in sharegpt_files]
        self.parts = [rows for rows, _ in parsed]
        self.load_reports = [report for _, report in parsed]
        empty = [report for report in self.load_reports if report.loaded == 0]
        if empty:
            details = "\n".join(report.summary() for report in empty)
            raise DatasetFormatError(
                ", ".join(report.path for report in empty),
                f"no usable records (an empty file, or every record skipped):\n{details}",
            )
        self.on_error, self.min_image_side = on_error, min_image_side
        self.access_reports = {report.path: LoadReport(report.path) for report in self.load_reports}
        self.unreadable: set[int] = set()  # records whose image failed once: not decoded again
        self.offsets = torch.tensor([0] + [len(p) for p in self.parts]).cumsum(0).tolist()
        self._last_image: tuple[str, Image.Image] | None = None  # an image's records often come in a row

    def __len__(self) -> int:
        return self.offsets[-1]

    def _row(self, index: int) -> dict:
        part = bisect.bisect_right(self.offsets, index) - 1
        return self.parts[part][index - self.offsets[part]]

    def _image(self, row: dict) -> tuple[Image.Image | None, tuple[int, int] | None]:
        """The row's image (None: text-only) and the file's own size (its pixel boxes refer to it)."""
        if row["image"] is None:
            return None, None
        if self._last_image is None or self._last_image[0] != row["image"]:
            declared = row.get("declared_size")
            self._last_image = (row["image"], *read_image_sized(row["image"], self.min_image_side, declared))
        return self._last_image[1:]

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self.unreadable:
                continue
            row = self._row(candidate)
            try:
                image, size = self._image(row)
                row = resolve_objects(row, size) if size else row  # pixel boxes checked against the image
            except FieldError as error:
                problem = DatasetFormatError(row["source"], error.reason, row["index"], row["id"], error.field)
                if self.on_error == "raise":
                    raise problem from None
                self.unreadable.add(candidate)
                self.access_reports[row["source"]].add_skip(problem, error.kind)
                logger.warning("skipped (data.on_error: skip): %s", problem)
                continue
            return {**row, "image": image}
        raise DatasetFormatError(", ".join(self.access_reports), "no record has a readable image")
