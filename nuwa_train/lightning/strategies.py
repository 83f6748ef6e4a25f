"""Scale-out: DeepSpeed ZeRO for pruning-aware LoRA, its CPU support, and single-file trainable checkpoints.

- `NuwaDeepSpeedStrategy` (GPUs): DeepSpeed's checkpoints hold only the trainable weights, because the frozen
  base is re-read from `model.model_path`; resuming therefore loads the module non-strictly. A checkpoint
  directory is written next to its target and swapped in whole: a full disk or a kill mid-save keeps the last one.
- `CPUDeepSpeedStrategy` (CPU SUPPORT, for tests, CI and CPU-only machines): the same, with Lightning's CUDA-only
  checks skipped so ZeRO-2/3 run on the CPU with gloo.
- `DeepSpeedLauncherEnvironment`: tells Lightning the node rank under DeepSpeed's own `deepspeed` launcher.
- `gathered_trainable_state` / `SaveTrainableWeights`: the trainable weights as full tensors (gathered from every
  rank under ZeRO-3) in a single-file checkpoint that `nuwa-train export` accepts.
- `consolidate_checkpoint` (also `python -m nuwa_train.lightning.strategies CHECKPOINT_DIR OUTPUT`): a sharded
  DeepSpeed checkpoint directory -> the same kind of single file.
"""

from __future__ import annotations

import argparse
import os
import shutil
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import lightning
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from ..io import load_checkpoint_file, replace_directory, staging_directory, torch_save_atomically, write_atomically
from ..runs import TRAINABLE_WEIGHTS_NAME

TORCH_EXTENSIONS_SUBDIR = Path("nuwa-train") / "torch_extensions"


class NuwaDeepSpeedStrategy(DeepSpeedStrategy):
    """DeepSpeed ZeRO whose checkpoints hold only the trainable weights (LoRA, projector) and their optimizer state.

    The frozen base is not written (`exclude_frozen_parameters`), so on resume DeepSpeed loads the module
    non-strictly; the base weights are already in place from `model_path`.
    """

    def __init__(self, *args, exclude_frozen_parameters: bool = True, **kwargs):
        super().__init__(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)

    @contextmanager
    def model_sharded_context(self):
        """Build the model whole; ZeRO-3 partitions it when DeepSpeed initialises the engine.

        Inside `deepspeed.zero.Init`, transformers fills empty shards (it fails unless told about ZeRO-3) and peft
        initialises LoRA on them (measured: lora_B did not start at zero). Built whole, each rank holds the model in
        host memory until the engine starts (about 14 GB for a 7B model in bf16), never on the GPU.
        """
        yield

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """Every rank writes its shards into one staging directory next to `filepath`, which then replaces it.

        DeepSpeed itself writes into `filepath` in place: a save that fails or is killed half-way leaves the
        previous checkpoint's shards partly overwritten. Every rank must call this (DeepSpeed's save is collective).
        """
        engine = self.deepspeed_engine
        # The rank that creates DeepSpeed's directories: one per node with node-local storage, else global rank 0.
        swaps = (engine.local_rank if engine.use_node_local_storage() else engine.global_rank) == 0
        target = Path(self.broadcast(str(filepath)))
        staging = Path(self.broadcast(str(staging_directory(target)) if self.is_global_zero else None))
        try:
            super().save_checkpoint(checkpoint, staging, storage_options)
            self.barrier("nuwa_train.deepspeed_checkpoint_written")  # every shard is in the staging directory
            if swaps:
                replace_directory(staging, target)
        finally:
            if swaps and staging.exists():  # the save failed: the previous checkpoint stays
                shutil.rmtree(staging, ignore_errors=True)
        self.barrier("nuwa_train.deepspeed_checkpoint_replaced")

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        check_deepspeed_checkpoint(checkpoint_path)
        module = self.lightning_module
        strict = module.strict_loading
        module.strict_loading = strict and not self.exclude_frozen_parameters
        try:
            return super().load_checkpoint(checkpoint_path, weights_only)
        finally:
            module.strict_loading = strict


def check_deepspeed_checkpoint(checkpoint_dir: str | os.PathLike) -> None:
    """Read every shard of a DeepSpeed checkpoint weights-only, refusing (by name) one that would run code.

    DeepSpeed unpickles its shards without `weights_only`; this runs first. Besides tensors and containers the shards
    hold three plain DeepSpeed types (an enum, the loss-scaler state, fragment addresses), allowed here. With
    frozen weights excluded the shards are small (LoRA and its optimizer state), so reading them twice is cheap.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    for shard in sorted(Path(checkpoint_dir).rglob("*.pt")):
        load_checkpoint_file(shard, allowed=(ZeroStageEnum, LossScaler, fragment_address))


def default_extensions_dir() -> str:
    """A writable per-user cache for the ops DeepSpeed compiles at start (its CPU shared-memory comm op)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return str(cache / TORCH_EXTENSIONS_SUBDIR)


class CPUDeepSpeedStrategy(NuwaDeepSpeedStrategy):
    """CPU SUPPORT: DeepSpeed ZeRO-2/3 through Lightning on the CPU (gloo). For tests, CI and CPU-only machines.

    Lightning 2.6 refuses DeepSpeed without CUDA ("only supported on CUDA GPUs"), although DeepSpeed itself runs
    on its CPU accelerator. This subclass skips exactly Lightning's CUDA-only checks -- the accelerator type check
    in `setup_environment` and the device-index validation in `setup_distributed` -- and gives each process the
    device cpu:<local rank>. Use a torch optimizer (DeepSpeed's own CPU Adam is JIT-compiled for minutes).
    """

    def __init__(self, *args, **kwargs):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", default_extensions_dir())
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's version only adds the CUDA check

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


class DeepSpeedLauncherEnvironment(LightningEnvironment):
    """Processes started by DeepSpeed's `deepspeed` launcher, which names the node rank CROSS_RANK, not NODE_RANK."""

    def node_rank(self) -> int:
        return int(os.environ.get("CROSS_RANK", 0))


def _gathered(parameters: list[torch.nn.Parameter]):
    """Under ZeRO-3 each rank holds a shard of every parameter: gather them (a collective) for reading."""
    if any(hasattr(p, "ds_id") for p in parameters):
        import deepspeed

        return deepspeed.zero.GatheredParameters(parameters)
    return nullcontext()


def gathered_trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copies of the module's trainable weights. Under ZeRO-3 every rank must call this (it gathers)."""
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    with _gathered([p for _, p in named]):
        return {name: p.detach().to("cpu", copy=True) for name, p in named}


def trainable_checkpoint(module) -> dict:
    """A single-file Lightning checkpoint of a `NuwaFineTuner` holding only its trainable weights (every rank)."""
    checkpoint = {
        "pytorch-lightning_version": lightning.__version__,
        "hyper_parameters": dict(module.hparams),
        "state_dict": gathered_trainable_state(module),
    }
    module.on_save_checkpoint(checkpoint)
    return checkpoint


class SaveTrainableWeights(Callback):
    """At the end of fit, write the trainable weights (gathered under ZeRO-3) to one file `nuwa-train export` reads:
    `path`, else the run folder's trainable.ckpt (what `nuwa-train export <run folder>` takes for a sharded run)."""

    def __init__(self, path: str | None = None):
        self.path = Path(path) if path else None

    def on_train_end(self, trainer, module) -> None:
        checkpoint = trainable_checkpoint(module)  # every rank takes part in the gather
        if trainer.is_global_zero:
            target = self.path or Path(trainer.default_root_dir) / TRAINABLE_WEIGHTS_NAME
            torch_save_atomically(target, checkpoint)
        trainer.strategy.barrier("nuwa_train.save_trainable_weights")


def consolidate_checkpoint(checkpoint_dir: str | os.PathLike, output: str | os.PathLike) -> Path:
    """A sharded DeepSpeed checkpoint directory -> one Lightning checkpoint file of fp32 trainable weights."""
    from lightning.pytorch.utilities.deepspeed import (
        convert_zero_checkpoint_to_fp32_state_dict,
    )

    check_deepspeed_checkpoint(checkpoint_dir)
    return write_atomically(Path(output), partial(convert_zero_checkpoint_to_fp32_state_dict, checkpoint_dir))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m nuwa_train.lightning.strategies",
        description="Consolidate a sharded DeepSpeed checkpoint into one file for `nuwa-train export`.",
    )
    parser.add_argument(
        "checkpoint_dir", help="a DeepSpeed checkpoint directory, e.g. runs/<recipe>/<run>/checkpoints/last.ckpt"
    )
    parser.add_argument("output", help="the single-file checkpoint to write")
    args = parser.parse_args(argv)
    print(f"wrote {consolidate_checkpoint(args.checkpoint_dir, args.output)}")


if __name__ == "__main__":
    main()
