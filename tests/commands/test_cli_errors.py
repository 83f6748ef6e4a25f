"""Errors a user can act on: one line and a non-zero exit (the traceback with --debug), bad flag values refused when
the command line is parsed, every flag's help and default, and exports whose base model is found locally or named."""

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nuwa_train.cli import DEBUG_ENV, build_parser, main
from nuwa_train.export import (
    NUWA_CONFIG_NAME,
    checkpoint_base_model,
    export_module,
    load_pruned,
    read_nuwa_config,
    trained_budgets,
)
from nuwa_train.models.loading import ModelPathError
from nuwa_train.pruning import NuwaConfig, NuwaConfigError

ROOT = Path(__file__).resolve().parents[2]
USER_ERROR_STATUS, USAGE_ERROR_STATUS = 1, 2


# ----------------------------------------------------------------------------- one line, or the traceback
def _nuwa_train(*args: str, debug_env: bool = False) -> subprocess.CompletedProcess:
    """The command as a user runs it (exit status and stderr are what is asserted)."""
    environment = {key: value for key, value in os.environ.items() if key != DEBUG_ENV}
    environment.update(OMP_NUM_THREADS="1", **({DEBUG_ENV: "1"} if debug_env else {}))
    return subprocess.run(
        [sys.executable, "-m", "nuwa_train", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
        cwd=ROOT,
    )


def test_a_user_error_is_one_line_on_stderr_and_the_traceback_needs_debug(tmp_path):
    missing = tmp_path / "nowhere"
    done = _nuwa_train("eval", "--model", str(missing), "--out", str(tmp_path / "out"))
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("[transformers]")]
    assert done.returncode == USER_ERROR_STATUS, done.stderr
    assert len(lines) == 1 and lines[0].startswith("nuwa-train eval: error: ") and str(missing) in lines[0], lines
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
    for debug in (("--debug",), ()):  # the global flag, or the environment variable
        done = _nuwa_train(*debug, "eval", "--model", str(missing), debug_env=not debug)
        assert done.returncode != 0 and "Traceback" in done.stderr and "ModelPathError" in done.stderr


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "--budget", "0"], "argument --budget: expected comma-separated positive integers, got 0"),
        (["eval", "--budget", "64,x"], "argument --budget: expected comma-separated positive integers, got 'x'"),
        (["eval", "--limit", "-1"], "argument --limit: expected a positive integer, got -1"),
        (["eval", "--budgets", ","], "argument --budgets: expected comma-separated positive integers, got ','"),
        (["eval", "--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
        (["bench", "--repeats", "0"], "argument --repeats: expected a positive integer, got 0"),
        (["export-data", "out", "--vqa-per-image", "-2"], "argument --vqa-per-image: expected an integer >= 0, got -2"),
        (
            ["chat", "model", "--image", "a.png", "--budget", "0"],
            "argument --budget: expected a positive integer, got 0",
        ),
        (
            ["chat", "model", "--image", "a.png", "--budget", "-64"],
            "argument --budget: expected a positive integer, got -64",
        ),
        (
            ["chat", "model", "--image", "a.png", "--max-new-tokens", "0"],
            "argument --max-new-tokens: expected a positive integer, got 0",
        ),
    ],
)
def test_bad_numbers_are_refused_when_the_command_line_is_parsed(argv, message, capsys, monkeypatch):
    import nuwa_train.commands.eval as eval_command

    monkeypatch.setattr(eval_command, "run_eval", lambda *a, **k: pytest.fail("eval ran with a bad flag value"))
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == USAGE_ERROR_STATUS
    assert message in capsys.readouterr().err


def test_library_errors_are_exceptions_and_the_command_turns_them_into_one_line(tmp_path, monkeypatch):
    from nuwa_train.commands.eval import parse_data_sources
    from nuwa_train.errors import UsageError

    with pytest.raises(UsageError, match="--data 'coco=x' must be FORMAT=PATH"):
        parse_data_sources(["coco=x"])  # a caller of the library gets an exception, not an exit
    with pytest.raises(SystemExit) as exited:
        main(["eval", "--data", "coco=x"])
    assert (
        exited.value.code == "nuwa-train eval: error: --data 'coco=x' must be FORMAT=PATH with FORMAT one of "
        "llava, refcoco, sharegpt"
    )
    with pytest.raises(UsageError):
        main(["--debug", "eval", "--data", "coco=x"])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(UsageError):
        main(["eval", "--data", "coco=x"])
    monkeypatch.setenv(DEBUG_ENV, "0")
    with pytest.raises(SystemExit, match=f"recipe {tmp_path / 'recipe.yaml'} does not exist"):
        main(["eval", "--model", str(tmp_path / "recipe.yaml")])  # a missing recipe: named, not a traceback
    with pytest.raises(
        SystemExit, match=f"{tmp_path} is neither a HF model directory .no config.json., an adapter-only export"
    ):
        main(["eval", "--model", str(tmp_path)])  # a folder, but not a model
    library = [path for path in (ROOT / "nuwa_train").rglob("*.py") if path != ROOT / "nuwa_train/cli.py"]
    exits = [str(path) for path in library if "SystemExit" in path.read_text()]
    assert not exits, f"library code exits instead of raising: {exits}"


# ----------------------------------------------------------------------------- help
def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices)


def test_every_flag_of_every_command_has_help_that_shows_its_default():
    parser = build_parser()
    commands = _subparsers(parser)
    assert {"bench", "demo", "eval", "export", "export-data", "pretrain-base"} <= set(commands)
    checked = 0
    for name, command in {"nuwa-train": parser, **commands}.items():
        text = "".join(command.format_help().split())  # no whitespace: help wraps lines, also at hyphens
        for action in command._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
            if not action.option_strings or action.nargs == 0 or action.required:  # these have no default
                continue
            shown = command._get_formatter()._get_help_string(action) % {**vars(action), "default": action.default}
            assert "default" in shown, f"{name} {action.option_strings[0]}: its help does not show the default"
            assert "".join(shown.split()) in text
            checked += 1
    assert checked > 30
    assert "(default: 250)" in " ".join(commands["eval"].format_help().split())  # --images: appended


# ----------------------------------------------------------------------------- exports and their base model
@pytest.fixture(scope="module")
def adapter_export(tiny_base_dir, tmp_path_factory):
    from nuwa_train.lightning import NuwaFineTuner

    target = tmp_path_factory.mktemp("adapter") / "export"
    return export_module(NuwaFineTuner(model_path=tiny_base_dir, pruning=NuwaConfig(budget=128)), target, merge=False)


def _named_base(export: Path, base: str, tmp_path: Path) -> Path:
    """A copy of the adapter-only export whose adapter_config.json names `base`."""
    import shutil

    copy = tmp_path / "renamed"
    shutil.copytree(export, copy)
    settings = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": base}))
    return copy


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a connection is recorded and refused."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"test: no network ({address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    return attempts


@pytest.mark.parametrize("base", ["llava-hf/llava-1.5-7b-hf", "checkpoints/moved-base"])
def test_an_adapter_only_export_loads_its_base_locally_or_names_it(
    adapter_export, tmp_path, base, no_network, monkeypatch
):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the loader itself must not go online
    renamed = _named_base(adapter_export, base, tmp_path)
    with pytest.raises(
        ModelPathError,
        match=f"adapter-only export {renamed} .*names the base model '{base}'.*does "
        f"not exist.*never downloads.*--model-path",
    ):
        load_pruned(renamed)
    assert no_network == []
    model = load_pruned(adapter_export)  # the recorded base is a local directory: merged onto it
    assert not hasattr(model, "peft_config") and model._nuwa.config.budget == 128 and no_network == []


def test_eval_runs_an_adapter_only_export_on_its_recorded_base(adapter_export, tmp_path, tiny_base_dir):
    out = tmp_path / "out"
    main(["eval", "--model", str(adapter_export), "--images", "2", "--out", str(out)])
    saved = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in saved["rows"]] == ["reference, full tokens", "full tokens", "nuwa"]
    assert saved["rows"][2]["budget"] == 128 and saved["rows"][0]["note"] == str(Path(tiny_base_dir).resolve())
    assert saved["records"] == 4 and (out / "kept_tokens.png").is_file()


@pytest.mark.parametrize(
    "text,message",
    [
        ('{"budget": 64,', "is not valid JSON"),
        ("[64]", "must hold a JSON object, not list"),
        ('{"budgett": 64}', "unknown NuwaConfig key"),
    ],
)
def test_a_corrupted_nuwa_config_json_is_an_error_naming_the_file(tmp_path, text, message):
    (tmp_path / NUWA_CONFIG_NAME).write_text(text)
    named = f"{tmp_path / NUWA_CONFIG_NAME}{' .*' if 'JSON' in message else ': '}{message}"
    unreadable = "JSON" in message  # every reader fails; a wrong key only fails those that build the settings
    for reader in (read_nuwa_config, load_pruned, *([trained_budgets] if unreadable else [])):
        with pytest.raises(NuwaConfigError, match=named):
            reader(tmp_path)
    (tmp_path / "config.json").write_text("{}")  # an export: eval reads its settings before loading the model
    with pytest.raises(SystemExit, match=f"nuwa-train eval: error: {named}"):
        main(["eval", "--model", str(tmp_path)])


def test_a_missing_export_directory_is_named(tmp_path):
    with pytest.raises(ModelPathError, match=f"export directory '{tmp_path / 'gone'}' does not exist"):
        load_pruned(tmp_path / "gone")


def test_a_checkpoints_relative_base_is_found_from_another_working_directory(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data/base").mkdir(parents=True)
    (project / "data/base/config.json").write_text("{}")
    checkpoint = project / "runs/default/checkpoints/last.ckpt"
    state = {"hyper_parameters": {"model_path": "data/base"}}
    monkeypatch.chdir(tmp_path)  # not the project: the recorded relative path does not resolve here
    assert checkpoint_base_model(checkpoint, state) == str(project / "data/base")
    absolute = {"hyper_parameters": {"model_path": str(tmp_path / "elsewhere")}}
    assert checkpoint_base_model(checkpoint, absolute) == str(tmp_path / "elsewhere")  # absolute: as recorded
    assert checkpoint_base_model(checkpoint, {"hyper_parameters": {"model_path": "missing"}}) == "missing"


def test_export_from_another_working_directory_finds_the_base(tiny_base_dir, tmp_path, monkeypatch):
    """A checkpoint of a run started with a relative model_path (as recipes/default.yaml gives it) exports from any
    working directory: the module records the base resolved, and a relative record is looked up from the run."""
    import shutil

    import lightning as L

    from nuwa_train.io import load_checkpoint_file
    from nuwa_train.lightning import LoraSettings, NuwaDataModule, NuwaFineTuner

    project = tmp_path / "project"
    shutil.copytree(tiny_base_dir, project / "data/tiny_base")
    monkeypatch.chdir(project)
    module = NuwaFineTuner(model_path="data/tiny_base", lora=LoraSettings(rank=2))
    assert module.hparams.model_path == str(project / "data/tiny_base")
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=project / "runs",
    )
    trainer.fit(module, NuwaDataModule(processor_path="data/tiny_base", train_images=2, val_images=1, batch_size=2))
    checkpoint = project / "runs/last.ckpt"
    trainer.save_checkpoint(checkpoint)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    main(["export", str(checkpoint), "merged"])
    assert (elsewhere / "merged/model.safetensors").is_file()
    recorded = json.loads((elsewhere / "merged" / NUWA_CONFIG_NAME).read_text())["exported_from"]["base_model"]
    assert recorded == str(project / "data/tiny_base")
    state = load_checkpoint_file(checkpoint)  # as a checkpoint from before paths were stored resolved
    state["hyper_parameters"]["model_path"] = "data/tiny_base"
    torch.save(state, project / "runs/relative.ckpt")
    main(["export", str(project / "runs/relative.ckpt"), "from_relative"])
    assert (elsewhere / "from_relative/model.safetensors").is_file()
