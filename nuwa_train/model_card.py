"""The model card of an export: README.md with Hugging Face model-card front matter, written into every export.

An export is a model a person can pick up: the card says what it was fine-tuned from, for how many steps, at
which budgets and with which recipe settings, how it prunes, how well it did (when an evaluation was run) and how
to load, ask, evaluate and publish it. Everything in it is read from the export itself (nuwa_config.json, which
records the training, and config.json), so `write_model_card(directory)` can rewrite it at any time, e.g. with
an evaluation table.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from .io import write_atomically
from .serving.settings import SERVED_FAMILY, SERVED_METHOD, TWO_STAGE_METHOD

CARD_NAME = "README.md"
# The export's nuwa_config.json, which export.py writes and the card reads: defined here, the lower of the two
# modules, so that only export.py imports the other.
NUWA_CONFIG_NAME = "nuwa_config.json"
TRAINED_BUDGETS_KEY = "trained_budgets"
EXPORT_RECORD_KEYS = ("exported_from", TRAINED_BUDGETS_KEY)  # what nuwa_config.json records besides NuwaConfig
TRAINING_KEY = "training"  # nuwa_config.json's exported_from.training: what `training_record` returns
HUB_CACHE_PREFIX = "models--"  # a Hugging Face cache snapshot: .../models--owner--name/snapshots/<sha>
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
CARD_TAGS = ("nuwa-train", "vision-token-pruning", "nuwa")
PIPELINE_TAG = "image-text-to-text"
NOT_PUBLISHABLE = (
    "transformers cannot load it without its base model: publish the base too, or export it merged "
    "(without --adapter-only)"
)


def training_record(module) -> dict:
    """What the export records of a `NuwaFineTuner`'s training: steps (of max_steps), budgets and recipe settings.

    Steps come from the trainer when the module was just trained, else from the checkpoint it was loaded from.
    """
    trainer = module._trainer  # None for a module loaded from a checkpoint (LightningModule.trainer would raise)
    if trainer is not None:
        step, max_steps = trainer.global_step, trainer.max_steps
    else:
        step, max_steps = module.checkpoint_progress or (None, None)
    hparams = module.hparams
    return {
        "steps": step,
        "max_steps": max_steps if max_steps and max_steps > 0 else None,
        "train_budgets": list(hparams.get("train_budgets") or []) or None,
        "train_budget_weights": hparams.get("train_budget_weights"),
        "lora": asdict(module.lora),
        "selection": asdict(module.selection),
        "optimizer": asdict(module.optim),
        "loss_reduction": hparams.get("loss_reduction"),
        "distill_weight": hparams.get("distill_weight"),
        "dtype": hparams.get("dtype"),
    }


def hub_id(base: str | None) -> str | None:
    """The Hugging Face Hub id of a base model when it can be told: a cache snapshot's folder, or an id itself."""
    if not base:
        return None
    for part in Path(base).parts:
        if part.startswith(HUB_CACHE_PREFIX):
            return part[len(HUB_CACHE_PREFIX) :].replace("--", "/", 1)
    return base if HUB_ID.match(base) and not Path(base).exists() else None


def _front_matter(path: Path) -> dict:
    """A README's YAML front matter ({} without one)."""
    if not path.is_file():
        return {}
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    block = text[4:].split("\n---", 1)[0]
    data = yaml.safe_load(block)
    return data if isinstance(data, dict) else {}


def _settings_table(values: dict) -> str:
    rows = [f"| `{key}` | {value if isinstance(value, str) else json.dumps(value)} |" for key, value in values.items()]
    return "\n".join(["| setting | value |", "|---|---|", *rows])


@dataclass(frozen=True)
class ExportFacts:
    """What the card says, read from an export's nuwa_config.json and config.json."""

    name: str  # the folder's name, as the card's commands refer to it
    model_type: str
    base: str | None
    merged: bool
    pruning: dict  # the NuwaConfig settings
    budgets: list  # trained at ("all" = every vision token)
    training: dict  # `training_record`, {} for an export that predates it

    @classmethod
    def read(cls, directory: Path, name: str) -> ExportFacts:
        settings = json.loads((directory / NUWA_CONFIG_NAME).read_text(encoding="utf-8"))
        origin = settings.get("exported_from") or {}
        config_file = directory / "config.json"
        if not config_file.is_file() and origin.get("base_model"):  # an adapter-only export: its base's family
            config_file = Path(origin["base_model"]) / "config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        training = origin.get(TRAINING_KEY) or {}
        pruning = {key: value for key, value in settings.items() if key not in EXPORT_RECORD_KEYS}
        budgets = settings.get(TRAINED_BUDGETS_KEY) or training.get("train_budgets") or [pruning.get("budget")]
        return cls(
            name,
            config.get("model_type") or "adapter",
            origin.get("base_model"),
            origin.get("merged", True),
            pruning,
            budgets,
            training,
        )


def _front_matter_lines(facts: ExportFacts) -> list[str]:
    """Hugging Face model-card metadata; a local base and an unknown license are said in comments, as an invalid
    `base_model` id would make the Hub refuse the card."""
    base_id = hub_id(facts.base)
    base_dir = Path(facts.base) if facts.base and Path(facts.base).is_dir() else None
    license_name = _front_matter(base_dir / CARD_NAME).get("license") if base_dir else None
    front = {
        "library_name": "transformers" if facts.merged else "peft",
        "pipeline_tag": PIPELINE_TAG,
        "tags": [*CARD_TAGS, facts.model_type, "lora"],
    }
    if base_id:
        front["base_model"] = base_id
    if license_name:
        front["license"] = license_name
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip()]
    if not base_id:
        lines.append(
            f"# base model: {facts.base} (a local directory, no Hugging Face Hub id known); set base_model "
            f"to its Hub id before publishing"
        )
    if not license_name:
        lines.append("# license: not known from the base model; set the base model's license before publishing")
    return [*lines, "---", ""]


def _training_lines(facts: ExportFacts) -> list[str]:
    training, budgets = facts.training, facts.budgets
    base_id = hub_id(facts.base)
    steps = training.get("steps")
    of = f" of {training['max_steps']}" if training.get("max_steps") else ""
    lines = [
        "## Training",
        "",
        f"- Base model: `{facts.base}`" + (f" (Hub: `{base_id}`)" if base_id else ""),
        f"- Steps trained: {'not recorded' if steps is None else steps}{of}",
        f"- Budgets trained: {', '.join(map(str, budgets))}"
        + (" ('all': every vision token)" if "all" in budgets else ""),
    ]
    if training:
        lora, selection, optimizer = (training.get(key, {}) for key in ("lora", "selection", "optimizer"))
        lines += [
            f"- LoRA: rank {lora.get('rank')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}, "
            f"targets {lora.get('targets')}, projector trained: {lora.get('train_projector')}",
            f"- Selection while training: {selection.get('mode')}, temperature "
            f"{selection.get('temperature_start')} -> {selection.get('temperature_end')} over "
            f"{selection.get('anneal_steps')} steps ({selection.get('schedule')}), the last "
            f"{selection.get('hard_final_fraction')} of the steps hard",
            f"- Optimizer: lr {optimizer.get('lr')}, warm-up {optimizer.get('warmup_steps')} steps, weight "
            f"decay {optimizer.get('weight_decay')}, cosine to {optimizer.get('min_lr_ratio')} x lr",
            f"- Loss: {training.get('loss_reduction')} mean, distillation weight "
            f"{training.get('distill_weight')}, dtype {training.get('dtype')}",
        ]
        if training.get("train_budget_weights"):
            lines.append(f"- Budget weights: {training['train_budget_weights']}")
    return [*lines, "", "The full settings of the run are in its run folder's `config.yaml` (`nuwa-train fit`).", ""]


def _evaluation_lines(name: str, evaluation: str | None) -> list[str]:
    if evaluation:  # its own "## title" becomes a subsection of this one
        return ["## Evaluation", "", re.sub(r"^## ", "### ", evaluation.strip(), flags=re.MULTILINE), ""]
    return [
        "## Evaluation",
        "",
        "No evaluation was recorded with this export. Measure it (VQA exact match, grounding "
        "Acc@0.5, and retention against the base model with all vision tokens) with:",
        "",
        "```",
        f"nuwa-train eval --model {name} --out {name}-eval            # its own pruning",
        f"nuwa-train eval --model {name} --compare --out {name}-eval  # every pruner at 64/128/192",
        "```",
        "",
    ]


def _serve_lines(facts: ExportFacts) -> list[str]:
    """Serving runs stage 1 only (a paged KV cache cannot shrink per layer), and only the LLaVA-1.5 family."""
    method = facts.pruning.get("method")
    if facts.model_type != SERVED_FAMILY or method not in (SERVED_METHOD, TWO_STAGE_METHOD):
        return [
            f"The vLLM plugin (`nuwa-train serve`) serves Nüwa on the LLaVA-1.5 family; this {facts.model_type} "
            f"model ({method}) runs pruned with `load_pruned` + `generate`.",
            "",
        ]
    stage_note = (
        ""
        if method == SERVED_METHOD
        else " This model was fine-tuned with two-stage Nüwa: the server runs its stage 1 only and says so."
    )
    return [
        "```",
        f"nuwa-train serve {facts.name} --port 8000   # vLLM's OpenAI-compatible server, stage-1 Nüwa",
        "```",
        "",
        f"The server prunes each image to the plan's kept tokens at their original positions.{stage_note}",
        "",
    ]


def _usage_lines(facts: ExportFacts) -> list[str]:
    name = facts.name
    plain = (
        "Loaded with plain `transformers` (`AutoModelForImageTextToText.from_pretrained`) the model runs all "
        "vision tokens: the pruning is attached by nuwa-train."
        if facts.merged
        else f"An adapter-only export: {NOT_PUBLISHABLE}."
    )
    return [
        "## Use",
        "",
        "```python",
        "from nuwa_train import load_pruned",
        "",
        f"model, processor = load_pruned({name!r}, return_processor=True)  # pruning from nuwa_config.json",
        f"# another budget: load_pruned({name!r}, budget=128)",
        "```",
        "",
        "From the command line:",
        "",
        "```",
        f'nuwa-train chat {name} --image photo.png --prompt "what colour is the circle?"',
        "```",
        "",
        plain,
        "",
        "## Evaluate",
        "",
        f"`nuwa-train eval --model {name}` (synthetic test split, or your files with `--data FORMAT=PATH`); "
        f"with lmms-eval: `./launch.sh lmms-eval --model nuwa --model_args pretrained={name} ...`.",
        "",
        "## Serve",
        "",
        *_serve_lines(facts),
        "## Publish",
        "",
        f"`hf upload OWNER/{name} {name}` (huggingface_hub's CLI) uploads the whole folder: weights, processor, "
        f"chat template, `nuwa_config.json` and this card (`model.push_to_hub` alone would leave out "
        f"`nuwa_config.json` and the card).",
        "",
    ]


def model_card(directory: str | Path, evaluation: str | None = None, name: str | None = None) -> str:
    """The README.md text of the export in `directory` (`evaluation`: a results table in Markdown; `name`: the
    folder's name where it will be, default its own, as the commands in the card refer to it)."""
    directory = Path(directory)
    facts = ExportFacts.read(directory, name or directory.name)
    kind = "merged model (LoRA folded into the base weights)" if facts.merged else "LoRA adapter (loaded onto its base)"
    grid = "x".join(map(str, facts.pruning.get("reference_grid", ())))
    summary = (
        f"A {facts.model_type} vision-language model fine-tuned with pruning-aware LoRA by nuwa-train, so that "
        f"it answers well from few vision tokens: it runs {facts.pruning.get('method')} pruning at "
        f"{', '.join(map(str, facts.budgets))} vision tokens per image (average over decoder layers, on the "
        f"{grid} reference grid). This folder is a {kind}."
    )
    return "\n".join(
        [
            *_front_matter_lines(facts),
            f"# {facts.name}",
            "",
            summary,
            "",
            *_training_lines(facts),
            "## Pruning (`nuwa_config.json`)",
            "",
            _settings_table(facts.pruning),
            "",
            *_evaluation_lines(facts.name, evaluation),
            *_usage_lines(facts),
        ]
    )


def write_model_card(directory: str | Path, evaluation: str | None = None, name: str | None = None) -> Path:
    """Write (or rewrite) README.md of the export in `directory`, atomically (see `model_card`)."""
    text = model_card(directory, evaluation, name)
    return write_atomically(Path(directory) / CARD_NAME, lambda staging: staging.write_text(text, encoding="utf-8"))
