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

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = -100
PADDING_SIDES = ("left", "right")


class CollateError(ValueError):
    """A record that cannot be batched; the message names the record and the field."""


def _record_name(record: object, position: int, id_key: str) -> str:
    record_id = record.get(id_key) if isinstance(record, Mapping) else getattr(record, id_key, None)
    return f"record {position} (id {record_id!r})" if record_id is not None else f"record {position}"


def _field(record: object, key: str):
    if isinstance(record, Mapping):
        return record.get(key)
    return getattr(record, key, None)


def as_image(value: object, where: str) -> Image.Image:
    """A PIL RGB image from a PIL image, an HxWx3 uint8 array or a file path."""
    if isinstance(value, Image.Image):
        return value.convert("RGB") if value.mode != "RGB" else value
    if isinstance(value, np.ndarray):
        if value.ndim != 3 or value.shape[2] != 3:
            raise CollateError(f"{where}: field 'image' array must be HxWx3, got shape {value.shape}")
        return Image.fromarray(value.astype(np.uint8))
    if isinstance(value, (str, os.PathLike)):
        try:
            with Image.open(value) as image:
                return image.convert("RGB")
        except OSError as error:
            raise CollateError(f"{where}: field 'image' cannot be read: {error}") from None
    raise CollateError(f"{where}: field 'image' must be a PIL image, an array or a path, got "
                       f"{type(value).__name__}")


@dataclass
class VisionLanguageCollator:
    """Callable turning a list of records into `input_ids, attention_mask, pixel_values, labels`.

    records: mappings (e.g. `datasets` rows) or objects with `image`, `prompt` and `answer`.
    `with_answer=False` builds generation prompts only (no labels), as evaluation needs.
    `max_length` truncates the answer side (never the prompt, which holds the image placeholders);
    a prompt longer than `max_length` raises.
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

    def __post_init__(self):
        if self.padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {self.padding_side!r}")
        tokenizer = self.processor.tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set one before collating batches")
        if getattr(self.processor, "chat_template", None) is None:
            raise ValueError("the processor has no chat template; the collator formats prompts with it")

    # ------------------------------------------------------------------------------------- text
    def prompt_text(self, prompt: str) -> str:
        return self.processor.apply_chat_template(self._messages(prompt), add_generation_prompt=True, tokenize=False)

    def answer_text(self, prompt: str, answer: str, where: str = "record") -> str:
        """What the full conversation adds after the generation prompt (answer + end of sequence)."""
        head = self.prompt_text(prompt)
        full = self.processor.apply_chat_template(
            self._messages(prompt) + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            tokenize=False)
        if not full.startswith(head):
            raise CollateError(f"{where}: the chat template does not render the conversation as generation prompt "
                               f"+ answer ({head!r} is not a prefix of {full!r})")
        return full[len(head):]

    @staticmethod
    def _messages(prompt: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]

    # ------------------------------------------------------------------------------------- batch
    def validate(self, record: object, position: int) -> tuple[Image.Image, str, str | None]:
        where = _record_name(record, position, self.id_key)
        values = {}
        for key in (self.image_key, self.prompt_key) + ((self.answer_key,) if self.with_answer else ()):
            value = _field(record, key)
            if value is None:
                raise CollateError(f"{where}: field {key!r} is missing")
            values[key] = value
        prompt = values[self.prompt_key]
        if not isinstance(prompt, str) or not prompt.strip():
            raise CollateError(f"{where}: field {self.prompt_key!r} must be a non-empty string, got {prompt!r}")
        image_token = getattr(self.processor, "image_token", "<image>")
        if image_token in prompt:
            raise CollateError(f"{where}: field {self.prompt_key!r} must not contain {image_token!r}; the chat "
                               f"template places the image")
        answer = None
        if self.with_answer:
            answer = values[self.answer_key]
            if not isinstance(answer, str) or not answer.strip():
                raise CollateError(f"{where}: field {self.answer_key!r} must be a non-empty string, got {answer!r}")
        return as_image(values[self.image_key], where), prompt.strip(), None if answer is None else answer.strip()

    def __call__(self, records: Sequence[object]) -> dict[str, torch.Tensor]:
        if len(records) == 0:
            raise CollateError("cannot collate an empty batch")
        tokenizer = self.processor.tokenizer
        images, prompts, texts, answers = [], [], [], []
        for position, record in enumerate(records):
            image, prompt, answer = self.validate(record, position)
            images.append(image)
            prompts.append(prompt)
            texts.append(self.prompt_text(prompt))
            answers.append(answer)
        # The processor expands the image placeholder to the model's number of image tokens.
        encoded = self.processor(images=images, text=texts, return_tensors=None, padding=False)
        rows, label_rows = [], []
        for position, prompt_ids in enumerate(encoded["input_ids"]):
            prompt_ids = list(prompt_ids)
            labels = [self.ignore_index] * len(prompt_ids)
            if self.with_answer:
                where = _record_name(records[position], position, self.id_key)
                text = self.answer_text(prompts[position], answers[position], where)
                answer_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in answer_ids:
                    unknown = [w for w, i in zip(text.split(), answer_ids) if i == tokenizer.unk_token_id]
                    raise CollateError(f"{where}: the answer {answers[position]!r} has words the tokenizer does not "
                                       f"know ({unknown[:5]})")
                if not answer_ids or answer_ids[-1] != tokenizer.eos_token_id:
                    answer_ids.append(tokenizer.eos_token_id)
                if self.max_length is not None:
                    room = self.max_length - len(prompt_ids)
                    if room < 1:
                        raise CollateError(f"{where}: the prompt alone has {len(prompt_ids)} tokens, more than "
                                           f"max_length={self.max_length}")
                    answer_ids = answer_ids[:room]
                prompt_ids = prompt_ids + answer_ids
                labels = labels + answer_ids
            rows.append(prompt_ids)
            label_rows.append(labels)
        batch = self._pad(rows, label_rows, tokenizer.pad_token_id)
        batch["pixel_values"] = torch.as_tensor(np.asarray(encoded["pixel_values"]), dtype=torch.float32)
        batch.update(self._extras(encoded, rows))
        if not self.with_answer:
            del batch["labels"]
        return batch

    def _extras(self, encoded, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """The processor's other outputs: per-image tensors as they are (image_grid_thw, image_sizes);
        per-token ones (Qwen-VL's mm_token_type_ids) extended over the answer with 0 and padded like input_ids."""
        extras = {}
        length = max(len(r) for r in rows)
        for key, value in encoded.items():
            if key in ("input_ids", "attention_mask", "pixel_values"):
                continue
            if isinstance(value, list) and len(value) == len(rows) and all(
                    isinstance(v, (list, np.ndarray)) and np.ndim(v) == 1 and len(v) <= len(r) for v, r in zip(value, rows)):
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
