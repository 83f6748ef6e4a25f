"""Every checkpoint the project writes survives a full disk and a kill at any point of its save, reaches the disk
before it replaces the previous one, is as readable as the umask makes new files, and exports refuse NaN / Inf.

Kinds (tests/lightning/saves.py): last.ckpt through the CheckpointIO `nuwa-train fit` installs, the pre-training
state last.safetensors, an export directory, and a DeepSpeed checkpoint directory. The disk is simulated
(simulated_disk.py): CI has no small file system to fill, and its $TMPDIR is another file system only sometimes.
"""

import errno
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import WORDS
from saves import FREE_SHARES, KINDS, NEW, OLD, TMPDIR, digest
from simulated_disk import SimulatedDisk

from nuwa_train.cli import main
from nuwa_train.export import ExportError, load_pruned, write_pretrained
from nuwa_train.io import write_atomically, write_directory_atomically
from nuwa_train.lightning.cli import run as lightning_cli
from nuwa_train.models.tiny import TinyLlavaSpec, build_tiny_llava
from nuwa_train.pruning import NuwaConfig

HERE = Path(__file__).resolve().parent
HARNESS_TIMEOUT_SECONDS = 1200  # a loaded 2-core machine; a hang must fail the test, not the CI job
UMASKS = (0o022, 0o027)
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is an optional extra (launch.sh test installs it)"
)
KIND_PARAMETERS = ["lightning", "pretrain-state", "export", pytest.param("deepspeed", marks=needs_deepspeed)]
KILLS_PER_KIND = {"lightning": 8, "pretrain-state": 8, "export": 6, "deepspeed": 4}  # points killed at, at most


def run_harness(mode: str, kind_name: str, directory: Path, *arguments: str) -> dict:
    """saves.py in a process of its own (DeepSpeed starts one process group per process)."""
    result_file = directory / "result.json"
    environment = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    subprocess.run(
        [
            sys.executable,
            str(HERE / "saves.py"),
            mode,
            kind_name,
            str(directory / "runs"),
            str(result_file),
            *arguments,
        ],
        check=True,
        env=environment,
        timeout=HARNESS_TIMEOUT_SECONDS,
    )
    return json.loads(result_file.read_text())


# ----------------------------------------------------------------------------------------------- a full disk
@pytest.mark.parametrize("kind_name", KIND_PARAMETERS)
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_whole(kind_name, tmp_path):
    result = run_harness("full-disk", kind_name, tmp_path)
    assert sorted(result) == sorted(map(str, FREE_SHARES))  # the disk filled at several points of the save
    for share, after in result.items():
        assert after["error"]["errno"] == errno.ENOSPC, (share, after)
        assert after["bytes_of"] == "old", (share, after)  # byte for byte (Lightning's copy from $TMPDIR truncated it)
        assert after["version"] == OLD, (share, after)  # and it loads
        assert after["beside"] == [], (share, after)  # no staging file or folder left behind


def test_fit_resumes_from_last_after_a_full_disk_failed_its_next_save(tiny_base_dir, tmp_path, monkeypatch):
    """The issue's run: `nuwa-train fit --ckpt_path last` after a save of last.ckpt ran out of space."""
    (tmp_path / TMPDIR).mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / TMPDIR))
    disk = tmp_path / "disk"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "accelerator": "cpu",
                    "devices": 1,
                    "logger": False,
                    "enable_progress_bar": False,
                    "limit_val_batches": 0,
                    "num_sanity_val_steps": 0,
                    "default_root_dir": str(disk),
                    "callbacks": [
                        {
                            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                            "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 1},
                        }
                    ],
                },
                "model": {"model_path": tiny_base_dir, "lora": {"rank": 4}},
                "data": {"batch_size": 2, "train_images": 8, "val_images": 2},
            }
        )
    )

    def fit(*args):
        lightning_cli(["fit", "--config", str(recipe), *args])

    fit("--trainer.max_steps", "1")
    last = next(disk.rglob("last.ckpt"))
    saved = last.read_bytes()
    with monkeypatch.context() as patches:
        SimulatedDisk(disk, free_bytes=len(saved) // 2).install(patches)
        with pytest.raises(OSError, match="No space left on device"):
            fit("--trainer.max_steps", "2", "--ckpt_path", "last")
    assert last.read_bytes() == saved
    assert not list(last.parent.glob(".last.ckpt.*"))
    fit("--trainer.max_steps", "2", "--ckpt_path", "last")
    assert torch.load(last, weights_only=True)["global_step"] == 2


# ----------------------------------------------------------------------------------------------- a kill
def assert_flushed_before_the_switch(points: list[str], target_name: str) -> None:
    """Each file written is flushed after its last write and before the one rename that puts the new checkpoint
    in place, and that rename's directory is flushed after it: a power cut cannot leave empty files behind."""
    switch = next(i for i, point in enumerate(points) if point.endswith(f"> {target_name}"))
    written = {point.split(" of ", 1)[1] for point in points if point.startswith("wrote ")}
    assert written, points
    for name in written:
        last_write = max(i for i, point in enumerate(points) if point == f"wrote half 2 of {name}")
        assert f"fsync {name}" in points[last_write:switch], (name, points)
    assert "fsync ." in points[switch:], points


@pytest.mark.parametrize("kind_name", KIND_PARAMETERS)
def test_a_kill_at_any_point_of_a_save_leaves_the_whole_old_or_the_whole_new_checkpoint(kind_name, tmp_path):
    result = run_harness("kill", kind_name, tmp_path, str(KILLS_PER_KIND[kind_name]))
    target_name = KINDS[kind_name].target_name
    for kill in result["kills"]:
        assert kill["bytes_of"] in ("old", "new"), kill  # byte-identical to the checkpoint before or after the save
        assert kill["version"] == {"old": OLD, "new": NEW}[kill["bytes_of"]], kill  # and it loads
    assert {kill["bytes_of"] for kill in result["kills"]} == {"old", "new"}, result["kills"]  # killed on both sides
    assert result["reference_versions"] == [NEW]
    assert result["after_a_save_again"] == [target_name]  # what a killed save left is removed by the next one
    assert_flushed_before_the_switch(result["points"], target_name)


# ----------------------------------------------------------------------------------------------- permissions
@pytest.fixture(params=UMASKS, ids=[f"umask-{mask:03o}" for mask in UMASKS])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


def test_exports_and_checkpoints_get_the_modes_the_umask_gives(umask, tmp_path):
    file_mode, folder_mode = 0o666 & ~umask, 0o777 & ~umask  # 0644 / 0755 under umask 022
    model, processor = build_tiny_llava(TinyLlavaSpec(), WORDS)
    export = write_pretrained(model, processor, NuwaConfig(), tmp_path / "export")
    found = modes(export)
    assert found.pop(".") == folder_mode  # tempfile.mkdtemp made it 0700: nobody else could read the export
    assert found and set(found.values()) == {file_mode}
    for kind in (KINDS["lightning"](), KINDS["pretrain-state"]()):
        target = tmp_path / kind.target_name
        kind.save_versions(target, lambda: None)
        assert target.stat().st_mode & 0o777 == file_mode
    written = write_directory_atomically(tmp_path / "folder", lambda staging: (staging / "a").mkdir())
    assert set(modes(written).values()) == {folder_mode}
    assert (
        write_atomically(tmp_path / "file", lambda staging: staging.write_text("x")).stat().st_mode & 0o777 == file_mode
    )


# ----------------------------------------------------------------------------------------------- NaN / Inf
def non_finite(model) -> dict[str, str]:
    """Two weights with NaN and one with Inf, by name."""
    weights = dict(model.named_parameters())
    names = sorted(weights)[:3]
    with torch.no_grad():
        weights[names[0]].view(-1)[:3] = float("nan")
        weights[names[1]].view(-1)[0] = float("nan")
        weights[names[2]].view(-1)[:2] = float("inf")
    return {names[0]: "3 NaN, 0 Inf", names[1]: "1 NaN, 0 Inf", names[2]: "0 NaN, 2 Inf"}


def test_an_export_of_nan_or_inf_weights_is_refused_naming_them_and_writes_nothing(tmp_path):
    model, processor = build_tiny_llava(TinyLlavaSpec(), WORDS)
    target = write_pretrained(model, processor, NuwaConfig(), tmp_path / "export")
    before = digest(target)
    broken = non_finite(model)
    with pytest.raises(ExportError, match=r"3 of \d+ tensors hold NaN or Inf values") as refused:
        write_pretrained(model, processor, NuwaConfig(), target)
    for name, counts in broken.items():
        assert f"{name} ({counts} of " in str(refused.value)
    assert "Nothing was written" in str(refused.value)
    assert digest(target) == before  # the previous export stays
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # and no staging folder
    with pytest.raises(ExportError, match="refused to export"):
        write_pretrained(model, processor, NuwaConfig(), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_nuwa_train_export_refuses_a_checkpoint_with_nan_weights_before_loading_the_model(
    tiny_base_dir, tmp_path, monkeypatch
):
    from nuwa_train.lightning import LoraSettings, NuwaFineTuner
    from nuwa_train.lightning.strategies import trainable_checkpoint

    module = NuwaFineTuner(model_path=tiny_base_dir, lora=LoraSettings(rank=4))
    module.configure_model()
    checkpoint = trainable_checkpoint(module)
    checkpoint["global_step"] = 3
    torch.save(checkpoint, tmp_path / "finite.ckpt")
    lora = sorted(name for name in checkpoint["state_dict"] if "lora_B" in name)
    for name in lora[:2]:
        checkpoint["state_dict"][name][0, 0] = float("nan")
    torch.save(checkpoint, tmp_path / "diverged.ckpt")
    with (
        monkeypatch.context() as patches,
        pytest.raises(
            SystemExit,
            match=rf"nuwa-train export: error: refused to export the checkpoint "
            rf"{tmp_path / 'diverged.ckpt'}: 2 of \d+ tensors hold NaN",
        ) as refused,
    ):
        patches.setattr(NuwaFineTuner, "load_from_checkpoint", lambda *args, **kwargs: pytest.fail("model loaded"))
        main(["export", str(tmp_path / "diverged.ckpt"), str(tmp_path / "export")])
    assert all(f"{name} (1 NaN, 0 Inf" in str(refused.value) for name in lora[:2])
    assert "Nothing was written" in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diverged.ckpt", "finite.ckpt"]
    main(["export", str(tmp_path / "finite.ckpt"), str(tmp_path / "export")])  # the same checkpoint, finite
    assert load_pruned(tmp_path / "export") is not None
