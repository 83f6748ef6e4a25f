"""An export is a model a person can pick up: its README.md is a Hugging Face model card that says what it is."""

import json
import shutil

import lightning as L
import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from nuwa_train.cli import main
from nuwa_train.export import NUWA_CONFIG_NAME, export_checkpoint
from nuwa_train.lightning import LoraSettings, NuwaDataModule, NuwaFineTuner, OptimizerSettings, SelectionSettings
from nuwa_train.model_card import CARD_NAME, hub_id, write_model_card
from nuwa_train.pruning import NuwaConfig

STEPS = 3
TRAIN_BUDGETS = [64, 128]
LORA_RANK = 4


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text[4:].split("\n---\n", 1)[0])


def section(text: str, title: str) -> str:
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def exported(tiny_base_dir, tmp_path_factory):
    """A budget-robust tiny fine-tune of STEPS steps, exported merged from its last.ckpt."""
    directory = tmp_path_factory.mktemp("card")
    module = NuwaFineTuner(
        model_path=tiny_base_dir,
        pruning=NuwaConfig(budget=64),
        lora=LoraSettings(rank=LORA_RANK, dropout=0.0),
        optimizer=OptimizerSettings(lr=1e-3),
        selection=SelectionSettings(mode="soft", anneal_steps=2),
        train_budgets=TRAIN_BUDGETS,
    )
    data = NuwaDataModule(processor_path=tiny_base_dir, train_images=4, val_images=2, batch_size=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=directory,
        callbacks=[ModelCheckpoint(dirpath=directory / "checkpoints", save_last=True, save_top_k=0)],
    )
    L.seed_everything(0)
    trainer.fit(module, data)
    return export_checkpoint(directory / "checkpoints" / "last.ckpt", directory / "export"), tiny_base_dir


def test_the_export_has_a_model_card_with_parsable_front_matter(exported):
    export, _ = exported
    text = (export / CARD_NAME).read_text()
    front = front_matter(text)
    assert front["library_name"] == "transformers" and front["pipeline_tag"] == "image-text-to-text"
    assert {"nuwa-train", "llava", "lora"} <= set(front["tags"])
    assert "base_model" not in front  # a local base has no Hub id: said in a comment instead of an invalid id
    assert "# base model:" in text.split("\n---\n", 1)[0]


def test_the_card_names_the_base_the_steps_and_the_budgets_trained(exported):
    export, base = exported
    text = (export / CARD_NAME).read_text()
    training = section(text, "Training")
    assert f"- Base model: `{base}`" in training
    assert f"- Steps trained: {STEPS} of {STEPS}" in training
    assert "- Budgets trained: 64, 128" in training
    assert f"LoRA: rank {LORA_RANK}," in training and "Selection while training: soft" in training
    recorded = json.loads((export / NUWA_CONFIG_NAME).read_text())["exported_from"]["training"]
    assert recorded["steps"] == STEPS and recorded["train_budgets"] == TRAIN_BUDGETS


def test_the_card_says_how_it_prunes_loads_and_is_evaluated(exported):
    export, _ = exported
    text = (export / CARD_NAME).read_text()
    pruning = section(text, "Pruning (`nuwa_config.json`)")
    assert "| `method` | nuwa |" in pruning and "| `budget` | 64 |" in pruning
    assert "nuwa-train eval --model export" in section(text, "Evaluation")  # none recorded: how to produce it
    use = section(text, "Use")
    assert "load_pruned('export', return_processor=True)" in use and "nuwa-train chat export" in use
    serve = section(text, "Serve")
    assert "nuwa-train serve export" in serve and "stage 1 only" in serve  # fine-tuned two-stage: served stage 1


def test_an_evaluation_table_goes_into_the_card(exported, tmp_path):
    export, _ = exported
    copy = shutil.copytree(export, tmp_path / "export")
    table = "## results\n\n| method | budget |\n|---|---|\n| nuwa | 64 |\n"
    write_model_card(copy, evaluation=table)
    evaluation = section((copy / CARD_NAME).read_text(), "Evaluation")
    assert "### results" in evaluation and "| nuwa | 64 |" in evaluation
    assert "nuwa-train eval --model" not in evaluation


def test_a_hub_base_is_named_in_the_front_matter_with_its_license(exported, tmp_path):
    export, _ = exported
    copy = shutil.copytree(export, tmp_path / "export")
    base = tmp_path / "hub" / "models--llava-hf--llava-1.5-7b-hf" / "snapshots" / "abc123"
    base.mkdir(parents=True)
    (base / CARD_NAME).write_text("---\nlicense: llama2\n---\n# LLaVA\n")
    settings = json.loads((copy / NUWA_CONFIG_NAME).read_text())
    settings["exported_from"]["base_model"] = str(base)
    (copy / NUWA_CONFIG_NAME).write_text(json.dumps(settings))
    front = front_matter(write_model_card(copy).read_text())
    assert front["base_model"] == "llava-hf/llava-1.5-7b-hf" and front["license"] == "llama2"
    assert hub_id("Qwen/Qwen2-VL-7B-Instruct") == "Qwen/Qwen2-VL-7B-Instruct" and hub_id(str(tmp_path)) is None


def test_chat_runs_the_export_with_its_trained_pruning(exported, tmp_path, capsys):
    from nuwa_train.data.synthetic import SyntheticConfig, generate_scene, render

    export, _ = exported
    image = tmp_path / "scene.png"
    config = SyntheticConfig()
    render(generate_scene(config, "test", 0), config).save(image)
    main(
        [
            "chat",
            str(export),
            "--image",
            str(image),
            "--prompt",
            "what shape is the yellow object?",
            "--max-new-tokens",
            "4",
            "--no-overlay",
        ]
    )
    captured = capsys.readouterr()
    assert "nuwa at budget 64 (nuwa_config.json of the export)" in captured.err
    assert captured.out.count("\n") == 1  # one answer line, whatever 3 steps of training taught


def test_an_adapter_only_card_names_its_library_and_its_base_family(exported, tmp_path):
    export, _ = exported
    copy = shutil.copytree(export, tmp_path / "adapter")
    (copy / "config.json").unlink()  # an adapter-only export holds no model config: the family is its base's
    settings = json.loads((copy / NUWA_CONFIG_NAME).read_text())
    settings["exported_from"]["merged"] = False
    (copy / NUWA_CONFIG_NAME).write_text(json.dumps(settings))
    text = write_model_card(copy).read_text()
    front = front_matter(text)
    assert front["library_name"] == "peft" and "llava" in front["tags"]
    assert "This folder is a LoRA adapter" in text and "cannot load it without its base model" in text
