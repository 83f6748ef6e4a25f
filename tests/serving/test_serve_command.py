"""`nuwa-train serve --dry-run`: what is served and the vLLM command, without starting vLLM."""

from __future__ import annotations

import json
import shlex
import shutil
import sys

import pytest

from nuwa_train.cli import main

from .conftest import MODEL


@pytest.fixture(autouse=True)
def any_python(monkeypatch):
    """The dry run only names the serving Python: this one stands in for .venv-serve."""
    monkeypatch.setenv("NUWA_SERVE_PYTHON", sys.executable)


def dry_run(capsys, *args: str) -> tuple[list[str], str]:
    main(["serve", *args, "--dry-run"])
    out = capsys.readouterr()
    return shlex.split(out.out.strip()), out.err


def overrides_of(command: list[str]) -> dict:
    return json.loads(command[command.index("--hf-overrides") + 1])


def test_a_plain_model_is_served_at_the_budget_with_vllm_flags_passed_on(capsys):
    command, err = dry_run(capsys, str(MODEL), "--budget", "128", "--port", "9001", "--max-model-len", "512")
    assert command[:3] == [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry"]
    assert command[command.index("--model") + 1] == str(MODEL) and command[command.index("--port") + 1] == "9001"
    assert command[-2:] == ["--max-model-len", "512"]  # after ours, so a vLLM flag of the user's wins
    overrides = overrides_of(command)
    assert overrides["architectures"] == ["NuwaLlavaForConditionalGeneration"]
    assert overrides["nuwa_pruning"]["method"] == "nuwa_stage1" and overrides["nuwa_pruning"]["budget"] == 128
    assert err == ""


def test_a_two_stage_export_is_served_stage1_only_with_a_warning(tmp_path, capsys):
    export = tmp_path / "export"
    shutil.copytree(MODEL, export)
    (export / "nuwa_config.json").write_text(json.dumps({"method": "nuwa", "budget": 64, "distance": 100.0}))
    command, err = dry_run(capsys, str(export))
    served = overrides_of(command)["nuwa_pruning"]
    assert served["method"] == "nuwa_stage1" and served["budget"] == 64 and served["distance"] == 100.0
    assert f"warning: {export} was fine-tuned with two-stage Nüwa" in err and "served stage-1-only" in err


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda path: None, "does not exist"),
        (lambda path: (path.mkdir(), (path / "adapter_config.json").write_text("{}")), "adapter-only export"),
        (
            lambda path: (path.mkdir(), (path / "config.json").write_text('{"model_type": "qwen2_vl"}')),
            "model_type 'qwen2_vl'",
        ),
    ],
)
def test_unservable_directories_are_refused_in_one_line(tmp_path, capsys, setup, message):
    target = tmp_path / "model"
    setup(target)
    with pytest.raises(SystemExit) as stopped:  # main's one-line error: exit status 1, the message on stderr
        main(["serve", str(target), "--dry-run"])
    assert str(stopped.value.code).startswith("nuwa-train serve: error: ") and message in str(stopped.value.code)
    assert capsys.readouterr().out == ""
