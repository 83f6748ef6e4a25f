"""The training loop's faults: a resume under other batch settings, stops requested in any state, non-finite losses,
training budgets the model's grid cannot hold (issues 27 and 31)."""

import os
import signal
import subprocess
import sys
import textwrap

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from nuwa_train.errors import UsageError
from nuwa_train.io import load_checkpoint_file
from nuwa_train.lightning import LoraSettings, NuwaDataModule, NuwaFineTuner, OptimizerSettings, SelectionSettings
from nuwa_train.lightning.checkpoints import TrainingStopped
from nuwa_train.lightning.data import ResumableSampler, TrainingStream, plan_training_stream
from nuwa_train.lightning.module import NonFiniteTrainingError
from nuwa_train.pruning import NuwaConfig, NuwaConfigError

TINY_GRID_TOKENS = 144  # the tiny base's 12x12 patch grid


def make_module(base_dir, module_class=NuwaFineTuner, **settings):
    settings = {
        "pruning": NuwaConfig(budget=64),
        "lora": LoraSettings(rank=4, dropout=0.0),
        "optimizer": OptimizerSettings(lr=2e-3, warmup_steps=2),
        "selection": SelectionSettings(mode="soft", anneal_steps=4),
        **settings,
    }
    return module_class(model_path=base_dir, **settings)


def make_data(base_dir, batch_size=4, **settings):
    return NuwaDataModule(processor_path=base_dir, train_images=12, val_images=2, batch_size=batch_size, **settings)


def trainer(directory, steps, callbacks=(), **settings):
    settings = {
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "enable_checkpointing": False,
        "devices": 1,
        **settings,
    }
    return L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=directory,
        callbacks=list(callbacks),
        **settings,
    )


class StepsRun(Callback):
    """The global step and the token rows of every training batch (which samples it trained on)."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, module, batch, batch_index):
        self.batches.append((trainer.global_step, batch["input_ids"].clone()))

    @property
    def steps(self) -> list[int]:
        return [step for step, _ in self.batches]

    def rows(self) -> list[torch.Tensor]:
        """Every training sample's tokens, in the order trained, padding cut (batches pad to their longest)."""
        return [row[row != PAD].tolist() for _, rows in self.batches for row in rows]


PAD = 0  # the tiny tokenizer's pad id
NO_PERIODIC = 1000  # every_n_train_steps of a ModelCheckpoint that only FinalCheckpoint's final save writes


# ----------------------------------------------------------------------------- train_budgets beyond the grid
@pytest.mark.parametrize("budgets", [[32, 2000], ["all", 600]])
def test_a_training_budget_the_grid_cannot_hold_is_an_error_at_start_naming_the_key(tiny_base_dir, tmp_path, budgets):
    module = make_module(tiny_base_dir, train_budgets=budgets)
    steps = StepsRun()
    with pytest.raises(
        NuwaConfigError,
        match=f"model.train_budgets: {budgets[1]} .*12x12 grid \\({TINY_GRID_TOKENS} "
        f"vision tokens per image.*24x24 reference grid",
    ):
        trainer(tmp_path, 4, [steps]).fit(module, make_data(tiny_base_dir))
    assert steps.batches == []  # before the first step, not when a step draws it


# ----------------------------------------------------------------------------- a resume under other batch settings
@pytest.mark.parametrize(
    "seen, step, max_steps, batch, accumulation, world, counted, expected",
    [
        (32, 8, 12, 2, 1, 1, 8, TrainingStream(32, 40, 8, 1)),  # issue 31: batch 4 -> 2 (was an empty, endless stream)
        (32, 8, 12, 4, 1, 1, 8, TrainingStream(32, 48, 8, 1)),  # unchanged: where an uninterrupted run goes on
        (32, 8, 12, 1, 1, 2, 8, TrainingStream(32, 40, 8, 1)),  # 4 ranks -> 2 ranks of batch 1
        (32, 8, 12, 2, 2, 1, 8, TrainingStream(32, 48, 8, 2)),  # accumulation 1 -> 2 on a step Lightning's count fits
        (28, 7, 10, 2, 2, 1, 7, TrainingStream(28, 38, 7, 1)),  # ... and on one it does not: the first step takes 1
        (48, 6, 9, 2, 4, 2, 6, TrainingStream(48, 88, 6, 2)),  # 6 batches into accumulation 4: first step 2 of 4
        (32, 8, 8, 2, 1, 1, 8, TrainingStream(32, 32, 8, 0)),  # nothing left: an empty stream, fit ends at once
        (32, 8, 6, 2, 1, 1, 8, TrainingStream(32, 32, 8, 0)),  # max_steps below the checkpoint's step: the same
    ],
)
def test_a_resume_trains_the_steps_left_on_the_samples_after_those_seen(
    seen, step, max_steps, batch, accumulation, world, counted, expected
):
    stream = plan_training_stream(seen, step, max_steps, batch, accumulation, world, counted)
    assert stream == expected
    steps_left = max(0, max_steps - step)
    trained = (stream.first_step_batches + (steps_left - 1) * accumulation) * batch * world if steps_left else 0
    assert stream.total - stream.start == trained  # every sample of the stream is trained once, none replayed
    for rank in range(world):  # Lightning's epoch ends with the stream: counted + the stream's batches
        sampler = ResumableSampler(
            10, batch, stream.start, stream.total, seed=0, rank=rank, world=world, counted=counted * batch
        )
        assert len(sampler) == (counted + (stream.total - stream.start) // (batch * world)) * batch
        assert len(list(sampler)) == (stream.total - stream.start) // world


def fit_saving_last(directory, base_dir, steps, batch_size, callbacks=(), ckpt_path=None, **settings):
    """A fit whose last.ckpt holds its final step (FinalCheckpoint writes it; no periodic saves)."""
    checkpoints = ModelCheckpoint(dirpath=directory, save_last=True, save_top_k=0, every_n_train_steps=NO_PERIODIC)
    run = trainer(directory, steps, [checkpoints, *callbacks], enable_checkpointing=True, **settings)
    module = make_module(base_dir)
    run.fit(module, make_data(base_dir, batch_size), ckpt_path=ckpt_path)
    return run, module


@pytest.fixture(scope="module")
def stream_at_batch_2(tiny_base_dir, tmp_path_factory):
    """The samples of a 24-step run at batch 2, in order: the stream every run of this data and seed reads."""
    steps = StepsRun()
    trainer(tmp_path_factory.mktemp("batch2"), 24, [steps]).fit(make_module(tiny_base_dir), make_data(tiny_base_dir, 2))
    return steps.rows()


@pytest.mark.parametrize(
    "batch_size, accumulation, steps_run",
    [(2, 1, list(range(8, 12))), (2, 2, [8, 8, 9, 9, 10, 10, 11, 11]), (4, 1, list(range(8, 12)))],
)
def test_a_resume_with_other_batch_settings_trains_the_steps_left_on_the_next_samples(
    stream_at_batch_2, tiny_base_dir, tmp_path, batch_size, accumulation, steps_run
):
    """8 steps at batch 4 (32 samples), then 12 steps at another batch (issue 31: batch 2 looped forever)."""
    fit_saving_last(tmp_path, tiny_base_dir, 8, 4)
    resumed = StepsRun()
    run, module = fit_saving_last(
        tmp_path,
        tiny_base_dir,
        12,
        batch_size,
        [resumed],
        ckpt_path=str(tmp_path / "last.ckpt"),
        accumulate_grad_batches=accumulation,
    )
    assert run.global_step == 12 and resumed.steps == steps_run
    samples = len(steps_run) * batch_size
    assert module.samples_seen == 32 + samples
    assert resumed.rows() == stream_at_batch_2[32 : 32 + samples]  # the stream goes on: nothing replayed or skipped


def test_a_resume_whose_step_count_does_not_fit_the_new_accumulation_shortens_only_its_first_step(
    stream_at_batch_2, tiny_base_dir, tmp_path
):
    fit_saving_last(tmp_path, tiny_base_dir, 7, 4)
    resumed = StepsRun()
    with pytest.warns(UserWarning, match="7 batches into Lightning's epoch.*step 8 accumulates 1 batches"):
        run, module = fit_saving_last(
            tmp_path, tiny_base_dir, 10, 2, [resumed], ckpt_path=str(tmp_path / "last.ckpt"), accumulate_grad_batches=2
        )
    assert run.global_step == 10 and resumed.steps == [7, 8, 8, 9, 9]
    assert module.samples_seen == 38 and resumed.rows() == stream_at_batch_2[28:38]
    assert load_checkpoint_file(tmp_path / "last.ckpt")["global_step"] == 10


def test_a_fit_without_max_steps_is_an_error_naming_the_key(tiny_base_dir, tmp_path):
    """The stream is sized in steps (before: one step per epoch, the same samples every epoch)."""
    with pytest.raises(UsageError, match="trainer.max_steps=-1: fine-tuning needs a step count"):
        trainer(tmp_path, -1, max_epochs=2).fit(make_module(tiny_base_dir), make_data(tiny_base_dir))


# ----------------------------------------------------------------------------- stops requested in any state
VALIDATE_EVERY = 2  # training batches between validations
VAL_BATCHES = 2


class SignalWhen(Callback):
    """Sends this process `number` (as `kill` or Ctrl-C would) at the hook `hook` when `when(trainer)` holds, once;
    then counts what ran after it: training steps, validation batches."""

    def __init__(self, hook: str, when, number=signal.SIGTERM):
        self.number, self.when, self.sent = number, when, False
        self.steps_after = self.validation_batches_after = self.validation_batches = 0
        setattr(self, hook, self._maybe_send)

    def _maybe_send(self, trainer, *args):
        if not self.sent and self.when(trainer):
            self.sent = True
            os.kill(os.getpid(), self.number)

    def on_train_batch_end(self, trainer, *args):
        self.steps_after += self.sent

    def on_validation_batch_end(self, trainer, *args):
        self.validation_batches += 1
        self.validation_batches_after += self.sent


def validating_fit(directory, base_dir, callbacks, steps=6):
    """A fit that validates every VALIDATE_EVERY steps (VAL_BATCHES batches, then generate-based metrics)."""
    checkpoints = ModelCheckpoint(dirpath=directory, save_last=True, save_top_k=0, every_n_train_steps=NO_PERIODIC)
    run = trainer(
        directory,
        steps,
        [checkpoints, *callbacks],
        enable_checkpointing=True,
        limit_val_batches=VAL_BATCHES,
        val_check_interval=VALIDATE_EVERY,
    )
    module = make_module(base_dir, eval_records=2)
    return run, module, make_data(base_dir, eval_batch_size=1)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_requested_just_before_a_validation_saves_the_step_without_validating(tiny_base_dir, tmp_path, number):
    """Issue 27: Lightning runs a validation (with generate) before it honours should_stop."""
    handler = signal.getsignal(number)
    signalled = SignalWhen("on_train_batch_start", lambda trainer: trainer.global_step == 3, number)  # step 4
    run, module, data = validating_fit(tmp_path, tiny_base_dir, [signalled])
    run.fit(module, data)  # returns normally: a clean stop
    assert run.global_step == 4 and signalled.steps_after == 1  # the step in flight finished
    assert signalled.validation_batches == VAL_BATCHES  # the validation after step 2 ran; none after the request
    assert signalled.validation_batches_after == 0
    assert load_checkpoint_file(tmp_path / "last.ckpt")["global_step"] == 4
    assert run.limit_val_batches == VAL_BATCHES and signal.getsignal(number) is handler


@pytest.mark.parametrize(
    "hook, when",
    [
        ("on_validation_batch_start", lambda trainer: True),  # as the validation starts
        ("on_validation_batch_end", lambda trainer: trainer.fit_loop.epoch_loop.val_loop.batch_progress.is_last_batch),
    ],
)  # ... and after its last batch, before the generate-based metrics
def test_a_stop_requested_during_a_validation_ends_it_at_once_and_saves_the_step(tiny_base_dir, tmp_path, hook, when):
    signalled = SignalWhen(hook, when)
    run, module, data = validating_fit(tmp_path, tiny_base_dir, [signalled])
    with pytest.raises(TrainingStopped, match="SIGTERM stopped fit during the validation after step 2"):
        run.fit(module, data)
    assert signalled.steps_after == 0 and signalled.validation_batches_after == 0
    assert "val/vqa_em" not in run.callback_metrics  # the generate-based metrics did not run
    assert load_checkpoint_file(tmp_path / "last.ckpt")["global_step"] == 2


class NoBatches(NuwaDataModule):
    """A training loader that reports batches and yields none: every epoch ends at once (issue 31's endless loop)."""

    def train_dataloader(self):
        empty = ResumableSampler(len(self.dataset("train")), 4, start=0, total=0, seed=0, counted=32)
        return torch.utils.data.DataLoader(
            self.dataset("train"), batch_size=4, sampler=empty, collate_fn=self.collator()
        )


class EpochLimit(Callback):
    RUNAWAY = 50

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch > self.RUNAWAY:
            raise RuntimeError(f"still running at epoch {trainer.current_epoch}")


def test_a_stop_requested_during_epochs_without_batches_ends_fit(tiny_base_dir, tmp_path):
    signalled = SignalWhen("on_train_epoch_start", lambda trainer: trainer.current_epoch == 3)
    run = trainer(tmp_path, 4, [signalled, EpochLimit()])
    run.fit(make_module(tiny_base_dir), NoBatches(processor_path=tiny_base_dir, train_images=12, val_images=2))
    assert run.current_epoch == 4 and run.global_step == 0


STOPPED_WHILE_READING_DATA = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from lightning.pytorch.callbacks import Callback
from test_loop_faults import NuwaDataModule, make_module, trainer

class SignalledWhileReading(NuwaDataModule):
    def train_dataloader(self):
        os.kill(os.getpid(), signal.SIGTERM)
        print("still reading", flush=True)
        return super().train_dataloader()

class Steps(Callback):
    def on_train_batch_start(self, *args):
        print("a step started", flush=True)

trainer({directory!r}, 4, [Steps()]).fit(make_module({base!r}), SignalledWhileReading(processor_path={base!r}))
"""


def test_sigterm_before_the_first_step_ends_the_process_at_once(tiny_base_dir, tmp_path):
    """Nothing is trained yet: SIGTERM acts as without fit (before: Lightning noted it and ran a step first)."""
    script = STOPPED_WHILE_READING_DATA.format(
        tests=os.path.dirname(__file__), directory=str(tmp_path), base=tiny_base_dir
    )
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]
    assert "still reading" not in done.stdout and "a step started" not in done.stdout


# ----------------------------------------------------------------------------- non-finite losses
NAN_STEP, SAVE_EVERY = 5, 2


class NaNLossAt(NuwaFineTuner):
    """The loss of step NAN_STEP (1-based) is NaN, as a diverging run's would be."""

    def _lm_loss(self, output):
        loss = super()._lm_loss(output)
        return loss * float("nan") if self.global_step + 1 == NAN_STEP else loss


def finite_checkpoint(path) -> dict:
    state = load_checkpoint_file(path)
    assert state["state_dict"] and all(bool(torch.isfinite(value).all()) for value in state["state_dict"].values())
    return state


def test_a_nan_loss_stops_fit_naming_the_step_and_last_ckpt_keeps_the_finite_state_before(tiny_base_dir, tmp_path):
    """Issue 31: a NaN run exited 0 and its last.ckpt held only non-finite tensors."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=SAVE_EVERY)
    steps = StepsRun()
    module = make_module(tiny_base_dir, module_class=NaNLossAt)
    with pytest.raises(NonFiniteTrainingError, match=f"loss is not finite at step {NAN_STEP} \\(train/loss nan"):
        trainer(tmp_path, 8, [checkpoints, steps], enable_checkpointing=True).fit(module, make_data(tiny_base_dir))
    assert steps.steps == list(range(NAN_STEP))  # nothing ran after the NaN step
    saved = finite_checkpoint(tmp_path / "last.ckpt")
    assert saved["global_step"] == NAN_STEP - 1  # the last save, and the state the NaN step started from
    for name, value in saved["state_dict"].items():
        assert torch.equal(value, module.state_dict()[name]), f"{name}: the NaN step changed the weights"


def test_a_diverging_learning_rate_stops_fit_before_a_non_finite_state_is_saved(tiny_base_dir, tmp_path):
    """The issue's command: --model.optimizer.lr 1e6 --model.optimizer.warmup_steps 0, saving every step."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    module = make_module(tiny_base_dir, optimizer=OptimizerSettings(lr=1e6, warmup_steps=0))
    with pytest.raises(NonFiniteTrainingError, match="not finite") as stopped:
        trainer(tmp_path, 12, [checkpoints], enable_checkpointing=True).fit(module, make_data(tiny_base_dir))
    saved = finite_checkpoint(tmp_path / "last.ckpt")
    step = int(str(stopped.value).split("step ")[1].split()[0])
    assert saved["global_step"] == step - 1  # the state before the non-finite one


# ----------------------------------------------------------------------------- under DDP: every rank stops alike
DISTRIBUTED_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "PL_GLOBAL_SEED",
)  # the test process's own, if an earlier test set them
DDP_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from nuwa_train.lightning.module import NonFiniteTrainingError
from test_loop_faults import NaNLossAt, NuwaFineTuner, make_data, make_module, trainer

class OnRankOne(Callback):
    '''Rank 1 alone: a SIGTERM as step 3 starts (or, in RankOneNaN, the NaN loss of step NAN_STEP).'''
    def on_train_batch_start(self, trainer, module, batch, batch_index):
        if {fault!r} == "sigterm" and trainer.global_rank == 1 and trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

class RankOneNaN(NaNLossAt):
    def _lm_loss(self, output):
        return super()._lm_loss(output) if self.global_rank == 1 else NuwaFineTuner._lm_loss(self, output)

checkpoints = ModelCheckpoint(dirpath={directory!r}, save_last=True, save_top_k=0, every_n_train_steps=2)
run = trainer({directory!r}, 6, [checkpoints, OnRankOne()], enable_checkpointing=True, devices=2, strategy="ddp")
module = make_module({base!r}, module_class=RankOneNaN if {fault!r} == "nan" else NuwaFineTuner)
try:
    run.fit(module, make_data({base!r}, 2))
    print(f"rank {{run.global_rank}} stopped at step {{run.global_step}}", flush=True)
except NonFiniteTrainingError as error:
    print(f"rank {{run.global_rank}} error: {{error}}", flush=True)
    sys.exit(1)
"""


@pytest.mark.parametrize("fault", ["nan", "sigterm"])
def test_under_ddp_a_fault_on_one_rank_stops_every_rank_at_the_same_step(tiny_base_dir, tmp_path, fault):
    script = tmp_path / "ddp_fit.py"
    script.write_text(
        DDP_SCRIPT.format(
            tests=os.path.dirname(__file__), directory=str(tmp_path / "run"), base=tiny_base_dir, fault=fault
        )
    )
    env = {key: value for key, value in os.environ.items() if key not in DISTRIBUTED_ENV}
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "OMP_NUM_THREADS": "1"},
        cwd=tmp_path,
    )
    assert (tmp_path / "run" / "last.ckpt").is_file(), done.stdout[-2000:] + done.stderr[-4000:]
    saved = load_checkpoint_file(tmp_path / "run" / "last.ckpt")
    if fault == "nan":  # NaN on rank 1 only: both ranks raise at its step, before the update; the save before stays
        assert done.returncode != 0
        assert f"rank 0 error: the training loss is not finite at step {NAN_STEP} (on another rank)" in done.stdout
        assert (
            f"rank 1 error: the training loss is not finite at step {NAN_STEP} (train/loss nan on global rank 1)"
            in done.stdout
        ), done.stdout[-3000:]
        assert saved["global_step"] == NAN_STEP - 1
    else:  # SIGTERM on rank 1 only: both ranks finish step 3 and stop; the final save holds it
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert "rank 0 stopped at step 3" in done.stdout and "rank 1 stopped at step 3" in done.stdout
        assert saved["global_step"] == 3
