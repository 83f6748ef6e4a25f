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

from .base import Adapter, UnsupportedModelError
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_vl import QwenVLAdapter
from .tiny import build_tiny_llava, build_tiny_llava_next
from .tiny_qwen import TinyQwenSpec, build_tiny_qwen


@dataclass(frozen=True)
class Family:
    """One VLM family: the adapter that reads its HF classes, and how to build a tiny one for tests."""

    adapter: type[Adapter]
    build_tiny: Callable[..., tuple]  # (words=..., atomic_tokens=...) -> (model, processor), random weights


FAMILIES: dict[str, Family] = {
    "llava": Family(LlavaAdapter, build_tiny_llava),
    "llava_next": Family(LlavaNextAdapter, build_tiny_llava_next),
    "qwen2_vl": Family(QwenVLAdapter, partial(build_tiny_qwen, TinyQwenSpec(version="qwen2_vl"))),
    "qwen2_5_vl": Family(QwenVLAdapter, partial(build_tiny_qwen, TinyQwenSpec(version="qwen2_5_vl"))),
}


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
