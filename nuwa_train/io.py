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
