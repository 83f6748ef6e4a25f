"""`model.init_from`: start a pre-training run from an earlier base instead of random weights.

The source is an exported base directory (`data/tiny_base`: the model only; the auxiliary heads start fresh) or a
run's state file (`runs/tiny_base/last.safetensors`: the model and its auxiliary heads). Every weight of the
source must fit the recipe's model (same name and shape); the recipe's model may be larger in one way only: more
LLM decoder layers than the source. Those new layers are appended after the source's and start as the identity
(their attention output and MLP down projections are zero, the rest initialised as usual), so the enlarged model
computes exactly what the source did and the new layers learn from there (block expansion, as in LLaMA Pro).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .state import read_state

INIT_KEY = "model.init_from"
EXPORT_WEIGHTS = "model.safetensors"
MODEL_PREFIX, HEADS_PREFIX = "model.", "heads."
DECODER_LAYER = re.compile(r"^model\.model\.language_model\.layers\.(\d+)\.")
# The projections that write into the residual stream: zero makes a decoder layer the identity.
RESIDUAL_OUTPUTS = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


class InitFromError(ValueError):
    """The source of `model.init_from` cannot initialise the recipe's model (the message says why and how)."""


@dataclass
class InitReport:
    source: str
    loaded: int  # tensors copied from the source
    new_layers: list[int] = field(default_factory=list)  # LLM decoder layers the source does not have
    fresh: list[str] = field(default_factory=list)  # other weights the source does not have (initialised as usual)

    def summary(self) -> str:
        parts = [f"{INIT_KEY}: {self.loaded} tensors from {self.source}"]
        if self.new_layers:
            parts.append(f"new LLM layers {self.new_layers} start as the identity (zero o_proj / down_proj)")
        if self.fresh:
            parts.append(
                f"{len(self.fresh)} tensors not in the source keep their initialisation "
                f"({', '.join(sorted({name.split('.')[0] for name in self.fresh}))})"
            )
        return "; ".join(parts)


def source_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """The source's tensors named as in `TinyBasePretrainer.state_dict()` ("model.…", "heads.…")."""
    path = Path(source)
    if path.is_dir():
        if not (path / EXPORT_WEIGHTS).is_file():
            raise InitFromError(
                f"{INIT_KEY}={source!s}: the directory has no {EXPORT_WEIGHTS} (an exported base "
                f"directory, e.g. data/tiny_base, or a run's last.safetensors is expected)"
            )
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(path)  # maps the saved layout to the module's names
        return {MODEL_PREFIX + name: value for name, value in model.state_dict().items()}
    if not path.is_file():
        raise InitFromError(f"{INIT_KEY}={source!s}: no such file or directory")
    state = read_state(path)
    if "state_dict" not in state:
        raise InitFromError(
            f"{INIT_KEY}={source!s}: not a pre-training state (no 'state_dict'); give a run's "
            f"last.safetensors or an exported base directory"
        )
    return dict(state["state_dict"])


def load_initial_weights(module, source: str | Path) -> InitReport:
    """Copy the source's weights into `module` (model and auxiliary heads); see the module docstring."""
    weights = source_weights(source)
    target = module.state_dict()
    unknown = sorted(set(weights) - set(target))
    if unknown:
        raise InitFromError(
            f"{INIT_KEY}={source!s}: {len(unknown)} source weights have no place in the recipe's "
            f"model (first: {unknown[:3]}); its model.spec must be at least the source's size "
            f"(only more LLM layers may be added)"
        )
    mismatched = [
        f"{name} {tuple(weights[name].shape)} -> {tuple(target[name].shape)}"
        for name in sorted(weights)
        if weights[name].shape != target[name].shape
    ]
    if mismatched:
        raise InitFromError(
            f"{INIT_KEY}={source!s}: {len(mismatched)} weights differ in shape from the recipe's "
            f"model (source -> recipe: {'; '.join(mismatched[:3])}); make model.spec's widths, "
            f"heads and vocabulary match the source's (only text_layers may grow)"
        )
    missing = sorted(set(target) - set(weights))
    new_layers = sorted({int(match.group(1)) for name in missing if (match := DECODER_LAYER.match(name))})
    source_layers = {int(match.group(1)) for name in weights if (match := DECODER_LAYER.match(name))}
    if new_layers and source_layers and min(new_layers) <= max(source_layers):
        raise InitFromError(
            f"{INIT_KEY}={source!s}: the source lacks weights of LLM layers {new_layers} that lie "
            f"among its own layers (a partial source)"
        )
    with torch.no_grad():
        module.load_state_dict(weights, strict=False)
        for name, param in module.named_parameters():
            match = DECODER_LAYER.match(name)
            if match and int(match.group(1)) in new_layers and name.endswith(RESIDUAL_OUTPUTS):
                param.zero_()
    fresh = [name for name in missing if not DECODER_LAYER.match(name)]
    return InitReport(str(source), len(weights), new_layers, fresh)
