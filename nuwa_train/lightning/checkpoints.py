"""Checkpoints a user can trust: read weights-only, and `last.ckpt` always the state fit ended with.

- `SafeCheckpointIO`: Lightning's torch checkpoint I/O, loading with `weights_only=True` and refusing a file that
  would run code with an error that names it (torch's own message names no file); saving next to the target and
  renaming it into place, so that a full disk or a kill mid-save leaves the previous checkpoint whole.
- `FinalCheckpoint`: when fit ends (max_steps, or a stop requested by Ctrl-C / SIGTERM), every `ModelCheckpoint`
  with `save_last` writes `last.ckpt` for the final step; Lightning keeps the last periodic one (step 50 of a
  60-step run that saves every 25). A first Ctrl-C or SIGTERM stops at the end of the optimizer step in flight or
  at the next validation batch, without starting a validation, saves and exits cleanly; a second Ctrl-C aborts
  at once.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from ..io import load_checkpoint_file, torch_save_atomically

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SafeCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose loads are weights-only (`UnsafeCheckpointError` names a refused file) and whose
    local saves are atomic where Lightning's are not.

    Lightning writes a local checkpoint to a temporary file in $TMPDIR and moves it onto the target; across file
    systems that move copies the bytes onto the target in place, so a full disk or a kill during the copy
    truncates the previous checkpoint (issue 31: last.ckpt 6,189,369 -> 4,349,952 bytes, then "failed finding
    central directory" on resume). Here the file is written next to the target and renamed onto it
    (`torch_save_atomically`). Remote paths (s3://, ...) keep Lightning's save: an object store replaces an
    object whole.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        file_system, local_path = url_to_fs(str(path))
        if storage_options is not None or not isinstance(file_system, LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)  # Lightning's refusal, or a remote save
            return
        torch_save_atomically(Path(local_path), checkpoint)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint_file(path, map_location=map_location or "cpu")


class TrainingStopped(Exception):
    """Ctrl-C / SIGTERM stopped fit during a validation: `last.ckpt` holds the last step, the validation did not
    finish. `trainer.fit` raises it (a stop at a step's end returns normally instead); `nuwa-train fit` exits 0."""


class FinalCheckpoint(Callback):
    """Writes `last.ckpt` at the end of fit; turns SIGINT / SIGTERM into a prompt, clean stop in any state.

    From the first step on, a first Ctrl-C or SIGTERM stops fit at the next of: the end of the optimizer step in
    flight, the end of the epoch (one without batches included), the next validation batch or the validation's
    generate-based metrics; it never starts a validation (on a 7B model one can outlast a scheduler's grace period).
    A second Ctrl-C aborts at once. Before the first step (the model loading, the datasets being read) nothing is
    trained yet: the signals act as they would without fit (SIGTERM ends the process, Ctrl-C interrupts).
    Under DDP every rank stops at the same point: each stop point is a collective decision (any rank signalled).
    """

    def __init__(self):
        self.requested_by: str | None = None
        self._training = False  # between the first step's start and the final save: signals request a stop
        self._originals: dict = {}  # the handlers before fit, restored after it
        self._limit_val_batches = None  # the trainer's, while a requested stop turns validation off

    # ------------------------------------------------------------------------------- signals
    def setup(self, trainer, module, stage: str) -> None:
        # From the start of fit: Lightning's own SIGTERM handler, set before the first step, only notes the signal
        # and stops after a training batch, without a checkpoint.
        if stage == "fit":
            self._install_handlers()

    def on_train_start(self, trainer, module) -> None:
        self.requested_by, self._training = None, True
        self._install_handlers()  # again: Lightning has put its SIGTERM handler in front of this one meanwhile

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for number in STOP_SIGNALS:
            previous = signal.signal(number, self._on_signal)
            self._originals.setdefault(number, previous)

    def _on_signal(self, number, frame) -> None:
        if not self._training:
            self._act_as_before(number, frame)
            return
        name = signal.Signals(number).name
        if self.requested_by is not None and number == signal.SIGINT:
            self._restore_handlers()
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a final checkpoint
        self.requested_by = name
        rank_zero_info(
            f"\n{name}: stopping at the end of the current step (or validation batch), then saving "
            f"last.ckpt; no validation is started (Ctrl-C again to abort at once)"
        )

    def _act_as_before(self, number, frame) -> None:
        """What the signal did before fit installed its handler (Python's Ctrl-C: KeyboardInterrupt; SIGTERM by
        default: the end of the process)."""
        original = self._originals.get(number, signal.SIG_DFL)
        if callable(original):
            original(number, frame)
        elif original == signal.SIG_DFL:
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)

    def _restore_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for number, handler in self._originals.items():
            if handler is not None:  # None: set outside Python, nothing to put back
                signal.signal(number, handler)

    def _stop_decided(self, trainer) -> bool:
        """Whether any rank was signalled: a collective, so call it where every rank is at the same point."""
        return trainer.strategy.reduce_boolean_decision(self.requested_by is not None, all=False)

    # ------------------------------------------------------------------------------- the stop points
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        at_step_boundary = (batch_index + 1) % trainer.accumulate_grad_batches == 0
        if at_step_boundary and self._stop_decided(trainer):
            self._stop_without_validation(trainer)

    def on_train_epoch_end(self, trainer, module) -> None:
        # An epoch can end without a step: one whose loader yields no batch would otherwise follow another forever.
        if self._stop_decided(trainer):
            self._stop_without_validation(trainer)

    def _stop_without_validation(self, trainer) -> None:
        """Lightning runs a validation before it honours `should_stop`; turned off until fit ends."""
        if self._limit_val_batches is None:
            self._limit_val_batches = trainer.limit_val_batches
        trainer.limit_val_batches = 0
        trainer.should_stop = True

    def on_validation_batch_start(self, trainer, module, batch, batch_index, dataloader_index=0) -> None:
        self._stop_validation_if_requested(trainer)

    def on_validation_epoch_end(self, trainer, module) -> None:
        # Callbacks run before the module's hook: the generate-based metrics are not started.
        self._stop_validation_if_requested(trainer)

    def _stop_validation_if_requested(self, trainer) -> None:
        if self._training and self._stop_decided(trainer):  # (the sanity check runs before the first step)
            raise TrainingStopped(
                f"{self.requested_by or 'a signal on another rank'} stopped fit during the "
                f"validation after step {trainer.global_step}"
            )

    # ------------------------------------------------------------------------------- the final save
    def on_train_end(self, trainer, module) -> None:
        self._save_final_state(trainer)
        self._training = False

    def on_exception(self, trainer, module, exception) -> None:
        if isinstance(exception, TrainingStopped):  # weights and loops are those of the last step
            self._save_final_state(trainer)
            rank_zero_info(f"{exception}: last.ckpt holds step {trainer.global_step}")
        self._training = False
        self._restore_handlers()
        self._restore_validation(trainer)

    def teardown(self, trainer, module, stage: str) -> None:
        # After Lightning's teardown, which puts back the handlers it found (this callback's, set in `setup`).
        self._restore_handlers()
        self._originals = {}
        self._restore_validation(trainer)

    def _restore_validation(self, trainer) -> None:
        if self._limit_val_batches is not None:
            trainer.limit_val_batches, self._limit_val_batches = self._limit_val_batches, None

    def _save_final_state(self, trainer) -> None:
        for callback in trainer.checkpoint_callbacks:
            if (
                isinstance(callback, ModelCheckpoint)
                and callback.save_last
                and callback._last_global_step_saved != trainer.global_step
            ):
                callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
                rank_zero_info(f"saved the final state (step {trainer.global_step}) to {callback.last_model_path}")
