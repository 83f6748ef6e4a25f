"""Training progress a person can read: step lines with rate and ETA in a log, steps (not "Epoch 0/-2") on a bar.

Lightning's default bar redraws one terminal line; written to a file or a pipe it leaves either nothing readable
or the whole bar once at the end, and a run bounded by `max_steps` (max_epochs -1) is titled "Epoch 0/-2".
`progress_callback()` picks the bar for a terminal and step lines for everything else; `NuwaCLI` adds it unless
the recipe names its own progress bar or turns progress off.
"""

from __future__ import annotations

import sys
import time

from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

LINES_PER_RUN = 20  # a log gets about this many step lines (every 5%), whatever the run's length
UNBOUNDED_INTERVAL = 50  # steps between lines when the run's length is unknown
SECONDS_PER_MINUTE, SECONDS_PER_HOUR = 60, 3600
TRAIN_PREFIX = "train/"  # a step line shows the training metrics without it ("loss 0.53")


class StepRichProgressBar(RichProgressBar):
    """Lightning's rich bar, titled by steps when the run is bounded by steps instead of "Epoch 0/-2"."""

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_epochs == -1:  # max_steps bounds the run: there is no last epoch to count towards
            return f"{'steps':{len(self.validation_description)}}"
        return super()._get_train_description(current_epoch)


def duration(seconds: float) -> str:
    """Seconds as '7m40s', '1h05m' or '12s': what an ETA needs, no more."""
    seconds = round(seconds)
    if seconds >= SECONDS_PER_HOUR:
        return f"{seconds // SECONDS_PER_HOUR}h{seconds % SECONDS_PER_HOUR // SECONDS_PER_MINUTE:02d}m"
    if seconds >= SECONDS_PER_MINUTE:
        return f"{seconds // SECONDS_PER_MINUTE}m{seconds % SECONDS_PER_MINUTE:02d}s"
    return f"{seconds}s"


def _number(value) -> str:
    return f"{float(value):.4g}"


class StepLogProgress(ProgressBar):
    """One line per `every_n_steps` optimizer steps and at the last step, for logs:
    "step 250/1250 (20%) loss 0.534 lm_loss 0.534 2.1 it/s ETA 7m40s"; after each validation, its metrics.

    `every_n_steps`: default, about LINES_PER_RUN lines over the run. The rate is measured since the previous
    line (a resumed run counts from where it resumed); the ETA assumes that rate for the remaining steps.
    """

    def __init__(self, every_n_steps: int | None = None, stream=None):
        super().__init__()
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps, self.stream = every_n_steps, stream
        self._enabled = True
        self._previous: tuple[int, float] | None = None  # (step, monotonic time) of the previous line

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def _write(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def total_steps(self, trainer) -> int | None:
        """Optimizer steps the run will make (None: unknown, e.g. an iterable without a length)."""
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return trainer.max_steps
        batches = trainer.num_training_batches
        if trainer.max_epochs is None or trainer.max_epochs < 0 or batches == float("inf"):
            return None
        return int(batches * trainer.max_epochs // trainer.accumulate_grad_batches)

    def interval(self, trainer) -> int:
        if self.every_n_steps is not None:
            return self.every_n_steps
        total = self.total_steps(trainer)
        return max(1, round(total / LINES_PER_RUN)) if total else UNBOUNDED_INTERVAL

    def on_train_start(self, trainer, pl_module) -> None:
        self._previous = (trainer.global_step, time.monotonic())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, total = trainer.global_step, self.total_steps(trainer)
        if not self._enabled or self._previous is None or step == self._previous[0]:  # gradient accumulation
            return
        if step % self.interval(trainer) and step != total:
            return
        self._write(self.step_line(trainer, pl_module, step, total))

    def step_line(self, trainer, pl_module, step: int, total: int | None) -> str:
        """The line of `step`; it also restarts the rate measurement."""
        now = time.monotonic()
        last_step, last_time = self._previous
        self._previous = (step, now)
        rate = (step - last_step) / (now - last_time) if now > last_time else None
        parts = [f"step {step}/{total} ({step / total:.0%})" if total else f"step {step}"]
        if trainer.max_epochs is not None and trainer.max_epochs > 1:  # an epoch count means something here
            parts.append(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")
        metrics = {name: value for name, value in self.get_metrics(trainer, pl_module).items() if name != "v_num"}
        parts += [
            f"{name.removeprefix(TRAIN_PREFIX)} {_number(value)}"
            for name, value in metrics.items()
            if not name.startswith("val/")
        ]
        if rate:
            parts.append(f"{rate:.2f} it/s")
            if total:
                parts.append(f"ETA {duration((total - step) / rate)}")
        return " ".join(parts)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        scores = {name: value for name, value in trainer.callback_metrics.items() if name.startswith("val/")}
        if scores:
            self._write(
                f"validation at step {trainer.global_step}: "
                + " ".join(f"{name} {_number(value)}" for name, value in sorted(scores.items()))
            )


def progress_callback(stream=None) -> ProgressBar:
    """The bar on an interactive terminal, step lines when `stream` (default stdout) is a file or a pipe."""
    target = stream or sys.stdout
    return StepRichProgressBar() if target.isatty() else StepLogProgress(stream=stream)


def with_progress(callbacks, enable_progress_bar: bool | None) -> list | None:
    """`callbacks` plus `progress_callback()`, unless progress is turned off or one of them is a progress bar
    already (a recipe's own choice wins); None when nothing is added."""
    listed = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    if enable_progress_bar is False or any(isinstance(callback, ProgressBar) for callback in listed):
        return None
    return [*listed, progress_callback()]
