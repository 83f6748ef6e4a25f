"""Model adapters: attach Nüwa pruning to one HF VLM instance without patching any class."""

from .attach import NuwaHandle, NuwaInputError, attach_nuwa, detach_nuwa
from .base import UnsupportedModelError
from .llava import LlavaAdapter

__all__ = ["NuwaHandle", "NuwaInputError", "attach_nuwa", "detach_nuwa", "LlavaAdapter", "UnsupportedModelError"]
