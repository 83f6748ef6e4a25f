"""Dispatch a resolved stage-1 plan to the selector it names (Nüwa or a baseline)."""

from __future__ import annotations

import torch

from .baselines import pooling_stage1, random_stage1, uniform_stage1, visionzip_stage1
from .config import NuwaConfig, Stage1Plan
from .stage1 import Stage1Output, nuwa_stage1


def run_stage1(plan: Stage1Plan, config: NuwaConfig, features: torch.Tensor, sim_features: torch.Tensor,
               scores: torch.Tensor, grid: tuple[int, int], generator: torch.Generator | None = None) -> Stage1Output:
    """Select (and for Nüwa/VisionZip, merge) `plan.keep` tokens per image."""
    if plan.method in ("nuwa", "nuwa_stage1"):
        return nuwa_stage1(features, sim_features, scores, grid, plan.keep, top_n=plan.top_n,
                           distance=config.distance, pillar_quantile=config.pillar_quantile,
                           region=config.region_size, aggregation=config.aggregation_for(grid),
                           window_tile=config.window_tile)
    if plan.method == "random":
        return random_stage1(features, plan.keep, generator)
    if plan.method == "uniform":
        return uniform_stage1(features, grid, plan.keep)
    if plan.method == "pooling":
        return pooling_stage1(features, grid, plan.keep)
    if plan.method == "visionzip":
        return visionzip_stage1(features, sim_features, scores, plan.keep, config.visionzip_contextual)
    raise ValueError(f"no stage-1 selector named {plan.method!r}")
