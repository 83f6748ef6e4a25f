"""The run's state on disk: Lightning checkpoints as safetensors + JSON (no pickle), and the CSV log kept across
sessions.

- `SafetensorsCheckpointIO`: Lightning's checkpoint dict as one safetensors file (`save_tensor_tree`); reading
  can never run code. Other files are read weights-only (`UnsafeCheckpointError` names a refused one).
- `StateCheckpoint`: `ModelCheckpoint` writing `<dirpath>/last.safetensors` every `minutes` of training (and,
  with `FinalCheckpoint`, at the end, on SIGTERM and on the first Ctrl-C).
- `HistoryCSVLogger`: Lightning's `CSVLogger` writing `<save_dir>/log.csv`, keeping the rows of earlier sessions
  up to the resumed step (the stock logger deletes its file when it starts).
- `convert_legacy_state`: the state files of the loop before Lightning (`last.safetensors` trees with a
  `position`, or `last.ckpt`) -> a Lightning checkpoint at the same step.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from datetime import timedelta
from pathlib import Path

import lightning
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.io import CheckpointIO

from ..io import load_checkpoint_file, load_tensor_tree, save_tensor_tree, write_atomically

STATE_SUFFIX = ".safetensors"
STATE_NAME = "last" + STATE_SUFFIX
LEGACY_STATE_NAME = "last.ckpt"  # torch.save files of the loop before safetensors, read weights-only
LOG_NAME = "log.csv"
STATE_KEY = "nuwa_pretrain"  # the checkpoint entry of TinyBasePretrainer: position, training seconds, RNG
STOPPED_EPOCHS = 1  # a fit stopped by its phases or a signal has closed its (only) epoch


def _plain(value):
    """Settings dataclasses (hyper-parameters) as dicts: a tensor tree holds tensors and JSON data only."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def read_state(path: str | os.PathLike) -> dict:
    """A state file: a tensor tree (safetensors) or, for older files, a weights-only torch load."""
    path = Path(path)
    return load_tensor_tree(path) if path.suffix == STATE_SUFFIX else load_checkpoint_file(path)


class SafetensorsCheckpointIO(CheckpointIO):
    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        save_tensor_tree(Path(path), _plain(checkpoint))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return read_state(path)

    def remove_checkpoint(self, path) -> None:
        Path(path).unlink(missing_ok=True)


class StateCheckpoint(ModelCheckpoint):
    """`last.safetensors` in `dirpath`, rewritten every `minutes` of training time (the resume state)."""

    FILE_EXTENSION = STATE_SUFFIX

    def __init__(self, dirpath: str = "runs/tiny_base", minutes: float = 3.0):
        if minutes <= 0:
            raise ValueError(f"StateCheckpoint: minutes={minutes} must be > 0")
        # One file rewritten in place: a state a converted or copied run starts from is not versioned to last-v1.
        super().__init__(
            dirpath=dirpath,
            save_last=True,
            save_top_k=0,
            train_time_interval=timedelta(minutes=minutes),
            enable_version_counter=False,
        )


def resume_state(run_dir: Path) -> Path | None:
    """The run's resume state, if any: `last.safetensors`, else an older version's `last.ckpt`."""
    for name in (STATE_NAME, LEGACY_STATE_NAME):
        if (run_dir / name).is_file():
            return run_dir / name
    return None


# ------------------------------------------------------------------------------------------------ the log
class _HistoryWriter(_ExperimentWriter):
    NAME_METRICS_FILE = LOG_NAME

    def _check_log_dir_exists(self) -> None:
        """Keep an existing log (the stock writer deletes it) and continue with its columns."""
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="", encoding="utf-8") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])

    def _record_new_keys(self) -> set[str]:
        """New columns go after the existing ones, in the order logged, `step` first (the stock writer sorts
        them, which misaligns rows appended under an existing header)."""
        logged = dict.fromkeys(["step", *(key for row in self.metrics for key in row)])
        new = [key for key in logged if key not in self.metrics_keys and any(key in row for row in self.metrics)]
        self.metrics_keys.extend(new)
        return set(new)

    def keep_until(self, step: int) -> None:
        """Drop rows after `step` (written after the state a run resumes from)."""
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="", encoding="utf-8") as file:
            rows = [row for row in csv.DictReader(file) if int(row["step"]) <= step]
        if not rows:
            os.remove(self.metrics_file_path)
            self.metrics_keys = []
            return

        def write(staging: Path) -> None:
            with open(staging, "w", newline="", encoding="utf-8") as file:
                writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
                writer.writeheader()
                writer.writerows(rows)

        write_atomically(Path(self.metrics_file_path), write)


class HistoryCSVLogger(CSVLogger):
    """`CSVLogger` writing `<save_dir>/log.csv` across sessions: a resumed run keeps the rows up to its step."""

    accepts_text = True  # the phase's name goes into its column

    def __init__(self, save_dir: str = "runs/tiny_base"):
        super().__init__(save_dir=save_dir, name="", version="")

    @property
    def experiment(self) -> _HistoryWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HistoryWriter(log_dir=self.log_dir)
        return self._experiment

    @property
    def metrics_path(self) -> Path:
        return Path(self.log_dir) / LOG_NAME

    def log_hyperparams(self, params=None) -> None:
        """The recipe is kept with the checkpoint and the export, not as a second hparams.yaml."""


def training_log(trainer) -> Path | None:
    for logger in trainer.loggers:
        if isinstance(logger, HistoryCSVLogger):
            return logger.metrics_path
    return None


def keep_log_until(trainer, step: int) -> None:
    for logger in trainer.loggers:
        if isinstance(logger, HistoryCSVLogger):
            logger.experiment.keep_until(step)


# ------------------------------------------------------------------------------------------------ legacy
def is_legacy_state(state: dict) -> bool:
    return "position" in state and "loops" not in state


def fit_loop_state_at(step: int) -> dict:
    """Lightning's fit-loop progress as a stopped fit saves it after `step` optimizer steps (one batch per step):
    the stop has closed the epoch (a mid-epoch state with an iterable of unknown length does not resume)."""
    trainer = lightning.Trainer(
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    loop = trainer.fit_loop.epoch_loop
    for counters in (loop.batch_progress.total, loop.batch_progress.current):
        counters.ready = counters.started = counters.processed = counters.completed = step
    for counters in (
        loop.automatic_optimization.optim_progress.optimizer.step.total,
        loop.automatic_optimization.optim_progress.optimizer.step.current,
    ):
        counters.ready = counters.completed = step
    for counters in (
        loop.automatic_optimization.optim_progress.optimizer.zero_grad.total,
        loop.automatic_optimization.optim_progress.optimizer.zero_grad.current,
    ):
        counters.ready = counters.started = counters.completed = step
    loop._batches_that_stepped = step
    for counters in (trainer.fit_loop.epoch_progress.total, trainer.fit_loop.epoch_progress.current):
        counters.ready = counters.started = counters.processed = counters.completed = STOPPED_EPOCHS
    return trainer.fit_loop.state_dict()


def convert_legacy_state(state: dict) -> dict:
    """The pre-Lightning state tree (model, heads, optimizer, position, elapsed, torch_rng) as a Lightning
    checkpoint of `TinyBasePretrainer` at the same step; the optimizer's parameter order is unchanged."""
    step = int(state["step"])
    weights = {f"model.{k}": v for k, v in state["model"].items()}
    weights.update({f"heads.{k}": v for k, v in state["heads"].items()})
    return {
        "pytorch-lightning_version": lightning.__version__,
        "epoch": STOPPED_EPOCHS,
        "global_step": step,
        "state_dict": weights,
        "optimizer_states": [state["optimizer"]],
        "lr_schedulers": [],
        "loops": {"fit_loop": fit_loop_state_at(step)},
        "callbacks": {},
        STATE_KEY: {"position": state["position"], "elapsed": state["elapsed"], "torch_rng": state["torch_rng"]},
    }
