"""Budget-robust fine-tuning: each step trains at a budget drawn from model.train_budgets; the export serves them."""

import json
import warnings
from collections import Counter

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

from nuwa_train.export import export_module, load_pruned
from nuwa_train.lightning import LoraSettings, NuwaDataModule, NuwaFineTuner, OptimizerSettings, SelectionSettings
from nuwa_train.pruning import NuwaConfig, NuwaConfigError

BUDGETS = [32, 64, "all"]


def make(base_dir, budgets=BUDGETS, weights=None):
    module = NuwaFineTuner(
        model_path=base_dir,
        pruning=NuwaConfig(budget=64, stage2_layer=0.75),
        lora=LoraSettings(rank=4, dropout=0.0),
        optimizer=OptimizerSettings(warmup_steps=1),
        selection=SelectionSettings(mode="soft", anneal_steps=4),
        train_budgets=budgets,
        train_budget_weights=weights,
    )
    return module, NuwaDataModule(processor_path=base_dir, train_images=8, val_images=4, batch_size=4)


class TokensSeen(Callback):
    """Per step: the budget drawn and the vision tokens per image each decoder layer saw."""

    def __init__(self):
        self.steps = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index):
        kept = module.nuwa.kept
        tokens = float(kept.vision_tokens_per_layer().mean() / kept.images_per_sample.sum())
        self.steps[trainer.global_step - 1] = (module.step_budget(trainer.global_step - 1), tokens, module.nuwa.config)


def test_each_step_trains_at_its_drawn_budget_and_the_export_records_the_budgets(tiny_base_dir, tmp_path):
    module, data = make(tiny_base_dir)
    seen = TokensSeen()
    L.Trainer(
        accelerator="cpu",
        max_steps=9,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
        callbacks=[seen],
    ).fit(module, data)
    tokens_at = {32: 8.0, 64: 16.0, "all": 144.0}  # of the tiny grid's 144 (budgets are per 576, depth-averaged)
    assert {budget for budget, _, _ in seen.steps.values()} == set(BUDGETS)  # 9 steps draw every budget here
    for step, (budget, tokens, config) in seen.steps.items():
        assert tokens == pytest.approx(tokens_at[budget], abs=0.5), (step, budget)
        assert config == (
            NuwaConfig(method="none") if budget == "all" else NuwaConfig(budget=budget, stage2_layer=0.75)
        )
    again, _ = make(tiny_base_dir)
    assert [again.step_budget(s) for s in range(50)] == [module.step_budget(s) for s in range(50)]  # resume-safe
    export = export_module(module, tmp_path / "export")
    assert json.loads((export / "nuwa_config.json").read_text())["trained_budgets"] == BUDGETS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trained budget loads without a warning
        assert load_pruned(export, budget=32)._nuwa.config.budget == 32
    with pytest.warns(UserWarning, match="budget 192 is outside the budgets .* fine-tuned at \\(32, 64, all\\)"):
        load_pruned(export, budget=192)


@pytest.mark.parametrize(
    "budgets, message",
    [
        ([], "must list distinct budgets"),
        ([64, 64], "must list distinct budgets"),
        ([64, 0], "model.train_budgets: budget=0"),
    ],
)
def test_bad_train_budgets_are_errors_naming_the_key(tiny_base_dir, budgets, message):
    with pytest.raises(NuwaConfigError, match=message):
        make(tiny_base_dir, budgets)


@pytest.mark.parametrize("weights", [None, [1, 1, 1], [3, 1, 1], [1, 2, 5]])
def test_budgets_are_drawn_in_proportion_to_their_weights(tiny_base_dir, weights):
    module, _ = make(tiny_base_dir, weights=weights)
    steps = 3000
    drawn = Counter(module.step_budget(step) for step in range(steps))
    shares = weights or [1] * len(BUDGETS)
    for budget, share in zip(BUDGETS, shares):
        assert drawn[budget] / steps == pytest.approx(share / sum(shares), abs=0.03), (budget, drawn)
    again, _ = make(tiny_base_dir, weights=weights)
    assert [again.step_budget(s) for s in range(1000, 1100)] == [module.step_budget(s) for s in range(1000, 1100)]


@pytest.mark.parametrize(
    "budgets, weights, message",
    [
        (BUDGETS, [1, 1], "one positive weight per budget"),
        (BUDGETS, [1, 0, 1], "one positive weight per budget"),
        (BUDGETS, [1, float("nan"), 1], "one positive weight per budget"),
        (None, [1.0], "model.train_budget_weights needs model.train_budgets"),
    ],
)
def test_bad_train_budget_weights_are_errors_naming_the_key(tiny_base_dir, budgets, weights, message):
    with pytest.raises(NuwaConfigError, match=message):
        make(tiny_base_dir, budgets, weights)


def test_a_single_budget_export_warns_at_other_budgets(tiny_base_dir, tmp_path):
    import shutil

    shutil.copytree(tiny_base_dir, tmp_path / "export")
    (tmp_path / "export" / "nuwa_config.json").write_text(json.dumps(NuwaConfig(budget=64).to_dict()))
    with pytest.warns(UserWarning, match="budget 128 is outside the budgets .* \\(64\\)"):
        load_pruned(tmp_path / "export", budget=128)
    from nuwa_train.cli import main

    main(
        [
            "eval",
            "--model",
            str(tmp_path / "export"),
            "--images",
            "2",
            "--budget",
            "64,128",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [row["budget"] for row in rows] == [None, 64, 128]
    assert "outside the budgets" not in rows[1]["note"] and "budget 128 is outside the budgets" in rows[2]["note"]
