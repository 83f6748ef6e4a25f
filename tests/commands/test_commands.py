"""The user-facing commands run end to end on a tiny random base (numbers are not asserted, outputs are)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from nuwa_train.cli import main

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "default.yaml"


def test_eval_compare_writes_the_table_and_the_overlay(tiny_base_dir, tmp_path):
    main(["eval", "--model", tiny_base_dir, "--images", "2", "--compare", "--budgets", "64", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["method"] for r in rows] == [
        "full tokens",
        "random",
        "pooling",
        "uniform",
        "FastV",
        "VisionZip-like",
        "Nüwa stage 1",
        "Nüwa",
    ]
    fastv = rows[4]
    assert fastv["vqa_em"] is None and "cannot be met by FastV" in fastv["note"]  # 4 LLM layers are too few
    assert rows[-1]["vision_tokens"] == 16.0 and rows[0]["vision_tokens"] == 144.0
    assert (tmp_path / "kept_tokens.png").stat().st_size > 0 and (tmp_path / "results.md").is_file()
    settings = {json.loads(line)["setting"] for line in (tmp_path / "predictions.jsonl").read_text().splitlines()}
    assert settings == {"full tokens"} | {f"{r['method']} @ 64" for r in rows[1:] if r["method"] != "FastV"}


def test_eval_scores_every_record_of_users_files_in_every_format_and_writes_the_predictions(tiny_base_dir, tmp_path):
    from nuwa_train.data.formats import export_split
    from nuwa_train.data.records import export_conversations
    from nuwa_train.data.synthetic import SyntheticConfig

    llava, refcoco = export_split(tmp_path / "files", SyntheticConfig(), "val", 3)  # 3 VQA + 3 grounding records
    conversations = export_conversations(tmp_path / "swift", SyntheticConfig(), "val", 2, 0, 1)  # 2 grounding
    out = tmp_path / "out"
    main(
        [
            "eval",
            "--model",
            tiny_base_dir,
            "--method",
            "nuwa",
            "--budget",
            "64",
            "--out",
            str(out),
            "--data",
            f"llava={llava}",
            "--data",
            f"refcoco={refcoco}",
            "--data",
            f"sharegpt={conversations}",
        ]
    )
    saved = json.loads((out / "results.json").read_text())
    assert saved["records"] == 8 and "sharegpt=" in saved["data"]
    full, pruned = saved["rows"]
    assert (full["num_vqa"], full["num_grounding"]) == (pruned["num_vqa"], pruned["num_grounding"]) == (3, 5)
    assert pruned["unparseable"] >= 0 and pruned["vision_tokens"] == 16.0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 16 and {p["setting"] for p in predictions} == {"full tokens", "nuwa @ 64"}
    assert {"id", "task", "answer", "prediction", "correct", "iou"} <= set(predictions[0])
    main(
        [
            "eval",
            "--model",
            tiny_base_dir,
            "--method",
            "none",
            "--out",
            str(out / "capped"),
            "--limit",
            "2",
            "--data",
            f"refcoco={refcoco}",
        ]
    )
    assert json.loads((out / "capped" / "results.json").read_text())["records"] == 2
    main(
        [
            "eval",
            "--model",
            tiny_base_dir,
            "--compare",
            "--budgets",
            "64",
            "--out",
            str(out / "compared"),
            "--data",
            f"refcoco={refcoco}",
        ]
    )  # every pruner on the same files
    compared = _result_rows(out / "compared")
    assert len(compared) == 8 and {
        r["num_grounding"] for r in compared if r["vqa_em"] is not None or r["grounding_acc50"] is not None
    } == {3}
    with pytest.raises(SystemExit, match="must be FORMAT=PATH with FORMAT one of llava, refcoco, sharegpt"):
        main(["eval", "--model", tiny_base_dir, "--data", f"coco={refcoco}"])


def _result_rows(out: Path) -> list[dict]:
    return json.loads((out / "results.json").read_text())["rows"]


def test_eval_of_an_export_runs_its_trained_pruning_unless_a_flag_overrides_it(tiny_base_dir, tmp_path):
    import shutil

    from nuwa_train.pruning import NuwaConfig

    export = tmp_path / "export"
    shutil.copytree(tiny_base_dir, export)
    trained = NuwaConfig(budget=64, stage2_layer=0.8)
    (export / "nuwa_config.json").write_text(json.dumps({**trained.to_dict(), "exported_from": "x.ckpt"}))
    main(["eval", "--model", str(export), "--images", "2", "--out", str(tmp_path / "a")])
    row = _result_rows(tmp_path / "a")[1]
    assert row["budget"] == 64 and row["note"] == "nuwa_config.json of the export; stage 2 at layer 0.8"
    main(["eval", "--model", str(export), "--images", "2", "--budget", "128", "--out", str(tmp_path / "b")])
    row = _result_rows(tmp_path / "b")[1]
    assert row["budget"] == 128 and "budget from the flags; stage 2 at layer 0.8" in row["note"]
    main(["eval", "--model", str(export), "--images", "2", "--method", "visionzip", "--out", str(tmp_path / "v")])
    row = _result_rows(tmp_path / "v")[1]
    assert (row["method"], row["note"]) == ("visionzip", "nuwa_config.json of the export, method from the flags")
    from nuwa_train import load_pruned

    for budget in (None, 128, 192):
        handle = load_pruned(export, budget=budget)._nuwa
        assert (handle.config.budget, handle.config.stage2_layer) == (budget or 64, 0.8)
    from nuwa_train.data import SyntheticConfig, generate_records
    from nuwa_train.evaluation import evaluate

    model, processor = load_pruned(export, budget=128, return_processor=True)
    records = list(generate_records(SyntheticConfig(), "val", 2))
    ran = evaluate(model, processor, records, progress=False)  # what the loaded model runs, reported as such
    assert (ran.method, ran.budget, ran.average_vision_tokens) == ("nuwa", 128, 32.0)
    full = evaluate(model, processor, records, pruning=NuwaConfig(method="none"), progress=False)
    assert (full.method, full.budget, full.average_vision_tokens) == ("none", None, 144.0)
    other = evaluate(model, processor, records, pruning=NuwaConfig(budget=64), progress=False)
    assert (other.budget, other.average_vision_tokens, model._nuwa.config.budget) == (64, 16.0, 128)
    main(["eval", "--model", tiny_base_dir, "--images", "2", "--out", str(tmp_path / "c")])  # a plain model
    row = _result_rows(tmp_path / "c")[1]
    assert row["note"] == "stage 2 at layer 0.5"


def test_eval_of_a_recipe_runs_the_recipes_pruning(tiny_base_dir, tmp_path):
    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["model"]["model_path"] = tiny_base_dir
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    main(["eval", "--model", str(path), "--images", "2", "--out", str(tmp_path / "out")])
    row = _result_rows(tmp_path / "out")[1]
    stage2 = recipe["model"]["pruning"]["stage2_layer"]
    assert row["note"] == f"model.pruning of {path}; stage 2 at layer {stage2}" and row["budget"] == 64
    recipe["model"]["pruning"]["stage2_layr"] = 0.8
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit, match="model.pruning: unknown NuwaConfig key.*stage2_layr"):
        main(["eval", "--model", str(path), "--images", "2", "--out", str(tmp_path / "bad")])


def test_eval_measures_retention_against_the_exports_base_model_or_the_given_reference(tiny_base_dir, tmp_path):
    import shutil

    from nuwa_train.pruning import NuwaConfig

    export = tmp_path / "export"
    shutil.copytree(tiny_base_dir, export)
    with torch.no_grad():  # the "fine-tuned" export differs from its base: the scores can tell them apart
        from safetensors.torch import load_file, save_file

        weights = load_file(export / "model.safetensors")
        save_file(
            {k: v * 0 if "lm_head" in k else v for k, v in weights.items()},
            export / "model.safetensors",
            metadata={"format": "pt"},
        )
    origin = {"base_model": str(Path(tiny_base_dir).resolve()), "merged": True}
    (export / "nuwa_config.json").write_text(json.dumps({**NuwaConfig().to_dict(), "exported_from": origin}))
    main(["eval", "--model", str(export), "--images", "3", "--out", str(tmp_path / "a")])
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    reference, own, pruned = saved["rows"]
    assert (reference["method"], own["method"]) == ("reference, full tokens", "full tokens")
    assert reference["note"] == origin["base_model"] and saved["reference"] == f"{origin['base_model']}, all tokens"
    plain = _result_rows_of_plain(tiny_base_dir, tmp_path / "plain")
    assert reference["vqa_em"] == plain["vqa_em"] and reference["grounding_miou"] == plain["grounding_miou"]
    said = {}
    for line in (tmp_path / "a" / "predictions.jsonl").read_text().splitlines():
        prediction = json.loads(line)
        said.setdefault(prediction["setting"], []).append(prediction["prediction"])
    assert said["reference, full tokens"] != said["full tokens"]  # the reference row really ran the base
    if reference["grounding_miou"]:
        assert pruned["grounding_retention"] == pytest.approx(pruned["grounding_acc50"] / reference["grounding_acc50"])
    main(["eval", "--model", str(export), "--reference", str(export), "--images", "3", "--out", str(tmp_path / "b")])
    assert [r["method"] for r in _result_rows(tmp_path / "b")] == ["full tokens", "nuwa"]
    origin["base_model"] = str(tmp_path / "moved")
    (export / "nuwa_config.json").write_text(json.dumps({**NuwaConfig().to_dict(), "exported_from": origin}))
    main(["eval", "--model", str(export), "--images", "3", "--out", str(tmp_path / "c")])
    assert "is not on this machine" in json.loads((tmp_path / "c" / "results.json").read_text())["reference"]
    with pytest.raises(SystemExit, match=f"model .{tmp_path / 'moved'}. does not exist"):
        main(["eval", "--model", str(export), "--reference", str(tmp_path / "moved"), "--out", str(tmp_path / "d")])


def _result_rows_of_plain(model: str, out: Path) -> dict:
    main(["eval", "--model", model, "--images", "3", "--method", "none", "--out", str(out)])
    return _result_rows(out)[0]


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
    assert [r["method"] for r in rows] == [
        "full tokens",
        "Nüwa, training-free",
        "Nüwa, fine-tuned",
        "VisionZip-like, fine-tuned",
        "FastV, fine-tuned",
    ]
    for picture in ("training_curves.png", "kept_tokens_base.png", "kept_tokens_fine_tuned.png"):
        assert (tmp_path / "demo" / picture).stat().st_size > 0
    assert (tmp_path / "demo" / "export" / "nuwa_config.json").is_file()
    card = (tmp_path / "demo" / "export" / "README.md").read_text()  # the model card carries the demo's table
    assert "### Main job:" in card and "| Nüwa, fine-tuned | 64 |" in card and "Steps trained: 2 of 2" in card


def test_demo_resumes_only_a_run_with_the_same_settings(tmp_path):
    from rich.console import Console

    from nuwa_train.commands.demo import _resumable_checkpoint

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

    from nuwa_train.commands import demo
    from nuwa_train.lightning import NuwaFineTuner
    from nuwa_train.lightning.cli import parse_recipe

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["model"]["model_path"] = tiny_base_dir
    recipe["trainer"].update(val_check_interval=2, limit_val_batches=0, log_every_n_steps=1)
    recipe["data"].update(batch_size=2, val_images=2)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(demo, "CHECKPOINT_EVERY", 2)
    console, steps = Console(quiet=True), 7
    recipe, nuwa = parse_recipe(tmp_path / "recipe.yaml"), demo.FINE_TUNES[0]

    def fine_tune(name):
        module, _ = demo._fine_tune(demo.fine_tune_settings(recipe, nuwa, tmp_path / name, steps), console)
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


def _trained_with(cli) -> dict:
    """The settings a built fine-tune trains with, read from its module and trainer."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from nuwa_train.lightning.checkpoints import SafeCheckpointIO

    module, trainer = cli.model, cli.trainer
    [checkpoint] = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]  # the recipe's best-ckpt is off
    [logger] = trainer.loggers
    assert isinstance(logger, CSVLogger) and isinstance(trainer.strategy.checkpoint_io, SafeCheckpointIO)
    return {
        "pruning": module.pruning,
        "mode": module.selection.mode,
        "anneal_steps": module.selection.anneal_steps,
        "max_steps": trainer.max_steps,
        "log_every_n_steps": trainer.log_every_n_steps,
        "root": Path(trainer.default_root_dir),
        "log_dir": Path(logger.log_dir),
        "checkpoints": (Path(checkpoint.dirpath), checkpoint.save_last, checkpoint._every_n_train_steps),
    }


# What the demo compares: each method's training selection mode and the pruning settings it needs beyond the recipe.
DEMO_FINE_TUNES = {"nuwa": ("soft", {}), "visionzip": ("hard", {}), "fastv": ("soft", {"fastv_layer": 1})}


@pytest.mark.parametrize("max_steps", [None, 40, 2])
def test_each_demo_fine_tune_trains_with_the_settings_the_demo_intends(tmp_path, max_steps):
    """Built from the parsed default recipe: the method's settings, the recipe's others, and a shortened schedule."""
    from nuwa_train.commands import demo
    from nuwa_train.lightning.cli import parse_recipe

    recipe_file = yaml.safe_load(RECIPE.read_text())
    recipe, steps = parse_recipe(RECIPE), recipe_file["trainer"]["max_steps"]
    anneal, log_every = recipe_file["model"]["selection"]["anneal_steps"], recipe_file["trainer"]["log_every_n_steps"]
    if max_steps is not None:  # the same annealing share of the shorter run; a run shorter than the interval logs
        anneal, steps, log_every = max(1, round(anneal / steps * max_steps)), max_steps, min(log_every, max_steps)
    assert [fine_tune.method for fine_tune in demo.FINE_TUNES] == list(DEMO_FINE_TUNES)
    for fine_tune in demo.FINE_TUNES:
        run_dir, (mode, method_pruning) = tmp_path / fine_tune.method, DEMO_FINE_TUNES[fine_tune.method]
        used = _trained_with(demo.build_fine_tune(demo.fine_tune_settings(recipe, fine_tune, run_dir, max_steps)))
        expected_pruning = {**recipe_file["model"]["pruning"], "method": fine_tune.method, **method_pruning}
        assert {key: getattr(used["pruning"], key) for key in expected_pruning} == expected_pruning
        assert (used["mode"], used["max_steps"], used["anneal_steps"], used["log_every_n_steps"]) == (
            mode,
            steps,
            anneal,
            log_every,
        )
        assert used["root"] == run_dir and used["log_dir"] == run_dir / "csv" / "version_0"
        assert used["checkpoints"] == (run_dir / "checkpoints", True, demo.CHECKPOINT_EVERY)


def test_the_demo_overrides_what_the_recipe_sets_and_keeps_the_rest(tmp_path):
    """A recipe value of a key the demo sets is replaced in the built run, one it does not set is kept, and a key the
    parser does not know is an error rather than a silently unused setting."""
    from nuwa_train.commands import demo
    from nuwa_train.lightning.cli import parse_recipe

    recipe = yaml.safe_load(RECIPE.read_text())
    recipe["model"]["pruning"].update(method="visionzip", fastv_layer=3, budget=32)
    recipe["model"]["selection"].update(mode="hard", anneal_steps=50)
    recipe["trainer"].update(max_steps=100, log_every_n_steps=20)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    parsed = parse_recipe(tmp_path / "recipe.yaml")
    nuwa, _, fastv = demo.FINE_TUNES

    used = _trained_with(demo.build_fine_tune(demo.fine_tune_settings(parsed, fastv, tmp_path / "fastv", 10)))
    assert (used["pruning"].method, used["pruning"].fastv_layer, used["mode"]) == ("fastv", 1, "soft")
    assert used["pruning"].budget == 32
    assert (used["max_steps"], used["anneal_steps"], used["log_every_n_steps"]) == (10, 5, 10)  # the recipe's share
    used = _trained_with(demo.build_fine_tune(demo.fine_tune_settings(parsed, nuwa, tmp_path / "nuwa", None)))
    assert (used["pruning"].method, used["pruning"].fastv_layer, used["mode"]) == ("nuwa", 3, "soft")
    assert (used["max_steps"], used["anneal_steps"], used["log_every_n_steps"]) == (100, 50, 20)

    misspelt = demo.FineTune("FastV, misspelt", "fastv", "soft", {"fastv_layers": 1})
    with pytest.raises(SystemExit):
        demo.build_fine_tune(demo.fine_tune_settings(parsed, misspelt, tmp_path / "misspelt", None))
