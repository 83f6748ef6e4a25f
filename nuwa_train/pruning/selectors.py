"""The selector registry: every pruning method by name, with its hard selection and (if any) its soft one.

Everything that lists methods derives from `SELECTORS`: the config's allowed values, which methods can train
with soft selection, the CLI help and the comparison table. Adding a selector = one function here (or in
baselines.py) + one registry line; `NuwaConfig.plan` reads how many stages it has from the entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .baselines import pooling_stage1, random_stage1, uniform_stage1, visionzip_stage1
from .soft import SoftStage1Output, nuwa_stage1_soft
from .stage1 import Stage1Output, nuwa_stage1


@dataclass(frozen=True)
class Stage1Plan:
    method: str
    keep: int  # tokens kept per image after stage 1
    top_n: int  # candidates per region (Nüwa only)


class Stage1Settings(Protocol):
    """What a selector reads from the pruning config (NuwaConfig has it): declared here so that config.py, which
    lists the methods from SELECTORS, is the only one of the two modules importing the other."""

    distance: float
    pillar_quantile: float
    region_size: int
    window_tile: int
    visionzip_contextual: float

    def aggregation_for(self, grid: tuple[int, int]) -> str: ...


# hard: (plan, config, features, sim_features, scores, grid, generator) -> Stage1Output
HardStage1 = Callable[..., Stage1Output]
# soft: (plan, config, features, sim_features, scores, grid, temperature, noise) -> SoftStage1Output
SoftStage1 = Callable[..., SoftStage1Output]


@dataclass(frozen=True)
class Selector:
    """One pruning method.

    `stage1`: its selection among the vision tokens before the LLM (None: it keeps them all there).
    `stage1_soft`: the differentiable form of `stage1` (None: it trains with hard selection only).
    `stage2`: it prunes again inside the LLM (Nüwa's prompt-guided stage 2, FastV), whose scores come from the
    LLM's own attention and so train soft without a stage-1 form. `regional`: stage 1 picks per-region candidates
    (needs `top_n` and a grid divisible into regions).
    """

    label: str
    stage1: HardStage1 | None = None
    stage1_soft: SoftStage1 | None = None
    stage2: bool = False
    regional: bool = False

    @property
    def trains_soft(self) -> bool:
        return self.stage1 is None or self.stage1_soft is not None


def _anchor_settings(plan: Stage1Plan, config: Stage1Settings, grid) -> dict:
    """The keyword settings hard and soft Nüwa stage 1 share, so the two modes cannot drift apart."""
    return dict(
        top_n=plan.top_n,
        distance=config.distance,
        pillar_quantile=config.pillar_quantile,
        region=config.region_size,
        aggregation=config.aggregation_for(grid),
        window_tile=config.window_tile,
    )


def _nuwa(plan: Stage1Plan, config: Stage1Settings, features, sim_features, scores, grid, generator) -> Stage1Output:
    return nuwa_stage1(features, sim_features, scores, grid, plan.keep, **_anchor_settings(plan, config, grid))


def _nuwa_soft(
    plan: Stage1Plan, config: Stage1Settings, features, sim_features, scores, grid, temperature, noise
) -> SoftStage1Output:
    return nuwa_stage1_soft(
        features,
        sim_features,
        scores,
        grid,
        plan.keep,
        temperature,
        noise=noise,
        **_anchor_settings(plan, config, grid),
    )


def _random(plan, config, features, sim_features, scores, grid, generator) -> Stage1Output:
    return random_stage1(features, plan.keep, generator)


def _uniform(plan, config, features, sim_features, scores, grid, generator) -> Stage1Output:
    return uniform_stage1(features, grid, plan.keep)


def _pooling(plan, config, features, sim_features, scores, grid, generator) -> Stage1Output:
    return pooling_stage1(features, grid, plan.keep)


def _visionzip(plan, config, features, sim_features, scores, grid, generator) -> Stage1Output:
    return visionzip_stage1(features, sim_features, scores, plan.keep, config.visionzip_contextual)


# In the comparison table's display order (after "none", the full-token reference).
SELECTORS: dict[str, Selector] = {
    "none": Selector("full tokens"),
    "random": Selector("random", _random),
    "pooling": Selector("pooling", _pooling),
    "uniform": Selector("uniform", _uniform),
    "fastv": Selector("FastV", stage2=True),
    "visionzip": Selector("VisionZip-like", _visionzip),
    "nuwa_stage1": Selector("Nüwa stage 1", _nuwa, _nuwa_soft, regional=True),
    "nuwa": Selector("Nüwa", _nuwa, _nuwa_soft, stage2=True, regional=True),
}
METHODS = tuple(SELECTORS)
SOFT_METHODS = tuple(name for name, selector in SELECTORS.items() if selector.trains_soft)


def selector(method: str) -> Selector:
    if method not in SELECTORS:
        raise ValueError(f"no selector named {method!r}; known: {', '.join(METHODS)}")
    return SELECTORS[method]


def run_stage1(
    plan: Stage1Plan,
    config: Stage1Settings,
    features: torch.Tensor,
    sim_features: torch.Tensor,
    scores: torch.Tensor,
    grid: tuple[int, int],
    generator: torch.Generator | None = None,
) -> Stage1Output:
    """Select (and for Nüwa / VisionZip, merge) `plan.keep` tokens per image with the plan's selector."""
    return selector(plan.method).stage1(plan, config, features, sim_features, scores, grid, generator)


def run_stage1_soft(
    plan: Stage1Plan,
    config: Stage1Settings,
    features: torch.Tensor,
    sim_features: torch.Tensor,
    scores: torch.Tensor,
    grid: tuple[int, int],
    temperature: float,
    noise: torch.Tensor | None = None,
) -> SoftStage1Output:
    """The plan's selector in its differentiable form (every token, with a keep probability)."""
    soft = selector(plan.method).stage1_soft
    if soft is None:
        raise ValueError(
            f"method {plan.method!r} has no soft stage-1 selection (soft methods: {', '.join(SOFT_METHODS)})"
        )
    return soft(plan, config, features, sim_features, scores, grid, temperature, noise)
