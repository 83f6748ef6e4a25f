"""Checkpoints a user can trust: read weights-only, and `last.ckpt` always the state fit ended with.

- `SafeCheckpointIO`: Lightning's torch checkpoint I/O, loading with `weights_only=True` and refusing a file that
  would run code with an error that names it (torch's own message names no file); saving next to the target and
  renaming it into place, so that a full disk or a kill mid-save leaves the previous checkpoint whole.
- `FinalCheckpoint`: when fit ends (max_steps, or a stop requested by Ctrl-C / SIGTERM), every `ModelCheckpoint`
  with `save_last` writes `last.ckpt` for the final step; Lightning keeps the last periodic one (step 50 of a
  60-step run that saves every 25). A first Ctrl-C or SIGTERM finishes the optimizer step in flight, saves and
  exits cleanly; a second Ctrl-C aborts at once.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import torch
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from ..io import load_checkpoint_file, write_atomically

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SafeCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose loads are weights-only (`UnsafeCheckpointError` names a refused file) and whose
    local saves are atomic where Lightning's are not.

    Lightning writes a local checkpoint to a temporary file in $TMPDIR and moves it onto the target; across file
    systems that move copies the bytes onto the target in place, so a full disk or a kill during the copy
    truncates the previous checkpoint (issue 31: last.ckpt 6,189,369 -> 4,349,952 bytes, then "failed finding
    central directory" on resume). Here the file is written next to the target and renamed onto it (`write_atomically`).
    Remote paths (s3://, ...) keep Lightning's save: an object store replaces an object whole.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        file_system, local_path = url_to_fs(str(path))
        if storage_options is not None or not isinstance(file_system, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)  # Lightning's refusal, or a remote save
            return
        write_atomically(Path(local_path), lambda staging: torch.save(checkpoint, staging))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint_file(path, map_location=map_location or "cpu")


class FinalCheckpoint(Callback):
    """Writes `last.ckpt` at the end of fit; turns SIGINT / SIGTERM into a clean stop after the current step."""

    def __init__(self):
        self.requested_by: str | None = None
        self._previous: dict = {}

    # ------------------------------------------------------------------------------- signals
    def on_train_start(self, trainer, module) -> None:
        self.requested_by = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._previous = {number: signal.signal(number, self._request_stop) for number in STOP_SIGNALS}

    def _request_stop(self, number, frame) -> None:
        name = signal.Signals(number).name
        if self.requested_by is not None and number == signal.SIGINT:
            self._restore_handlers()
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a final checkpoint
        self.requested_by = name
        rank_zero_info(f"\n{name}: finishing the current step, then saving last.ckpt and stopping "
                       f"(Ctrl-C again to abort at once)")

    def _restore_handlers(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        at_step_boundary = (batch_index + 1) % trainer.accumulate_grad_batches == 0
        # Every rank must stop at the same step: stop when any rank was signalled (a collective on every step).
        if at_step_boundary and trainer.strategy.reduce_boolean_decision(self.requested_by is not None, all=False):
            trainer.should_stop = True

    def on_exception(self, trainer, module, exception) -> None:
        self._restore_handlers()

    # ------------------------------------------------------------------------------- the final save
    def on_train_end(self, trainer, module) -> None:
        self._restore_handlers()
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and \
                    callback._last_global_step_saved != trainer.global_step:
                callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
                rank_zero_info(f"saved the final state (step {trainer.global_step}) to {callback.last_model_path}")
