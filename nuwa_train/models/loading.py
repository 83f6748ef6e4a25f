"""Load a HF VLM and its processor from a local directory, whatever the family (one code path for
the tiny models and real checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor


class ModelPathError(FileNotFoundError):
    """A model path that is not a local HF directory; the message says which path was tried."""


def local_model_dir(path: str | Path, needs: str = "config.json") -> Path:
    """`path` as an existing local model directory holding `needs`, else a `ModelPathError` naming it.

    nuwa-train never downloads: a missing directory would otherwise reach the Hub client and come back as
    "Repo id must be in the form ...", which does not say that the directory is missing.
    """
    directory = Path(path).expanduser()
    tried = directory.resolve()
    if not directory.is_dir():
        raise ModelPathError(
            f"model directory {str(path)!r} does not exist (tried {tried}); nuwa-train loads "
            f"models from local directories only and never downloads. Check the path (e.g. "
            f"model.model_path in the recipe, or --model-path for export)"
        )
    if not (directory / needs).is_file():
        raise ModelPathError(
            f"{tried} has no {needs}: not a Hugging Face model directory (save one with save_pretrained)"
        )
    return directory


def load_processor(path: str | Path):
    """The directory's processor: the class a family loads in place of the one processor_config.json names (its
    processor quirk, `ModelFamily.processor_classes`), else `AutoProcessor`'s."""
    from .families import processor_classes  # late: the families import every adapter

    config = local_model_dir(path, needs="tokenizer_config.json") / "processor_config.json"
    name = json.loads(config.read_text()).get("processor_class") if config.is_file() else None
    replacement = processor_classes().get(name)
    if replacement is not None:
        return replacement.from_pretrained(path, local_files_only=True)
    return AutoProcessor.from_pretrained(path, local_files_only=True)


def load_vlm(path: str | Path, dtype: str | torch.dtype = "float32"):
    """(model, processor) from a HF directory: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, ..."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = AutoModelForImageTextToText.from_pretrained(local_model_dir(path), dtype=dtype, local_files_only=True)
    return model, load_processor(path)
