"""Pre-training of the tiny base: targets, a short run that learns, exact kill/resume, and the shipped state."""

import csv
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CodeOnLoad

from nuwa_train.data import SyntheticConfig, generate_records, generate_scene, render
from nuwa_train.io import UnsafeCheckpointError, load_tensor_tree, save_tensor_tree
from nuwa_train.models.tiny import TinyLlavaSpec, load_tiny_llava
from nuwa_train.pretrain import TinyBasePretrainer
from nuwa_train.pretrain.cli import main
from nuwa_train.pretrain.data import BatchMaker, phase_synthetic
from nuwa_train.pretrain.heads import cls_attention_pool, sincos_2d
from nuwa_train.pretrain.state import LOG_NAME, STATE_NAME, convert_legacy_state
from nuwa_train.pretrain.targets import COVER_THRESHOLD, TargetMaker

ROOT = Path(__file__).resolve().parents[2]
VISION_STEPS = 3
RECIPE = """
seed_everything: false
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: -1
  gradient_clip_val: 1.0
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {run}
  logger: {{class_path: nuwa_train.pretrain.state.HistoryCSVLogger, init_args: {{save_dir: {run}}}}}
  callbacks:
    - {{class_path: nuwa_train.pretrain.state.StateCheckpoint, init_args: {{dirpath: {run}, minutes: 100}}}}
    - {{class_path: nuwa_train.lightning.checkpoints.FinalCheckpoint}}
    - {{class_path: nuwa_train.pretrain.callbacks.CpuThreads, init_args: {{threads: {threads}}}}}
    - class_path: nuwa_train.pretrain.callbacks.ExportBase
      init_args: {{export_dir: {export}, minutes: 100, snapshot_eval_images: 2, final_eval_images: 2,
                  saliency_images: 2, eval_batch_size: 4}}
model:
  seed: 0
  spec: {{vision_hidden: 32, vision_layers: 2, vision_heads: 2, text_hidden: 32, text_layers: 2, text_heads: 2,
         text_kv_heads: 1, image_after_text: true}}
  presence_from: cls_attention
  referred_layer: 1
  phases:
    - {{name: vision, train: vision, steps: {vision}, batch_size: 4, lr: 3.0e-3, warmup: 1}}
    - {{name: all, train: all, steps: {steps}, batch_size: 4, lr: 3.0e-3, warmup: 2, aux_weight: 0.3,
        referred_weight: 0.5, single_object_fraction: [0.5, 0.25]}}
data:
  synthetic: {{seed: 0}}
"""


def _recipe(tmp_path: Path, name: str, steps: int, vision: int = VISION_STEPS) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        RECIPE.format(
            steps=steps,
            vision=vision,
            run=tmp_path / name / "run",
            export=tmp_path / name / "export",
            threads=int(os.environ.get("NUWA_TEST_THREADS", "2")),
        )
    )
    return path


def _module(recipe: Path, **changes) -> TinyBasePretrainer:
    model = yaml.safe_load(recipe.read_text())["model"]
    return TinyBasePretrainer(**{**model, **changes})


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
    for obj in scene.objects:  # every object owns patches of its own class inside its box
        mine = np.flatnonzero(targets["classes"] == 1 + maker.triples.index((obj.size, obj.colour, obj.shape)))
        assert len(mine) >= 1
        rows, cols = mine // 12, mine % 12
        assert (cols * 8 + 8 > obj.box[0]).all() and (cols * 8 < obj.box[2]).all()
        assert (rows * 8 + 8 > obj.box[1]).all() and (rows * 8 < obj.box[3]).all()
    for record in generate_records(config, "train", 40):  # the referred patches are the referred objects'
        cover = maker.coverage(record.scene)
        patches = maker.referred_patches(record, cover)
        assert all(patches[cover[i] >= COVER_THRESHOLD].min() >= COVER_THRESHOLD for i in record.referred)
        others = [i for i in range(len(record.scene.objects)) if i not in record.referred]
        if others:
            assert (patches[cover[others].max(0) == 1] == 0).all()
        assert patches.any() == bool(record.referred)


def test_fast_pixels_match_the_processor(tmp_path):
    module = _module(_recipe(tmp_path, "px", 1))
    images = [render(generate_scene(SyntheticConfig(), "train", i), SyntheticConfig()) for i in range(2)]
    reference = torch.as_tensor(np.asarray(module.processor.image_processor(images)["pixel_values"]))
    make_batch = BatchMaker(module.phases, module.synthetic, module.processor, module.targets)
    assert torch.allclose(make_batch.pixels(images), reference, atol=1e-5)


def test_a_phase_can_change_the_training_data(tmp_path):
    recipe = _recipe(tmp_path, "mix", 1)
    phases = yaml.safe_load(recipe.read_text())["model"]["phases"]
    phases[1]["data"] = {"vqa_mix": [["count", 1.0]]}
    module = _module(recipe, phases=phases)
    make_batch = BatchMaker(module.phases, module.synthetic, module.processor, module.targets)
    assert make_batch.synthetic_at(module.position).vqa_mix == SyntheticConfig().vqa_mix
    module.position = module.position.next_phase()
    module.position.inner = 1  # the whole phase done: the curriculum's end value
    mixed = make_batch.synthetic_at(module.position)
    assert mixed.vqa_mix == (("count", 1.0),) and mixed.single_object_fraction == 0.25
    assert phase_synthetic(module.synthetic, module.phases[0]).vqa_mix == SyntheticConfig().vqa_mix
    assert {r.kind for r in generate_records(mixed, "train", 20) if r.task == "vqa"} == {"count"}
    phases[1]["data"] = {"vqa_mixture": [["count", 1.0]]}
    with pytest.raises(ValueError, match=r"model.phases.1 \('all'\): bad data override"):
        _module(recipe, phases=phases)


def test_bad_settings_name_their_key(tmp_path):
    recipe = _recipe(tmp_path, "bad", 1)
    with pytest.raises(ValueError, match="model.presence_from='mean'"):
        _module(recipe, presence_from="mean")
    phases = yaml.safe_load(recipe.read_text())["model"]["phases"]
    phases[0]["batch_size"] = 3
    with pytest.raises(ValueError, match=r"model.phases \('vision'\): batch_size=3"):
        _module(recipe, phases=phases)
    with pytest.raises(SystemExit):  # LightningCLI names the unknown key and exits
        main([str(recipe), "--model.phasez", "[]"])


def test_sincos_positions_are_distinct():
    table = sincos_2d((12, 12), 32)
    assert table.shape == (144, 32)
    distances = torch.cdist(table, table)
    assert distances[~torch.eye(144, dtype=torch.bool)].min() > 0.1


def test_cls_attention_pool_is_the_layers_own_cls_read_out(tmp_path):
    """The presence head's input is exactly what the feature layer's attention gives the CLS token."""
    tower = _module(_recipe(tmp_path, "pool", 1)).model.model.vision_tower
    pixels = torch.randn(2, 3, 96, 96)
    hidden = tower(pixels, output_hidden_states=True).hidden_states
    layer = tower.encoder.layers[-1]
    expected = layer.self_attn(layer.layer_norm1(hidden[-2]))[0][:, 0]
    assert torch.allclose(cls_attention_pool(layer, hidden[-2]), expected, atol=1e-5)


def test_short_run_learns_and_exports(tmp_path):
    recipe = _recipe(tmp_path, "learn", 40)
    assert main([str(recipe)]) == 0
    rows = [r for r in _log(tmp_path / "learn/run" / LOG_NAME) if r["phase"] == "all"]
    first = np.mean([float(r["lm"]) for r in rows[:5]])
    last = np.mean([float(r["lm"]) for r in rows[-5:]])
    assert last < first - 0.5, (first, last)
    export = tmp_path / "learn/export"
    for name in (
        "model.safetensors",
        "config.json",
        "eval_report.json",
        "eval_report.md",
        "README.md",
        "training_log.csv",
        "recipe.yaml",
    ):
        assert (export / name).exists(), name
    model, processor = load_tiny_llava(export)
    assert model.config.text_config.num_hidden_layers == 2
    assert not any("heads" in key or "referred" in key for key in model.state_dict())  # aux heads stay behind
    assert processor.apply_chat_template(  # the exported processor keeps the question-first layout
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True,
        tokenize=False,
    ).startswith("user : hi <image>")
    report = json.loads((export / "eval_report.json").read_text())
    assert report["final"] and report["step"] == VISION_STEPS + 40
    assert report["phase_steps"] == {"vision": VISION_STEPS, "all": 40}
    assert yaml.safe_load((export / "recipe.yaml").read_text())["model"]["phases"][1]["steps"] == 40
    assert not list(export.parent.glob(".export*"))  # no staging leftovers


def _kill_at(monkeypatch, step: int) -> None:
    """SIGTERM during the step that takes the run to `step` (a `kill <pid>`; FinalCheckpoint stops cleanly)."""
    original = TinyBasePretrainer.training_step

    def training_step(self, dataloader_iter):
        if self.position.step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, dataloader_iter)

    monkeypatch.setattr(TinyBasePretrainer, "training_step", training_step)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("straight")
    assert main([str(_recipe(tmp_path, "straight", 6))]) == 0
    return tmp_path / "straight/run"


@pytest.mark.parametrize("kill_step", [2, VISION_STEPS, 7])  # inside phase 1, at its end, inside phase 2
def test_killed_and_resumed_equals_uninterrupted(tmp_path, monkeypatch, uninterrupted, kill_step):
    recipe = _recipe(tmp_path, "resumed", 6)
    run = tmp_path / "resumed/run"
    before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        _kill_at(patch, kill_step)
        assert main([str(recipe)]) == 0
    assert signal.getsignal(signal.SIGTERM) is before  # the handler was restored
    state = load_tensor_tree(run / STATE_NAME)
    assert state["global_step"] == kill_step and not (tmp_path / "resumed/export").exists()
    assert state["nuwa_pretrain"]["position"]["phase"] == (0 if kill_step < VISION_STEPS else 1)
    assert main([str(recipe)]) == 0
    a, b = load_tensor_tree(uninterrupted / STATE_NAME), load_tensor_tree(run / STATE_NAME)
    assert a["global_step"] == b["global_step"] == VISION_STEPS + 6
    for key in a["state_dict"]:
        assert torch.allclose(a["state_dict"][key], b["state_dict"][key], atol=1e-6), key
    for index, moments in a["optimizer_states"][0]["state"].items():
        for name, value in moments.items():
            assert torch.allclose(value, b["optimizer_states"][0]["state"][index][name], atol=1e-6), (index, name)
    straight, resumed = _log(uninterrupted / LOG_NAME), _log(run / LOG_NAME)
    assert [int(r["step"]) for r in resumed] == list(range(1, VISION_STEPS + 7))
    for x, y in zip(straight, resumed):
        assert x["phase"] == y["phase"] and abs(float(x["loss"]) - float(y["loss"])) < 1e-6, (x, y)


def test_pretrain_refuses_a_resume_state_that_would_run_code(tmp_path):
    recipe = _recipe(tmp_path, "payload", 3)
    run_dir = tmp_path / "payload/run"
    run_dir.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"model": {}, "step": 1, "payload": CodeOnLoad(marker)}, run_dir / "last.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=f"refused to load the checkpoint {run_dir / 'last.ckpt'}"):
        main([str(recipe)])
    assert not marker.exists()


def test_a_state_of_the_loop_before_lightning_is_converted_and_resumes(tmp_path, monkeypatch, uninterrupted):
    """A `last.safetensors` tree of the old loop (model, heads, optimizer, position) is converted once in place
    and resumes at its step, reaching the uninterrupted run's weights."""
    recipe = _recipe(tmp_path, "legacy", 6)
    run = tmp_path / "legacy/run"
    with monkeypatch.context() as patch:
        _kill_at(patch, 5)
        assert main([str(recipe)]) == 0
    new = load_tensor_tree(run / STATE_NAME)
    weights = new["state_dict"]
    old = {
        "model": {k[len("model.") :]: v for k, v in weights.items() if k.startswith("model.")},
        "heads": {k[len("heads.") :]: v for k, v in weights.items() if k.startswith("heads.")},
        "optimizer": new["optimizer_states"][0],
        "step": new["global_step"],
        **new["nuwa_pretrain"],
    }
    assert convert_legacy_state(old)["loops"]["fit_loop"] == new["loops"]["fit_loop"]  # as Lightning saved it
    save_tensor_tree(run / STATE_NAME, old)
    assert main([str(recipe)]) == 0
    a, b = load_tensor_tree(uninterrupted / STATE_NAME), load_tensor_tree(run / STATE_NAME)
    assert a["global_step"] == b["global_step"]
    for key in a["state_dict"]:
        assert torch.allclose(a["state_dict"][key], b["state_dict"][key], atol=1e-6), key


def test_the_shipped_resume_state_resumes_at_its_last_step(tmp_path):
    """runs/tiny_base: a Lightning checkpoint (safetensors + JSON) of the run the shipped base was exported from;
    with a phase appended it trains on from that step, keeping the run's log."""
    shipped = ROOT / "runs/tiny_base"
    assert sorted(p.name for p in shipped.iterdir()) == sorted([LOG_NAME, STATE_NAME])
    report = json.loads((ROOT / "data/tiny_base/eval_report.json").read_text())
    state = load_tensor_tree(shipped / STATE_NAME)
    position = state["nuwa_pretrain"]["position"]
    assert state["global_step"] == position["step"] == report["step"]
    assert dict(zip(report["phase_steps"], position["done_steps"])) == report["phase_steps"]
    run, export = tmp_path / "run", tmp_path / "export"
    shutil.copytree(shipped, run)
    recipe = yaml.safe_load((ROOT / "recipes/tiny_base.yaml").read_text())
    recipe["trainer"]["logger"]["init_args"]["save_dir"] = str(run)
    recipe["trainer"]["default_root_dir"] = str(run)
    recipe["trainer"]["enable_progress_bar"] = False
    callbacks = recipe["trainer"]["callbacks"]
    callbacks[0]["init_args"]["dirpath"] = str(run)
    callbacks[3]["init_args"].update(export_dir=str(export), final_eval_images=2, saliency_images=2)
    recipe["model"]["phases"].append({"name": "extra", "train": "all", "steps": 1, "batch_size": 2, "lr": 1e-5})
    path = tmp_path / "tiny_base.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main([str(path)]) == 0
    resumed = load_tensor_tree(run / STATE_NAME)
    assert resumed["global_step"] == report["step"] + 1
    assert resumed["nuwa_pretrain"]["position"]["done_steps"] == [*position["done_steps"], 1]
    log = _log(run / LOG_NAME)
    assert len(log) == len(_log(shipped / LOG_NAME)) + 1 and log[-1]["phase"] == "extra"
    assert int(log[-1]["step"]) == report["step"] + 1
