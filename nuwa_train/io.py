"""Small file-system helpers shared by everything that writes results people load later."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def replace_directory(staging: Path, target: Path) -> None:
    """Move a finished `staging` directory to `target` with renames only.

    An existing target is renamed aside first and removed last, so at every moment `target` is either
    the complete old directory or the complete new one: a crash never leaves a half-written one.
    """
    backup = None
    if target.exists():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, backup)
    os.replace(staging, target)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(staging)` next to `path`, then one rename: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    write(staging)
    os.replace(staging, path)
    return path


# ------------------------------------------------------------------------------------------ checkpoints
class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that holds Python objects beyond tensors and plain data: loading it could run code."""

    def __init__(self, path: str | os.PathLike, detail: str):
        self.path = str(path)
        super().__init__(
            f"refused to load the checkpoint {self.path}: it holds Python objects that unpickling would run "
            f"({detail.strip().splitlines()[-1] if detail.strip() else 'unknown object'}). nuwa-train loads "
            f"checkpoints weights-only (tensors, numbers, strings, containers and its own settings classes); a file "
            f"written by nuwa-train never needs more. Do not load it unless you made it yourself.")


def _weights_only_detail(error: Exception) -> str:
    """torch's message names the refused global on one of its lines; keep that line, not its advice."""
    lines = [line for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line]
    return lines[0] if lines else str(error)


def load_checkpoint_file(path: str | os.PathLike, map_location="cpu") -> dict:
    """`torch.load(path, weights_only=True)`; a file that needs more is refused with `UnsafeCheckpointError`."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(path, _weights_only_detail(error)) from None


TENSOR_TREE_KEY = "nuwa_train.tree"  # safetensors metadata entry holding the JSON skeleton


def _flatten(value, path: str, tensors: dict):
    import torch

    if isinstance(value, torch.Tensor):
        tensors[path] = value
        return {"__tensor__": path}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {key: _flatten(item, f"{path}/{key}", tensors) for key, item in value.items()}
        return {"__items__": [[key, _flatten(item, f"{path}/{key}", tensors)] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_flatten(item, f"{path}/{i}", tensors) for i, item in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{path or '/'}: {type(value).__name__} cannot be stored in a tensor tree "
                    f"(tensors, dicts, lists and JSON scalars only)")


def _unflatten(value, tensors: dict):
    if isinstance(value, dict):
        if set(value) == {"__tensor__"}:
            return tensors[value["__tensor__"]]
        if set(value) == {"__items__"}:
            return {key: _unflatten(item, tensors) for key, item in value["__items__"]}
        return {key: _unflatten(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [_unflatten(item, tensors) for item in value]
    return value


def save_tensor_tree(path: Path, tree: dict) -> Path:
    """A nested dict of tensors and plain data as ONE safetensors file (the skeleton as JSON metadata), atomically.

    No pickle: reading it back can never run code, unlike a `torch.save` file. Tuples come back as lists.
    """
    import json

    from safetensors.torch import save_file

    tensors: dict = {}
    skeleton = _flatten(tree, "", tensors)
    seen, stored = set(), {}
    for key, tensor in tensors.items():  # safetensors refuses tensors that share memory (e.g. tied weights)
        tensor = tensor.detach().cpu().contiguous()
        if tensor.numel() and tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        stored[key] = tensor
    return write_atomically(Path(path), lambda staging: save_file(
        stored, str(staging), metadata={TENSOR_TREE_KEY: json.dumps(skeleton)}))


def load_tensor_tree(path: Path) -> dict:
    """The tree `save_tensor_tree` wrote."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        if TENSOR_TREE_KEY not in metadata:
            raise ValueError(f"{path} is a safetensors file without nuwa-train's {TENSOR_TREE_KEY!r} metadata; it "
                             f"was not written by save_tensor_tree")
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    return _unflatten(json.loads(metadata[TENSOR_TREE_KEY]), tensors)
