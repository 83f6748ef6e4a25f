"""Read and write the two public formats users bring: LLaVA conversations and RefCOCO grounding.

Both loaders return a `datasets.Dataset` with one schema (FEATURES), so VQA and grounding data
can be concatenated. Real user files go through the same validation as the synthetic export:
a malformed record raises `DatasetFormatError` naming the file, record and field, or with
`on_error="skip"` is left out and counted in a `LoadReport`.
"""

import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import pyarrow.compute as pc
from PIL import Image, ImageFile

from .geometry import COORD_RANGE, Box
from .images import displayed_size, orientation, to_rgb, upright
from .schema import ON_ERROR, TEXT_TASK
from .synthetic import (
    LOC_PATTERN,
    Record,
    SyntheticConfig,
    box_to_tokens,
    generate_records,
    render,
    tokens_to_box,
)

logger = logging.getLogger(__name__)
PathLike = str | os.PathLike

IMAGE_TOKEN = "<image>"
LLAVA_FILE = "llava_vqa.json"
REFCOCO_FILE = "refcoco_grounding.json"
IMAGE_DIR = "images"
TEXT_ONLY = ("keep", "skip")  # what the loaders do with records that have no image (data.text_only)
TEXT_ONLY_SKIPPED = "text-only record (data.text_only: skip)"
REPORTED_IDS = 5  # record ids listed per skip reason in a report
_LIST_INDEX = re.compile(r"\[\d+\]")  # conversations[3].value -> conversations[].value when counting reasons
_COORDINATE = r"(?:<loc_\d+>|\d+)"
_BOX_ANSWER = re.compile(rf"[\s\[\](),]*(?:{_COORDINATE}[\s\[\](),]*){{4}}")  # four coordinates, nothing else

FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "image": datasets.Image(),
        "task": datasets.Value("string"),  # "vqa", "grounding", or "text" (no image: trains, is not scored)
        "prompt": datasets.Value("string"),  # first user turn, image placeholder removed
        "answer": datasets.Value("string"),  # first assistant turn: what the model must emit
        "box": datasets.List(datasets.Value("int32"), length=4),  # grounding target in [0, 1000); None for vqa
        "messages": datasets.List({"role": datasets.Value("string"), "content": datasets.Value("string")}),
        "expression": datasets.Value("string"),  # grounding: the bare referring expression (None if not known)
        # ShareGPT grounding (ms-swift): what the <ref-object> / <bbox> placeholders of `messages` stand for, in order
        "objects": {
            "ref": datasets.List(datasets.Value("string")),
            "bbox": datasets.List(datasets.List(datasets.Value("float64"), length=4)),
            "bbox_type": datasets.Value("string"),
        },
        "system": datasets.Value("string"),  # a system prompt (ShareGPT records), None if the record has none
    }
)


class DatasetFormatError(ValueError):
    """A file or record that does not follow its format; the message says where and why."""

    def __init__(
        self, path: str, reason: str, index: int | None = None, record_id: object = None, field: str | None = None
    ):
        self.path, self.reason, self.index, self.record_id, self.field = path, reason, index, record_id, field
        where = [str(path)]
        if index is not None:
            where.append(f"record {index} (id {record_id!r})")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join([*where, reason]))


@dataclass
class LoadReport:
    """What a loader kept and what it skipped (with `on_error="skip"`), and why: counts per reason, first ids."""

    path: str
    loaded: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)  # every skipped record's full message
    by_reason: Counter = field(default_factory=Counter)  # short reason -> count
    first_ids: dict[str, list] = field(default_factory=dict)  # short reason -> first REPORTED_IDS record ids

    def add_skip(self, problem: DatasetFormatError, kind: str) -> None:
        self.skipped += 1
        self.reasons.append(str(problem))
        self.by_reason[kind] += 1
        ids = self.first_ids.setdefault(kind, [])
        if len(ids) < REPORTED_IDS:
            ids.append(problem.record_id)

    def summary(self) -> str:
        """One line per reason: `count x reason (ids ...)`."""
        lines = [f"{self.path}: {self.loaded} records loaded, {self.skipped} skipped"]
        lines += [
            f"  {count} x {kind} (first ids: {', '.join(map(repr, self.first_ids[kind]))})"
            for kind, count in self.by_reason.most_common()
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "loaded": self.loaded,
            "skipped": self.skipped,
            "skipped_by_reason": dict(self.by_reason.most_common()),
            "first_ids": self.first_ids,
        }


class FieldError(Exception):
    """Raised inside a record parser; the caller adds the file and record to the message.

    `kind` is the reason without the record's own values (e.g. "image: file not found"), for counting.
    `chosen`: the record is left out by a setting (e.g. data.text_only: skip), not for an error: it is counted
    whatever `on_error` says.
    """

    def __init__(self, field: str, reason: str, kind: str | None = None, chosen: bool = False):
        super().__init__(reason)
        self.field, self.reason, self.chosen = field, reason, chosen
        if kind is None:
            kind = f"{_LIST_INDEX.sub('[]', field)}: {reason.split(':')[0]}"
        self.kind = kind


# ---------------------------------------------------------------------------------------------
# field checks


def _get(record: object, key: str, kind: type | tuple[type, ...]) -> object:
    if not isinstance(record, dict):
        raise FieldError("<record>", f"expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise FieldError(key, "missing")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, kind):  # bool is an int in Python, never in JSON
        raise FieldError(key, f"expected {_type_names(kind)}, got {type(value).__name__} {value!r}")
    return value


def _type_names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _text(record: object, key: str) -> str:
    value = _get(record, key, str).strip()
    if not value:
        raise FieldError(key, "empty")
    return value


class ImageIndex:
    """Which image files exist, from one directory listing per folder instead of one lookup per record.

    Start-up then costs a listing of each image folder (COCO's 83K training images: one folder), not 665K file
    opens on every rank; the images themselves are read, and checked, when a record is first used. The listing
    also says which entries are symbolic links (no extra system call), so only those are resolved one by one.
    """

    def __init__(self):
        self._folders: dict[str, tuple[frozenset[str], frozenset[str]]] = {}  # folder -> (names, link names)
        self._real_folders: dict[str, str] = {}

    def _listing(self, folder: str) -> tuple[frozenset[str], frozenset[str]]:
        if folder not in self._folders:
            try:
                with os.scandir(folder) as entries:
                    listed = [(entry.name, entry.is_symlink()) for entry in entries]
            except OSError:
                listed = []
            self._folders[folder] = (
                frozenset(name for name, _ in listed),
                frozenset(name for name, link in listed if link),
            )
        return self._folders[folder]

    def exists(self, path: str) -> bool:
        folder, name = os.path.split(path)
        return name in self._listing(folder)[0]

    def real_folder(self, folder: str) -> str:
        """`folder` with every symbolic link on its way resolved (once per folder)."""
        if folder not in self._real_folders:
            self._real_folders[folder] = os.path.realpath(folder)
        return self._real_folders[folder]

    def real_path(self, path: str) -> str:
        """`path` with every symbolic link resolved (its folder once per folder, the file only if it is a link)."""
        folder, name = os.path.split(path)
        if name in self._listing(folder)[1]:
            return os.path.realpath(path)
        return os.path.join(self.real_folder(folder), name)


class EmbeddedImage:
    """An image a `save_to_disk` folder embeds: its bytes stay in the memory-mapped Arrow table until the record
    is read, so start-up costs what a JSON file costs whatever the images weigh."""

    def __init__(self, table: datasets.Dataset, column: str, row: int, position: int | None = None):
        self.table, self.column, self.row, self.position = table, column, row, position

    def read(self) -> bytes:
        value = self.table.data.column(self.column)[self.row].as_py()
        value = value if self.position is None else value[self.position]
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path") and os.path.isfile(value["path"]):
            with open(value["path"], "rb") as f:
                return f.read()
        raise FieldError(self.column, f"the saved image has no bytes and no readable path ({value.get('path')!r})")

    def _key(self) -> tuple:
        return id(self.table), self.column, self.row, self.position

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EmbeddedImage) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"<image embedded in row {self.row} of column {self.column!r}>"


def _image_path(
    record: object, root: Path, allow_outside_root: bool, index: ImageIndex, key: str = "image"
) -> str | EmbeddedImage:
    """The record's image as an absolute path inside `root` (unless allowed outside) that exists, or the image a
    `save_to_disk` folder embeds. Inside means after symbolic links are resolved: a link in the root that points
    elsewhere leaves it."""
    if isinstance(record, dict) and isinstance(record.get(key), EmbeddedImage):
        return record[key]
    given = _text(record, key)
    root = os.path.abspath(root)
    path = os.path.normpath(os.path.join(root, given))
    if not allow_outside_root and (os.path.isabs(given) or not _inside(path, root)):
        raise FieldError(
            key,
            f"path {given!r} leaves the dataset root {root} (set data.allow_outside_root: true to allow it)",
            kind="image: path outside the root",
        )
    if not index.exists(path):
        raise FieldError(key, f"file not found: {path}")
    if not allow_outside_root:
        real, real_root = index.real_path(path), index.real_folder(root)
        if not _inside(real, real_root):
            raise FieldError(
                key,
                f"path {given!r} is a symbolic link (or lies in a linked folder) to {real}, outside "
                f"the dataset root {real_root} (set data.allow_outside_root: true to allow it)",
                kind="image: link outside the root",
            )
    return path


def _inside(path: str, root: str) -> bool:
    """Whether normalised `path` is `root` or below it (a prefix test: a start-up cost per record)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def read_image(
    path: str | EmbeddedImage, min_side: int | None = None, declared_size: tuple[int, int] | None = None
) -> Image.Image:
    """Decode an image fully (a truncated or corrupt file fails here, not in the processor), upright and RGB.

    `min_side`: the short side the processor needs at most; a larger image is decoded reduced by a whole factor
    (JPEG's DCT scaling via `draft`, else `reduce`), so an 8000x8000 photo does not cost a full-size decode and
    resize on every access. `declared_size`: (width, height) the record states, checked against the displayed
    image (EXIF orientation applied, see data/images.py). Any mode PIL reads becomes 8-bit RGB (`to_rgb`).
    `path` may also be an image a `save_to_disk` folder embeds.
    Raises `FieldError("image", ...)`; the caller names the file and record.
    """
    return read_image_sized(path, min_side, declared_size)[0]


@contextmanager
def _strict_decoding():
    """A truncated file fails to decode, whatever an imported library set: lmms-eval, for one, turns PIL's global
    LOAD_TRUNCATED_IMAGES on at import, which would fill the missing rows silently."""
    previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def reduced(image: Image.Image, min_side: int | None) -> Image.Image:
    """`image` reduced by the whole factor that keeps its short side >= `min_side` (itself when under 2x)."""
    factor = min(image.size) // min_side if min_side else 1
    return image.reduce(factor) if factor >= 2 else image


def read_image_sized(
    path: str | EmbeddedImage, min_side: int | None = None, declared_size: tuple[int, int] | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """`read_image` and the displayed image's full (width, height): pixel boxes refer to it, not to a reduced
    decode, and to the photo as shown (a JPEG stored sideways with EXIF orientation 6 swaps the two)."""
    name = repr(path) if isinstance(path, EmbeddedImage) else path
    try:
        with (
            _strict_decoding(),
            Image.open(io.BytesIO(path.read()) if isinstance(path, EmbeddedImage) else path) as image,
        ):
            turned = orientation(image)
            size = displayed_size(image.size, turned)
            if declared_size is not None and tuple(declared_size) != size:
                stored = (
                    f" (stored {image.size[0]}x{image.size[1]}, shown turned by its EXIF orientation "
                    f"{turned}: boxes and sizes refer to the image as shown)"
                    if size != image.size
                    else ""
                )
                raise FieldError(
                    "image",
                    f"{name} is {size[0]}x{size[1]}{stored}, but the record declares "
                    f"width {declared_size[0]}, height {declared_size[1]}",
                    kind="width/height: do not match the image",
                )
            factor = min(size) // min_side if min_side else 1
            if factor >= 2 and image.format == "JPEG":
                image.draft("RGB", (image.size[0] // factor, image.size[1] // factor))
            image.load()
            decoded = reduced(to_rgb(upright(image)), min_side)
            return (decoded.copy() if decoded is image else decoded), size  # detached from the closed file
    except FieldError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise FieldError("image", f"cannot read image {name}: {error}", kind="image: cannot be decoded") from None


def _image(
    record: object, root: Path, allow_outside_root: bool, index: ImageIndex, key: str = "image"
) -> tuple[str | EmbeddedImage, tuple[int, int]]:
    """Absolute path (or bytes) and (width, height) of the record's image, reading the whole file (public loaders)."""
    path = _image_path(record, root, allow_outside_root, index, key)
    image = read_image(path)
    return path, image.size


def _check_box(box: object, field: str) -> Box:
    """A valid [x1, y1, x2, y2] box of integers in [0, 1000) with x1 < x2 and y1 < y2."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(type(v) is int for v in box):
        raise FieldError(field, f"expected a list of 4 integers, got {box!r}")
    box = list(box)
    if not all(0 <= v < COORD_RANGE for v in box):
        raise FieldError(field, f"box {box} has a coordinate outside [0, {COORD_RANGE})")
    if box[0] >= box[2]:
        raise FieldError(field, f"box {box} has x1 >= x2")
    if box[1] >= box[3]:
        raise FieldError(field, f"box {box} has y1 >= y2")
    return tuple(box)


def _answer_box(answer: str, bins: int, field: str) -> Box | None:
    """The box of a grounding answer (four coordinates and nothing else), None for a VQA answer."""
    if not _BOX_ANSWER.fullmatch(answer):
        if LOC_PATTERN.search(answer):
            raise FieldError(field, f"coordinate tokens must form exactly one box of four, got {answer!r}")
        return None
    box = tokens_to_box(answer, bins)
    if box is None:
        raise FieldError(
            field, f"box {answer!r} has an integer outside [0, {COORD_RANGE}) or a token outside the {bins} bins"
        )
    return _check_box(box, field)


# ---------------------------------------------------------------------------------------------
# loaders


def chat_turns(
    turns: list, column: str, role_tag: str, content_tag: str, speakers: tuple[str, str], has_image: bool
) -> list[dict]:
    """Alternating (user, assistant) turns ending with the assistant as messages (role user/assistant, content
    without the image placeholder, which the first user turn of a record with an image must hold exactly once)."""
    if len(turns) < 2 or len(turns) % 2:
        raise FieldError(
            column,
            f"expected alternating {speakers[0]}/{speakers[1]} turns ending with {speakers[1]}, got {len(turns)} turns",
        )
    messages = []
    for t, turn in enumerate(turns):
        speaker = speakers[t % 2]
        if not isinstance(turn, dict) or turn.get(role_tag) != speaker:
            got = turn.get(role_tag) if isinstance(turn, dict) else turn
            raise FieldError(
                f"{column}[{t}].{role_tag}",
                f"expected {speaker!r} (turns alternate {speakers[0]}, {speakers[1]}), got {got!r}",
            )
        content = turn.get(content_tag)
        if not isinstance(content, str):
            raise FieldError(f"{column}[{t}].{content_tag}", f"expected str, got {type(content).__name__}")
        if content.count(IMAGE_TOKEN) != (1 if t == 0 and has_image else 0):
            rule = (
                f"the first {speakers[0]} turn needs exactly one"
                if t == 0 and has_image
                else "only the first turn of a record with an image may hold an"
            )
            raise FieldError(f"{column}[{t}].{content_tag}", f"{rule} {IMAGE_TOKEN!r} placeholder")
        messages.append({"role": ("user", "assistant")[t % 2], "content": content.replace(IMAGE_TOKEN, "").strip()})
    return messages


def _read_records(path: str) -> list:
    """The records of a JSON file (one list), a JSON Lines file (`.jsonl`: one record per line, blank lines
    skipped; a line that is not JSON is an error naming its line number), or a `datasets` directory written by
    `save_to_disk` (one split; its images stay encoded until a record is used)."""
    if os.path.isdir(path):
        return _read_saved_dataset(path)
    try:
        with open(path, encoding="utf-8") as f:
            if not path.endswith(".jsonl"):
                records = json.load(f)
                if not isinstance(records, list):
                    raise DatasetFormatError(path, f"expected a JSON list of records, got {type(records).__name__}")
                return records
            records = []
            for number, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise DatasetFormatError(path, f"line {number} is not valid JSON: {error}") from None
            return records
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetFormatError(path, f"not valid UTF-8 JSON: {error}") from None


def _read_saved_dataset(path: str) -> list[dict]:
    try:
        saved = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as error:
        raise DatasetFormatError(path, f"not a dataset written by save_to_disk: {error}") from None
    if isinstance(saved, datasets.DatasetDict):
        raise DatasetFormatError(
            path,
            f"holds the splits {', '.join(saved)}: name one split's folder (e.g. "
            f"{os.path.join(path, next(iter(saved)))})",
        )
    images = {
        name: isinstance(feature, (datasets.List, datasets.Sequence))
        for name, feature in saved.features.items()
        if isinstance(feature, datasets.Image) or isinstance(getattr(feature, "feature", None), datasets.Image)
    }
    rows = saved.remove_columns(list(images)).to_list()  # the text: what a JSON file holds
    for name, is_list in images.items():
        column = saved.data.column(name)
        counts = pc.list_value_length(column).to_pylist() if is_list else [None] * len(rows)
        missing = column.is_null().to_pylist()
        for number, (row, count) in enumerate(zip(rows, counts)):
            if missing[number]:
                row[name] = None
            elif is_list:
                row[name] = [EmbeddedImage(saved, name, number, k) for k in range(count)]
            else:
                row[name] = EmbeddedImage(saved, name, number)
    return rows


def _parse(
    path: PathLike, image_root: PathLike | None, on_error: str, parse_record: Callable[[object, Path, int], dict]
) -> tuple[list[dict], LoadReport]:
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    path = str(path)
    if not os.path.exists(path):
        raise DatasetFormatError(path, "file not found")
    records = _read_records(path)
    root = Path(image_root) if image_root is not None else Path(path) if os.path.isdir(path) else Path(path).parent
    rows, report = [], LoadReport(path)
    for index, record in enumerate(records):
        try:
            row = parse_record(record, root, index)
        except FieldError as error:
            record_id = record.get("id") if isinstance(record, dict) else None
            problem = DatasetFormatError(path, error.reason, index, record_id, error.field)
            if on_error == "raise" and not error.chosen:
                raise problem from None
            report.add_skip(problem, error.kind)
            continue
        rows.append({**row, "source": path, "index": index})
    report.loaded = len(rows)
    return rows, report


def _encodable(value: object) -> object:
    return {"bytes": value.read(), "path": None} if isinstance(value, EmbeddedImage) else value


def _to_dataset(rows: list[dict], report: LoadReport) -> datasets.Dataset:
    if report.skipped:
        logger.warning("%s: skipped %d malformed records, first: %s", report.path, report.skipped, report.reasons[0])
    # Every FEATURES column, also when every record was skipped (the rows' `source` and `index` are not columns).
    columns = {name: [_encodable(row.get(name)) for row in rows] for name in FEATURES}
    return datasets.Dataset.from_dict(columns, features=FEATURES)


def parse_llava_json(
    path: PathLike,
    image_root: PathLike | None = None,
    on_error: str = "raise",
    coordinate_bins: int = SyntheticConfig.coordinate_bins,
    allow_outside_root: bool = False,
    check_images: bool = True,
    text_only: str = "keep",
) -> tuple[list[dict], LoadReport]:
    """Validate a LLaVA conversation file into rows of FEATURES (plus `source`, `index`) and a LoadReport.

    A record is grounding when its first answer is a box (four coordinate tokens or integers). Image paths must
    stay inside the image root unless `allow_outside_root`. `check_images=False` only checks that each image
    file exists (from folder listings) and leaves decoding to the first use: start-up without image I/O.
    A record without an `image` field (and without an image placeholder) is text-only: task "text", image None;
    `text_only="skip"` leaves such records out and counts them.
    """
    if text_only not in TEXT_ONLY:
        raise ValueError(f"data.text_only={text_only!r} must be one of {', '.join(TEXT_ONLY)}")
    index = ImageIndex()

    def parse_record(record: object, root: Path, _index: int) -> dict:
        record_id = str(_get(record, "id", (str, int)))
        has_image = not isinstance(record, dict) or "image" in record
        if not has_image and text_only == "skip":
            raise FieldError("image", "the record has no image", kind=TEXT_ONLY_SKIPPED, chosen=True)
        image = None
        if has_image:
            image = (
                _image(record, root, allow_outside_root, index)[0]
                if check_images
                else _image_path(record, root, allow_outside_root, index)
            )
        messages = chat_turns(
            _get(record, "conversations", list), "conversations", "from", "value", ("human", "gpt"), has_image
        )
        answer = messages[1]["content"]
        if not answer:
            raise FieldError("conversations[1].value", "empty answer")
        box = _answer_box(answer, coordinate_bins, "conversations[1].value")
        task = TEXT_TASK if not has_image else "vqa" if box is None else "grounding"
        return {
            "id": record_id,
            "image": image,
            "task": task,
            "prompt": messages[0]["content"],
            "answer": answer,
            "box": None if box is None else list(box),
            "messages": messages,
            "expression": None,
        }

    return _parse(path, image_root, on_error, parse_record)


def load_llava_json(
    path: PathLike,
    image_root: PathLike | None = None,
    on_error: str = "raise",
    coordinate_bins: int = SyntheticConfig.coordinate_bins,
    allow_outside_root: bool = False,
    text_only: str = "keep",
) -> datasets.Dataset:
    """A LLaVA conversation JSON as a Dataset; images resolve against the JSON's folder unless `image_root`."""
    return _to_dataset(
        *parse_llava_json(path, image_root, on_error, coordinate_bins, allow_outside_root, text_only=text_only)
    )


def parse_refcoco_json(
    path: PathLike,
    image_root: PathLike | None = None,
    on_error: str = "raise",
    coordinate_bins: int = SyntheticConfig.coordinate_bins,
    prompt_template: str = SyntheticConfig.grounding_template,
    allow_outside_root: bool = False,
    check_images: bool = True,
) -> tuple[list[dict], LoadReport]:
    """Validate a RefCOCO-style grounding file into rows of FEATURES plus a LoadReport.

    `problem` is a bare referring expression in RefCOCO, so the prompt is
    `prompt_template.format(expression=problem)`; pass "{expression}" if problems are full questions.
    The answer is the box in coordinate tokens, as the model must emit it. `allow_outside_root`, `check_images`:
    as in `parse_llava_json` (unchecked, the declared width and height are checked when the image is read).
    """
    index = ImageIndex()

    def parse_record(record: object, root: Path, _index: int) -> dict:
        record_id = str(_get(record, "id", (str, int)))
        problem = _text(record, "problem")
        box = _check_box(_get(record, "normalized_solution", list), "normalized_solution")
        declared = tuple(_get(record, key, int) for key in ("width", "height"))
        if check_images:
            image, size = _image(record, root, allow_outside_root, index)
            for key, stated, actual in zip(("width", "height"), declared, size):
                if stated != actual:
                    raise FieldError(key, f"{stated} does not match the image's {key} {actual}")
        else:
            image = _image_path(record, root, allow_outside_root, index)
        prompt = prompt_template.format(expression=problem)
        answer = box_to_tokens(box, coordinate_bins)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return {
            "id": record_id,
            "image": image,
            "task": "grounding",
            "prompt": prompt,
            "answer": answer,
            "box": list(box),
            "messages": messages,
            "declared_size": list(declared),
            "expression": problem,
        }

    return _parse(path, image_root, on_error, parse_record)


def load_refcoco_json(
    path: PathLike,
    image_root: PathLike | None = None,
    on_error: str = "raise",
    coordinate_bins: int = SyntheticConfig.coordinate_bins,
    prompt_template: str = SyntheticConfig.grounding_template,
    allow_outside_root: bool = False,
) -> datasets.Dataset:
    """A RefCOCO-style JSON as a Dataset; images resolve against the JSON's folder unless `image_root`."""
    return _to_dataset(
        *parse_refcoco_json(path, image_root, on_error, coordinate_bins, prompt_template, allow_outside_root)
    )


# ---------------------------------------------------------------------------------------------
# export


def _write_json(path: Path, rows: list[dict]):
    """A JSON list with one record per line: valid for any JSON reader, readable in a diff."""
    path.write_text("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n", encoding="utf-8")


def export_records(records: Iterable[Record], out_dir: PathLike, config: SyntheticConfig) -> tuple[Path, Path]:
    """Write PNG images plus a LLaVA file (VQA records) and a RefCOCO file (grounding records)."""
    out = Path(out_dir)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    llava, refcoco, written = [], [], set()
    for record in records:
        scene = record.scene
        image = f"{IMAGE_DIR}/{scene.image_name}"
        if image not in written:
            render(scene, config).save(out / image)
            written.add(image)
        if record.task == "vqa":
            conversation = [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{record.prompt}"},
                {"from": "gpt", "value": record.answer},
            ]
            llava.append({"id": record.id, "image": image, "conversations": conversation})
        else:
            refcoco.append(
                {
                    "id": record.id,
                    "image": image,
                    "problem": record.expression,
                    "normalized_solution": list(record.box),
                    "width": scene.width,
                    "height": scene.height,
                }
            )
    _write_json(out / LLAVA_FILE, llava)
    _write_json(out / REFCOCO_FILE, refcoco)
    return out / LLAVA_FILE, out / REFCOCO_FILE


def export_split(
    out_dir: PathLike, config: SyntheticConfig, split: str, num_images: int, start: int = 0
) -> tuple[Path, Path]:
    """Export images [start, start + num_images) of a split: one VQA and one grounding record per image."""
    return export_records(generate_records(config, split, num_images, start), out_dir, config)


def write_sample(
    out_dir: PathLike, config: SyntheticConfig = SyntheticConfig(), split: str = "test", num_images: int = 24
) -> tuple[Path, Path]:
    """Regenerate the committed sample (data/synthetic_sample) byte for byte, README included."""
    paths = export_split(out_dir, config, split, num_images)
    readme = f"""# Synthetic grounding sample

{num_images} images of the `{split}` split of nuwa-train's synthetic benchmark
(`nuwa_train.data.synthetic`), each with one VQA record in `{LLAVA_FILE}` (LLaVA
conversations) and one grounding record in `{REFCOCO_FILE}` (RefCOCO style, boxes as
integers in [0, 1000)). Images are in `{IMAGE_DIR}/`.

Generated with

```
{config!r}
```

To regenerate it exactly (with the default config), from the repository root:

```
python -c "from nuwa_train.data import write_sample; write_sample('data/synthetic_sample')"
```
"""
    (Path(out_dir) / "README.md").write_text(readme, encoding="utf-8")
    return paths
