"""The supported VLM families, in one place.

Adding a family = one adapter module (an `Adapter` subclass naming its HF classes), one line here, and a
tiny random-weight config of the real HF class (so the family's tests run without downloads). See the
README's "Adding a model family".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import nn

from ..data.boxes import BoxFormat, box_format
from .base import Adapter, UnsupportedModelError
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_vl import QwenVLAdapter
from .tiny import build_tiny_llava, build_tiny_llava_next
from .tiny_qwen import TinyQwenSpec, build_tiny_qwen


@dataclass(frozen=True)
class Family:
    """One VLM family: the adapter that reads its HF classes, how to build a tiny one for tests, and the box
    format its released checkpoints were trained to answer in (data/boxes.py)."""

    adapter: type[Adapter]
    build_tiny: Callable[..., tuple]  # (words=..., atomic_tokens=...) -> (model, processor), random weights
    box_format: str


def _speaking(builder: Callable[..., tuple], format_name: str) -> Callable[..., tuple]:
    """A tiny builder whose tokenizer round-trips text and knows the family's box format (its native answers)."""
    def build(words=(), atomic_tokens=(), **settings):
        extra_words, specials = box_format(format_name).vocabulary()
        return builder(words=[*words, *extra_words], atomic_tokens=[*atomic_tokens, *specials], round_trip=True,
                       **settings)
    return build


FAMILIES: dict[str, Family] = {
    "llava": Family(LlavaAdapter, _speaking(build_tiny_llava, "llava"), "llava"),
    "llava_next": Family(LlavaNextAdapter, _speaking(build_tiny_llava_next, "llava"), "llava"),
    "qwen2_vl": Family(QwenVLAdapter, _speaking(partial(build_tiny_qwen, TinyQwenSpec(version="qwen2_vl")),
                                                "qwen2_vl"), "qwen2_vl"),
    "qwen2_5_vl": Family(QwenVLAdapter, _speaking(partial(build_tiny_qwen, TinyQwenSpec(version="qwen2_5_vl")),
                                                  "qwen2_5_vl"), "qwen2_5_vl"),
}  # keyed by the HF config's `model_type`
LOC_TOKEN_PREFIX = "<loc_"  # a vocabulary with <loc_0> .. <loc_{n-1}> answers in n-bin coordinate tokens


def box_format_for(model_type: str | None, tokenizer, name: str | None = None,
                   loc_prompt_template: str | None = None) -> BoxFormat | None:
    """The box format a model answers in: `name` when given (the recipe key data.box_format), else coordinate
    tokens when its vocabulary has them (the tiny base was trained on them), else its family's; None when neither
    is known (then the records' own answers are used as they are). `loc_prompt_template`: the grounding question
    of coordinate-token models (the synthetic data's own wording); the other formats keep their family's."""
    vocabulary = tokenizer.get_vocab()
    bins = 0
    while f"{LOC_TOKEN_PREFIX}{bins}>" in vocabulary:
        bins += 1
    if name is None:
        family = FAMILIES.get(model_type)
        name = "loc_tokens" if bins else family.box_format if family is not None else None
    if name is None:
        return None
    if name != "loc_tokens":
        return box_format(name)
    return box_format(name, prompt_template=loc_prompt_template, **({"bins": bins} if bins else {}))


def base_model(model: nn.Module) -> nn.Module:
    """The HF model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter of this model's VLM family (a supported HF VLM, or a peft model wrapping one)."""
    base = base_model(model)
    adapter_class = next((f.adapter for f in FAMILIES.values() if isinstance(base, f.adapter.model_classes)), None)
    if adapter_class is None:
        supported = ", ".join(sorted({c.__name__ for f in FAMILIES.values() for c in f.adapter.model_classes}))
        raise UnsupportedModelError(f"{type(base).__name__} is not supported by Nüwa yet; supported: {supported}")
    return adapter_class(base)
