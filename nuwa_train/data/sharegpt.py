"""ShareGPT-style records, the format LLaMA-Factory and ms-swift users already have.

A record is a list of chat messages plus its images (nuwa-train trains one image per record):

    {"messages": [{"role": "user", "content": "<image>Find the <ref-object>"},
                  {"role": "assistant", "content": "<bbox>"}],
     "images": ["coco/train2014/x.jpg"],
     "objects": {"ref": ["guy in red"], "bbox": [[138, 136, 235, 359]], "bbox_type": "real"}}

Grounding follows ms-swift: each `<ref-object>` / `<bbox>` placeholder takes the next `objects.ref` / `objects.bbox`
in conversation order, and the collator writes them in the model family's own box format (data/boxes.py), so one
file trains LLaVA, Qwen2-VL and Qwen2.5-VL alike. `bbox_type` says what the numbers are: "real" pixels of the
original image (the default), "norm_1000" or "norm_1". LLaMA-Factory's `conversations` / `from` / `value` records
read the same way; `dataset_info_entry` reads the file and its column names from a `dataset_info.json` entry.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

from .boxes import BBOX_TYPES, BoxError, check_numbers, object_box01
from .formats import (
    _LIST_INDEX,
    TEXT_ONLY,
    TEXT_ONLY_SKIPPED,
    DatasetFormatError,
    FieldError,
    ImageIndex,
    LoadReport,
    PathLike,
    _get,
    _image,
    _image_path,
    _parse,
    _to_dataset,
    chat_turns,
)
from .geometry import to_grid
from .schema import BOX_PLACEHOLDER, REF_PLACEHOLDER, TEXT_TASK
from .synthetic import Record, SyntheticConfig

DEFAULT_BBOX_TYPE = "real"  # ms-swift's default: pixels of the original image
CONVERSATIONS_FILE = "conversations.jsonl"  # the synthetic multi-turn export


@dataclass(frozen=True)
class ShareGPTLayout:
    """Where a record keeps its parts: the `columns` and `tags` of a LLaMA-Factory `dataset_info.json` entry."""

    messages: str = "messages"
    images: str = "images"
    system: str = "system"
    objects: str = "objects"
    role_tag: str = "role"
    content_tag: str = "content"
    user_tag: str = "user"
    assistant_tag: str = "assistant"
    system_tag: str = "system"


OPENAI_LAYOUT = ShareGPTLayout()  # ms-swift, and LLaMA-Factory's "openai" special case
# LLaMA-Factory's sharegpt defaults (data/README.md: columns.messages "conversations", tags from/value/human/gpt)
LLAMA_FACTORY_LAYOUT = ShareGPTLayout(
    messages="conversations", role_tag="from", content_tag="value", user_tag="human", assistant_tag="gpt"
)
_TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "system_tag")
_COLUMN_KEYS = ("messages", "images", "system")


def _layout_of(record: object, layout: ShareGPTLayout | None) -> ShareGPTLayout:
    """The given layout, or the one whose messages column the record has (`messages` or `conversations`)."""
    if layout is not None:
        return layout
    if isinstance(record, dict) and LLAMA_FACTORY_LAYOUT.messages in record and OPENAI_LAYOUT.messages not in record:
        return LLAMA_FACTORY_LAYOUT
    return OPENAI_LAYOUT


def dataset_info_entry(spec: str) -> tuple[str, ShareGPTLayout]:
    """`PATH/dataset_info.json:NAME` -> (the entry's data file or folder, its layout), for `formatting: sharegpt`."""
    info_path, separator, name = spec.rpartition(":")
    if not separator or not name:
        raise DatasetFormatError(spec, "expected PATH/dataset_info.json:DATASET_NAME")
    try:
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise DatasetFormatError(info_path, f"cannot read the dataset_info.json: {error}") from None
    if name not in info:
        raise DatasetFormatError(info_path, f"has no dataset {name!r} (it has: {', '.join(info)})")
    entry = info[name]
    if entry.get("formatting", "alpaca") != "sharegpt":
        raise DatasetFormatError(
            info_path,
            f"dataset {name!r} has formatting {entry.get('formatting', 'alpaca')!r}; nuwa-train reads sharegpt entries",
        )
    if "file_name" not in entry:
        raise DatasetFormatError(info_path, f"dataset {name!r} has no file_name (hub datasets are not downloaded)")
    columns, tags = entry.get("columns", {}), entry.get("tags", {})
    layout = ShareGPTLayout(
        **{
            **{f.name: getattr(LLAMA_FACTORY_LAYOUT, f.name) for f in fields(ShareGPTLayout)},
            **{key: columns[key] for key in _COLUMN_KEYS if key in columns},
            **{key: tags[key] for key in _TAG_KEYS if key in tags},
        }
    )
    return os.path.join(os.path.dirname(info_path), entry["file_name"]), layout


def sharegpt_source(spec: str) -> tuple[str, ShareGPTLayout | None]:
    """A recipe's `data.*_files.sharegpt` entry: a file or folder (layout detected per record), or
    `PATH/dataset_info.json:NAME` (LLaMA-Factory's registration: the entry's file and column names)."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    return dataset_info_entry(spec)


def _objects(record: dict, layout: ShareGPTLayout) -> dict | None:
    """The record's validated `objects` (refs, 4-number boxes, bbox_type), None when it has none."""
    value = record.get(layout.objects)
    if value is None:
        return None
    if isinstance(value, str):  # ms-swift also accepts the objects as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise FieldError(layout.objects, f"not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise FieldError(layout.objects, f"expected {{'ref': [...], 'bbox': [...]}}, got {type(value).__name__}")
    refs, boxes = value.get("ref") or [], value.get("bbox") or []
    bbox_type = value.get("bbox_type") or DEFAULT_BBOX_TYPE
    if bbox_type not in BBOX_TYPES:
        raise FieldError(f"{layout.objects}.bbox_type", f"{bbox_type!r} is not one of {', '.join(BBOX_TYPES)}")
    if not isinstance(refs, list) or not all(isinstance(r, str) and r.strip() for r in refs):
        raise FieldError(f"{layout.objects}.ref", f"expected a list of non-empty strings, got {refs!r}")
    if not isinstance(boxes, list):
        raise FieldError(f"{layout.objects}.bbox", f"expected a list of [x1, y1, x2, y2] boxes, got {boxes!r}")
    checked = []
    for number, box in enumerate(boxes):
        with _box_field(f"{layout.objects}.bbox[{number}]"):
            checked.append(check_numbers(box))
            if BBOX_TYPES[bbox_type] is not None:  # in range; pixel boxes are checked once the image's size is known
                object_box01(box, bbox_type, None)
    return {"ref": [r.strip() for r in refs], "bbox": checked, "bbox_type": bbox_type}


@contextmanager
def _box_field(where: str):
    """A `BoxError` raised inside as the `FieldError` of field `where` (skippable, counted by its kind)."""
    try:
        yield
    except BoxError as error:
        raise FieldError(where, str(error), kind=f"{_LIST_INDEX.sub('[]', where)}: {error.kind}") from None


def resolve_objects(row: dict, size: tuple[int, int]) -> dict:
    """The row with its boxes as fractions of the image (`bbox_type` "norm_1") and, for a grounding row, its
    0-1000 `box`: pixel boxes need the original image's (width, height), known once the image is read."""
    objects = row.get("objects")
    if not objects:
        return row
    if objects["bbox_type"] != "norm_1":
        boxes = []
        for number, box in enumerate(objects["bbox"]):
            with _box_field(f"{OPENAI_LAYOUT.objects}.bbox[{number}]"):
                boxes.append(list(object_box01(box, objects["bbox_type"], size)))
        row = {**row, "objects": {**objects, "bbox": boxes, "bbox_type": "norm_1"}}
    if row["task"] == "grounding" and row["box"] is None:
        first_box = row["messages"][0]["content"].count(BOX_PLACEHOLDER)  # boxes the question itself holds
        row = {**row, "box": list(to_grid(row["objects"]["bbox"][first_box]))}
    return row


def parse_sharegpt_json(
    path: PathLike,
    image_root: PathLike | None = None,
    on_error: str = "raise",
    layout: ShareGPTLayout | None = None,
    allow_outside_root: bool = False,
    check_images: bool = True,
    text_only: str = "keep",
) -> tuple[list[dict], LoadReport]:
    """Validate a ShareGPT-style JSON / JSONL file or `save_to_disk` folder into rows of FEATURES and a LoadReport.

    `path` may also be `PATH/dataset_info.json:NAME`, a LLaMA-Factory registration (`sharegpt_source`).
    `layout`: the record's column and tag names (default: the registration's, else `messages`/role/content records,
    or LLaMA-Factory's `conversations`/from/value ones, whichever the record has). A leading system message (or the
    `system` column) becomes the row's `system` prompt. A record is grounding when its first answer is one `<bbox>` (it is then
    scored like a RefCOCO record); other answers with placeholders train and are scored as text.
    """
    if text_only not in TEXT_ONLY:
        raise ValueError(f"data.text_only={text_only!r} must be one of {', '.join(TEXT_ONLY)}")
    path, registered = sharegpt_source(str(path))
    layout = layout or registered
    index = ImageIndex()

    def parse_record(record: object, root: Path, position: int) -> dict:
        form = _layout_of(record, layout)
        if not isinstance(record, dict):
            raise FieldError("<record>", f"expected a JSON object, got {type(record).__name__}")
        record_id = str(record.get("id", position))
        turns = list(_get(record, form.messages, list))
        system = record.get(form.system)
        if turns and isinstance(turns[0], dict) and turns[0].get(form.role_tag) == form.system_tag:
            system = turns.pop(0).get(form.content_tag)
        if system is not None and (not isinstance(system, str) or not system.strip()):
            raise FieldError(form.system, f"expected a non-empty string, got {system!r}")
        images = record.get(form.images) or []
        images = images if isinstance(images, list) else [images]
        if len(images) > 1:
            raise FieldError(
                form.images,
                f"{len(images)} images: nuwa-train trains one image per record",
                kind=f"{form.images}: more than one image",
            )
        has_image = bool(images)
        if not has_image and text_only == "skip":
            raise FieldError(form.images, "the record has no image", kind=TEXT_ONLY_SKIPPED, chosen=True)
        messages = chat_turns(
            turns, form.messages, form.role_tag, form.content_tag, (form.user_tag, form.assistant_tag), has_image
        )
        for t, message in enumerate(messages):
            if not message["content"]:
                raise FieldError(f"{form.messages}[{t}].{form.content_tag}", "empty")
        objects = _objects(record, form)
        texts = " ".join(m["content"] for m in messages)
        needed = {"ref": texts.count(REF_PLACEHOLDER), "bbox": texts.count(BOX_PLACEHOLDER)}
        for key, count in needed.items():
            have = len(objects[key]) if objects else 0
            if count > have:
                raise FieldError(
                    f"{form.objects}.{key}",
                    f"the messages hold {count} "
                    f"{REF_PLACEHOLDER if key == 'ref' else BOX_PLACEHOLDER} "
                    f"placeholders but {form.objects}.{key} has {have} entries",
                )
        if any(needed.values()) and not has_image:
            raise FieldError(
                form.messages, f"{REF_PLACEHOLDER} / {BOX_PLACEHOLDER} placeholders need the record's image"
            )
        grounding = has_image and messages[1]["content"] == BOX_PLACEHOLDER
        task = TEXT_TASK if not has_image else "grounding" if grounding else "vqa"
        expression = None
        if grounding and REF_PLACEHOLDER in messages[0]["content"]:
            expression = objects["ref"][0]
        image, size = None, None
        if has_image:
            image_record = {form.images: images[0]}
            image, size = (
                _image(image_record, root, allow_outside_root, index, form.images)
                if check_images
                else (_image_path(image_record, root, allow_outside_root, index, form.images), None)
            )
        row = {
            "id": record_id,
            "image": image,
            "task": task,
            "prompt": messages[0]["content"],
            "answer": messages[1]["content"],
            "box": None,
            "messages": messages,
            "expression": expression,
            "objects": objects,
            "system": system,
        }
        if objects and (objects["bbox_type"] != DEFAULT_BBOX_TYPE or size is not None):
            row = resolve_objects(row, size)  # pixel boxes of unread images wait for the image (FileRecords)
        return row

    return _parse(path, image_root, on_error, parse_record)


def conversation_row(records: list[Record], config: SyntheticConfig) -> dict:
    """Records about one image as one conversation row (FEATURES without the image): grounding turns ask
    `config.grounding_template` about a `<ref-object>` and answer `<bbox>`, their boxes in `objects` (0-1000)."""
    messages, refs, boxes = [], [], []
    for record in records:
        if record.task == "grounding":
            messages += [
                {"role": "user", "content": config.grounding_template.format(expression=REF_PLACEHOLDER)},
                {"role": "assistant", "content": BOX_PLACEHOLDER},
            ]
            refs.append(record.expression)
            boxes.append([float(v) for v in record.box])
        else:
            messages += [{"role": "user", "content": record.prompt}, {"role": "assistant", "content": record.answer}]
    first = records[0]
    return dict(
        id=f"{first.scene.split}-{first.scene.index:06d}-conversation",
        prompt=messages[0]["content"],
        answer=messages[1]["content"],
        task=first.task,
        box=first.box,
        kind=first.kind,
        expression=first.expression,
        messages=messages,
        objects={"ref": refs, "bbox": boxes, "bbox_type": "norm_1000"} if refs else None,
    )


def load_sharegpt_json(
    path: PathLike,
    image_root: PathLike | None = None,
    on_error: str = "raise",
    layout: ShareGPTLayout | None = None,
    allow_outside_root: bool = False,
    text_only: str = "keep",
):
    """A ShareGPT-style file or folder (or `PATH/dataset_info.json:NAME`) as a Dataset (images resolve against its
    folder unless `image_root`)."""
    return _to_dataset(
        *parse_sharegpt_json(path, image_root, on_error, layout, allow_outside_root, text_only=text_only)
    )
