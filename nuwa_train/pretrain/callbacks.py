"""Callbacks of pre-training: the phase clock (time budgets), the CPU thread count, and the periodic export."""

from __future__ import annotations

import time
import traceback
from numbers import Number

import torch
from lightning.pytorch.callbacks import Callback

from .export import ExportSettings, export_base
from .phases import SECONDS_PER_MINUTE
from .state import training_log


class PhaseClock(Callback):
    """Times every training step and advances the module's position by it: a phase ends after its `steps`, or
    its `minutes` of training time (a shared machine then takes fewer steps), and fit stops after the last one.
    Writes the module's log row (window means) to the loggers when one is due, before any checkpoint of the step.
    """

    def __init__(self):
        self.started = 0.0

    def on_train_start(self, trainer, module) -> None:
        module.skip_finished_phases()
        trainer.should_stop = trainer.should_stop or module.finished

    def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        row = module.step_done(time.perf_counter() - self.started, outputs["metrics"])
        if row is not None:
            for logger in trainer.loggers:
                # CSV keeps the phase's name; other loggers take numbers only
                logger.log_metrics(
                    {k: v for k, v in row.items() if isinstance(v, Number) or getattr(logger, "accepts_text", False)},
                    step=module.position.step,
                )
                logger.save()
        if module.finished:
            trainer.should_stop = True


class CpuThreads(Callback):
    """Torch's thread count for training; with `adaptive`, re-chosen while training on a shared machine.

    A second busy process makes 2 OpenMP threads on 2 cores up to 10x slower. Every `period` steps, run `trial`
    steps with the other thread count (1 or `threads`) and keep whichever had the lower mean step time over the
    adjacent windows. Thread counts do not change the maths, only the speed.
    """

    def __init__(self, threads: int = 2, adaptive: bool = False, period: int = 30, trial: int = 3):
        if threads < 1 or period < 1 or trial < 1:
            raise ValueError(f"CpuThreads: threads={threads}, period={period}, trial={trial} must all be >= 1")
        self.threads, self.adaptive, self.period, self.trial = threads, adaptive, period, trial
        self.options = sorted({1, threads})
        self.current = threads
        self.recent: list[float] = []
        self.trial_times: list[float] | None = None
        self.count = 0
        self.started = 0.0

    def on_train_start(self, trainer, module) -> None:
        self.current = self.threads
        torch.set_num_threads(self.current)

    def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        if self.adaptive and len(self.options) > 1:
            self.record(time.perf_counter() - self.started)

    def record(self, seconds: float) -> None:
        self.count += 1
        if self.trial_times is not None:
            self.trial_times.append(seconds)
            if len(self.trial_times) >= self.trial:
                if sum(self.trial_times) / len(self.trial_times) >= sum(self.recent) / max(len(self.recent), 1):
                    torch.set_num_threads(self.current)  # the trial was slower: go back
                else:
                    self.current = torch.get_num_threads()
                self.trial_times, self.recent = None, []
            return
        self.recent = (self.recent + [seconds])[-self.trial :]
        if self.count % self.period == 0 and len(self.recent) == self.trial:
            torch.set_num_threads(self.options[0] if self.current == self.options[1] else self.options[1])
            self.trial_times = []


class ExportBase(Callback):
    """Exports the base (model + processor, log, eval report, README) to `export_dir`: every `minutes` of wall
    time as a snapshot (a failed snapshot never costs the run), and finally when this session ends the last phase.

    `test_data`: SyntheticConfig fields of the evaluation's test split (default: the defaults).
    `conversation_turns` > 0: the same test images are also asked that many questions in one conversation each
    (referring expressions with probability `conversation_grounding`), scored turn by turn (conversations.py).
    """

    def __init__(
        self,
        export_dir: str = "data/tiny_base",
        minutes: float = 15.0,
        snapshot_eval_images: int = 150,
        final_eval_images: int = 1000,
        saliency_images: int = 200,
        eval_batch_size: int = 64,
        max_new_tokens: int = 8,
        test_data: dict | None = None,
        conversation_turns: int = 0,
        conversation_grounding: float = 0.3,
    ):
        self.settings = ExportSettings(
            export_dir,
            snapshot_eval_images,
            final_eval_images,
            saliency_images,
            eval_batch_size,
            max_new_tokens,
            dict(test_data or {}),
            conversation_turns,
            conversation_grounding,
        )
        self.minutes = minutes
        self.recipe: dict = {}  # the parsed recipe, written next to the model (set by the CLI)
        self.recipe_file: str | None = None  # the recipe's path, for the README's commands (set by the CLI)
        self.last_export = 0.0
        self.start_step = 0

    def on_train_start(self, trainer, module) -> None:
        self.last_export = time.monotonic()
        self.start_step = module.position.step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        if module.finished or time.monotonic() - self.last_export < SECONDS_PER_MINUTE * self.minutes:
            return
        try:
            self.export(trainer, module, final=False)
        except Exception:  # a failed snapshot must not cost the training run
            traceback.print_exc()
        self.last_export = time.monotonic()

    def on_train_end(self, trainer, module) -> None:
        if module.finished and module.position.step > self.start_step:
            self.export(trainer, module, final=True)

    def export(self, trainer, module, final: bool, progress: bool = False):
        """`progress`: bars for the evaluation (off while training: they would interleave with the trainer's)."""
        return export_base(module, self.settings, final, self.recipe, training_log(trainer), progress, self.recipe_file)
