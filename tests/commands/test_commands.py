"""The user-facing commands run end to end on a tiny random base (numbers are not asserted, outputs are)."""

import json
from pathlib import Path

import yaml

from nuwa_train.cli import main

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "default.yaml"


def test_eval_compare_writes_the_table_and_the_overlay(tiny_base_dir, tmp_path):
    main(["eval", "--model", tiny_base_dir, "--images", "2", "--compare", "--budgets", "64", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["full tokens", "random", "pooling", "uniform", "FastV", "VisionZip-like",
                                           "Nüwa stage 1", "Nüwa"]
    fastv = rows[4]
    assert fastv["vqa_em"] is None and "cannot be met by FastV" in fastv["note"]  # 4 LLM layers are too few
    assert rows[-1]["vision_tokens"] == 16.0 and rows[0]["vision_tokens"] == 144.0
    assert (tmp_path / "compare_kept_tokens.png").stat().st_size > 0 and (tmp_path / "compare.md").is_file()


def test_demo_runs_the_main_job(tiny_base_dir, tmp_path, monkeypatch):
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["model"]["model_path"] = tiny_base_dir
    recipe["trainer"].update(val_check_interval=2, limit_val_batches=1, log_every_n_steps=1)
    recipe["model"]["eval_records"] = 2
    recipe["data"].update(batch_size=2, val_images=2)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    main(["demo", "--recipe", "recipe.yaml", "--out", "demo", "--test-images", "2", "--max-steps", "2"])
    rows = json.loads((tmp_path / "demo" / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["full tokens", "Nüwa, training-free", "Nüwa, fine-tuned",
                                           "VisionZip-like, fine-tuned", "FastV, fine-tuned"]
    for picture in ("training_curves.png", "kept_tokens_base.png", "kept_tokens_fine_tuned.png"):
        assert (tmp_path / "demo" / picture).stat().st_size > 0
    assert (tmp_path / "demo" / "export" / "nuwa_config.json").is_file()


def test_demo_resumes_only_a_run_with_the_same_settings(tmp_path):
    from rich.console import Console

    from nuwa_train.demo import _resumable_checkpoint

    console, run_dir = Console(quiet=True), tmp_path / "runs" / "nuwa"
    assert _resumable_checkpoint(run_dir, "lr: 0.001\n", console) is None  # nothing to resume yet
    last = run_dir / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"interrupted")
    assert _resumable_checkpoint(run_dir, "lr: 0.001\n", console) == last
    assert _resumable_checkpoint(run_dir, "lr: 0.002\n", console) is None  # another recipe: start afresh
    assert not last.exists()
    assert _resumable_checkpoint(run_dir, "lr: 0.001\n", console) is None  # the old settings are gone too


class SimulatedKill(RuntimeError):
    pass


def test_the_demo_resumes_a_killed_fine_tune_exactly(tiny_base_dir, tmp_path, monkeypatch):
    """The demo's fine-tunes resume through `fit --ckpt_path`: killed after an early checkpoint, the same weights."""
    from rich.console import Console

    from nuwa_train import demo
    from nuwa_train.lightning import NuwaFineTuner

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["model"]["model_path"] = tiny_base_dir
    recipe["trainer"].update(val_check_interval=2, limit_val_batches=0, log_every_n_steps=1)
    recipe["data"].update(batch_size=2, val_images=2)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(demo, "CHECKPOINT_EVERY", 2)
    console, steps = Console(quiet=True), 7

    def fine_tune(name):
        module, _ = demo._fine_tune(tmp_path / "recipe.yaml", tmp_path / name, "nuwa", "soft", {}, steps, console)
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    expected = fine_tune("straight")
    original, started = NuwaFineTuner.on_train_batch_start, []

    def kill_once_at_step_3(self, batch, batch_index):
        started.append(self.global_step)
        if self.global_step == 3 and not (tmp_path / "killed").exists():
            (tmp_path / "killed").touch()
            raise SimulatedKill("killed during step 4")
        return original(self, batch, batch_index)

    monkeypatch.setattr(NuwaFineTuner, "on_train_batch_start", kill_once_at_step_3)
    try:
        fine_tune("resumed")
    except SimulatedKill:
        pass
    assert (tmp_path / "resumed" / "checkpoints" / "last.ckpt").is_file()
    started.clear()
    resumed = fine_tune("resumed")  # the same settings: resumes from step 2
    assert started == list(range(2, steps))
    assert resumed.keys() == expected.keys()
    for name, value in resumed.items():
        assert (value - expected[name]).abs().max() <= 1e-6, name
