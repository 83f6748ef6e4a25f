"""`nuwa-train fit|validate|test --config recipes/<name>.yaml [--section.key value ...]` (LightningCLI).

Each command runs in a run folder of its own (nuwa_train/runs.py): `<trainer.default_root_dir>/<--run_name or the
start time>`, the root defaulting to runs/<name of the last --config>. Recipes name no folders: the CLI puts the
checkpoints (a ModelCheckpoint without dirpath), the CSV and TensorBoard logs (when the recipe sets no logger),
config.yaml and data_report.json in it. `--ckpt_path` takes a checkpoint, a run folder or a root (its newest
run); `fit` given a run's checkpoint continues in that run's folder.

Settings precedence with `--ckpt_path`: the checkpoint's model settings replace the recipe's (the weights need
them). An explicit `--model.*` flag wins over the checkpoint for `validate` and `test` (e.g. `--model.test_records
8`); `fit` continues a run as it was trained and refuses a flag that contradicts the checkpoint, naming it.
Lightning itself applies the checkpoint over the command line, silently.
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ..errors import UsageError
from ..io import UnsafeCheckpointError
from ..runs import (
    CHECKPOINTS_NAME,
    LAST_CHECKPOINT_NAME,
    SETTINGS_NAME,
    checkpoint_path,
    create_run_folder,
    default_root,
    latest_run,
    mark_latest,
    run_folder_of,
    started_now,
)
from .checkpoints import SafeCheckpointIO
from .data import NuwaDataModule
from .module import NuwaFineTuner
from .progress import with_progress

LAST = "last"  # `--ckpt_path last`: the newest run of the root
MODEL_FLAG = "--model"
RUN_LOGGERS = ((CSVLogger, "csv"), (TensorBoardLogger, "tensorboard"))  # a run's logs when the recipe sets none


class CheckpointSettingsError(UsageError):
    """`fit --ckpt_path` with a `--model.*` flag that contradicts the checkpoint it continues."""


class RunSettings(SaveConfigCallback):
    """`config.yaml` in the run folder (Lightning's goes to the first logger's version folder), written once by
    global rank 0: the settings as given (recipe + command line) with the root the run is in as
    trainer.default_root_dir, and none of the folders the CLI fills in, so `--config <run>/config.yaml` repeats the
    run as a new one beside it instead of writing into it. A continued run rewrites it."""

    def __init__(self, parser, config, **kwargs) -> None:
        super().__init__(parser, config, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer, pl_module, stage: str) -> None:
        run_dir = Path(trainer.default_root_dir)
        settings = self.config.clone()
        settings.trainer.default_root_dir = str(run_dir.parent)
        self.parser.save(settings, run_dir / SETTINGS_NAME, skip_none=False, overwrite=True, multifile=self.multifile)


def command_line_model_keys(argv: list[str]) -> set[str]:
    """The model settings a command line gives explicitly: `--model.pruning.budget 32` -> model.pruning.budget."""
    flags = (token.split("=", 1)[0] for token in argv)
    return {flag[2:] for flag in flags if flag == MODEL_FLAG or flag.startswith(MODEL_FLAG + ".")}


def _nested(key: str, value) -> dict:
    """{"a": {"b": value}} for the key "a.b" (a Namespace value as a dict, as parse_object takes it)."""
    for part in reversed(key.split(".")):
        value = {part: value.as_dict() if isinstance(value, Namespace) else value}
    return value


class NuwaCLI(LightningCLI):
    def __init__(self, *args, save_config_callback=RunSettings, **kwargs) -> None:
        super().__init__(*args, save_config_callback=save_config_callback, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="the run folder's name under trainer.default_root_dir (default: the start time)",
        )
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
            self.command_line = []
            self.config = parser.parse_object(args)
        else:
            self.command_line = list(sys.argv[1:] if args is None else args if isinstance(args, list) else [])
            super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        """The run folder, then the `--ckpt_path` checkpoint's model settings (read weights-only) under the
        command line's explicit `--model.*` flags (the module docstring says which wins)."""
        subcommand = self.config.get("subcommand")
        self.run_dir = self._run_folder(subcommand)
        if subcommand is None:
            return
        given = self.config.clone()
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError as error:
            path = self.config[subcommand].get("ckpt_path")
            raise UnsafeCheckpointError.from_unpickling(path, error) from None
        self._keep_command_line_model_settings(subcommand, given)

    def _keep_command_line_model_settings(self, subcommand: str, given: Namespace) -> None:
        """Undo the checkpoint's replacement of an explicit `--model.*` flag (validate, test), or refuse it (fit)."""
        dropped = sorted(
            key
            for key in command_line_model_keys(self.command_line)
            if self.config.get(f"{subcommand}.{key}") != given.get(f"{subcommand}.{key}")
        )
        if not dropped:
            return
        if subcommand == "fit":
            differences = "; ".join(
                f"--{key} {given.get(f'{subcommand}.{key}')!r} (the checkpoint's: "
                f"{self.config.get(f'{subcommand}.{key}')!r})"
                for key in dropped
            )
            raise CheckpointSettingsError(
                f"fit --ckpt_path {self.config[subcommand].ckpt_path} continues a run with the model settings stored "
                f"in its checkpoint, and the command line contradicts them: {differences}. Drop these flags to "
                f"continue the run as it was trained, or start a new run (without --ckpt_path) to train with them"
            )
        for key in dropped:
            self.config = self.parser.parse_object(
                {subcommand: _nested(key, given.get(f"{subcommand}.{key}"))}, self.config
            )

    def _run_folder(self, subcommand: str | None) -> Path:
        """This command's run folder; points `--ckpt_path` at the checkpoint a run folder or root stands for.

        `fit` continuing a run's checkpoint (without --run_name) continues in that run's folder; any other command
        gets a new folder, created by global rank 0 (`fit` also moves `latest` to it). The other ranks of a
        distributed run may name a different time: nothing of theirs lands there, as Lightning broadcasts rank 0's
        checkpoint folder and only rank 0 writes logs, settings and the data report.
        """
        settings = self.config[subcommand] if subcommand else self.config
        recipes = settings.get("config") or [None]  # the last one named is the most specific (e.g. the user's own)
        root = Path(settings.trainer.default_root_dir or default_root(recipes[-1]))
        name = settings.get("run_name")
        if subcommand is None:  # built by a program (the demo, tests), which looks after its folders itself
            return root / (name or started_now())
        continued = None
        if settings.get("ckpt_path") == LAST:
            continued = latest_run(root)
            last = continued / CHECKPOINTS_NAME / LAST_CHECKPOINT_NAME if continued else None
            if last is not None and last.exists():  # else Lightning warns that it starts afresh
                settings.ckpt_path = str(last)
        elif settings.get("ckpt_path"):
            settings.ckpt_path = str(checkpoint_path(settings.ckpt_path))
            continued = run_folder_of(settings.ckpt_path)
        if subcommand == "fit" and continued is not None and name is None:
            return continued
        prefix = "" if subcommand == "fit" else f"{subcommand}-"
        if rank_zero_only.rank != 0:
            return root / (name or started_now(prefix))
        run_dir = create_run_folder(root, name, prefix)
        if subcommand == "fit":
            mark_latest(run_dir)
        return run_dir

    def instantiate_trainer(self, **kwargs):
        """The trainer, reading `--ckpt_path` files weights-only with an error that names a refused file, and with
        progress a log can show (progress.py) unless the recipe picks its own bar."""
        settings = self._get(self.config_init, "trainer", default={})
        callbacks = with_progress(
            kwargs.get("callbacks", settings.get("callbacks")),
            kwargs.get("enable_progress_bar", settings.get("enable_progress_bar")),
        )
        if callbacks is not None:
            kwargs["callbacks"] = callbacks
        kwargs.setdefault("default_root_dir", str(self.run_dir))
        if settings.get("logger") in (None, True):  # Lightning's default logger, in the run folder
            kwargs.setdefault("logger", [logger(self.run_dir, name=name) for logger, name in RUN_LOGGERS])
        trainer = super().instantiate_trainer(**kwargs)
        for checkpoint in trainer.checkpoint_callbacks:
            if isinstance(checkpoint, ModelCheckpoint) and checkpoint.dirpath is None:
                checkpoint.dirpath = os.path.realpath(self.run_dir / CHECKPOINTS_NAME)
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


def run(argv: list[str]) -> NuwaCLI:
    # Arguments that are the command line itself go through sys.argv (LightningCLI warns when given both).
    args = None if argv == sys.argv[1:] else argv
    return NuwaCLI(NuwaFineTuner, NuwaDataModule, args=args)
