"""Checkpoints users can trust: never run code on load, last.ckpt is the final state, exports swap safely."""

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import CodeOnLoad, LossRecorder
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from nuwa_train.export import ExportError, export_checkpoint
from nuwa_train.io import UnsafeCheckpointError, load_checkpoint_file
from nuwa_train.lightning import LoraSettings, NuwaDataModule, NuwaFineTuner, OptimizerSettings, SelectionSettings
from nuwa_train.lightning.cli import run as lightning_cli
from nuwa_train.pruning import NuwaConfig

STEPS, SAVE_EVERY = 7, 5  # a run whose length is not a multiple of the checkpoint interval


def make(base_dir):
    module = NuwaFineTuner(
        model_path=base_dir,
        pruning=NuwaConfig(budget=64),
        lora=LoraSettings(rank=4, dropout=0.0),
        optimizer=OptimizerSettings(lr=2e-3, warmup_steps=2),
        selection=SelectionSettings(mode="soft", anneal_steps=4),
    )
    return module, NuwaDataModule(processor_path=base_dir, train_images=12, val_images=2, batch_size=4)


def fit(directory: Path, base_dir, callbacks=(), ckpt_path=None, steps=STEPS):
    module, data = make(base_dir)
    checkpoints = ModelCheckpoint(dirpath=directory, save_last=True, save_top_k=0, every_n_train_steps=SAVE_EVERY)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=directory,
        callbacks=[checkpoints, *callbacks],
    )
    L.seed_everything(0)
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return trainer, module


class SignalAt(Callback):
    """Sends this process a signal while step `step` (1-based) runs, as `kill` or Ctrl-C would."""

    def __init__(self, step: int, number: int):
        self.step, self.number = step, number

    def on_train_batch_start(self, trainer, module, batch, batch_index):
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), self.number)


@pytest.fixture(scope="module")
def finished_run(tiny_base_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    losses = LossRecorder()
    trainer, module = fit(directory, tiny_base_dir, [losses])
    return directory, losses.losses


# ----------------------------------------------------------------------------- last.ckpt is the final state
def test_last_checkpoint_holds_the_final_step_when_max_steps_is_not_a_save_step(finished_run):
    directory, _ = finished_run
    state = load_checkpoint_file(directory / "last.ckpt")
    assert state["global_step"] == STEPS  # Lightning alone leaves step 5 here
    assert state["nuwa_train"]["max_steps"] == STEPS


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_finishes_the_step_saves_and_the_resume_equals_the_uninterrupted_run(
    finished_run, tiny_base_dir, tmp_path, number
):
    _, expected = finished_run
    handler = signal.getsignal(number)
    trainer, _ = fit(tmp_path, tiny_base_dir, [SignalAt(3, number)])  # returns normally: a clean stop
    assert trainer.global_step == 3 and signal.getsignal(number) is handler
    assert load_checkpoint_file(tmp_path / "last.ckpt")["global_step"] == 3
    resumed = LossRecorder()
    fit(tmp_path, tiny_base_dir, [resumed], ckpt_path=str(tmp_path / "last.ckpt"))
    assert sorted(resumed.losses) == list(range(4, STEPS + 1))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(expected[step], abs=1e-6)


def test_export_names_the_step_and_warns_on_a_checkpoint_that_is_not_the_final_state(finished_run, tmp_path, capsys):
    directory, _ = finished_run
    state = load_checkpoint_file(directory / "last.ckpt")
    state["global_step"] = SAVE_EVERY  # what Lightning alone would have left in last.ckpt
    torch.save(state, tmp_path / "mid.ckpt")
    with pytest.warns(UserWarning, match=f"holds step {SAVE_EVERY} of a {STEPS}-step run, not its final state"):
        export_checkpoint(tmp_path / "mid.ckpt", tmp_path / "mid-export")
    export_checkpoint(directory / "last.ckpt", tmp_path / "export")
    assert f"step {STEPS} of {STEPS}" in capsys.readouterr().out


# ----------------------------------------------------------------------------- loading never runs code
@pytest.fixture
def payload_checkpoint(finished_run, tmp_path):
    """A real fit checkpoint with one extra entry whose unpickling would run code."""
    directory, _ = finished_run
    state = load_checkpoint_file(directory / "last.ckpt")
    marker = tmp_path / "code-ran"
    state["callbacks"]["payload"] = CodeOnLoad(marker)
    path = tmp_path / "payload.ckpt"
    torch.save(state, path)
    return path, marker


def test_export_refuses_a_checkpoint_that_would_run_code(payload_checkpoint, tmp_path):
    path, marker = payload_checkpoint
    with pytest.raises(UnsafeCheckpointError, match=f"refused to load the checkpoint {path}"):
        export_checkpoint(path, tmp_path / "export")
    assert not marker.exists() and not (tmp_path / "export").exists()


def test_fit_resume_refuses_a_checkpoint_that_would_run_code(payload_checkpoint, tiny_base_dir, tmp_path):
    path, marker = payload_checkpoint
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "accelerator": "cpu",
                    "devices": 1,
                    "max_steps": STEPS,
                    "logger": False,
                    "enable_progress_bar": False,
                    "limit_val_batches": 0,
                    "num_sanity_val_steps": 0,
                    "default_root_dir": str(tmp_path),
                },
                "model": {"model_path": tiny_base_dir, "lora": {"rank": 4}},
                "data": {"batch_size": 4, "train_images": 12, "val_images": 2},
            }
        )
    )
    with pytest.raises(UnsafeCheckpointError, match=f"refused to load the checkpoint {path}"):
        lightning_cli(["fit", "--config", str(recipe), "--ckpt_path", str(path)])
    assert not marker.exists()


def test_a_checkpoint_stores_the_resolved_base_path_and_export_says_which_path_failed(
    tiny_base_dir, tmp_path, monkeypatch, finished_run
):
    monkeypatch.chdir(Path(tiny_base_dir).parent)
    module = NuwaFineTuner(model_path=Path(tiny_base_dir).name)  # relative, as a recipe would give it
    assert module.hparams.model_path == str(Path(tiny_base_dir).resolve())
    directory, _ = finished_run
    state = load_checkpoint_file(directory / "last.ckpt")
    state["hyper_parameters"]["model_path"] = str(tmp_path / "moved_base")
    torch.save(state, tmp_path / "moved.ckpt")
    with pytest.raises(ExportError, match=f"base model '{tmp_path / 'moved_base'}'.*does not exist.*--model-path"):
        export_checkpoint(tmp_path / "moved.ckpt", tmp_path / "export")
    assert (
        export_checkpoint(tmp_path / "moved.ckpt", tmp_path / "export", model_path=tiny_base_dir) / "model.safetensors"
    ).is_file()
