"""`nuwa-train pretrain-base RECIPE [--model.key value ...] [--fresh] [--export-only]` (a LightningCLI).

The recipe has the fine-tuning recipes' sections (`trainer`, `model`, `data`); re-running the same command
resumes from the run's `last.safetensors` (the `StateCheckpoint`'s directory), continuing exactly where it stopped.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from ..errors import UsageError
from ..io import save_tensor_tree
from .callbacks import ExportBase
from .data import TinyBaseData
from .module import TinyBasePretrainer
from .state import (
    STATE_NAME,
    SafetensorsCheckpointIO,
    StateCheckpoint,
    convert_legacy_state,
    is_legacy_state,
    keep_log_until,
    read_state,
    resume_state,
)


class PretrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--fresh", action="store_true", help=f"ignore an existing {STATE_NAME} (overwritten)")
        parser.add_argument("--export-only", action="store_true", help=f"export from {STATE_NAME} and exit")
        # The training data fixes the vocabulary and the heads' classes of the model.
        parser.link_arguments("data", "model.synthetic", compute_fn=_training_data, apply_on="instantiate")

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        trainer.strategy.checkpoint_io = SafetensorsCheckpointIO()
        return trainer


def _training_data(data: TinyBaseData):
    return data.synthetic


def _callback(trainer, kind):
    found = [c for c in trainer.callbacks if isinstance(c, kind)]
    return found[0] if found else None


def prepared_state(run_dir: Path) -> tuple[Path | None, int]:
    """The resume state of `run_dir` and its step, converted in place once if an older version of the loop
    wrote it; (None, 0) for a new run."""
    path = resume_state(run_dir)
    if path is None:
        return None, 0
    state = read_state(path)  # refuses (by name) a file that would run code
    if is_legacy_state(state):
        converted = save_tensor_tree(run_dir / STATE_NAME, convert_legacy_state(state))
        print(
            f"converted the resume state {path} to a Lightning checkpoint {converted} (step {state['step']})",
            flush=True,
        )
        if path != converted:
            path.unlink()
        return converted, int(state["step"])
    return path, int(state["global_step"])


def load_state_into(module, path: Path) -> None:
    checkpoint = read_state(path)
    module.load_state_dict(checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):  # `pretrain-base recipes/tiny_base.yaml ...`
        argv = ["--config", argv[0], *argv[1:]]
    # The arguments are the command line's, rewritten: LightningCLI's warning about getting both does not apply.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    cli = PretrainCLI(
        TinyBasePretrainer,
        TinyBaseData,
        run=False,
        args=argv,
        save_config_kwargs={"overwrite": True},
        seed_everything_default=False,
    )
    trainer, module = cli.trainer, cli.model
    checkpoint = _callback(trainer, StateCheckpoint)
    if checkpoint is None:
        raise UsageError("the recipe's trainer.callbacks need a StateCheckpoint (where the run's state lives)")
    export = _callback(trainer, ExportBase)
    if export is not None:
        export.recipe = _recipe_dict(cli)
        export.recipe_file = str(cli.config.config[0]) if cli.config.get("config") else None
    run_dir = Path(checkpoint.dirpath)
    state, step = (None, 0) if cli.config.fresh else prepared_state(run_dir)
    if cli.config.export_only:
        if state is None:
            raise UsageError(
                f"--export-only: no {STATE_NAME} in {run_dir} to export from (train first: the same "
                f"command without --export-only)"
            )
        if export is None:
            raise UsageError("--export-only: the recipe's trainer.callbacks have no ExportBase")
        load_state_into(module, state)
        print(f"exporting step {step} of {state} to {export.settings.export_dir}", flush=True)
        export.export(trainer, module, final=module.finished, progress=True)
        return 0
    if state is not None:
        load_state_into(module, state)  # fit loads it again; read here to see whether anything is left to train
        module.skip_finished_phases()
        if module.finished:
            # fit would resume, train nothing, and still rewrite the state and the log
            print(
                f"nothing to train: {state} is at step {step}, the end of the recipe's last phase "
                f"({module.phases[-1].name!r}). Append a phase to the recipe to train on, pass --fresh to start "
                f"over, or --export-only to re-export",
                flush=True,
            )
            return 0
        print(f"resuming from {state}", flush=True)
    keep_log_until(trainer, step)
    trainer.fit(module, cli.datamodule, ckpt_path=state)
    return 0


def _recipe_dict(cli) -> dict:
    """The parsed recipe (every default filled in) as plain data, for recipe.yaml and the eval report."""
    import yaml

    config = cli.config.clone()
    for flag in ("fresh", "export_only", "config"):
        config.pop(flag, None)
    return yaml.safe_load(cli.parser.dump(config, skip_check=True))
