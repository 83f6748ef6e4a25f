"""Pruning-aware LoRA fine-tuning: the loss falls, a killed run resumes exactly, exports reload exactly."""

import lightning as L
import pytest
import torch
from conftest import LossRecorder
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from nuwa_train.data import SyntheticConfig, coordinate_tokens, vocabulary
from nuwa_train.export import ExportError, export_module, load_pruned, write_pretrained
from nuwa_train.lightning import (
    LoraSettings,
    NuwaDataModule,
    NuwaFineTuner,
    OptimizerSettings,
    ResumableSampler,
    SelectionSettings,
)
from nuwa_train.lightning.module import IGNORE_INDEX, record_mean_loss
from nuwa_train.models.tiny import TinyLlavaSpec, build_tiny_llava, save_tiny_llava
from nuwa_train.pruning import NuwaConfig


@pytest.fixture
def base_dir(tiny_base_dir):
    return tiny_base_dir


class SimulatedKill(RuntimeError):
    pass


class KillAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_index):
        if trainer.global_step == self.step:
            raise SimulatedKill(f"killed before step {self.step + 1}")


def make(base_dir, mode="soft", lr=2e-3, dropout=0.05, gumbel=0.0, distill=0.0, train_images=40):
    module = NuwaFineTuner(
        model_path=base_dir,
        pruning=NuwaConfig(budget=64),
        lora=LoraSettings(rank=8, dropout=dropout),
        optimizer=OptimizerSettings(lr=lr, warmup_steps=2),
        selection=SelectionSettings(mode=mode, anneal_steps=10, gumbel=gumbel),
        distill_weight=distill,
    )
    data = NuwaDataModule(processor_path=base_dir, train_images=train_images, val_images=4, batch_size=4)
    return module, data


def trainer(tmp_path, steps, callbacks=(), **kwargs):
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
        **kwargs,
    )


def test_a_few_soft_steps_reduce_the_loss(base_dir, tmp_path):
    module, data = make(base_dir, lr=5e-3, train_images=4)  # 8 records: two batches seen again and again
    recorder = LossRecorder()
    trainer(tmp_path, 40, [recorder], enable_checkpointing=False).fit(module, data)
    losses = [recorder.losses[s] for s in sorted(recorder.losses)]
    assert sum(losses[-4:]) / 4 < 0.85 * sum(losses[:4]) / 4


class BatchRecorder(Callback):
    """Per optimizer step: the loss and the exact token rows trained on (which samples were seen)."""

    def __init__(self):
        self.losses, self.batches = {}, {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index):
        self.losses[trainer.global_step] = float(outputs["loss"])
        self.batches[trainer.global_step] = batch["input_ids"].clone()


def trainable_weights(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


RESUME_STEPS, SAVE_EVERY = 10, 3


@pytest.fixture(scope="module")
def uninterrupted_run(tiny_base_dir, tmp_path_factory):
    L.seed_everything(0)
    module, data = make(tiny_base_dir, mode="soft", gumbel=0.5)
    recorder = BatchRecorder()
    trainer(tmp_path_factory.mktemp("straight"), RESUME_STEPS, [recorder], enable_checkpointing=False).fit(module, data)
    return recorder, trainable_weights(module)


@pytest.mark.parametrize("kill_before", [4, 7, 10])  # resumes from the checkpoints of steps 3 (early), 6 and 9 (late)
def test_resume_from_any_saved_step_equals_the_uninterrupted_run(
    uninterrupted_run, tiny_base_dir, tmp_path, kill_before
):
    expected, expected_weights = uninterrupted_run
    L.seed_everything(0)
    module, data = make(tiny_base_dir, mode="soft", gumbel=0.5)
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=SAVE_EVERY, save_top_k=0)
    with pytest.raises(SimulatedKill):
        trainer(tmp_path, RESUME_STEPS, [KillAt(kill_before - 1), checkpoints]).fit(module, data)
    saved = (kill_before - 1) // SAVE_EVERY * SAVE_EVERY

    module, data = make(tiny_base_dir, mode="soft", gumbel=0.5)
    resumed = BatchRecorder()
    trainer(tmp_path, RESUME_STEPS, [resumed], enable_checkpointing=False).fit(
        module, data, ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert sorted(resumed.losses) == list(range(saved + 1, RESUME_STEPS + 1))
    for step in resumed.losses:
        assert torch.equal(resumed.batches[step], expected.batches[step]), f"step {step} trained on other samples"
        assert resumed.losses[step] == pytest.approx(expected.losses[step], abs=1e-6)
    weights = trainable_weights(module)
    assert weights.keys() == expected_weights.keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, expected_weights[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("group", [1, 4])
def test_sampler_passes_are_permutations_that_keep_groups_and_resume_mid_pass(group):
    stream = list(ResumableSampler(24, batch_size=4, start=0, total=64, seed=3, group=group))
    assert sorted(stream[:24]) == sorted(stream[24:48]) == list(range(24)) and stream[:24] != stream[24:48]
    assert all(stream[k] // group == stream[k - k % group] // group for k in range(64))  # a group stays together
    assert list(ResumableSampler(24, batch_size=4, start=28, total=64, seed=3, group=group)) == stream[28:]
    ranks = [
        list(ResumableSampler(24, batch_size=4, start=0, total=64, seed=3, rank=r, world=2, group=group))
        for r in (0, 1)
    ]
    assert [i for step in range(0, 64, 8) for r in (0, 1) for i in ranks[r][step // 2 : step // 2 + 4]] == stream


def test_grouped_data_settings_are_checked(base_dir):
    with pytest.raises(ValueError, match="data.train_vqa_per_image=1.5"):
        NuwaDataModule(processor_path=base_dir, train_vqa_per_image=1.5)
    # with files they do not apply (tests/data/test_faults_round2.py: the default recipe takes files as they are)
    NuwaDataModule(processor_path=base_dir, group_by_image=True, train_files={"llava": ["x.json"]})


def test_temperature_and_hard_final_phase_follow_the_step(base_dir):
    module = NuwaFineTuner(
        model_path=base_dir,
        selection=SelectionSettings(
            temperature_start=1.0, temperature_end=0.01, anneal_steps=100, hard_final_fraction=0.25
        ),
    )
    assert module.temperature(0) == 1.0 and module.temperature(100) == pytest.approx(0.01)
    module.trainer = L.Trainer(max_steps=400, logger=False)
    assert module.selection_mode(299) == "soft" and module.selection_mode(300) == "hard"


def test_distillation_adds_a_finite_positive_term(base_dir):
    module, data = make(base_dir, distill=1.0)
    module.configure_model()
    data.setup()
    batch = data.collator()([data.dataset("train")[i] for i in range(4)])
    module.nuwa.set_selection("soft", 0.5)
    output = module.model(**batch)
    distill = module._distillation(batch, output.logits)
    assert torch.isfinite(distill) and distill > 0
    module.nuwa.set_selection("hard")
    output = module.model(**batch)
    assert torch.isfinite(module._distillation(batch, output.logits))


def test_record_mean_loss_weighs_records_equally_on_the_pruned_sequence(base_dir):
    """Per record, the batch loss equals the record's loss run alone (padding and stage 2 included)."""
    module, data = make(base_dir)
    module.configure_model()
    module.model.eval()
    module.nuwa.set_selection("hard")
    data.setup()
    records = [data.dataset("train")[i] for i in range(4)]  # VQA and grounding: 2 vs 5 answer tokens
    collate = data.collator()
    with torch.no_grad():
        alone = torch.stack([module.model(**collate([record])).loss for record in records])
        batch = collate(records)
        output = module.model(**batch)
        by_record = record_mean_loss(output.logits, module.nuwa.output_labels())
    answer_tokens = (batch["labels"] != IGNORE_INDEX).sum(dim=1).float()
    assert len(set(answer_tokens.tolist())) > 1  # otherwise both means coincide and nothing is tested
    assert by_record == pytest.approx(alone.mean().item(), abs=1e-4)
    assert output.loss == pytest.approx(((alone * answer_tokens).sum() / answer_tokens.sum()).item(), abs=1e-4)


def test_unknown_loss_reduction_is_a_clear_error(base_dir):
    with pytest.raises(ValueError, match="model.loss_reduction='sum' must be one of token, record"):
        NuwaFineTuner(model_path=base_dir, loss_reduction="sum")


def test_lora_never_targets_vision_layers_without_gradient(tmp_path):
    config = SyntheticConfig()
    model, processor = build_tiny_llava(
        TinyLlavaSpec(vision_feature_layer=-2), vocabulary(config), coordinate_tokens(config)
    )
    save_tiny_llava(model, processor, tmp_path)
    module = NuwaFineTuner(model_path=str(tmp_path), lora=LoraSettings(targets="lm+vision"))
    module.configure_model()
    names = [n for n, p in module.model.named_parameters() if p.requires_grad]
    assert any("vision_tower.encoder.layers.1." in n and "lora_A" in n for n in names)
    assert not any("vision_tower.encoder.layers.2." in n for n in names)  # past the feature layer (-2 of 3)
    assert any("multi_modal_projector" in n for n in names)


@pytest.mark.parametrize("merge", [True, False])
def test_export_reload_gives_the_same_logits_as_the_trained_module(base_dir, tmp_path, merge):
    module, data = make(base_dir, dropout=0.0)
    trainer(tmp_path, 3, enable_checkpointing=False).fit(module, data)
    batch = data.collator(with_answer=False, padding_side="left")([data.dataset("val")[i] for i in range(4)])
    module.eval()
    module.nuwa.set_selection("hard")
    with torch.no_grad():
        expected = module.model(**batch).logits
    target = export_module(module, tmp_path / "export", merge=merge)
    assert (target / "nuwa_config.json").is_file() and (target / "chat_template.jinja").is_file()
    assert (target / ("model.safetensors" if merge else "adapter_model.safetensors")).is_file()
    model = load_pruned(target)
    with torch.no_grad():
        reloaded = model(**batch).logits
    torch.testing.assert_close(reloaded, expected, atol=1e-5, rtol=1e-5)
    assert reloaded.shape[1] < batch["input_ids"].shape[1]  # pruning is attached


def test_export_is_atomic(base_dir, tmp_path, monkeypatch):
    module, _ = make(base_dir)
    module.configure_model()
    target = tmp_path / "out"
    write_pretrained(module.base_model, module.processor, module.pruning, target)
    before = sorted(p.name for p in target.iterdir())

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(module.processor), "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        write_pretrained(module.base_model, module.processor, module.pruning, target)
    assert sorted(p.name for p in target.iterdir()) == before  # the previous export is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left behind
    with pytest.raises(ExportError, match="has no nuwa_config.json"):
        load_pruned(tmp_path)


@pytest.mark.parametrize("test_records, scored", [(None, 6), (2, 2)], ids=["whole-split", "capped"])
def test_test_scores_the_whole_test_split_unless_capped(base_dir, tmp_path, test_records, scored):
    module = NuwaFineTuner(model_path=base_dir, test_records=test_records, eval_records=1)
    data = NuwaDataModule(processor_path=base_dir, test_images=3, eval_batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.test(module, data, verbose=False)
    assert module.full_token_reference["records"] == scored  # retention is against the base on the same records
    assert {"test/vqa_em", "test/grounding_acc50", "test/vision_tokens"} <= set(trainer.callback_metrics)
