"""Model adapters: attach Nüwa pruning to one HF VLM instance without patching any class."""

from .attach import NuwaHandle, attach_nuwa, detach_nuwa
from .base import Adapter, NuwaInputError, UnsupportedModelError
from .families import FAMILIES, adapter_for
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .loading import load_processor, load_vlm
from .qwen2_vl import QwenVLAdapter
from .qwen3_vl import Qwen3VLAdapter
from .sequence import KeptTokens, KeptView

__all__ = [
    "Adapter",
    "FAMILIES",
    "KeptTokens",
    "KeptView",
    "NuwaHandle",
    "NuwaInputError",
    "adapter_for",
    "attach_nuwa",
    "detach_nuwa",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "QwenVLAdapter",
    "Qwen3VLAdapter",
    "UnsupportedModelError",
    "load_processor",
    "load_vlm",
]
