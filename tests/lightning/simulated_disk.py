"""A simulated disk for save tests: the file system that holds `root` fills up, or stops the process at a chosen
moment of a save so that a test can SIGKILL it there.

- Everything outside `root` is another file system: a rename from there into `root` fails with EXDEV, as the
  kernel answers, so a move falls back to copying the bytes (what `shutil.move` from $TMPDIR does).
- Tensor files written into `root` (torch.save, safetensors, os.write) and copies into it (os.sendfile, which
  shutil's copies use) are written in two halves; after `free_bytes` bytes a write fails with ENOSPC, after
  writing what still fitted (as a full disk does). Small files written through Python's file objects (JSON,
  tokenizer) are not counted.
- Every half written, every fsync and every rename into `root` is a numbered point; with `pause_at=k` the process
  writes the points so far to `ready` (JSON) at point k and sleeps there, for the test to kill it.
"""

from __future__ import annotations

import errno
import io
import json
import os
import time
from pathlib import Path

import safetensors.torch
import torch

import nuwa_train.io

PAUSE_SECONDS = 3600  # a paused save waits for its SIGKILL, never for this


class SimulatedDisk:
    def __init__(
        self, root: Path, free_bytes: int | None = None, pause_at: int | None = None, ready: Path | None = None
    ):
        self.root = Path(root).resolve()
        self.free_bytes, self.pause_at, self.ready = free_bytes, pause_at, ready
        self.points: list[str] = []

    def install(self, patches) -> SimulatedDisk:
        """Patch the writers through `patches` (a `pytest.MonkeyPatch`); undone when it is."""
        originals = {
            "save": torch.save,
            "sendfile": os.sendfile,
            "rename": os.rename,
            "replace": os.replace,
            "fsync": os.fsync,
            "exchange": nuwa_train.io._exchange,
        }
        self._os_write = os.write
        patches.setattr(
            torch, "save", lambda obj, f, *args, **kwargs: self._save(originals["save"], obj, f, *args, **kwargs)
        )
        save_file = safetensors.torch.save_file
        patches.setattr(
            safetensors.torch,
            "save_file",
            lambda tensors, filename, metadata=None: self._save_tensors(save_file, tensors, filename, metadata),
        )
        for module in ("transformers.modeling_utils", "peft.peft_model"):  # their own `safe_save_file` name
            patches.setattr(f"{module}.safe_save_file", safetensors.torch.save_file, raising=False)
        patches.setattr(os, "write", self._write_descriptor)
        patches.setattr(
            os,
            "sendfile",
            lambda out, source, offset, count: self._sendfile(originals["sendfile"], out, source, offset, count),
        )
        for name in ("rename", "replace"):
            patches.setattr(
                os,
                name,
                lambda source, target, *args, _original=originals[name], **kwargs: self._rename(
                    _original, source, target, *args, **kwargs
                ),
            )
        patches.setattr(os, "fsync", lambda descriptor: self._fsync(originals["fsync"], descriptor))
        patches.setattr(
            nuwa_train.io, "_exchange", lambda first, second: self._exchange(originals["exchange"], first, second)
        )
        return self

    # ------------------------------------------------------------------------------------------- points
    def _inside(self, path) -> bool:
        return Path(os.path.abspath(path)).resolve().is_relative_to(self.root)

    def _path_inside(self, descriptor: int) -> str | None:
        """The file behind a descriptor when it is in `root` (not a pipe, socket or file elsewhere), else None."""
        path = os.readlink(f"/proc/self/fd/{descriptor}")
        return path if path.startswith(os.sep) and self._inside(path) else None

    def _name(self, path) -> str:
        return str(Path(os.path.abspath(path)).resolve().relative_to(self.root))

    def _point(self, what: str) -> None:
        self.points.append(what)
        if self.pause_at == len(self.points) - 1:
            self.ready.write_text(json.dumps(self.points))
            time.sleep(PAUSE_SECONDS)

    # ------------------------------------------------------------------------------------------- writers
    def _write(self, descriptor: int, data: bytes, path) -> None:
        middle = len(data) // 2
        for number, part in enumerate((data[:middle], data[middle:]), 1):
            room = len(part) if self.free_bytes is None else min(len(part), self.free_bytes)
            view = memoryview(part)[:room]
            while view:
                view = view[self._os_write(descriptor, view) :]
            if self.free_bytes is not None:
                self.free_bytes -= room
            if room < len(part):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            self._point(f"wrote half {number} of {self._name(path)}")

    def _write_descriptor(self, descriptor: int, data) -> int:
        path = self._path_inside(descriptor)
        if path is None:
            return self._os_write(descriptor, data)
        self._write(descriptor, bytes(data), path)
        return len(data)

    def _write_file(self, path, data: bytes) -> None:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            self._write(descriptor, data, path)
        finally:
            os.close(descriptor)

    def _save(self, original, obj, f, *args, **kwargs):
        if not isinstance(f, (str, os.PathLike)) or not self._inside(f):
            return original(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        original(obj, buffer, *args, **kwargs)
        self._write_file(f, buffer.getvalue())

    def _save_tensors(self, original, tensors, filename, metadata):
        if not self._inside(filename):
            return original(tensors, filename, metadata=metadata)
        self._write_file(filename, safetensors.torch.save(tensors, metadata=metadata))

    def _sendfile(self, original, out: int, source: int, offset, count: int) -> int:
        path = self._path_inside(out)
        if path is None:
            return original(out, source, offset, count)
        data = os.pread(source, count, offset)
        if data:
            self._write(out, data, path)
        return len(data)

    # ------------------------------------------------------------------------------------------- renames, syncs
    def _rename(self, original, source, target, *args, **kwargs):
        if self._inside(target):
            self._point(f"rename {Path(source).name} -> {self._name(target)}")
            if not self._inside(source):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(source), str(target))
        return original(source, target, *args, **kwargs)

    def _exchange(self, original, first, second) -> bool:
        if self._inside(second):
            self._point(f"exchange {Path(first).name} <-> {self._name(second)}")
        return original(first, second)

    def _fsync(self, original, descriptor: int) -> None:
        path = self._path_inside(descriptor)
        if path is not None:
            self._point(f"fsync {self._name(path)}")
        return original(descriptor)
