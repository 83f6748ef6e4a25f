"""`nuwa-train fit|validate|test --config recipes/<name>.yaml [--section.key value ...]` (LightningCLI)."""

from __future__ import annotations

import pickle
import sys

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..io import UnsafeCheckpointError
from .checkpoints import SafeCheckpointIO
from .data import NuwaDataModule
from .module import NuwaFineTuner


class NuwaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data module tokenises with the processor stored next to the model.
        parser.link_arguments("model.model_path", "data.processor_path")
        # The data module shards its resumable sample stream by rank itself; Lightning's distributed sampler
        # would shard it a second time.
        parser.set_defaults({"trainer.use_distributed_sampler": False})

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads a `--ckpt_path` file's hyper-parameters (weights-only) before anything else runs."""
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError as error:
            path = self.config[self.config.subcommand].get("ckpt_path")
            raise UnsafeCheckpointError.from_unpickling(path, error) from None

    def instantiate_trainer(self, **kwargs):
        """The trainer, reading `--ckpt_path` files weights-only with an error that names a refused file."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own CheckpointIO plugin is kept
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer


def run(argv: list[str]) -> None:
    # Arguments that are the command line itself go through sys.argv (LightningCLI warns when given both).
    args = None if argv == sys.argv[1:] else argv
    NuwaCLI(NuwaFineTuner, NuwaDataModule, args=args, save_config_kwargs={"overwrite": True})
