"""Batch (image, prompt, answer) records for a VLM through its processor's chat template.

The collator is independent of any training loop: pre-training, fine-tuning and evaluation all use
it, so the prompt the model is trained on is exactly the prompt `generate` is given later.

For each record the user turn is `[image, prompt]` and the assistant turn is `answer`; the processor's
chat template decides the layout (e.g. image before or after the question). The prompt part
(`add_generation_prompt=True`) and the answer part (what the full conversation adds after it, which
ends with the end-of-sequence token) are tokenised separately and concatenated, so the answer boundary
is exact. Labels are the answer tokens; prompt, image and padding positions are `ignore_index`.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from .boxes import BoxError, BoxFormat, ImageFrame, below_grid, object_box01
from .geometry import Box01, to_box01
from .images import to_rgb, upright
from .schema import (
    ANSWER_TRUNCATED,
    ANSWER_UNKNOWN_TOKENS,
    BOX_BELOW_GRID,
    BOX_PLACEHOLDER,
    IGNORE_INDEX,
    ON_ERROR,
    PADDING_SIDES,
    PROMPT_TOO_LONG,
    PROMPT_UNKNOWN_TOKENS,
    REF_PLACEHOLDER,
    TEXT_TASK,
    TURNS_DROPPED,
)

logger = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(f"{re.escape(REF_PLACEHOLDER)}|{re.escape(BOX_PLACEHOLDER)}")


class Validated(NamedTuple):
    """A record ready to batch: its image (None: text-only), its (question, answer) turns in the text the model
    reads (answers None for generation prompts), and its system prompt."""

    image: Image.Image | None
    turns: list[tuple[str, str | None]]
    system: str | None = None

    @property
    def prompt(self) -> str:
        return self.turns[0][0]

    @property
    def answer(self) -> str | None:
        return self.turns[0][1]


class CollateError(ValueError):
    """A record that cannot be batched; the message names the record and the field."""


def _record_name(record: object, position: int, id_key: str) -> str:
    """A file's record as `file: record i (id ...)`; otherwise the batch position and the id."""
    record_id, source, index = (_field(record, key) for key in (id_key, "source", "index"))
    if source is not None:
        return f"{source}: record {index} (id {record_id!r})"
    return f"record {position} (id {record_id!r})" if record_id is not None else f"record {position}"


def needed_image_side(processor, sizes_are_areas: bool = False) -> int | None:
    """The largest short side the processor can make use of (None: unknown); bigger images may be decoded reduced.

    `sizes_are_areas`: the image processor's `size` bounds pixel areas, not sides (a family's processor quirk,
    `ModelFamily.image_sizes_are_areas`: Qwen-VL's dynamic resolution)."""
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    if size is None:
        return None

    def get(key: str):
        return size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)

    if sizes_are_areas:
        area = get("longest_edge") or get("max_pixels")
        return math.isqrt(area) if area else None
    sides = [get(key) for key in ("shortest_edge", "height", "width", "longest_edge")]
    sides += [side for pair in (getattr(image_processor, "image_grid_pinpoints", None) or []) for side in pair]
    sides = [side for side in sides if side]
    return max(sides) if sides else None


def _field(record: object, key: str):
    if isinstance(record, Mapping):
        return record.get(key)
    return getattr(record, key, None)


def as_image(value: object, where: str) -> Image.Image:
    """A PIL RGB image, upright (EXIF orientation applied), from a PIL image of any mode, an HxWx3 uint8 array or
    a file path (data/images.py: the frame boxes are drawn in, 16-bit and palette images decoded right)."""
    if isinstance(value, Image.Image):
        return to_rgb(upright(value))
    if isinstance(value, np.ndarray):
        if value.ndim != 3 or value.shape[2] != 3:
            raise CollateError(f"{where}: field 'image' array must be HxWx3, got shape {value.shape}")
        return Image.fromarray(value.astype(np.uint8))
    if isinstance(value, (str, os.PathLike)):
        try:
            with Image.open(value) as image:
                image.load()
                converted = to_rgb(upright(image))
                return converted.copy() if converted is image else converted  # detached from the closed file
        except (OSError, ValueError) as error:
            raise CollateError(f"{where}: field 'image' cannot be read: {error}") from None
    raise CollateError(f"{where}: field 'image' must be a PIL image, an array or a path, got {type(value).__name__}")


@dataclass
class VisionLanguageCollator:
    """Callable turning a list of records into `input_ids, attention_mask, pixel_values, labels`.

    records: mappings (e.g. `datasets` rows) or objects with `image`, `prompt` and `answer`. A record whose
    `messages` hold several user/assistant turns trains on every assistant turn (labels on each answer, the image
    in the first user turn), as LLaVA does; `max_length` then keeps whole turns and counts the ones it drops.
    `with_answer=False` builds generation prompts only (no labels), as evaluation needs.
    `box_format`: grounding records (a `box`, and an `expression` when known) are asked and answered in that
    format (data/boxes.py) instead of their own text; `llava` boxes also pad the image to a centred square first.
    `max_length` truncates the answer side (never the prompt, which holds the image placeholders) and counts it;
    a prompt longer than `max_length`, or an answer with text the tokenizer cannot represent, raises naming the
    record, or with `on_error="skip"` leaves the record out of its batch and counts it. `counts` holds what was
    truncated, refused or unrepresentable; each kind is also logged once.
    """

    processor: object
    padding_side: str = "right"
    max_length: int | None = None
    with_answer: bool = True
    ignore_index: int = IGNORE_INDEX
    image_key: str = "image"
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    id_key: str = "id"
    messages_key: str = "messages"
    box_format: BoxFormat | None = None
    on_error: str = "raise"
    counts: Counter = field(default_factory=Counter)

    def __post_init__(self):
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {self.padding_side!r}")
        if self.on_error not in ON_ERROR:
            raise ValueError(f"data.on_error={self.on_error!r} must be one of {', '.join(ON_ERROR)}")
        tokenizer = self.processor.tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one before collating batches")
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError("the processor has no chat template; the collator formats prompts with it")

    # ------------------------------------------------------------------------------------- text
    def prompt_text(self, prompt: str, has_image: bool = True, system: str | None = None) -> str:
        return self.processor.apply_chat_template(
            self._chat([], prompt, has_image, system), add_generation_prompt=True, tokenize=False
        )

    @staticmethod
    def _messages(prompt: str, has_image: bool = True) -> list[dict]:
        text = [{"type": "text", "text": prompt}]
        return [{"role": "user", "content": [{"type": "image"}, *text] if has_image else text}]

    @classmethod
    def _chat(
        cls,
        turns: Sequence[tuple[str, str]],
        question: str | None = None,
        has_image: bool = True,
        system: str | None = None,
    ) -> list[dict]:
        """Chat messages of whole (question, answer) turns, then an open `question`; the image in the first turn."""
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
        for number, (asked, answered) in enumerate(turns):
            messages += cls._messages(asked, has_image and number == 0)
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answered}]})
        if question is not None:
            messages += cls._messages(question, has_image and not turns)
        return messages

    def conversation_pieces(
        self, turns: Sequence[tuple[str, str]], where: str = "record", has_image: bool = True, system: str | None = None
    ) -> list[tuple[str, bool]]:
        """The text the conversation adds after its first generation prompt, as (text, is_answer) pieces.

        Each piece is the difference of two renderings of the chat template (prompt of turn i, then turn i
        answered), so the pieces joined are exactly the template's rendering of the whole conversation.
        """
        render = self.processor.apply_chat_template
        previous = self.prompt_text(turns[0][0], has_image, system)
        pieces = []
        for number, (question, _) in enumerate(turns):
            if number:
                prompt = render(
                    self._chat(turns[:number], question, has_image, system), add_generation_prompt=True, tokenize=False
                )
                pieces.append((self._after(previous, prompt, where), False))
                previous = prompt
            answered = render(self._chat(turns[: number + 1], has_image=has_image, system=system), tokenize=False)
            pieces.append((self._after(previous, answered, where), True))
            previous = answered
        return pieces

    @staticmethod
    def _after(head: str, full: str, where: str) -> str:
        if not full.startswith(head):
            raise CollateError(
                f"{where}: the chat template does not render the conversation turn by turn "
                f"({head!r} is not a prefix of {full!r})"
            )
        return full[len(head) :]

    # ------------------------------------------------------------------------------------- batch
    def turns(self, record: object, prompt: str, answer: str, where: str) -> list[tuple[str, str]]:
        """The record's (question, answer) turns: its `messages` when they hold a whole conversation, else one."""
        messages = _field(record, self.messages_key)
        if not messages or len(messages) <= 2:
            return [(prompt, answer)]
        roles = [_field(m, "role") for m in messages]
        if len(messages) % 2 or roles != ["user", "assistant"] * (len(messages) // 2):
            raise CollateError(
                f"{where}: field {self.messages_key!r} must alternate user / assistant turns ending "
                f"with the assistant, got roles {roles}"
            )
        turns = [(prompt, answer)]
        for number in range(2, len(messages), 2):
            question, reply = (_field(m, "content") for m in messages[number : number + 2])
            for turn, text in ((number, question), (number + 1, reply)):
                if not isinstance(text, str) or not text.strip():
                    raise CollateError(
                        f"{where}: {self.messages_key}[{turn}].content must be a non-empty string, got {text!r}"
                    )
            turns.append((question.strip(), reply.strip()))
        return turns

    def validate(self, record: object, position: int) -> Validated:
        """A record's image (None for a text-only record, task "text"), turns and system prompt, checked."""
        where = _record_name(record, position, self.id_key)
        values = {}
        text_only = _field(record, "task") == TEXT_TASK
        if text_only and _field(record, self.image_key) is not None:
            raise CollateError(f"{where}: a text-only record (task {TEXT_TASK!r}) must not have an image")
        needed = (() if text_only else (self.image_key,)) + (self.prompt_key,)
        for key in needed + ((self.answer_key,) if self.with_answer else ()):
            value = _field(record, key)
            if value is None:
                raise CollateError(f"{where}: field {key!r} is missing")
            values[key] = value
        prompt = values[self.prompt_key]
        if not isinstance(prompt, str) or not prompt.strip():
            raise CollateError(f"{where}: field {self.prompt_key!r} must be a non-empty string, got {prompt!r}")
        image_token = getattr(self.processor, "image_token", "<image>")
        if image_token in prompt:
            raise CollateError(
                f"{where}: field {self.prompt_key!r} must not contain {image_token!r}; the chat "
                f"template places the image"
            )
        answer = None
        if self.with_answer:
            answer = values[self.answer_key]
            if not isinstance(answer, str) or not answer.strip():
                raise CollateError(f"{where}: field {self.answer_key!r} must be a non-empty string, got {answer!r}")
        image = None if text_only else as_image(values[self.image_key], where)
        prompt, answer = prompt.strip(), None if answer is None else answer.strip()
        objects = _field(record, "objects")
        if (
            not objects
            and self.box_format is not None
            and _field(record, "task") == "grounding"
            and (_field(record, "box") is not None or _field(record, "expression"))
        ):
            image, prompt, answer = self._in_box_format(record, image, prompt, answer, where)
        turns = self.turns(record, prompt, answer, where) if self.with_answer else [(prompt, None)]
        if objects:
            image, turns = self._with_objects(image, turns, objects, where)
        return Validated(image, turns, self._system(record, where))

    def _system(self, record: object, where: str) -> str | None:
        system = _field(record, "system")
        if system is None:
            return None
        if not isinstance(system, str) or not system.strip():
            raise CollateError(f"{where}: field 'system' must be a non-empty string, got {system!r}")
        if "system" not in self.processor.chat_template:
            raise CollateError(
                f"{where}: the record has a system prompt but the processor's chat template has no "
                f"system role; remove the prompt from the data or use a template with one"
            )
        return system.strip()

    def _with_objects(
        self, image: Image.Image, turns: list[tuple[str, str | None]], objects: Mapping, where: str
    ) -> tuple[Image.Image, list[tuple[str, str | None]]]:
        """The turns with each <ref-object> / <bbox> placeholder written, in order, in `box_format`."""
        if self.box_format is None:
            raise CollateError(
                f"{where}: field 'objects' (<ref-object>/<bbox> placeholders) needs a box format "
                f"(data.box_format, or the collator's box_format)"
            )
        frame = self.image_frame(image)
        boxes = []
        for number, box in enumerate(objects["bbox"]):
            try:
                boxes.append(object_box01(box, objects["bbox_type"], image.size))
            except BoxError as error:
                raise CollateError(f"{where}: field 'objects.bbox[{number}]': {error}") from None
            self._check_box_size(boxes[-1], frame, where)
        values = {REF_PLACEHOLDER: iter(objects["ref"]), BOX_PLACEHOLDER: iter(boxes)}
        counts = {REF_PLACEHOLDER: len(objects["ref"]), BOX_PLACEHOLDER: len(objects["bbox"])}

        def written(match: re.Match) -> str:
            placeholder = match.group()
            value = next(values[placeholder], None)
            if value is None:
                raise CollateError(
                    f"{where}: more {placeholder} placeholders than objects."
                    f"{'ref' if placeholder == REF_PLACEHOLDER else 'bbox'} entries "
                    f"({counts[placeholder]})"
                )
            return (
                self.box_format.render_ref(value)
                if placeholder == REF_PLACEHOLDER
                else self.box_format.render_coordinates(value, frame)
            )

        turns = [tuple(None if text is None else _PLACEHOLDER.sub(written, text) for text in turn) for turn in turns]
        return self.native_image(image), turns

    def image_frame(self, image: Image.Image) -> ImageFrame:
        """The frame `box_format` renders and parses boxes of this image in (the format's own rule)."""
        if self.box_format is None:
            return ImageFrame(*image.size)
        return self.box_format.image_frame(image, getattr(self.processor, "image_processor", None))

    def _in_box_format(
        self, record: object, image: Image.Image, prompt: str, answer: str | None, where: str
    ) -> tuple[Image.Image, str, str | None]:
        """A grounding record asked (and, when it has a box, answered) in `box_format`, on the image its boxes
        refer to. A record with an expression and no box is a question only (e.g. from an lmms-eval task)."""
        codec, frame = self.box_format, self.image_frame(image)
        expression, box = _field(record, "expression"), _field(record, "box")
        if box is not None:
            self._check_box_size(to_box01(tuple(box)), frame, where)
            answer = codec.render(to_box01(tuple(box)), frame, label=expression or "")
        return self.native_image(image), codec.prompt(expression) if expression else prompt, answer

    def _check_box_size(self, box: Box01, frame: ImageFrame, where: str) -> None:
        """A box below one cell of the answer's grid trains an answer that reads back as no box: counted."""
        if below_grid(self.box_format, box, frame):
            self._count(BOX_BELOW_GRID, f"{where}: box {tuple(round(v, 4) for v in box)}")

    def native_image(self, image: Image.Image) -> Image.Image:
        """The image as the box format's frame has it (e.g. LLaVA's padded square), else the image itself."""
        if self.box_format is None:
            return image
        return self.box_format.native_image(image, getattr(self.processor, "image_processor", None))

    def _count(self, kind: str, where: str) -> None:
        if not self.counts[kind]:
            logger.warning("%s: %s (counted in the data report; further cases are not logged)", where, kind)
        self.counts[kind] += 1

    def _refuse(self, kind: str, where: str, message: str) -> None:
        """A record that cannot train: an error under on_error="raise", else counted (the caller drops it)."""
        if self.on_error == "raise":
            raise CollateError(f"{where}: {message} (set data.on_error: skip to leave such records out)")
        self._count(kind, where)

    def __call__(self, records: Sequence[object]) -> dict[str, torch.Tensor]:
        if len(records) == 0:
            raise CollateError("cannot collate an empty batch")
        validated = [self.validate(record, position) for position, record in enumerate(records)]
        encoded, rows, label_rows, kept = self._encode(records, validated)
        if len(kept) < len(records):  # records refused: the processor runs again on the rest (a rare path)
            if not kept:
                raise CollateError(
                    f"every record of this batch was refused ({len(records)} records; see the warnings above)"
                )
            records, validated = [records[i] for i in kept], [validated[i] for i in kept]
            encoded, rows, label_rows, kept = self._encode(records, validated, counted=False)
        batch = self._pad(rows, label_rows, self.processor.tokenizer.pad_token_id)
        if encoded.get("pixel_values") is not None:  # absent when every record is text-only
            batch["pixel_values"] = torch.as_tensor(np.asarray(encoded["pixel_values"]), dtype=torch.float32)
        batch.update(self._extras(encoded, rows))
        if not self.with_answer:
            del batch["labels"]
        return batch

    def _encode(self, records: Sequence[object], validated: list, counted: bool = True):
        """Token rows and label rows of the records, and the positions of those that can train."""
        tokenizer = self.processor.tokenizer
        images = [item.image for item in validated if item.image is not None]
        texts = [self.prompt_text(item.prompt, item.image is not None, item.system) for item in validated]
        # The processor expands the image placeholder to the model's number of image tokens.
        encoded = self.processor(images=images or None, text=texts, return_tensors=None, padding=False)
        rows, label_rows, kept = [], [], []
        unknown = tokenizer.unk_token_id
        for position, prompt_ids in enumerate(encoded["input_ids"]):
            prompt_ids = list(prompt_ids)
            where = _record_name(records[position], position, self.id_key)
            if counted and unknown is not None and unknown in prompt_ids:
                self._count(PROMPT_UNKNOWN_TOKENS, where)
            if self.max_length is not None and len(prompt_ids) >= self.max_length:
                self._refuse(
                    PROMPT_TOO_LONG,
                    where,
                    f"the prompt alone has {len(prompt_ids)} tokens, at least "
                    f"max_length={self.max_length} (data.max_length)",
                )
                continue
            labels = [self.ignore_index] * len(prompt_ids)
            if self.with_answer:
                item = validated[position]
                answered = self._answered(
                    item.turns, where, len(prompt_ids), counted, item.image is not None, item.system
                )
                if answered is None:
                    continue
                prompt_ids = prompt_ids + answered[0]
                labels = labels + answered[1]
            rows.append(prompt_ids)
            label_rows.append(labels)
            kept.append(position)
        return encoded, rows, label_rows, kept

    def _answered(
        self,
        turns: list[tuple[str, str]],
        where: str,
        prompt_length: int,
        counted: bool,
        has_image: bool = True,
        system: str | None = None,
    ) -> tuple[list[int], list[int]] | None:
        """Token ids and labels of everything after the first generation prompt (None: the record is refused).

        Answers are labelled, later questions are not. Every answer ends with end-of-sequence. Within
        `max_length` the conversation keeps whole turns; only a first answer longer than the room left is cut.
        """
        tokenizer = self.processor.tokenizer
        unknown = tokenizer.unk_token_id
        pieces = self.conversation_pieces(turns, where, has_image, system)
        ids, labels = [], []
        for number in range(len(turns)):
            turn_ids, turn_labels = [], []
            if number:  # the user's next question (template text included)
                question_ids = tokenizer(pieces[2 * number - 1][0], add_special_tokens=False)["input_ids"]
                if counted and unknown is not None and unknown in question_ids:
                    self._count(PROMPT_UNKNOWN_TOKENS, where)
                turn_ids += question_ids
                turn_labels += [self.ignore_index] * len(question_ids)
            text = pieces[2 * number][0]
            answer_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if unknown is not None and unknown in answer_ids:
                words = [w for w, i in zip(text.split(), answer_ids) if i == unknown]
                self._refuse(
                    ANSWER_UNKNOWN_TOKENS,
                    where,
                    f"the answer {turns[number][1]!r} has words the tokenizer does not know ({words[:5]})",
                )
                return None
            if not answer_ids or answer_ids[-1] != tokenizer.eos_token_id:
                answer_ids.append(tokenizer.eos_token_id)
            turn_ids += answer_ids
            turn_labels += answer_ids
            room = None if self.max_length is None else self.max_length - prompt_length - len(ids)
            if room is not None and len(turn_ids) > room:
                if number == 0:
                    if counted:
                        self._count(ANSWER_TRUNCATED, where)
                    ids, labels = turn_ids[:room], turn_labels[:room]
                elif counted:
                    self._count(TURNS_DROPPED, where)
                break
            ids, labels = ids + turn_ids, labels + turn_labels
        return ids, labels

    def _extras(self, encoded, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """The processor's other outputs: per-image tensors as they are (image_grid_thw, image_sizes);
        per-token ones (Qwen-VL's mm_token_type_ids) extended over the answer with 0 and padded like input_ids."""
        extras = {}
        length = max(len(r) for r in rows)
        for key, value in encoded.items():
            if key in ("input_ids", "attention_mask", "pixel_values"):
                continue
            if (
                isinstance(value, list)
                and len(value) == len(rows)
                and all(
                    isinstance(v, (list, np.ndarray)) and np.ndim(v) == 1 and len(v) <= len(r)
                    for v, r in zip(value, rows)
                )
            ):
                table = torch.zeros((len(rows), length), dtype=torch.long)
                for i, (row_values, row) in enumerate(zip(value, rows)):
                    full = list(row_values) + [0] * (len(row) - len(row_values))
                    span = slice(length - len(row), length) if self.padding_side == "left" else slice(0, len(row))
                    table[i, span] = torch.tensor(full)
                extras[key] = table
            else:
                extras[key] = torch.as_tensor(np.asarray(value))
        return extras

    def _pad(self, rows: list[list[int]], label_rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), length), self.ignore_index, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (row, label) in enumerate(zip(rows, label_rows)):
            span = slice(length - len(row), length) if self.padding_side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row)
            labels[i, span] = torch.tensor(label)
            mask[i, span] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
