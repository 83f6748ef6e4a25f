"""Pre-training of the tiny base: targets, a short run that learns, and exact kill/resume."""

import csv
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CodeOnLoad

from nuwa_train.data import SyntheticConfig, generate_records, generate_scene, render
from nuwa_train.io import UnsafeCheckpointError, load_tensor_tree
from nuwa_train.models.tiny import TinyLlavaSpec, load_tiny_llava
from nuwa_train.pretrain import (
    TargetMaker,
    Trainer,
    cls_attention_pool,
    load_recipe,
    main,
    sincos_2d,
)

RECIPE = """
seed: 0
threads: 2
model: {{vision_hidden: 32, vision_layers: 2, vision_heads: 2, text_hidden: 32, text_layers: 2, text_heads: 2,
         text_kv_heads: 1, image_after_text: true}}
data: {{seed: 0}}
phases:
  - {{name: vision, train: vision, steps: 3, batch_size: 4, lr: 3.0e-3, warmup: 1}}
  - {{name: all, train: all, steps: {steps}, batch_size: 4, lr: 3.0e-3, warmup: 2, aux_weight: 0.3,
      referred_weight: 0.5, single_object_fraction: [0.5, 0.25]}}
presence_from: cls_attention
referred_layer: 1
log_every: 1
checkpoint_minutes: 100
export_minutes: 100
snapshot_eval_images: 2
final_eval_images: 2
saliency_images: 2
eval_batch_size: 4
run_dir: {run}
export_dir: {export}
"""


def _recipe(tmp_path: Path, name: str, steps: int) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(RECIPE.format(steps=steps, run=tmp_path / name / "run", export=tmp_path / name / "export"))
    return path


def _log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_targets_match_the_scene():
    config, spec = SyntheticConfig(), TinyLlavaSpec()
    maker = TargetMaker(config, spec)
    scene = generate_scene(config, "train", 3)
    targets = maker.scene_targets(scene)
    assert targets["cover"].shape == (len(scene.objects), 144)
    assert targets["counts"][0] == len(scene.objects) and targets["presence"].sum() == len(scene.objects)
    for index, obj in enumerate(scene.objects):  # every object owns patches of its own class inside its box
        mine = np.flatnonzero(targets["classes"] == 1 + maker.triples.index((obj.size, obj.colour, obj.shape)))
        assert len(mine) >= 1
        rows, cols = mine // 12, mine % 12
        assert (cols * 8 + 8 > obj.box[0]).all() and (cols * 8 < obj.box[2]).all()
        assert (rows * 8 + 8 > obj.box[1]).all() and (rows * 8 < obj.box[3]).all()
    for record in generate_records(config, "train", 40):
        chosen = maker.referred(record)
        if record.task == "grounding":
            assert len(chosen) == 1
        elif record.kind in ("colour", "shape", "spatial"):
            assert chosen, record.prompt
        elif record.kind == "existence":
            assert bool(chosen) == (record.answer == "yes"), record.prompt
        elif record.kind == "count":
            assert len(chosen) == int(record.answer), record.prompt


def test_fast_pixels_match_the_processor(tmp_path):
    trainer = Trainer(load_recipe(_recipe(tmp_path, "px", 1)))
    images = [render(generate_scene(SyntheticConfig(), "train", i), SyntheticConfig()) for i in range(2)]
    reference = torch.as_tensor(np.asarray(trainer.processor.image_processor(images)["pixel_values"]))
    assert torch.allclose(trainer.stream.pixels(images), reference, atol=1e-5)


def test_a_phase_can_change_the_training_data(tmp_path):
    recipe = _recipe(tmp_path, "mix", 1).read_text().replace(
        "[0.5, 0.25]}", "[0.5, 0.25], data: {vqa_mix: [[count, 1.0]]}}")
    assert "data: {vqa_mix" in recipe
    path = tmp_path / "mix.yaml"
    path.write_text(recipe)
    trainer = Trainer(load_recipe(path))
    vision, counting = trainer.config.phases
    base = trainer.stream.synthetic_at(vision, 0.0)
    assert base.vqa_mix == SyntheticConfig().vqa_mix
    mixed = trainer.stream.synthetic_at(counting, 1.0)
    assert mixed.vqa_mix == (("count", 1.0),) and mixed.single_object_fraction == 0.25
    kinds = {r.kind for r in generate_records(mixed, "train", 20) if r.task == "vqa"}
    assert kinds == {"count"}
    path.write_text(recipe.replace("vqa_mix: [[count, 1.0]]", "vqa_mixture: [[count, 1.0]]"))
    with pytest.raises(ValueError, match="phase 'all': bad data override"):
        load_recipe(path)


def test_sincos_positions_are_distinct():
    table = sincos_2d((12, 12), 32)
    assert table.shape == (144, 32)
    distances = torch.cdist(table, table)
    assert distances[~torch.eye(144, dtype=torch.bool)].min() > 0.1


def test_short_run_learns_and_exports(tmp_path):
    recipe = _recipe(tmp_path, "learn", 40)
    assert main([str(recipe), "--no-progress"]) == 0
    rows = [r for r in _log(tmp_path / "learn/run/log.csv") if r["phase"] == "all"]
    first = np.mean([float(r["lm"]) for r in rows[:5]])
    last = np.mean([float(r["lm"]) for r in rows[-5:]])
    assert last < first - 0.5, (first, last)
    export = tmp_path / "learn/export"
    for name in ("model.safetensors", "config.json", "eval_report.json", "eval_report.md", "README.md",
                 "training_log.csv", "recipe.yaml"):
        assert (export / name).exists(), name
    model, processor = load_tiny_llava(export)
    assert model.config.text_config.num_hidden_layers == 2
    assert processor.apply_chat_template(  # the exported processor keeps the question-first layout
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True, tokenize=False).startswith("user : hi <image>")
    assert not list(export.parent.glob(".export*"))  # no staging leftovers


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    straight = _recipe(tmp_path, "straight", 6)
    assert main([str(straight), "--no-progress"]) == 0
    resumed = _recipe(tmp_path, "resumed", 6)
    assert main([str(resumed), "--no-progress", "--stop-after", "5"]) == 0
    state = load_tensor_tree(tmp_path / "resumed/run/last.safetensors")
    assert state["step"] == 5 and not (tmp_path / "resumed/export").exists()
    assert main([str(resumed), "--no-progress"]) == 0
    a = load_tensor_tree(tmp_path / "straight/run/last.safetensors")
    b = load_tensor_tree(tmp_path / "resumed/run/last.safetensors")
    assert a["step"] == b["step"] == 9
    for key in a["model"]:
        assert torch.allclose(a["model"][key], b["model"][key], atol=1e-6), key
    for index, moments in a["optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.allclose(value, b["optimizer"]["state"][index][name], atol=1e-6), (index, name)
    steps = [int(r["step"]) for r in _log(tmp_path / "resumed/run/log.csv")]
    assert steps == list(range(1, 10))


def test_sigterm_saves_a_checkpoint(tmp_path, monkeypatch):
    """`kill <pid>` of a long run: the step in flight finishes, then it checkpoints and stops cleanly."""
    recipe = _recipe(tmp_path, "killed", 400)
    original = Trainer.train_step

    def step(self, batch):
        if self.step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the handler fit() installs
        return original(self, batch)

    monkeypatch.setattr(Trainer, "train_step", step)
    before = signal.getsignal(signal.SIGTERM)
    assert main([str(recipe), "--no-progress"]) == 0
    state = load_tensor_tree(tmp_path / "killed/run/last.safetensors")
    assert state["step"] == 7 and state["position"]["phase"] == 1
    assert not (tmp_path / "killed/export").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # fit() restored the previous handler


def test_cls_attention_pool_is_the_layers_own_cls_read_out(tmp_path):
    """The presence head's input is exactly what the feature layer's attention gives the CLS token."""
    config = load_recipe(_recipe(tmp_path, "pool", 1), ["presence_from=cls_attention"])
    trainer = Trainer(config)
    tower = trainer.model.model.vision_tower
    pixels = torch.randn(2, 3, 96, 96)
    hidden = tower(pixels, output_hidden_states=True).hidden_states
    layer = tower.encoder.layers[-1]
    normed = layer.layer_norm1(hidden[-2])
    expected = layer.self_attn(normed)[0][:, 0]
    assert torch.allclose(cls_attention_pool(layer, hidden[-2]), expected, atol=1e-5)
    with pytest.raises(ValueError, match="presence_from"):
        load_recipe(_recipe(tmp_path, "bad", 1), ["presence_from=mean"])


def test_pretrain_refuses_a_resume_state_that_would_run_code(tmp_path):
    recipe = _recipe(tmp_path, "payload", 3)
    run_dir = tmp_path / "payload/run"
    run_dir.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"model": {}, "step": 1, "payload": CodeOnLoad(marker)}, run_dir / "last.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=f"refused to load the checkpoint {run_dir / 'last.ckpt'}"):
        main([str(recipe), "--no-progress"])
    assert not marker.exists()


def test_the_shipped_resume_state_holds_no_pickle():
    """runs/tiny_base resumes from safetensors + JSON only, at the step the shipped base was exported from."""
    root = Path(__file__).resolve().parents[2]
    run_dir = root / "runs/tiny_base"
    assert sorted(p.name for p in run_dir.iterdir()) == ["last.safetensors", "log.csv"]
    state = load_tensor_tree(run_dir / "last.safetensors")
    report = json.loads((root / "data/tiny_base/eval_report.json").read_text())
    assert state["step"] == report["step"] and set(state) >= {"model", "heads", "optimizer", "position", "torch_rng"}
