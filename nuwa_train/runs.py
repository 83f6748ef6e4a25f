"""Run folders: every `nuwa-train fit` writes its checkpoints, logs, settings and data report to a folder of its own.

    runs/default/                   the root: trainer.default_root_dir (default runs/<recipe name>)
    ├── latest -> 20261208-014522   the newest fit of this root (what `--ckpt_path last` resumes)
    ├── 20261208-014522/            one fit: --run_name, else the time it started
    │   ├── config.yaml             the settings as given (recipe + command line)
    │   ├── data_report.json
    │   ├── checkpoints/last.ckpt   (and the recipe's best-*.ckpt)
    │   ├── csv/version_0/metrics.csv
    │   └── tensorboard/version_0/
    └── test-20261208-020133/       a `test` (or `validate`) run: its settings, logs and data report

A second fit of the same recipe used to write `last-v1.ckpt` beside the first run's `last.ckpt`, so commands
given `.../last.ckpt` silently used the older run. Commands that take a checkpoint also take a run folder (its
`checkpoints/last.ckpt`) or a root (its newest run).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .errors import UsageError

RUNS_DIR = Path("runs")
UNNAMED_RECIPE = "unnamed"  # the root's name when the settings come from no recipe file
LATEST_NAME = "latest"
CHECKPOINTS_NAME = "checkpoints"
LAST_CHECKPOINT_NAME = "last.ckpt"
TRAINABLE_WEIGHTS_NAME = "trainable.ckpt"  # SaveTrainableWeights' file (sharded DeepSpeed runs)
SETTINGS_NAME = "config.yaml"
RUN_NAME_FORMAT = "%Y%m%d-%H%M%S"  # sorts by start time


class RunFolderError(UsageError):
    """A run folder that cannot be used as asked: taken, or without the checkpoint a command needs."""


def default_root(recipe: str | os.PathLike | None) -> Path:
    """runs/<recipe file name>: a copied and renamed recipe gets runs of its own."""
    return RUNS_DIR / (Path(recipe).stem if recipe else UNNAMED_RECIPE)


def started_now(prefix: str = "") -> str:
    return prefix + time.strftime(RUN_NAME_FORMAT)


def create_run_folder(root: Path, name: str | None, prefix: str = "") -> Path:
    """A new, empty run folder under `root`: `name`, else the start time (with -2, -3 ... if a run started in the
    same second). A taken `name` is an error: a second fit would mix its checkpoints and logs with the first's."""
    if name is not None:
        if name == LATEST_NAME or Path(name).name != name:
            raise RunFolderError(
                f"--run_name {name!r}: a run's name must be a single folder name other than "
                f"{LATEST_NAME!r} (the link to the newest run)"
            )
        run_dir = root / name
        if run_dir.exists():
            raise RunFolderError(
                f"run folder {run_dir} already exists: continue that run with --ckpt_path {run_dir}, "
                f"or start a new one with another --run_name"
            )
        run_dir.mkdir(parents=True)
        return run_dir
    stem, number = started_now(prefix), 1
    while True:
        run_dir = root / (stem if number == 1 else f"{stem}-{number}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            number += 1


def mark_latest(run_dir: Path) -> None:
    """Point `<root>/latest` at `run_dir` (a relative link: the root can move), replacing the old link at once."""
    link, staging = run_dir.parent / LATEST_NAME, run_dir.parent / f".{LATEST_NAME}.{os.getpid()}"
    staging.unlink(missing_ok=True)
    staging.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(staging, link)


def latest_run(root: Path) -> Path | None:
    """The run `<root>/latest` points at, None when the root has no run yet."""
    link = root / LATEST_NAME
    return root / os.readlink(link) if link.is_symlink() and link.is_dir() else None


def run_folder_of(path: str | os.PathLike) -> Path | None:
    """The run folder a checkpoint or folder belongs to: `<run>/checkpoints/<file>`, `<run>` itself (it has a
    checkpoints folder) or a root (its latest run); None for anything else."""
    path = Path(path)
    if path.parent.name == CHECKPOINTS_NAME:
        return path.parent.parent
    if path.name == LATEST_NAME and path.is_symlink():  # the run itself, so that messages name it
        return latest_run(path.parent)
    if (path / CHECKPOINTS_NAME).is_dir():
        return path
    return latest_run(path)


def checkpoint_path(path: str | os.PathLike, single_file: bool = False) -> Path:
    """What a command given `path` reads: a checkpoint as it is, a run folder's `checkpoints/last.ckpt`, a root's
    newest run's. `single_file`: a sharded (DeepSpeed) last.ckpt folder gives way to the run's trainable.ckpt.
    A path that does not exist is returned as it is, for the caller's own error."""
    path = Path(path)
    run_dir = run_folder_of(path) if path.is_dir() else None
    if path.parent.name == CHECKPOINTS_NAME:  # a checkpoint (a sharded one is a folder)
        return path
    if run_dir is None:
        if single_file and path.is_dir():
            raise RunFolderError(
                f"{path} is a folder but neither a run folder (no {CHECKPOINTS_NAME}/) nor a root "
                f"of runs (no {LATEST_NAME}): pass a run folder or a .ckpt file"
            )
        return path
    last = run_dir / CHECKPOINTS_NAME / LAST_CHECKPOINT_NAME
    if single_file and last.is_dir():
        trainable = run_dir / TRAINABLE_WEIGHTS_NAME
        if trainable.is_file():
            return trainable
        raise RunFolderError(
            f"{last} is a sharded DeepSpeed checkpoint and {run_dir} has no {TRAINABLE_WEIGHTS_NAME}: "
            f"write one with `python -m nuwa_train.lightning.strategies {last} {trainable}`"
        )
    if not last.exists():
        found = sorted(p.name for p in (run_dir / CHECKPOINTS_NAME).glob("*"))
        what = (
            f"pass one of its checkpoints: {', '.join(found)}"
            if found
            else "it has no checkpoint at all (stopped before its first save)"
        )
        raise RunFolderError(f"run folder {run_dir} has no {CHECKPOINTS_NAME}/{LAST_CHECKPOINT_NAME}; {what}")
    return last
