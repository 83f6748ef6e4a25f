"""Fine-tuning and export for the other VLM families: Qwen2-VL, Qwen2.5-VL and LLaVA-NeXT.

The same Lightning module, data module and exporter as LLaVA-1.5: only the adapter differs.
"""

import lightning as L
import pytest
import torch

from nuwa_train.data import SyntheticConfig, coordinate_tokens, vocabulary
from nuwa_train.data.collate import VisionLanguageCollator
from nuwa_train.export import export_module, load_pruned
from nuwa_train.lightning import (
    LoraSettings,
    NuwaDataModule,
    NuwaFineTuner,
    OptimizerSettings,
    SelectionSettings,
)
from nuwa_train.models import FAMILIES, load_processor
from nuwa_train.pruning import NuwaConfig

# LLaVA-1.5 fine-tuning has its own tests (test_lightning.py) on the shipped-base shape
OTHER_FAMILIES = [name for name in FAMILIES if name != "llava"]


@pytest.fixture(scope="module", params=OTHER_FAMILIES)
def family_dir(request, tmp_path_factory):
    return _family_dir(request.param, tmp_path_factory.mktemp(request.param))


def make(path, mode="soft"):
    module = NuwaFineTuner(
        model_path=path,
        pruning=NuwaConfig(budget=128, stage2_layer=2),
        lora=LoraSettings(rank=4, dropout=0.0, targets="lm+vision"),
        optimizer=OptimizerSettings(lr=5e-3, warmup_steps=1),
        selection=SelectionSettings(mode=mode, anneal_steps=4),
        distill_weight=0.5,
    )
    data = NuwaDataModule(processor_path=path, train_images=4, val_images=2, batch_size=4)
    return module, data


def fit(module, data, tmp_path, steps):
    L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    ).fit(module, data)


@pytest.mark.parametrize("mode", ["soft", "straight_through"])
def test_two_steps_of_pruning_aware_lora_train_every_adapter(family_dir, tmp_path, mode):
    module, data = make(family_dir, mode)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters() if p.requires_grad}
    assert any(".visual." in n or "vision_tower" in n for n in before)  # LoRA reaches the vision tower
    fit(module, data, tmp_path, 2)
    changed = {n for n, p in module.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert changed == set(before)  # every trainable parameter got a gradient step
    assert module.nuwa._layout is not None and module.nuwa._layout.selection.keep_bias is not None


def test_export_reload_gives_the_same_logits(family_dir, tmp_path):
    module, data = make(family_dir)
    fit(module, data, tmp_path, 2)
    batch = data.collator(with_answer=False, padding_side="left")([data.dataset("val")[i] for i in range(4)])
    module.eval()
    module.nuwa.set_selection("hard")
    with torch.no_grad():
        expected = module.model(**batch).logits
    target = export_module(module, tmp_path / "export", merge=True)
    model = load_pruned(target)
    with torch.no_grad():
        reloaded = model(**batch).logits
    processor = load_processor(target)  # the image-only Qwen processor round-trips too
    assert type(processor) is type(module.processor)
    assert torch.equal(
        VisionLanguageCollator(processor, padding_side="left", with_answer=False)(
            [data.dataset("val")[i] for i in range(4)]
        )["input_ids"],
        batch["input_ids"],
    )
    assert reloaded.shape == expected.shape and reloaded.shape[1] < batch["input_ids"].shape[1]
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-5)


def test_image_free_batches_still_run_every_trainable_module(family_dir):
    """The blank-image row (kept for data-parallel training) works with each family's image inputs."""
    module, data = make(family_dir)
    module.configure_model()
    batch = data.collator()([data.dataset("train")[i] for i in range(3)])
    text = batch["input_ids"] != module.nuwa.adapter.image_token_id
    text_only = {key: batch[key][text].view(3, -1) for key in ("input_ids", "attention_mask", "labels")}
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    module.nuwa.set_selection("soft", 0.5)
    plain = module.model(**text_only).loss
    extended = module._with_blank_image(text_only)
    loss = module.model(**extended).loss
    loss.backward()
    assert loss.item() == pytest.approx(plain.item(), abs=1e-6)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


@pytest.mark.parametrize("recipe", ["qwen2_vl_7b_zero2", "llava_next_7b_zero2"])
def test_family_recipes_train_two_steps_on_a_tiny_model_of_their_family(recipe, tmp_path, monkeypatch):
    """The GPU recipes, with their model swapped for a tiny one of the same family and a plain CPU strategy."""
    from pathlib import Path

    from nuwa_train.lightning.cli import NuwaCLI

    family = "qwen2_5_vl" if recipe.startswith("qwen") else "llava_next"
    path = _family_dir(family, tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[2]
    cli = NuwaCLI(
        NuwaFineTuner,
        NuwaDataModule,
        run=False,
        args=[
            "--config",
            str(root / "recipes" / f"{recipe}.yaml"),
            "--model.model_path",
            path,
            "--data.train_files",
            "null",
            "--data.val_files",
            "null",
            "--data.test_files",
            "null",
            "--data.train_images",
            "4",
            "--data.batch_size",
            "2",
            "--data.num_workers",
            "0",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.strategy",
            "auto",
            "--trainer.precision",
            "32-true",
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "0",
        ],
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 2


def test_kept_stage1_counts_no_padding_slot_with_images_of_different_sizes(family_dir):
    """Soft selection over a batch of a small and a large image: the logged count is each image's own count."""
    module, data = make(family_dir)
    module.configure_model()
    module.model.eval()
    module.nuwa.set_selection("soft", 0.5)
    collate = data.collator()
    records = [data.dataset("val")[i] for i in range(2)]
    records[1] = {**records[1], "image": records[1]["image"].resize((192, 160))}  # more patches / tiles
    with torch.no_grad():
        alone = []
        for record in records:
            module.model(**collate([record]))
            alone.append(float(module.nuwa.kept.stage1_vision_tokens()))
        module.model(**collate(records))
    assert alone[0] != pytest.approx(alone[1])  # the images do keep different numbers of tokens
    assert not module.nuwa._layout.selection.kept.all()  # so the smaller one's row is padded
    assert module._kept_tokens()["train/kept_stage1"] == pytest.approx(sum(alone) / 2, rel=1e-4)


def _family_dir(family, path):
    torch.manual_seed(0)
    config = SyntheticConfig()
    words, atomic = vocabulary(config), coordinate_tokens(config)
    model, processor = FAMILIES[family].build_tiny(words=words, atomic_tokens=atomic)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)
