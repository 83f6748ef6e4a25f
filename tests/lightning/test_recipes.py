"""Every LightningCLI recipe parses and trains two steps on a tiny model, so a recipe cannot rot."""

from pathlib import Path

import pytest
import yaml

from nuwa_train.lightning import NuwaDataModule, NuwaFineTuner
from nuwa_train.lightning.cli import NuwaCLI

# GPU-cluster recipes (accelerator: gpu, DeepSpeed, real data paths) run on the CPU with a tiny model and data in
# tests/test_scaleout.py::test_llava_7b_recipe_trains_two_steps_on_the_cpu.
# The tiny base's pre-training recipe (model.phases) is tested in tests/commands/test_pretrain.py.
RECIPES = sorted(
    p
    for p in (Path(__file__).parents[2] / "recipes").glob("*.yaml")
    if "trainer" in (recipe := yaml.safe_load(p.read_text()))
    and recipe["trainer"].get("accelerator") != "gpu"
    and "phases" not in recipe.get("model", {})
)


def test_there_are_fine_tuning_recipes():
    assert any(p.name == "default.yaml" for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_two_steps_on_the_tiny_model(recipe, tiny_base_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe's relative run directories land here
    cli = NuwaCLI(
        NuwaFineTuner,
        NuwaDataModule,
        run=False,
        args=[
            "--config",
            str(recipe),
            "--model.model_path",
            tiny_base_dir,
            "--trainer.max_steps",
            "2",
            "--data.train_images",
            "4",
            "--data.batch_size",
            "2",
            "--trainer.limit_val_batches",
            "0",
        ],
    )
    assert cli.datamodule.hparams.processor_path == tiny_base_dir  # linked from model.model_path
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 2
