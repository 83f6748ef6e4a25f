"""pretrain-base on a finished run (a copy of the shipped state): nothing to train, nothing rewritten; --export-only
shows what it is doing while it evaluates."""

import hashlib
import shutil
from pathlib import Path

import pytest
import yaml

from nuwa_train.cli import main as nuwa_train
from nuwa_train.io import load_tensor_tree
from nuwa_train.pretrain.state import LOG_NAME, STATE_NAME

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_RUN = ROOT / "runs/tiny_base"
EXPORT_IMAGES = 2


def _digests(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())}


@pytest.fixture
def shipped_copy(tmp_path) -> tuple[Path, Path, Path]:
    """(recipe, run folder, export folder): recipes/tiny_base.yaml pointed at a copy of runs/tiny_base."""
    run, export = tmp_path / "run", tmp_path / "export"
    shutil.copytree(SHIPPED_RUN, run)
    recipe = yaml.safe_load((ROOT / "recipes/tiny_base.yaml").read_text())
    recipe["trainer"]["logger"]["init_args"]["save_dir"] = str(run)
    recipe["trainer"]["default_root_dir"] = str(run)
    callbacks = recipe["trainer"]["callbacks"]
    callbacks[0]["init_args"]["dirpath"] = str(run)
    callbacks[3]["init_args"].update(
        export_dir=str(export), final_eval_images=EXPORT_IMAGES, saliency_images=EXPORT_IMAGES
    )
    path = tmp_path / "tiny_base.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path, run, export


def test_a_finished_run_has_nothing_to_train_and_is_left_byte_identical(shipped_copy, capsys):
    recipe, run, export = shipped_copy
    before = _digests(run)
    assert before == _digests(SHIPPED_RUN) and set(before) == {STATE_NAME, LOG_NAME}
    with pytest.raises(SystemExit) as exited:
        nuwa_train(["pretrain-base", str(recipe)])
    assert exited.value.code == 0
    said = capsys.readouterr().out
    step = load_tensor_tree(run / STATE_NAME)["global_step"]
    assert f"nothing to train: {run / STATE_NAME} is at step {step}, the end of the recipe's last phase" in said
    assert "resuming" not in said
    assert _digests(run) == before and not export.exists()  # no state, log or export rewritten, nothing added


def test_export_only_shows_its_progress(shipped_copy, capsys, monkeypatch):
    import nuwa_train.evaluation as evaluation

    recipe, run, export = shipped_copy
    before = _digests(run)
    bars = []  # (enabled, task descriptions) of every progress bar opened

    def recording_bar(enabled=True):
        bar = progress_bar(enabled)
        bars.append((enabled, bar))
        return bar

    progress_bar = evaluation.progress_bar
    monkeypatch.setattr(evaluation, "progress_bar", recording_bar)
    with pytest.raises(SystemExit) as exited:
        nuwa_train(["pretrain-base", str(recipe), "--export-only"])
    assert exited.value.code == 0
    said = capsys.readouterr().out
    step = load_tensor_tree(run / STATE_NAME)["global_step"]
    lines = [line for line in said.splitlines() if line.strip()]
    assert lines[0] == f"exporting step {step} of {run / STATE_NAME} to {export}"  # said before the evaluation starts
    shown = [(enabled, [task.description for task in bar.tasks]) for enabled, bar in bars]
    assert shown == [(True, [f"test split, {2 * EXPORT_IMAGES} records"]), (True, ["CLS-attention saliency"])]
    assert all(task.finished for _, bar in bars for task in bar.tasks)
    assert f"exported step {step} to {export}" in said and (export / "model.safetensors").is_file()
    assert _digests(run) == before
