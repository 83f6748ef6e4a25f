"""Run folders: each fit writes to a folder of its own; export / test / resume take it; flags beat the checkpoint."""

import os
from pathlib import Path

import pytest
import torch
import yaml

from nuwa_train.export import export_checkpoint
from nuwa_train.io import load_checkpoint_file
from nuwa_train.lightning.cli import CheckpointSettingsError
from nuwa_train.lightning.cli import run as lightning_cli
from nuwa_train.runs import RunFolderError, checkpoint_path, run_folder_of

RECIPE_NAME = "tiny"
STEPS = 2
TEST_IMAGES = 8  # two records each: 16 test records, more than any limit below
RECORDED_TEST_RECORDS = 2  # what the fit stores in its checkpoint
LR = 0.001
VISION_TOKENS = {64: 16, 32: 8}  # the tiny base's 12x12 grid keeps budget/576 of its 144 tokens


@pytest.fixture
def recipe(tiny_base_dir, tmp_path, monkeypatch):
    """A recipe as recipes/*.yaml write them (no folder named: no logger, no checkpoint dirpath), run in tmp_path."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"{RECIPE_NAME}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "seed_everything": 0,
                "trainer": {
                    "accelerator": "cpu",
                    "devices": 1,
                    "max_steps": STEPS,
                    "limit_val_batches": 0,
                    "num_sanity_val_steps": 0,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "log_every_n_steps": 1,
                    "use_distributed_sampler": False,
                    "callbacks": [
                        {
                            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 1},
                        }
                    ],
                },
                "model": {
                    "model_path": tiny_base_dir,
                    "lora": {"rank": 4, "dropout": 0.0},
                    "optimizer": {"lr": LR},
                    "eval_max_new_tokens": 4,
                },
                "data": {"batch_size": 2, "train_images": 4, "val_images": 2, "test_images": TEST_IMAGES},
            }
        )
    )
    return str(path)


def fit(recipe: str, *flags: str) -> Path:
    """`nuwa-train fit --config recipe FLAGS`; the run folder it wrote to (absolute)."""
    return Path(lightning_cli(["fit", "--config", recipe, *flags]).trainer.default_root_dir).resolve()


def step_of(run_dir: Path) -> int:
    return load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["global_step"]


def assert_is_a_complete_run(run_dir: Path) -> None:
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"last.ckpt"}  # no last-v1.ckpt
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"] == step_of(run_dir)
    assert (run_dir / "data_report.json").is_file()
    assert (run_dir / "csv" / "version_0" / "metrics.csv").is_file()
    assert list((run_dir / "tensorboard" / "version_0").glob("events.out.tfevents.*"))


def test_two_fits_of_a_recipe_make_two_run_folders_and_export_takes_either(recipe, tmp_path, capsys):
    first = fit(recipe)
    second = fit(recipe, "--trainer.max_steps", str(STEPS + 1))
    root = tmp_path / "runs" / RECIPE_NAME  # runs/<recipe name>: the recipe names no folder
    assert first.parent == second.parent == root and first != second
    assert sorted(p.name for p in root.iterdir()) == sorted([first.name, second.name, "latest"])
    for run_dir in (first, second):
        assert_is_a_complete_run(run_dir)
    assert (step_of(first), step_of(second)) == (STEPS, STEPS + 1)
    assert (root / "latest").resolve() == second.resolve()

    for given, run_dir in ((first, first), (root, second), (root / "latest", second)):
        capsys.readouterr()
        export_checkpoint(given, tmp_path / "export")
        assert f"{run_dir.name}/checkpoints/last.ckpt: step {step_of(run_dir)} of" in capsys.readouterr().out

    repeated = fit(str(first / "config.yaml"))  # the recorded settings repeat the run beside it
    assert repeated.parent == root and repeated not in (first, second) and step_of(repeated) == STEPS


def test_a_fit_continues_in_its_run_folder_given_the_folder_or_last(recipe, tmp_path):
    run_dir = fit(recipe, "--run_name", "first")
    assert run_dir == tmp_path / "runs" / RECIPE_NAME / "first" and step_of(run_dir) == STEPS
    with pytest.raises(RunFolderError, match="first already exists: continue that run with --ckpt_path"):
        fit(recipe, "--run_name", "first")
    for taken in ("latest", "a/b"):
        with pytest.raises(RunFolderError, match="a single folder name other than 'latest'"):
            fit(recipe, "--run_name", taken)

    assert fit(recipe, "--ckpt_path", str(run_dir), "--trainer.max_steps", str(STEPS + 1)) == run_dir
    assert step_of(run_dir) == STEPS + 1
    assert fit(recipe, "--ckpt_path", "last", "--trainer.max_steps", str(STEPS + 2)) == run_dir
    assert step_of(run_dir) == STEPS + 2
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["first", "latest"]  # no new run
    assert sorted(p.name for p in (run_dir / "csv").iterdir()) == ["version_0", "version_1", "version_2"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["max_steps"] == STEPS + 2


def test_default_root_dir_moves_every_file_of_the_run(recipe, tmp_path):
    run_dir = fit(recipe, "--trainer.default_root_dir", str(tmp_path / "elsewhere"))
    assert run_dir.parent == tmp_path / "elsewhere"
    assert_is_a_complete_run(run_dir)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "lightning_logs").exists()


def test_the_root_is_named_after_the_last_recipe_given(recipe, tmp_path):
    """`--config recipes/default.yaml --config my_data.yaml`: the user's own recipe names the runs."""
    (tmp_path / "my_data.yaml").write_text(yaml.safe_dump({"data": {"train_images": 2}}))
    run_dir = fit(recipe, "--config", str(tmp_path / "my_data.yaml"))
    assert run_dir.parent == tmp_path / "runs" / "my_data" and step_of(run_dir) == STEPS


def test_a_distributed_fit_makes_one_run_folder_and_continues_in_it(recipe, tmp_path):
    """Every rank parses the command line (Lightning's launcher re-runs it, torchrun starts them all): rank 0 alone
    makes the folder, and the checkpoints, logs, settings and data report of every rank's run land in it."""
    from test_scaleout import PROCESSES, launch

    root = tmp_path / "ddp"  # launch.sh runs in the repository: an absolute root
    flags = (recipe, "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(root))
    launch("--launcher", "local", "--devices", str(PROCESSES), *flags)
    [run_dir] = [p for p in root.iterdir() if p.name != "latest"]
    assert_is_a_complete_run(run_dir)
    launch(
        "--launcher",
        "torchrun",
        "--devices",
        str(PROCESSES),
        *flags,
        "--ckpt_path",
        "last",
        "--trainer.max_steps",
        str(STEPS + 1),
    )
    assert sorted(p.name for p in root.iterdir()) == [run_dir.name, "latest"] and step_of(run_dir) == STEPS + 1
    assert sorted(p.name for p in (run_dir / "csv").iterdir()) == ["version_0", "version_1"]


def test_command_line_model_flags_win_over_the_checkpoint_in_test_and_fit_refuses_a_contradiction(recipe, tmp_path):
    run_dir = fit(recipe, "--run_name", "trained", "--model.test_records", str(RECORDED_TEST_RECORDS))

    def test(*flags):
        cli = lightning_cli(["test", "--config", recipe, "--ckpt_path", str(run_dir), *flags])
        assert cli.trainer.callback_metrics["test/vision_tokens"] == VISION_TOKENS[cli.model.pruning.budget]
        return cli.model, Path(cli.trainer.default_root_dir).resolve()

    model, test_dir = test("--model.test_records", "8", "--model.pruning.budget", "32")
    assert (model.hparams.test_records, model.pruning.budget) == (8, 32)  # Lightning: 2 and 64, the checkpoint's
    assert model.full_token_reference == {**model.full_token_reference, "split": "test", "records": 8}  # scored 8
    assert test_dir.parent == run_dir.parent and test_dir.name.startswith("test-")
    assert (test_dir / "config.yaml").is_file() and (run_dir.parent / "latest").resolve() == run_dir.resolve()
    model, _ = test()  # without a flag the checkpoint's settings serve (the recipe sets no test_records)
    assert (model.hparams.test_records, model.pruning.budget) == (RECORDED_TEST_RECORDS, 64)
    assert model.full_token_reference["records"] == RECORDED_TEST_RECORDS

    with pytest.raises(CheckpointSettingsError, match=rf"--model\.optimizer\.lr 0\.5 \(the checkpoint's: {LR}\)"):
        fit(recipe, "--ckpt_path", str(run_dir), "--model.optimizer.lr", "0.5")
    assert step_of(run_dir) == STEPS
    # a flag that agrees with the checkpoint drops nothing: the run continues
    assert (
        fit(recipe, "--ckpt_path", str(run_dir), "--model.optimizer.lr", str(LR), "--trainer.max_steps", str(STEPS + 1))
        == run_dir
    )
    assert step_of(run_dir) == STEPS + 1


def test_a_command_given_a_folder_reads_its_runs_last_checkpoint(tmp_path):
    run_dir = tmp_path / "runs" / "r" / "20261208-010000"
    (run_dir / "checkpoints").mkdir(parents=True)
    with pytest.raises(RunFolderError, match="has no checkpoints/last.ckpt; it has no checkpoint at all"):
        checkpoint_path(run_dir)
    (run_dir / "checkpoints" / "best-5.ckpt").write_bytes(b"")
    with pytest.raises(RunFolderError, match="has no checkpoints/last.ckpt; pass one of its checkpoints: best-5.ckpt"):
        checkpoint_path(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(b"")
    os.symlink(run_dir.name, run_dir.parent / "latest")
    for given in (run_dir, run_dir.parent, run_dir.parent / "latest", last):
        assert checkpoint_path(given) == last and run_folder_of(checkpoint_path(given)) == run_dir
    assert checkpoint_path(tmp_path / "missing.ckpt") == tmp_path / "missing.ckpt"  # the caller's own error
    with pytest.raises(RunFolderError, match="neither a run folder"):
        checkpoint_path(tmp_path / "runs", single_file=True)

    last.unlink()
    last.mkdir()  # a sharded DeepSpeed checkpoint: Lightning loads the folder, export needs one file
    assert checkpoint_path(run_dir) == last
    with pytest.raises(RunFolderError, match="sharded DeepSpeed checkpoint.*python -m nuwa_train.lightning.strategies"):
        checkpoint_path(run_dir, single_file=True)
    torch.save({}, run_dir / "trainable.ckpt")
    assert checkpoint_path(run_dir, single_file=True) == run_dir / "trainable.ckpt"
