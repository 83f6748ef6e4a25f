"""What a model directory is served with: the stage-1 pruning vLLM runs, and the config overrides that tell it.

The directory stays a plain Hugging Face export: the plugin's architecture name and the pruning settings reach
vLLM as `hf_overrides` (a change of the loaded config, never of the files). Pure Python + NuwaConfig, so the
launcher (training environment) and the plugin (serving environment) read the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..pruning import NuwaConfig, NuwaConfigError

SERVED_ARCHITECTURE = "NuwaLlavaForConditionalGeneration"
PRUNING_KEY = "nuwa_pruning"  # the served NuwaConfig, as a dict, on vLLM's copy of the model config
# vLLM gives a model per-request rotary positions only through M-RoPE (`uses_mrope` reads this key). Declared with
# every rotary frequency on the first row, it is 1-D RoPE at positions the plugin chooses (the rows are equal).
MROPE_KEY = "mrope_section"
SERVED_FAMILY = "llava"  # config.json model_type the plugin serves (LLaVA-1.5 and its tiny base)
SERVED_METHOD = "nuwa_stage1"
TWO_STAGE_METHOD = "nuwa"


class ServingError(NuwaConfigError):
    """A model or pruning setting that cannot be served; the message names it and what to do."""


@dataclass(frozen=True)
class ServedPruning:
    config: NuwaConfig  # what vLLM runs (always stage 1 only)
    trained: NuwaConfig | None  # the export's nuwa_config.json (None: a plain model directory)
    note: str = ""  # how `config` differs from what the model was fine-tuned with ("" when it does not)


def served_pruning(trained: NuwaConfig | None, budget: int | None = None) -> ServedPruning:
    """The stage-1 pruning to serve for a model fine-tuned with `trained` (None: a plain model directory, served with
    NuwaConfig's stage-1 defaults), at `budget` (default: the trained one)."""
    if trained is None:
        config = NuwaConfig(method=SERVED_METHOD) if budget is None else NuwaConfig(method=SERVED_METHOD, budget=budget)
        return ServedPruning(config, None)
    if trained.method not in (SERVED_METHOD, TWO_STAGE_METHOD):
        raise ServingError(
            f"method={trained.method!r} in nuwa_config.json: the vLLM plugin serves Nüwa "
            f"({SERVED_METHOD!r}, or {TWO_STAGE_METHOD!r} served stage-1-only); serve the plain "
            f"model with `vllm serve` instead"
        )
    config = trained if budget is None else replace(trained, budget=budget)
    note = ""
    if trained.method == TWO_STAGE_METHOD:
        config = replace(config, method=SERVED_METHOD)
        note = (
            f"fine-tuned with two-stage Nüwa (method {TWO_STAGE_METHOD!r}: stage 2 drops vision tokens inside "
            f"the LLM, which a paged KV cache cannot do per layer); served stage-1-only as {SERVED_METHOD!r} at "
            f"budget {config.budget}: the same average of vision tokens in every layer, chosen by stage 1 alone. "
            f"Answers equal load_pruned(dir, config=<that config>), not the two-stage model's"
        )
    return ServedPruning(config, trained, note)


def hf_overrides(config: NuwaConfig, head_dim: int) -> dict:
    """vLLM `hf_overrides` that serve a LLaVA-1.5 directory with the plugin's model class and `config`."""
    return {"architectures": [SERVED_ARCHITECTURE], PRUNING_KEY: config.to_dict(), MROPE_KEY: [head_dim // 2, 0, 0]}


def config_from_overrides(model_config) -> NuwaConfig:
    """The served NuwaConfig on vLLM's model config (set by `hf_overrides`), checked."""
    settings = getattr(model_config, PRUNING_KEY, None)
    if not isinstance(settings, dict):
        raise ServingError(
            f"{SERVED_ARCHITECTURE} needs the served pruning as hf_overrides[{PRUNING_KEY!r}]; start "
            f"the server with `nuwa-train serve MODEL_DIR`"
        )
    config = NuwaConfig.from_dict(settings)
    if config.method != SERVED_METHOD:
        raise ServingError(
            f"hf_overrides[{PRUNING_KEY!r}] has method={config.method!r}; the plugin serves {SERVED_METHOD!r} only"
        )
    return config
