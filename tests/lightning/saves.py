"""Every kind of checkpoint the project writes, saved twice (the previous one, then its replacement), and a
harness that runs the second save on a `SimulatedDisk` and reports what the target then holds (JSON):

    python saves.py full-disk KIND DIRECTORY RESULT   the disk fills at several shares of the new checkpoint
    python saves.py kill KIND DIRECTORY RESULT MOST   a SIGKILL at every point of the save (MOST of them at most)

The harness process imports and builds once, then forks one child per save (it never runs torch's thread pool,
so forking is safe); DeepSpeed's process group is started in each child, never in the harness (DeepSpeed cannot
start a second one in a process).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import lightning as L
import pytest
import torch
from simulated_disk import SimulatedDisk
from torch.utils.data import DataLoader, TensorDataset

from nuwa_train.io import load_checkpoint_file
from nuwa_train.lightning.checkpoints import SafeCheckpointIO
from nuwa_train.pretrain.state import SafetensorsCheckpointIO, read_state

OLD, NEW = 1, 2  # the version of the previous checkpoint and of the one the save replaces it with
TENSOR_VALUES = 1 << 19  # 2 MiB of float32: big enough for writes with a middle, small enough to be quick
READY_TIMEOUT_SECONDS = 300  # a DeepSpeed start on a loaded 2-core machine
DEEPSPEED_WIDTH, DEEPSPEED_BATCH, DEEPSPEED_SAMPLES = 256, 2, 8
TEST_ZERO2_CONFIG = {
    "zero_optimization": {"stage": 2},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 1_000_000,
    "train_micro_batch_size_per_gpu": DEEPSPEED_BATCH,
}


def trainer_checkpoint(version: int) -> dict:
    """A Lightning checkpoint dict whose step and weights say which version it is."""
    return {
        "pytorch-lightning_version": L.__version__,
        "global_step": version,
        "epoch": 0,
        "state_dict": {"layer.weight": torch.full((TENSOR_VALUES,), float(version))},
    }


def checked_version(state: dict, weights: torch.Tensor) -> int:
    version = int(state["global_step"])
    assert torch.equal(weights, torch.full_like(weights, float(version))), "weights of another version"
    return version


class LightningCheckpoint:
    """last.ckpt through the CheckpointIO `nuwa-train fit` installs."""

    target_name = "last.ckpt"

    def prepare(self) -> None:
        pass

    def save_versions(self, target: Path, between) -> None:
        SafeCheckpointIO().save_checkpoint(trainer_checkpoint(OLD), target)
        between()
        SafeCheckpointIO().save_checkpoint(trainer_checkpoint(NEW), target)

    def saved_version(self, target: Path) -> int:
        state = load_checkpoint_file(target)
        return checked_version(state, state["state_dict"]["layer.weight"])


class PretrainState(LightningCheckpoint):
    """The pre-training resume state, last.safetensors."""

    target_name = "last.safetensors"

    def save_versions(self, target: Path, between) -> None:
        SafetensorsCheckpointIO().save_checkpoint(trainer_checkpoint(OLD), target)
        between()
        SafetensorsCheckpointIO().save_checkpoint(trainer_checkpoint(NEW), target)

    def saved_version(self, target: Path) -> int:
        state = read_state(target)
        return checked_version(state, state["state_dict"]["layer.weight"])


class Export:
    """An export directory (`write_pretrained`, what `nuwa-train export` writes)."""

    target_name = "export"

    def prepare(self) -> None:
        from conftest import WORDS

        from nuwa_train.models.tiny import TinyLlavaSpec, build_tiny_llava

        torch.manual_seed(0)
        self.model, self.processor = build_tiny_llava(TinyLlavaSpec(), WORDS)

    def save(self, target: Path, version: int) -> None:
        from nuwa_train.export import write_pretrained
        from nuwa_train.pruning import NuwaConfig

        with torch.no_grad():
            self.model.get_output_embeddings().weight.fill_(version)
        write_pretrained(self.model, self.processor, NuwaConfig(), target)

    def save_versions(self, target: Path, between) -> None:
        self.save(target, OLD)
        between()
        self.save(target, NEW)

    def saved_version(self, target: Path) -> int:
        from nuwa_train.export import load_pruned

        weights = load_pruned(target).get_output_embeddings().weight
        version = int(weights[0, 0])
        assert torch.equal(weights, torch.full_like(weights, float(version))), "weights of another version"
        return version


class TinyRegression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(DEEPSPEED_WIDTH, DEEPSPEED_WIDTH)

    def training_step(self, batch, batch_index):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)  # a torch optimizer: DeepSpeed's own JIT-compiles


class SaveEachStep(L.Callback):
    """Step 1 saves the previous checkpoint; step 2 calls `between` and saves its replacement."""

    def __init__(self, target: Path, between):
        self.target, self.between = target, between

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index):
        if trainer.global_step == NEW:
            self.between()
        trainer.save_checkpoint(self.target)


class DeepSpeedCheckpoint:
    """A DeepSpeed ZeRO-2 checkpoint directory (NuwaDeepSpeedStrategy), one rank on the CPU."""

    target_name = "last.ckpt"

    def prepare(self) -> None:
        import deepspeed  # noqa: F401  (imported once, before the forks)

    def save_versions(self, target: Path, between) -> None:
        from nuwa_train.lightning.strategies import CPUDeepSpeedStrategy

        L.seed_everything(0)
        data = DataLoader(TensorDataset(torch.randn(DEEPSPEED_SAMPLES, DEEPSPEED_WIDTH)), batch_size=DEEPSPEED_BATCH)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=NEW,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            strategy=CPUDeepSpeedStrategy(config=json.loads(json.dumps(TEST_ZERO2_CONFIG))),
            callbacks=[SaveEachStep(target, between)],
            default_root_dir=target.parent,
        )
        trainer.fit(TinyRegression(), data)

    def saved_version(self, target: Path) -> int:
        from nuwa_train.lightning.strategies import check_deepspeed_checkpoint

        check_deepspeed_checkpoint(target)  # every shard loads
        assert (target / "latest").read_text() == "checkpoint"
        states = torch.load(target / "checkpoint" / "mp_rank_00_model_states.pt", weights_only=False)
        assert set(states["module"]) == {"layer.weight", "layer.bias"}
        return int(states["global_step"])


KINDS = {
    "lightning": LightningCheckpoint,
    "pretrain-state": PretrainState,
    "export": Export,
    "deepspeed": DeepSpeedCheckpoint,
}


def digest(path: Path) -> dict[str, str]:
    """sha256 of a file, or of every file under a directory, by relative path."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# ----------------------------------------------------------------------------------------------- the harness
DISK, TMPDIR, READY, OLD_DIGEST, POINTS, ERROR = "disk", "tmp", "ready.json", "old.json", "points.json", "error.json"
FREE_SHARES = (0.0, 0.5, 0.99)  # the disk fills at this share of the largest file of the previous checkpoint


def in_child(work) -> int:
    """Run `work()` in a forked child; returns its pid. The child never returns into the caller."""
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        work()
        status = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def exit_code(pid: int) -> int:
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def largest_file(path: Path) -> int:
    return max(p.stat().st_size for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())


def save_on_disk(kind, run: Path, free_share: float | None = None, **disk) -> int:
    """A child saving both versions into `run`/disk; the second save runs on a `SimulatedDisk(**disk)` that
    fills at `free_share` of the previous checkpoint's largest file (the error it raises goes to `run`/error.json).

    Its $TMPDIR is outside the disk: another file system, as on a cluster whose /tmp is local.
    """
    for folder in (DISK, TMPDIR):
        (run / folder).mkdir(parents=True, exist_ok=True)
    target = run / DISK / kind.target_name

    def work():
        tempfile.tempdir = str(run / TMPDIR)
        with pytest.MonkeyPatch.context() as patches:
            simulated = []

            def between():
                (run / OLD_DIGEST).write_text(json.dumps(digest(target)))
                free = None if free_share is None else int(free_share * largest_file(target))
                simulated.append(SimulatedDisk(run / DISK, free_bytes=free, **disk).install(patches))

            try:
                kind.save_versions(target, between)
            except OSError as error:
                (run / ERROR).write_text(json.dumps({"errno": error.errno, "message": str(error)}))
                return
        (run / POINTS).write_text(json.dumps(simulated[0].points))

    return in_child(work)


def kill_at(kind, run: Path, point: int) -> None:
    """Save, stop the second save at `point` and SIGKILL it there."""
    pid = save_on_disk(kind, run, pause_at=point, ready=run / READY)
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not (run / READY).exists():
        finished, _ = os.waitpid(pid, os.WNOHANG)
        if finished or time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise RuntimeError(f"the save ended or hung before point {point}")
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    exit_code(pid)


def describe(kind, run: Path, reference: dict) -> dict:
    """What the disk holds: the target as a version (or why it does not load) and every other name."""
    target = run / DISK / kind.target_name
    held = digest(target) if target.exists() else None
    try:
        version = kind.saved_version(target)
    except Exception as error:  # the test reports every point that does not load
        version = f"{type(error).__name__}: {error}"
    return {
        "bytes_of": next((name for name, value in reference.items() if value is not None and held == value), None),
        "version": version,
        "beside": sorted(p.name for p in (run / DISK).iterdir() if p != target),
    }


def points_to_kill(count: int, most: int) -> list[int]:
    """Every point, or `most` of them spread evenly with the first and the last."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def full_disk(kind, directory: Path) -> dict:
    """Per share of free space: the error the save raised and what the disk then holds."""
    result = {}
    for share in FREE_SHARES:
        run = directory / f"free-{share}"
        assert exit_code(save_on_disk(kind, run, free_share=share)) == 0
        reference = {"old": json.loads((run / OLD_DIGEST).read_text()), "new": None}
        error = json.loads((run / ERROR).read_text()) if (run / ERROR).exists() else None
        result[str(share)] = {"error": error, **describe(kind, run, reference)}
    return result


def kills(kind, directory: Path, most: int) -> dict:
    """Kill the save at its points; the target after each kill, and after a save again into a killed one."""
    reference_run = directory / "reference"
    assert exit_code(save_on_disk(kind, reference_run)) == 0, "the save without a kill failed"
    reference = {
        "old": json.loads((reference_run / OLD_DIGEST).read_text()),
        "new": digest(reference_run / DISK / kind.target_name),
    }
    points = json.loads((reference_run / POINTS).read_text())
    killed = []
    for point in points_to_kill(len(points), most):
        run = directory / f"kill-{point}"
        kill_at(kind, run, point)
        killed.append({"point": points[point], **describe(kind, run, reference)})
    first = directory / f"kill-{points_to_kill(len(points), most)[0]}"  # a save again after a kill
    assert exit_code(in_child(lambda: kind.save_versions(first / DISK / kind.target_name, lambda: None))) == 0
    return {
        "points": points,
        "kills": killed,
        "reference_versions": [kind.saved_version(reference_run / DISK / kind.target_name)],
        "after_a_save_again": sorted(p.name for p in (first / DISK).iterdir()),
    }


def main(mode: str, kind_name: str, directory: str, result_file: str, *most: str) -> None:
    torch.set_num_threads(1)  # no thread pool in this process: its forks are safe
    kind = KINDS[kind_name]()
    kind.prepare()
    result = full_disk(kind, Path(directory)) if mode == "full-disk" else kills(kind, Path(directory), int(*most))
    Path(result_file).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
