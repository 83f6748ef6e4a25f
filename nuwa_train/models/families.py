"""The supported VLM families: each one declared once, as one `ModelFamily` entry in `FAMILIES`.

A family is everything that differs between VLMs, in one place: the adapter that reads its HF classes (stage-1
features and scores, positions, LoRA targets, projector: the family's module), its native box format (whose own
methods hold the grounding prompt and the image frame its boxes refer to: padding, resizing), its processor quirks,
and a tiny random-weight builder of the real HF class for tests. The collator, evaluation, the lmms-eval model,
loading and export ask the family or the box format; none of them checks a family's types or class names.
Adding a family: its module (an `Adapter` subclass), its tiny config, its tests, and one entry below (README,
"Adding a model family").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

from torch import nn

from ..data.boxes import BoxFormat, answer_box_format, box_format
from ..data.collate import needed_image_side
from .base import Adapter, UnsupportedModelError
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_vl import QwenVLAdapter, image_only_processors
from .qwen3_vl import Qwen3VLAdapter
from .tiny import build_tiny_llava, build_tiny_llava_next
from .tiny_qwen import TinyQwenSpec, build_tiny_qwen


@dataclass(frozen=True)
class ModelFamily:
    """One VLM family, keyed by its HF config's `model_type`."""

    model_type: str
    adapter: type[Adapter]
    model_class: type  # the HF class the family's checkpoints load as (a class the adapter reads)
    box_format: str  # the format its released checkpoints answer boxes in (data/boxes.py)
    tiny_builder: Callable[..., tuple]  # (words=, atomic_tokens=, round_trip=) -> (model, processor), random weights
    # Processor quirks: classes loaded instead of the ones a processor_config.json names, and whether the image
    # processor's `size` bounds pixel areas rather than sides.
    processor_classes: Mapping[str, type] = field(default_factory=dict)
    image_sizes_are_areas: bool = False

    def build_tiny(self, words=(), atomic_tokens=(), **settings) -> tuple:
        """A tiny (model, processor) whose tokenizer round-trips text and spells the family's native box answers."""
        extra_words, specials = box_format(self.box_format).vocabulary()
        return self.tiny_builder(
            words=[*words, *extra_words], atomic_tokens=[*atomic_tokens, *specials], round_trip=True, **settings
        )

    def image_side(self, processor) -> int | None:
        """The largest short side the family's processor uses (images beyond it may be decoded reduced)."""
        return needed_image_side(processor, self.image_sizes_are_areas)


def _qwen(
    model_type: str,
    model_class: type,
    upstream_processor: str,
    adapter: type[Adapter] = QwenVLAdapter,
    box_format_name: str | None = None,
) -> ModelFamily:
    return ModelFamily(
        model_type,
        adapter,
        model_class,
        box_format_name or model_type,
        partial(build_tiny_qwen, TinyQwenSpec(version=model_type)),
        image_only_processors(upstream_processor),
        image_sizes_are_areas=True,
    )


FAMILIES: dict[str, ModelFamily] = {
    family.model_type: family
    for family in (
        ModelFamily("llava", LlavaAdapter, LlavaAdapter.model_classes[0], "llava", build_tiny_llava),
        ModelFamily("llava_next", LlavaNextAdapter, LlavaNextAdapter.model_classes[0], "llava", build_tiny_llava_next),
        _qwen("qwen2_vl", QwenVLAdapter.model_classes[0], "Qwen2VLProcessor"),
        _qwen("qwen2_5_vl", QwenVLAdapter.model_classes[1], "Qwen2_5_VLProcessor"),
        _qwen("qwen3_vl", Qwen3VLAdapter.model_classes[0], "Qwen3VLProcessor", Qwen3VLAdapter),
        _qwen("qwen3_vl_moe", Qwen3VLAdapter.model_classes[1], "Qwen3VLProcessor", Qwen3VLAdapter, "qwen3_vl"),
    )
}


def family_for(model_type: str | None) -> ModelFamily | None:
    """The family of a HF `model_type` (None: not a supported family, or not known)."""
    return FAMILIES.get(model_type)


def processor_classes() -> dict[str, type]:
    """Every family's processor replacements, by the class name a processor_config.json states."""
    return {name: cls for family in FAMILIES.values() for name, cls in family.processor_classes.items()}


def image_side(processor, model_type: str | None) -> int | None:
    """The largest short side `processor` uses, read the way its family's processor states sizes."""
    family = family_for(model_type)
    return family.image_side(processor) if family is not None else needed_image_side(processor)


def box_format_for(
    model_type: str | None, tokenizer, name: str | None = None, loc_prompt_template: str | None = None
) -> BoxFormat | None:
    """The box format a model of this family answers in (`answer_box_format` with the family's own format)."""
    family = family_for(model_type)
    return answer_box_format(tokenizer, name, family.box_format if family is not None else None, loc_prompt_template)


def base_model(model: nn.Module) -> nn.Module:
    """The HF model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def family_of(model: nn.Module) -> ModelFamily:
    """The family of a supported HF VLM (or a peft model wrapping one), by the class it is an instance of."""
    base = base_model(model)
    family = next((f for f in FAMILIES.values() if isinstance(base, f.model_class)), None)
    if family is None:
        supported = ", ".join(sorted(f.model_class.__name__ for f in FAMILIES.values()))
        raise UnsupportedModelError(f"{type(base).__name__} is not supported by Nüwa yet; supported: {supported}")
    return family


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of this model's VLM family."""
    return family_of(model).adapter(base_model(model))
