"""Scale-out on the CPU: launch.sh, 2-process DDP (gloo) and DeepSpeed ZeRO-2/3 fits through Lightning with
Nüwa active, the 7B recipes on a tiny model, and gradient checkpointing with pruning.

Multi-process runs start `nuwa-train fit` through launch.sh (one launcher each: local, torchrun, deepspeed,
fabric), one run at a time with one thread per process. The callbacks and the checkpoint plugin below are
loaded by those processes from this file (PYTHONPATH=tests/lightning:tests).
"""

import copy
import hashlib
import importlib.util
import json
import math
import os
import signal
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import LossRecorder
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from nuwa_train.data import SyntheticConfig, export_split
from nuwa_train.lightning import (
    LoraSettings,
    NuwaDataModule,
    NuwaFineTuner,
    OptimizerSettings,
    SelectionSettings,
)
from nuwa_train.lightning.cli import NuwaCLI
from nuwa_train.lightning.strategies import (
    CPUDeepSpeedStrategy,
    DeepSpeedLauncherEnvironment,
    NuwaDeepSpeedStrategy,
    gathered_trainable_state,
)
from nuwa_train.lightning.strategies import main as consolidate_main
from nuwa_train.pruning import NuwaConfig

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LAUNCH = ROOT / "launch.sh"
PROCESSES = 2
STEPS = 4
CHECKPOINT_EVERY = 1  # resume tests restart from an early and a late step, not only from half-way
IMAGE_FREE_RANK, IMAGE_FREE_STEP = 1, 1  # rank 1's second batch loses its images
RUN_TIMEOUT_SECONDS = 300  # a hung collective must fail the test, not the CI job
DISTRIBUTED_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "CROSS_RANK",
    "TORCHELASTIC_RUN_ID",
)
# Lightning writes into a strategy's config dict: give every strategy its own copy.
TEST_ZERO3_CONFIG = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # shard everything
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 1_000_000,
}
TEST_ZERO2_CONFIG = {
    "zero_optimization": {"stage": 2},
    "zero_allow_untested_optimizer": True,
    "steps_per_print": 1_000_000,
}
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is an optional extra (launch.sh test installs it)"
)


# ----------------------------------------------------------------------------- loaded by the launched processes
class RankLog(Callback):
    """Each rank appends its own loss and the logged (rank-averaged) loss per step; at the end its trainable weights."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index):
        row = {
            "step": trainer.global_step,
            "loss": float(outputs["loss"]),
            "logged": float(trainer.callback_metrics["train/loss"]),
            "images": "pixel_values" in batch,
            "samples": hashlib.sha1(batch["input_ids"].numpy().tobytes()).hexdigest(),
        }
        with open(f"{self.path}.rank{trainer.global_rank}.jsonl", "a") as log:
            log.write(json.dumps(row) + "\n")

    def on_train_end(self, trainer, module):
        torch.save(gathered_trainable_state(module), f"{self.path}.rank{trainer.global_rank}.weights.pt")


class DropImages(Callback):
    """One rank gets one batch without images (image tokens removed), as a text-only sample would arrive."""

    def on_train_batch_start(self, trainer, module, batch, batch_index):
        if (trainer.global_rank, trainer.global_step) == (IMAGE_FREE_RANK, IMAGE_FREE_STEP):
            text = batch["input_ids"] != module.base_model.config.image_token_index
            rows = batch["input_ids"].shape[0]
            for key in ("input_ids", "attention_mask", "labels"):
                batch[key] = batch[key][text].view(rows, -1)
            del batch["pixel_values"]


class WriteLog(TorchCheckpointIO):
    """Records which rank wrote which checkpoint file."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with open(self.path, "a") as log:
            log.write(f"{torch.distributed.get_rank()} {Path(path).name}\n")
        super().save_checkpoint(checkpoint, path, storage_options)


# ----------------------------------------------------------------------------- helpers
def read_log(prefix: Path, rank: int) -> dict[int, dict]:
    lines = Path(f"{prefix}.rank{rank}.jsonl").read_text().splitlines()
    return {row["step"]: row for row in map(json.loads, lines)}


def read_weights(prefix: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(f"{prefix}.rank{rank}.weights.pt")


def assert_same_weights(actual: dict, expected: dict, atol: float = 1e-5) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=0, msg=name)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def launch(*args: str, timeout: float = RUN_TIMEOUT_SECONDS) -> subprocess.CompletedProcess:
    """launch.sh with one thread per process and no inherited distributed settings; kills the whole tree on timeout
    (launchers put their workers in sessions of their own)."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(
            filter(
                None,
                [
                    str(HERE),
                    str(HERE.parent),  # this file, conftest
                    env.get("PYTHONPATH"),
                ],
            )
        ),
    )
    process = subprocess.Popen(
        ["bash", str(LAUNCH), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [process.pid, *_descendants(process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        output, _ = process.communicate()
        pytest.fail(f"launch.sh {' '.join(args)} did not finish in {timeout} s (hung collective?):\n{output[-4000:]}")
    assert process.returncode == 0, f"launch.sh {' '.join(args)} failed:\n{output[-6000:]}"
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def write_yaml(path: Path, content: dict) -> str:
    path.write_text(yaml.safe_dump(content))
    return str(path)


def base_recipe(directory: Path, model_dir: str) -> str:
    """A few soft-Nüwa LoRA steps on the tiny model (LoRA on LM and vision, no dropout: ranks and runs compare)."""
    return write_yaml(
        directory / "base.yaml",
        {
            "seed_everything": 0,
            "trainer": {
                "accelerator": "cpu",
                "devices": PROCESSES,
                "max_steps": STEPS,
                "limit_val_batches": 0,
                "num_sanity_val_steps": 0,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "use_distributed_sampler": False,
                "logger": False,
                "default_root_dir": str(directory),
            },
            "model": {
                "model_path": model_dir,
                "pruning": {"method": "nuwa", "budget": 64},
                "lora": {"rank": 4, "dropout": 0.0, "targets": "lm+vision"},
                "selection": {"mode": "soft", "anneal_steps": 10},
                "optimizer": {"lr": 2.0e-3, "warmup_steps": 1},
            },
            "data": {"batch_size": 2, "train_images": 16, "val_images": 2},
        },
    )


def run_config(directory: Path, name: str, strategy=None, plugins=(), callbacks=()) -> str:
    checkpoints = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {
            "dirpath": str(directory / name / "checkpoints"),
            "save_top_k": -1,
            "every_n_train_steps": CHECKPOINT_EVERY,
            "filename": "step-{step}",
            "auto_insert_metric_name": False,
        },
    }
    trainer = {
        "callbacks": [
            checkpoints,
            {"class_path": "test_scaleout.RankLog", "init_args": {"path": str(directory / name / "log")}},
            {"class_path": "test_scaleout.DropImages"},
            *callbacks,
        ]
    }
    if strategy is not None:
        trainer["strategy"] = strategy
    if plugins:
        trainer["plugins"] = list(plugins)
    (directory / name).mkdir(parents=True, exist_ok=True)
    return write_yaml(directory / f"{name}.yaml", {"trainer": trainer})


def deepspeed_strategy(directory: Path, name: str, config: dict) -> dict:
    path = directory / f"{name}.json"
    path.write_text(json.dumps(config))
    return {"class_path": "nuwa_train.lightning.strategies.CPUDeepSpeedStrategy", "init_args": {"config": str(path)}}


# ----------------------------------------------------------------------------- launch.sh
def dry_run(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV and k != "OMP_NUM_THREADS"}
    env.update(env_extra or {})
    return subprocess.run(["bash", str(LAUNCH), "--dry-run", *args], env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("launch") / "recipe.yaml"
    path.write_text("trainer: {}\n")
    return str(path)


def test_launch_sh_prints_the_command_of_each_launcher(recipe_file, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=8\nnode1 slots=8\n")
    threads = {"OMP_NUM_THREADS": "3"}  # a value you set wins over cores / processes
    cases = {
        (
            "--launcher",
            "torchrun",
            "--devices",
            "2",
            recipe_file,
            "--trainer.max_steps",
            "3",
        ): f"env OMP_NUM_THREADS=3 MKL_NUM_THREADS=3 torchrun --standalone --nproc-per-node 2 -m nuwa_train fit "
        f"--config {recipe_file} --trainer.max_steps 3 --trainer.devices 2 --trainer.num_nodes 1",
        (
            "--launcher",
            "torchrun",
            "--devices",
            "8",
            "--nodes",
            "2",
            "--node-rank",
            "1",
            "--master-addr",
            "10.0.0.1",
            "--master-port",
            "29600",
            recipe_file,
        ): f"env OMP_NUM_THREADS=3 MKL_NUM_THREADS=3 torchrun --nnodes 2 --node-rank 1 --master-addr 10.0.0.1 "
        f"--master-port 29600 --nproc-per-node 8 -m nuwa_train fit --config {recipe_file} --trainer.devices 8 "
        f"--trainer.num_nodes 2",
        (
            "--devices",
            "2",
            "--nodes",
            "2",
            "--node-rank",
            "0",
            "--master-addr",
            "10.0.0.1",
            recipe_file,
        ): f"env OMP_NUM_THREADS=3 MKL_NUM_THREADS=3 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NODE_RANK=0 python -m "
        f"nuwa_train fit "
        f"--config {recipe_file} --trainer.devices 2 --trainer.num_nodes 2",
        (recipe_file, "--ckpt_path", "last"): f"python -m nuwa_train fit --config {recipe_file} --ckpt_path last",
        (
            "--launcher",
            "deepspeed",
            "--devices",
            "8",
            "--nodes",
            "2",
            "--hostfile",
            str(hostfile),
            recipe_file,
        ): f"env OMP_NUM_THREADS=3 MKL_NUM_THREADS=3 deepspeed --hostfile {hostfile} --num_nodes 2 --num_gpus 8 "
        f"--no_local_rank --module nuwa_train fit --config {recipe_file} --trainer.devices 8 --trainer.num_nodes 2 "
        f"--trainer.plugins nuwa_train.lightning.strategies.DeepSpeedLauncherEnvironment",
        ("test", "-q"): "python -m pytest -q",
        ("demo",): "nuwa-train demo",
        ("bench", "--shapes", "tiny"): "nuwa-train bench --shapes tiny",
    }
    for args, expected in cases.items():
        result = dry_run(*args, env_extra=threads)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected

    fabric = dry_run("--launcher", "fabric", "--devices", "2", recipe_file).stdout.split()
    cores = len(os.sched_getaffinity(0))
    assert fabric[1:3] == [f"OMP_NUM_THREADS={max(1, cores // 2)}", f"MKL_NUM_THREADS={max(1, cores // 2)}"]
    assert fabric[3:9] == ["fabric", "run", "--devices", "2", "--num-nodes", "1"]
    assert Path(fabric[9]).name == "nuwa-train" and fabric[10:] == [
        "fit",
        "--config",
        recipe_file,
        "--trainer.devices",
        "2",
        "--trainer.num_nodes",
        "1",
    ]


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ("--launcher", "torchrun", "--devices", "2", "--hostfile", "HOSTFILE", "RECIPE"),
            "--hostfile is for --launcher deepspeed only",
        ),
        (("--node-rank", "1", "RECIPE"), "--node-rank needs --nodes M with M > 1"),
        (("--master-addr", "10.0.0.1", "RECIPE"), "--master-addr needs --nodes M with M > 1"),
        (("--launcher", "mpirun", "RECIPE"), "--launcher must be one of"),
        (("--launcher", "torchrun", "RECIPE"), "--launcher torchrun needs --devices N"),
        (("--devices", "0", "RECIPE"), "--devices must be a positive integer"),
        (("--master-port", "99999", "RECIPE"), "--master-port must be a port number"),
        (
            ("--launcher", "torchrun", "--devices", "2", "--nodes", "2", "--node-rank", "0", "RECIPE"),
            "needs --master-addr",
        ),
        (
            ("--launcher", "torchrun", "--devices", "2", "--nodes", "2", "--master-addr", "a", "RECIPE"),
            "needs --node-rank",
        ),
        (
            (
                "--launcher",
                "fabric",
                "--devices",
                "2",
                "--nodes",
                "2",
                "--node-rank",
                "2",
                "--master-addr",
                "a",
                "RECIPE",
            ),
            "--node-rank 2 must be below --nodes 2",
        ),
        (("--launcher", "deepspeed", "--devices", "2", "--nodes", "2", "RECIPE"), "needs --hostfile"),
        (
            (
                "--launcher",
                "deepspeed",
                "--devices",
                "2",
                "--nodes",
                "2",
                "--hostfile",
                "HOSTFILE",
                "--node-rank",
                "1",
                "RECIPE",
            ),
            "--node-rank does not apply to --launcher deepspeed",
        ),
        (("--devices", "2", "demo"), "launch options apply to a training recipe"),
        (("RECIPE", "--devices", "2"), "launch option --devices must come before the recipe"),
        (("--launcher", "torchrun", "--devices", "2", "RECIPE", "--trainer.devices", "4"), "contradicts the launcher"),
        (("--devices", "RECIPE"), "no recipe or command after the launch options"),
        (("--launcher",), "--launcher needs a value"),
        (("--gpus", "2", "RECIPE"), "unknown launch option --gpus"),
        (("missing/recipe.yaml",), "recipe missing/recipe.yaml not found"),
    ],
)
def test_launch_sh_refuses_contradictory_options(recipe_file, tmp_path, args, message):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=2\n")
    args = [recipe_file if a == "RECIPE" else str(hostfile) if a == "HOSTFILE" else a for a in args]
    result = dry_run(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert message in result.stderr


def test_deepspeed_launcher_environment_reads_the_node_rank(monkeypatch):
    monkeypatch.setenv("CROSS_RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    environment = DeepSpeedLauncherEnvironment()
    assert environment.node_rank() == 3 and environment.local_rank() == 1
    assert environment.creates_processes_externally


# ----------------------------------------------------------------------------- every rank runs the same modules
def test_a_batch_without_images_runs_the_image_path_without_changing_the_loss(tiny_base_dir):
    module = NuwaFineTuner(
        model_path=tiny_base_dir,
        pruning=NuwaConfig(budget=64),
        lora=LoraSettings(rank=4, dropout=0.0, targets="lm+vision"),
    )
    module.configure_model()
    data = NuwaDataModule(processor_path=tiny_base_dir, train_images=4)
    batch = data.collator()([data.dataset("train")[i] for i in range(3)])
    text = batch["input_ids"] != module.base_model.config.image_token_index
    text_only = {key: batch[key][text].view(3, -1) for key in ("input_ids", "attention_mask", "labels")}
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    for mode in ("soft", "straight_through", "hard"):
        module.nuwa.set_selection(mode, 0.5)
        module.model.zero_grad(set_to_none=True)
        plain = module.model(**text_only).loss
        plain.backward()
        assert any(p.grad is None for p in trainable)  # the vision LoRA and projector sat out: DDP would fail
        module.model.zero_grad(set_to_none=True)
        extended = module._with_blank_image(text_only)
        assert extended["input_ids"].shape == (4, module.nuwa.plan.num_tokens)  # widened past the short text rows
        loss = module.model(**extended).loss
        loss.backward()
        assert loss.item() == pytest.approx(plain.item(), abs=1e-6)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)


# ----------------------------------------------------------------------------- DDP, 2 processes (gloo)
@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, tiny_base_dir):
    directory = tmp_path_factory.mktemp("ddp")
    recipe = base_recipe(directory, tiny_base_dir)
    writes = directory / "writes.log"
    config = run_config(
        directory,
        "run",
        strategy="ddp",
        plugins=[{"class_path": "test_scaleout.WriteLog", "init_args": {"path": str(writes)}}],
    )
    launch("--launcher", "local", "--devices", str(PROCESSES), recipe, "--config", config)  # the Trainer spawns
    return {"directory": directory, "recipe": recipe, "writes": writes}


def test_ddp_losses_are_finite_and_every_rank_logs_the_same_mean(ddp_run):
    logs = [read_log(ddp_run["directory"] / "run" / "log", rank) for rank in range(PROCESSES)]
    assert all(sorted(log) == list(range(1, STEPS + 1)) for log in logs)
    assert not logs[IMAGE_FREE_RANK][IMAGE_FREE_STEP + 1]["images"]  # that batch had no images, and nothing hung
    for step in range(1, STEPS + 1):
        losses = [log[step]["loss"] for log in logs]
        assert all(math.isfinite(loss) for loss in losses)
        assert logs[0][step]["logged"] == logs[1][step]["logged"] == pytest.approx(sum(losses) / PROCESSES, abs=1e-6)
    weights = [read_weights(ddp_run["directory"] / "run" / "log", rank) for rank in range(PROCESSES)]
    assert_same_weights(weights[1], weights[0], atol=0)  # the replicas stayed identical


def test_ddp_checkpoints_are_written_once_by_rank_zero(ddp_run):
    expected = [f"step-{step}.ckpt" for step in range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY)]
    assert ddp_run["writes"].read_text().splitlines() == [f"0 {name}" for name in expected]
    assert sorted(p.name for p in (ddp_run["directory"] / "run" / "checkpoints").iterdir()) == expected


@pytest.mark.parametrize("saved_step", [1, STEPS - 1])  # an early and a late checkpoint of the run
def test_ddp_resume_from_any_step_equals_the_uninterrupted_run(ddp_run, saved_step):
    directory = ddp_run["directory"]
    name = f"resumed-{saved_step}"
    config = run_config(directory, name, strategy="ddp")
    checkpoint = directory / "run" / "checkpoints" / f"step-{saved_step}.ckpt"
    launch(
        "--launcher",
        "torchrun",
        "--devices",
        str(PROCESSES),
        ddp_run["recipe"],
        "--config",
        config,
        "--ckpt_path",
        str(checkpoint),
    )
    for rank in range(PROCESSES):
        uninterrupted, resumed = read_log(directory / "run" / "log", rank), read_log(directory / name / "log", rank)
        assert sorted(resumed) == list(range(saved_step + 1, STEPS + 1))
        for step in resumed:
            assert resumed[step]["samples"] == uninterrupted[step]["samples"], f"rank {rank} step {step}: other samples"
            assert resumed[step]["loss"] == pytest.approx(uninterrupted[step]["loss"], abs=1e-6)
        assert_same_weights(
            read_weights(directory / name / "log", rank), read_weights(directory / "run" / "log", rank), atol=1e-6
        )


# ----------------------------------------------------------------------------- DeepSpeed ZeRO-2 / ZeRO-3, 2 processes
@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, tiny_base_dir):
    directory = tmp_path_factory.mktemp("zero")
    recipe = base_recipe(directory, tiny_base_dir)
    trainable = directory / "zero3" / "trainable.ckpt"
    zero2 = run_config(directory, "zero2", strategy=deepspeed_strategy(directory, "zero2", TEST_ZERO2_CONFIG))
    launch("--launcher", "deepspeed", "--devices", str(PROCESSES), recipe, "--config", zero2)
    zero3 = run_config(
        directory,
        "zero3",
        strategy=deepspeed_strategy(directory, "zero3", TEST_ZERO3_CONFIG),
        callbacks=[
            {
                "class_path": "nuwa_train.lightning.strategies.SaveTrainableWeights",
                "init_args": {"path": str(trainable)},
            }
        ],
    )
    launch("--launcher", "fabric", "--devices", str(PROCESSES), recipe, "--config", zero3)
    return {"directory": directory, "trainable": trainable}


@needs_deepspeed
@pytest.mark.parametrize("stage,weight_tolerance", [("zero2", 1e-6), ("zero3", 1e-4)])
def test_zero_stages_train_like_ddp(zero_runs, ddp_run, stage, weight_tolerance):
    """Same data, same start, the same image-free batch on rank 1: the same losses and weights as DDP (ZeRO-3
    reduce-scatters gradients in another summation order: 2e-5 apart after 4 Adam steps of 2e-3, measured)."""
    for rank in range(PROCESSES):
        zero, ddp = (
            read_log(zero_runs["directory"] / stage / "log", rank),
            read_log(ddp_run["directory"] / "run" / "log", rank),
        )
        assert sorted(zero) == sorted(ddp)
        for step in ddp:
            assert math.isfinite(zero[step]["loss"])
            assert zero[step]["loss"] == pytest.approx(ddp[step]["loss"], abs=1e-5)
            assert zero[step]["logged"] == pytest.approx(ddp[step]["logged"], abs=1e-5)
    assert_same_weights(
        read_weights(zero_runs["directory"] / stage / "log"),
        read_weights(ddp_run["directory"] / "run" / "log"),
        atol=weight_tolerance,
    )


@needs_deepspeed
def test_zero3_saves_only_the_gathered_trainable_weights(zero_runs, tiny_base_dir):
    saved = torch.load(zero_runs["trainable"], weights_only=False)
    gathered = read_weights(zero_runs["directory"] / "zero3" / "log")  # what every rank saw after the gather
    assert_same_weights(saved["state_dict"], gathered, atol=0)
    module = NuwaFineTuner(model_path=tiny_base_dir, lora=LoraSettings(rank=4, targets="lm+vision"))
    module.configure_model()
    full = dict(module.named_parameters())
    for name, weight in saved["state_dict"].items():
        assert full[name].requires_grad and weight.shape == full[name].shape  # whole tensors, not rank shards
    assert len(saved["state_dict"]) == sum(p.requires_grad for p in full.values())


@needs_deepspeed
def test_zero3_sharded_checkpoint_consolidates_into_the_export_path(zero_runs, tmp_path):
    from nuwa_train.export import export_checkpoint, load_pruned

    sharded = zero_runs["directory"] / "zero3" / "checkpoints" / f"step-{STEPS}.ckpt"
    assert sharded.is_dir() and len(list((sharded / "checkpoint").glob("*optim_states.pt"))) == PROCESSES
    single = tmp_path / "consolidated.ckpt"
    consolidate_main([str(sharded), str(single)])  # python -m nuwa_train.lightning.strategies DIR FILE
    consolidated = torch.load(single, weights_only=False)
    assert_same_weights(consolidated["state_dict"], read_weights(zero_runs["directory"] / "zero3" / "log"), atol=0)
    assert consolidated["nuwa_train"]["samples_seen"] == STEPS * PROCESSES * 2

    target = export_checkpoint(single, tmp_path / "export")
    trained = NuwaFineTuner.load_from_checkpoint(zero_runs["trainable"], map_location="cpu", weights_only=False)
    data = NuwaDataModule(processor_path=str(target), val_images=2)
    batch = data.collator(with_answer=False, padding_side="left")([data.dataset("val")[i] for i in range(2)])
    trained.configure_model()
    trained.eval()
    trained.nuwa.set_selection("hard")
    with torch.no_grad():
        expected = trained.model(**batch).logits
        exported = load_pruned(target)(**batch).logits
    torch.testing.assert_close(exported, expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- DeepSpeed in this process (one rank)
@pytest.fixture(scope="module")
def one_rank_deepspeed():
    """DeepSpeed runs in the test process share one process group (world size 1); the environment Lightning
    writes for it is restored afterwards, so later launches do not think they were started by a launcher.
    OMP_NUM_THREADS keeps Lightning's launcher from raising torch's thread count to all cores."""
    saved = dict(os.environ)
    os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


@needs_deepspeed
def test_zero3_resume_restores_weights_optimizer_and_data_position(one_rank_deepspeed, tiny_base_dir, tmp_path):
    def fit(callbacks, ckpt_path=None):
        L.seed_everything(0)
        module = NuwaFineTuner(
            model_path=tiny_base_dir,
            pruning=NuwaConfig(budget=64),
            lora=LoraSettings(rank=4, dropout=0.05, targets="lm+vision"),
            optimizer=OptimizerSettings(lr=2e-3, warmup_steps=1),
            selection=SelectionSettings(mode="soft", anneal_steps=10),
        )
        data = NuwaDataModule(processor_path=tiny_base_dir, train_images=8, batch_size=2)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            strategy=CPUDeepSpeedStrategy(config=copy.deepcopy(TEST_ZERO3_CONFIG)),
            max_steps=STEPS,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            use_distributed_sampler=False,
            default_root_dir=tmp_path,
            callbacks=callbacks,
        )
        trainer.fit(module, data, ckpt_path=ckpt_path)

    uninterrupted, resumed = LossRecorder(), LossRecorder()
    fit(
        [
            uninterrupted,
            ModelCheckpoint(
                dirpath=tmp_path,
                filename="step-{step}",
                save_top_k=-1,
                every_n_train_steps=CHECKPOINT_EVERY,
                auto_insert_metric_name=False,
            ),
        ]
    )
    checkpoint = tmp_path / f"step-{CHECKPOINT_EVERY}.ckpt"
    saved = torch.load(next((checkpoint / "checkpoint").glob("*model_states.pt")), weights_only=False)
    assert all("lora_" in k or "modules_to_save" in k for k in saved["module"])  # no frozen weight was written
    fit([resumed], ckpt_path=str(checkpoint))
    assert sorted(resumed.losses) == list(range(CHECKPOINT_EVERY + 1, STEPS + 1))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(uninterrupted.losses[step], abs=1e-5)


@pytest.fixture(scope="module")
def small_files(tmp_path_factory) -> str:
    """A tiny LLaVA + RefCOCO file mix in the formats the 7B recipes read."""
    llava, refcoco = export_split(tmp_path_factory.mktemp("files"), SyntheticConfig(), "train", 4)
    return json.dumps({"llava": [str(llava)], "refcoco": [str(refcoco)]})


def _numbers_only(value) -> bool:
    if isinstance(value, dict):
        return all(_numbers_only(v) for v in value.values())
    return isinstance(value, (bool, int, float))


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_llava_7b_recipe_trains_two_steps_on_the_cpu(
    one_rank_deepspeed, stage, tiny_base_dir, small_files, tmp_path, monkeypatch
):
    """The 7B recipe itself, with a tiny model and data, one CPU process and the CPU-support strategy class."""
    recipe = ROOT / "recipes" / f"llava15_7b_zero{stage}.yaml"
    settings = yaml.safe_load(recipe.read_text())
    strategy = settings["trainer"]["strategy"]
    assert strategy["class_path"] == "nuwa_train.lightning.strategies.NuwaDeepSpeedStrategy"
    deepspeed_config = json.loads((ROOT / strategy["init_args"]["config"]).read_text())
    assert deepspeed_config["zero_optimization"]["stage"] == stage
    assert _numbers_only(deepspeed_config) and "gradient_accumulation_steps" not in deepspeed_config

    monkeypatch.chdir(tmp_path)  # the recipe's relative run directories land here
    cli = NuwaCLI(
        NuwaFineTuner,
        NuwaDataModule,
        run=False,
        args=[
            "--config",
            str(recipe),
            "--model.model_path",
            tiny_base_dir,
            "--data.train_files",
            small_files,
            "--data.val_files",
            small_files,
            "--data.test_files",
            small_files,
            "--data.batch_size",
            "2",
            "--data.num_workers",
            "0",
            "--trainer.accelerator",
            "cpu",
            "--trainer.devices",
            "1",
            "--trainer.strategy.class_path",
            "nuwa_train.lightning.strategies.CPUDeepSpeedStrategy",
            "--trainer.strategy.init_args.config",
            str(ROOT / strategy["init_args"]["config"]),
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "0",
        ],
    )
    assert isinstance(cli.trainer.strategy, NuwaDeepSpeedStrategy) and cli.trainer.precision == "bf16-mixed"
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 2 and cli.trainer.strategy.zero_stage_3 == (stage == 3)
    assert cli.model.base_model.model.language_model.layers[0].gradient_checkpointing
    run_dir = Path(cli.trainer.default_root_dir)  # runs/<recipe name>/<start time>: the recipe names no folder
    assert run_dir.parent == Path("runs") / f"llava15_7b_zero{stage}" and (run_dir / "trainable.ckpt").is_file()
    assert (
        run_dir / "checkpoints" / "last.ckpt"
    ).is_dir()  # sharded: `nuwa-train export <run_dir>` reads trainable.ckpt


# ----------------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_gradient_checkpointing_keeps_loss_and_gradients_with_pruning_active(tiny_base_dir, mode):
    """Masks, position ids and the soft keep bias are built once, outside the checkpointed layers, and reused by
    the recompute: loss and every gradient match the run without checkpointing (dropout draws are replayed)."""
    data = NuwaDataModule(processor_path=tiny_base_dir, train_images=4)
    batch = data.collator()([data.dataset("train")[i] for i in range(4)])
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = NuwaFineTuner(
            model_path=tiny_base_dir,
            pruning=NuwaConfig(budget=64),
            gradient_checkpointing=checkpointing,
            lora=LoraSettings(rank=4, dropout=0.1, targets="lm+vision"),
        )
        module.configure_model()
        module.nuwa.set_selection(mode, 0.5)
        recomputed = []
        layer = module.base_model.model.language_model.layers[-1]
        layer.self_attn.register_forward_hook(lambda *args, calls=recomputed: calls.append(1))
        torch.manual_seed(1)
        loss = module.model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads, len(recomputed)))
    (loss, grads, calls), (checkpointed_loss, checkpointed_grads, checkpointed_calls) = results
    assert (calls, checkpointed_calls) == (1, 2)  # the layer really ran again in the backward pass
    assert checkpointed_loss == pytest.approx(loss, abs=1e-6)
    scoring_layer = f"language_model.layers.{module.nuwa.plan.stage2.layer - 1}.self_attn.q_proj.lora_B"
    assert any(scoring_layer in n and g.abs().sum() > 0 for n, g in grads.items())  # not a vacuous comparison
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
