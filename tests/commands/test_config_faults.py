"""Config faults fail when the config is read, naming the key, the allowed values or the path that was tried."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

import nuwa_train.io as nuwa_io
from nuwa_train.export import load_pruned, write_pretrained
from nuwa_train.lightning import NuwaFineTuner
from nuwa_train.lightning.cli import run as lightning_cli
from nuwa_train.models.loading import ModelPathError, load_vlm
from nuwa_train.pruning import NuwaConfig, NuwaConfigError


def test_a_missing_model_directory_says_so_and_that_nothing_is_downloaded(tmp_path):
    with pytest.raises(ModelPathError, match=f"'{tmp_path / 'nowhere'}' does not exist.*never downloads"):
        load_vlm(str(tmp_path / "nowhere"))
    module = NuwaFineTuner(model_path="checkpoints/llava-1.5-7b-hf")  # relative and missing, as in a 7B recipe
    with pytest.raises(ModelPathError, match="'checkpoints/llava-1.5-7b-hf' does not exist \\(tried /"):
        module.configure_model()


@pytest.fixture
def recipe(tiny_base_dir, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "accelerator": "cpu",
                    "max_steps": 1,
                    "logger": False,
                    "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path),
                },
                "model": {"model_path": tiny_base_dir},
                "data": {"batch_size": 2, "train_images": 2},
            }
        )
    )
    return str(path)


@pytest.mark.parametrize(
    "key,value,allowed",
    [
        ("model.selection.mode", "sfot", "straight_through"),
        ("model.dtype", "fp32", "bfloat16"),
        ("data.on_error", "ignore", "skip"),
        ("model.lora.targets", "all", "lm+vision"),
        ("model.pruning.method", "nuwaa", "visionzip"),
    ],
)
def test_a_misspelt_choice_fails_when_the_recipe_is_parsed_naming_key_and_choices(
    recipe, key, value, allowed, capsys, monkeypatch
):
    built = []
    monkeypatch.setattr(NuwaFineTuner, "configure_model", lambda self: built.append(self))
    with pytest.raises(SystemExit):
        lightning_cli(["fit", "--config", recipe, f"--{key}", value])
    error = capsys.readouterr().err
    assert key.split(".")[-1] in error and value in error and allowed in error
    assert not built  # nothing was built before the error


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"distance": "x"}, "distance='x' must be a number"),
        ({"sim_layers": 3}, "sim_layers=3 must be a list of 2"),
        ({"stage2_layer": True}, "stage2_layer=True must be an integer or a"),
        ({"budget": 64.5}, "budget=64.5 must be an integer"),
    ],
)
def test_a_wrongly_typed_nuwa_config_json_is_a_nuwa_config_error(tmp_path, settings, message):
    (tmp_path / "nuwa_config.json").write_text(json.dumps({**NuwaConfig().to_dict(), **settings}))
    with pytest.raises(NuwaConfigError, match=message):
        load_pruned(tmp_path)


# ----------------------------------------------------------------------------- the export swap
class SimulatedKill(BaseException):
    pass


@pytest.fixture
def exported(tiny_llava, tmp_path):
    model, processor = tiny_llava
    target = tmp_path / "export"
    write_pretrained(model, processor, NuwaConfig(), target, extra={"exported_from": {"version": "old"}})
    return model, processor, target


def version(target: Path) -> str:
    return json.loads((target / "nuwa_config.json").read_text())["exported_from"]["version"]


def leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def kill_at(monkeypatch, function: str, call: int):
    """Make the `call`-th call of nuwa_train.io's os.<function> (or _exchange) die like a SIGKILL would."""
    calls = []
    original = getattr(os, function) if function != "_exchange" else nuwa_io._exchange

    def dying(*args, **kwargs):
        calls.append(args)
        if len(calls) == call:
            raise SimulatedKill(f"killed at {function} call {call}")
        return original(*args, **kwargs)

    if function == "_exchange":
        monkeypatch.setattr(nuwa_io, "_exchange", dying)
    else:
        monkeypatch.setattr(nuwa_io.os, function, dying)


@pytest.mark.parametrize("exchange", [True, False], ids=["atomic-exchange", "two-renames"])
@pytest.mark.parametrize("kill", ["before-swap", "mid-swap", "before-cleanup"])
def test_a_killed_export_leaves_a_whole_old_or_new_export_and_the_next_one_cleans_up(
    exported, monkeypatch, exchange, kill
):
    model, processor, target = exported
    if not exchange:
        monkeypatch.setattr(nuwa_io, "_exchange", lambda first, second: False)
    with monkeypatch.context() as patch:
        if exchange:
            point = {"before-swap": ("_exchange", 1), "mid-swap": ("_exchange", 1), "before-cleanup": ("rmtree", 1)}
        else:  # os.replace 1: old aside; 2: new in place; then the backup is removed
            point = {"before-swap": ("replace", 1), "mid-swap": ("replace", 2), "before-cleanup": ("rmtree", 1)}
        function, call = point[kill]
        if function == "rmtree":
            patch.setattr(nuwa_io.shutil, "rmtree", lambda *a, **k: (_ for _ in ()).throw(SimulatedKill("killed")))
        else:
            kill_at(patch, function, call)
        with pytest.raises(SimulatedKill):
            write_pretrained(model, processor, NuwaConfig(), target, extra={"exported_from": {"version": "new"}})
    with monkeypatch.context() as patch:
        patch.setattr(nuwa_io, "_process_alive", lambda pid: False)  # the killed process is gone
        nuwa_io.recover_directory(target)  # what the next export or load_pruned does first
    assert version(target) in ("old", "new") and (target / "model.safetensors").is_file()
    assert leftovers(target) == []
    assert load_pruned(target) is not None
    write_pretrained(model, processor, NuwaConfig(), target, extra={"exported_from": {"version": "newer"}})
    assert version(target) == "newer" and leftovers(target) == []


def test_a_staging_folder_of_a_running_export_is_left_alone(exported):
    _, _, target = exported
    live = target.parent / f".{target.name}.staging-{os.getpid()}-abc"
    live.mkdir()
    assert nuwa_io.recover_directory(target) == [] and live.is_dir()
    shutil.rmtree(live)
