"""`nuwa-train fit|validate|test --config recipes/<name>.yaml [--section.key value ...]` (LightningCLI)."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..io import UnsafeCheckpointError
from .checkpoints import SafeCheckpointIO
from .data import NuwaDataModule
from .module import NuwaFineTuner
from .progress import with_progress


class NuwaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The data module tokenises with the processor stored next to the model.
        parser.link_arguments("model.model_path", "data.processor_path")
        # The data module shards its resumable sample stream by rank itself; Lightning's distributed sampler
        # would shard it a second time.
        parser.set_defaults({"trainer.use_distributed_sampler": False})

    def parse_arguments(self, parser, args) -> None:
        """Settings parsed before (`parse_recipe`) are checked as they are.

        LightningCLI warns when given `args` while `sys.argv` has arguments, in case a command line is being
        ignored; a Namespace is never a command line, and the warning would print the whole of it.
        """
        if isinstance(args, Namespace):
            self.config = parser.parse_object(args)
        else:
            super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI reads a `--ckpt_path` file's hyper-parameters (weights-only) before anything else runs."""
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError as error:
            path = self.config[self.config.subcommand].get("ckpt_path")
            raise UnsafeCheckpointError.from_unpickling(path, error) from None

    def instantiate_trainer(self, **kwargs):
        """The trainer, reading `--ckpt_path` files weights-only with an error that names a refused file, and with
        progress a log can show (progress.py) unless the recipe picks its own bar."""
        settings = self._get(self.config_init, "trainer", default={})
        callbacks = with_progress(kwargs.get("callbacks", settings.get("callbacks")),
                                  kwargs.get("enable_progress_bar", settings.get("enable_progress_bar")))
        if callbacks is not None:
            kwargs["callbacks"] = callbacks
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own CheckpointIO plugin is kept
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer


class _RecipeParser(NuwaCLI):
    """NuwaCLI up to its parsed config: the recipe is checked and completed, nothing is seeded or built."""

    def parse_arguments(self, parser, args) -> None:
        """`args` is `--config <recipe>` built by `parse_recipe`, not a command line that could be ignored."""
        self.config = parser.parse_args(args)

    def _set_seed(self) -> None:
        """The run built from the parsed settings seeds itself (`seed_everything: true` draws its own seed)."""

    def instantiate_classes(self) -> None:
        """Nothing to build: the caller edits the settings and builds with `NuwaCLI(..., args=settings)`."""


def parse_recipe(recipe: str | Path) -> Namespace:
    """A fine-tuning recipe as `nuwa-train fit --config` reads it: type-checked, every default filled in.

    One parse serves several runs: edit a `clone()` per run and hand it to `NuwaCLI(..., args=settings)`,
    which checks the edits (an unknown key is an error) and builds the module, data module and trainer.
    """
    return _RecipeParser(NuwaFineTuner, NuwaDataModule, args=["--config", str(recipe)], run=False).config


def run(argv: list[str]) -> None:
    # Arguments that are the command line itself go through sys.argv (LightningCLI warns when given both).
    args = None if argv == sys.argv[1:] else argv
    NuwaCLI(NuwaFineTuner, NuwaDataModule, args=args, save_config_kwargs={"overwrite": True})
