"""A pruner's configuration moved to where a model's depth lets it meet its budget (evaluation and the bench)."""

from __future__ import annotations

from dataclasses import replace

from .config import NuwaConfig, NuwaConfigError


def fastv_within_budget(config: NuwaConfig, grid: tuple[int, int], num_layers: int) -> tuple[NuwaConfig, str]:
    """FastV at the deepest layer, at or before its configured `fastv_layer`, where the budget can be met, and a
    note saying so when that is not the configured layer.

    FastV keeps every vision token in its first `fastv_layer` layers and prunes once after them, and the budget is
    the average over all layers: on a shallow LLM the first layers alone can exceed a small budget (FastV's layer 2
    of LLaVA-1.5's 32 is layer 2 of 10 on the tiny base, where 64 tokens are out of reach). Pruning earlier keeps
    FastV what it is, a single drop by attention inside the LLM, closest to its configured depth. Other methods
    come back unchanged; a budget no layer can meet raises the configured layer's `NuwaConfigError`.
    """
    if config.method != "fastv":
        return config, ""
    try:
        config.plan(grid, num_layers)
        return config, ""
    except NuwaConfigError as unreachable:
        for layer in range(min(config.fastv_layer, num_layers) - 1, 0, -1):
            candidate = replace(config, fastv_layer=layer)
            try:
                candidate.plan(grid, num_layers)
            except NuwaConfigError:
                continue
            return candidate, (
                f"FastV after layer {layer}: fastv_layer={config.fastv_layer} cannot meet budget "
                f"{config.budget} on this {num_layers}-layer LLM"
            )
        raise unreachable
