"""The training loop's faults: a resume under other batch settings, stops requested in any state, non-finite losses,
training budgets the model's grid cannot hold (issues 27 and 31)."""

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

from nuwa_train.lightning import LoraSettings, NuwaDataModule, NuwaFineTuner, OptimizerSettings, SelectionSettings
from nuwa_train.pruning import NuwaConfig, NuwaConfigError

TINY_GRID_TOKENS = 144  # the tiny base's 12x12 patch grid


def make_module(base_dir, module_class=NuwaFineTuner, **settings):
    settings = {"pruning": NuwaConfig(budget=64), "lora": LoraSettings(rank=4, dropout=0.0),
                "optimizer": OptimizerSettings(lr=2e-3, warmup_steps=2),
                "selection": SelectionSettings(mode="soft", anneal_steps=4), **settings}
    return module_class(model_path=base_dir, **settings)


def make_data(base_dir, batch_size=4, **settings):
    return NuwaDataModule(processor_path=base_dir, train_images=12, val_images=2, batch_size=batch_size, **settings)


def trainer(directory, steps, callbacks=(), **settings):
    settings = {"limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_checkpointing": False, **settings}
    return L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, use_distributed_sampler=False, default_root_dir=directory,
                     callbacks=list(callbacks), **settings)


class StepsRun(Callback):
    """The global step and the sample rows of every training batch."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, module, batch, batch_index):
        self.batches.append((trainer.global_step, batch["input_ids"].shape[0]))


# ----------------------------------------------------------------------------- train_budgets beyond the grid
@pytest.mark.parametrize("budgets", [[32, 2000], ["all", 600]])
def test_a_training_budget_the_grid_cannot_hold_is_an_error_at_start_naming_the_key(tiny_base_dir, tmp_path, budgets):
    module = make_module(tiny_base_dir, train_budgets=budgets)
    steps = StepsRun()
    with pytest.raises(NuwaConfigError, match=f"model.train_budgets: {budgets[1]} .*12x12 grid \\({TINY_GRID_TOKENS} "
                                              f"vision tokens per image.*24x24 reference grid"):
        trainer(tmp_path, 4, [steps]).fit(module, make_data(tiny_base_dir))
    assert steps.batches == []  # before the first step, not when a step draws it
