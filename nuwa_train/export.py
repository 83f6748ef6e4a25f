"""Export an adapted checkpoint as a plain HF directory, and load it back with pruning attached.

`export_checkpoint` merges LoRA into the base weights (or keeps the adapter only) and writes
`save_pretrained` output, the processor (tokenizer, chat template), the generation config and
`nuwa_config.json`. Everything is written to a staging directory next to the target that is swapped
into place at the end, so a full disk or a kill never leaves a half-written directory that loads; a
model with NaN or Inf weights is refused before anything is written. `load_pruned(path)` is
`from_pretrained` plus one `attach_nuwa` call.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from .io import load_checkpoint_file, recover_directory, write_directory_atomically
from .model_card import (
    EXPORT_RECORD_KEYS,
    NUWA_CONFIG_NAME,
    TRAINED_BUDGETS_KEY,
    TRAINING_KEY,
    training_record,
    write_model_card,
)
from .models import attach_nuwa
from .models.loading import ModelPathError, local_model_dir
from .pruning import NuwaConfig, NuwaConfigError
from .runs import checkpoint_path

ADAPTER_CONFIG_NAME = "adapter_config.json"  # peft's: an adapter-only export
NON_FINITE_SHOWN = 5  # tensors named in the refusal of a model with NaN / Inf weights


class ExportError(RuntimeError):
    """The checkpoint or the target directory cannot be used; the message says which and why."""


def write_pretrained(
    model, processor, pruning: NuwaConfig, target: str | os.PathLike, extra: dict | None = None
) -> Path:
    """Atomically write model + processor + nuwa_config.json to `target` (refused, nothing written, when a weight
    is NaN or Inf). The directory and its files get the modes the umask gives (0755 / 0644 under umask 022)."""
    target = Path(target).resolve()
    refuse_non_finite(model.state_dict(), f"the model to export to {target}")

    def write(staging: Path) -> None:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / NUWA_CONFIG_NAME).write_text(json.dumps({**pruning.to_dict(), **(extra or {})}, indent=2))
        write_model_card(
            staging, name=target.name
        )  # README.md: what it is, how it was trained, how to load and evaluate it

    return write_directory_atomically(target, write)


def refuse_non_finite(tensors: dict, source: str) -> None:
    """`ExportError` naming the tensors that hold NaN or Inf (how many, and the first few by name with their counts).

    A diverged run's weights load and run without an error, answering garbage; an export is refused instead.
    """
    found = {}
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and (tensor.is_floating_point() or tensor.is_complex()):
            nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
            if nan or inf:
                found[name] = f"{name} ({nan} NaN, {inf} Inf of {tensor.numel()} values)"
    if not found:
        return
    shown = list(found.values())[:NON_FINITE_SHOWN]
    more = f"; {len(found) - len(shown)} more" if len(found) > len(shown) else ""
    raise ExportError(
        f"refused to export {source}: {len(found)} of {len(tensors)} tensors hold NaN or Inf values "
        f"({'; '.join(shown)}{more}). Nothing was written. Training diverged (look for the step where "
        f"the loss became NaN in the training log); export a checkpoint saved before it"
    )


def export_checkpoint(
    checkpoint: str | os.PathLike, target: str | os.PathLike, merge: bool = True, model_path: str | None = None
) -> Path:
    """From a Lightning checkpoint of `NuwaFineTuner`, or a run folder of `nuwa-train fit` (nuwa_train/runs.py), to a
    HF directory (merged, or adapter only)."""
    from .lightning.module import NuwaFineTuner

    checkpoint = checkpoint_path(checkpoint, single_file=True)  # a run folder: its checkpoints/last.ckpt
    if not checkpoint.is_file():
        raise ExportError(f"checkpoint {checkpoint} does not exist (pass a .ckpt written by `nuwa-train fit`)")
    state = load_checkpoint_file(checkpoint)  # weights-only: a file that would run code is refused, named
    describe_checkpoint_step(checkpoint, state)
    refuse_non_finite(state.get("state_dict", {}), f"the checkpoint {checkpoint}")  # before the model loads
    base = model_path or checkpoint_base_model(checkpoint, state)
    overrides = {"model_path": base} if base else {}
    try:
        module = NuwaFineTuner.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True, **overrides)
    except ModelPathError as error:
        base = overrides.get("model_path", state.get("hyper_parameters", {}).get("model_path"))
        raise ExportError(
            f"{checkpoint} was trained on the base model {base!r}, which cannot be loaded: {error}. "
            f"Pass --model-path if the base moved since training"
        ) from None
    return export_module(module, target, merge)


def checkpoint_base_model(checkpoint: Path, state: dict) -> str | None:
    """The base model directory a fine-tuning checkpoint records (its hyper-parameters' model_path).

    Checkpoints store it resolved, so it is found from any working directory. A relative one (a checkpoint written
    before that) is looked up from the working directory, then from the checkpoint's folders upwards: training ran
    in the project the run folder sits in, so the export finds `data/tiny_base` from anywhere too.
    """
    recorded = state.get("hyper_parameters", {}).get("model_path")
    if not isinstance(recorded, str) or Path(recorded).expanduser().is_absolute() or Path(recorded).is_dir():
        return recorded
    for folder in Path(checkpoint).resolve().parents:
        if (folder / recorded / "config.json").is_file():
            return str(folder / recorded)
    return recorded


def describe_checkpoint_step(checkpoint: Path, state: dict) -> None:
    """Print the step a checkpoint holds; warn when it is not the final state of its run."""
    step, max_steps = state.get("global_step"), state.get("nuwa_train", {}).get("max_steps")
    of = f" of {max_steps}" if max_steps and max_steps > 0 else ""
    print(f"exporting {checkpoint}: step {step}{of}")
    if max_steps and max_steps > 0 and step is not None and step < max_steps:
        warnings.warn(
            f"{checkpoint} holds step {step} of a {max_steps}-step run, not its final state (saved "
            f"mid-run, or the run was stopped early); export the run's last.ckpt after fit ends for "
            f"the trained model",
            stacklevel=2,
        )


def export_module(module, target: str | os.PathLike, merge: bool = True) -> Path:
    """Export a (trained) `NuwaFineTuner`: merge_and_unload for a plain model, or the adapter alone."""
    module.configure_model()  # the Nüwa hooks stay attached: saving does not run the model
    base = Path(module.hparams.model_path)  # a local base is recorded absolute: evaluation finds it from anywhere
    extra = {
        "exported_from": {
            "base_model": str(base.resolve() if base.is_dir() else base),
            "merged": merge,
            TRAINING_KEY: training_record(module),
        }
    }
    if module.hparams.get("train_budgets"):  # budget-robust: the budgets it serves without a warning
        extra[TRAINED_BUDGETS_KEY] = list(module.hparams.train_budgets)
    if merge:
        merged = module.model.merge_and_unload()
        return write_pretrained(merged, module.processor, module.pruning, target, extra)
    # The adapter must find its base wherever it is loaded from.
    module.model.peft_config["default"].base_model_name_or_path = str(Path(module.hparams.model_path).resolve())
    return write_pretrained(module.model, module.processor, module.pruning, target, extra)


def _json_object(file: Path, error: type[Exception]) -> dict:
    """A JSON file holding an object; anything else raises `error` naming the file (a bare JSONDecodeError
    says neither which file nor what to do)."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as reason:
        raise error(f"{file} is not valid JSON ({reason}); re-export the model with `nuwa-train export`") from None
    if not isinstance(data, dict):
        raise error(
            f"{file} must hold a JSON object, not {type(data).__name__}; re-export the model with `nuwa-train export`"
        )
    return data


def _nuwa_config_json(path: str | os.PathLike) -> dict | None:
    """A directory's nuwa_config.json as written (settings plus what the export records), None without one."""
    config_file = Path(path) / NUWA_CONFIG_NAME
    return _json_object(config_file, NuwaConfigError) if config_file.is_file() else None


def read_nuwa_config(path: str | os.PathLike) -> NuwaConfig | None:
    """The pruning a directory's model was fine-tuned with (its nuwa_config.json), None if it has none."""
    settings = _nuwa_config_json(path)
    if settings is None:
        return None
    for key in EXPORT_RECORD_KEYS:
        settings.pop(key, None)
    try:
        return NuwaConfig.from_dict(settings)
    except NuwaConfigError as error:
        raise NuwaConfigError(f"{Path(path) / NUWA_CONFIG_NAME}: {error}") from None


def trained_budgets(path: str | os.PathLike) -> list | None:
    """The budgets a directory's model was fine-tuned at (its own budget for a single-budget fine-tune; "all"
    means every vision token), None for a directory without nuwa_config.json."""
    settings = _nuwa_config_json(path)
    if settings is None:
        return None
    return settings.get(TRAINED_BUDGETS_KEY) or [settings.get("budget", NuwaConfig().budget)]


def untrained_budget_note(path: str | os.PathLike, budget: int) -> str:
    """ "" when `budget` is one the model at `path` was fine-tuned at (or it was not fine-tuned), else a warning."""
    budgets = trained_budgets(path)
    if budgets is None or budget in budgets:
        return ""
    return (
        f"budget {budget} is outside the budgets {path} was fine-tuned at ({', '.join(map(str, budgets))}): "
        f"expect lower scores than at a trained budget"
    )


def recorded_base_model(path: str | os.PathLike) -> str | None:
    """The base model an export was fine-tuned from (its nuwa_config.json), None for other directories."""
    origin = (_nuwa_config_json(path) or {}).get("exported_from")
    return origin.get("base_model") if isinstance(origin, dict) else None


def load_pruned(
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    config: NuwaConfig | None = None,
    budget: int | None = None,
    return_processor: bool = False,
):
    """An exported model (merged or adapter-only) with hard Nüwa pruning attached from nuwa_config.json.

    `budget`: run at another budget than the one it was fine-tuned at (the other trained settings stay);
    `config`: replace the settings altogether. Returns the HF model, or `(model, processor)` with
    `return_processor=True` (the export's own tokenizer, chat template and image processor). The handle is
    `model._nuwa`: `model._nuwa.use(config)` switches settings, `detach_nuwa(model)` removes it.
    """
    path = Path(path)
    recover_directory(path)  # an export killed mid-swap
    if not path.is_dir():
        raise ModelPathError(
            f"export directory {str(path)!r} does not exist (tried {path.resolve()}); write one "
            f"with `nuwa-train export`"
        )
    if config is None:
        config = read_nuwa_config(path)
        if config is None:
            raise ExportError(f"{path} has no {NUWA_CONFIG_NAME}; export it with `nuwa-train export` or pass config=")
    if budget is not None:
        config = replace(config, budget=budget)
    untrained = untrained_budget_note(path, config.budget) if config.method != "none" else ""
    if untrained:
        warnings.warn(untrained, stacklevel=2)
    model = load_exported_model(path, dtype)
    model.eval()
    attach_nuwa(model, config)
    if return_processor:
        from .models.loading import load_processor

        return model, load_processor(path)
    return model


def is_adapter_export(path: str | os.PathLike) -> bool:
    """Whether `path` is an adapter-only export (`nuwa-train export --adapter-only`): LoRA weights and the name
    of their base model, no config.json of its own."""
    return (Path(path) / ADAPTER_CONFIG_NAME).is_file()


def adapter_base_model(path: str | os.PathLike) -> Path:
    """The local base model directory an adapter-only export's adapter_config.json names.

    Resolved like every other model path: a local directory or a `ModelPathError` that names the export and
    the path (a Hub id is never downloaded; the Hub client would answer a missing path with "Repo id must be
    in the form ...").
    """
    adapter_file = Path(path) / ADAPTER_CONFIG_NAME
    named = _json_object(adapter_file, ExportError).get("base_model_name_or_path")
    if not isinstance(named, str) or not named:
        raise ExportError(
            f"{adapter_file} names no base model (base_model_name_or_path); re-export the adapter "
            f"with `nuwa-train export --adapter-only --model-path BASE_DIR`"
        )
    try:
        return local_model_dir(named)
    except ModelPathError as error:
        raise ModelPathError(
            f"the adapter-only export {path} ({ADAPTER_CONFIG_NAME}) names the base model "
            f"{named!r}, which cannot be loaded: {error}; or re-export with `nuwa-train export "
            f"--adapter-only --model-path BASE_DIR`"
        ) from None


def load_exported_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """The plain HF model of an export (or of any HF directory), no pruning attached: an adapter-only export is
    merged onto its recorded base model. Local files only: nothing is downloaded."""
    from transformers import AutoModelForImageTextToText

    if not is_adapter_export(path):
        return AutoModelForImageTextToText.from_pretrained(local_model_dir(path), dtype=dtype, local_files_only=True)
    from peft import PeftModel

    base = AutoModelForImageTextToText.from_pretrained(adapter_base_model(path), dtype=dtype, local_files_only=True)
    return PeftModel.from_pretrained(base, Path(path)).merge_and_unload()
