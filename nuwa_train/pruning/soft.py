"""Differentiable selection for pruning-aware training.

`soft_topk` turns scores into keep probabilities p with exactly k in expectation per row; as the
temperature goes to 0, p becomes the hard top-k indicator, so a forward that biases attention by
log p converges to the hard, physically pruned forward. `nuwa_stage1_soft` is stage 1 in that form:
every token carries the features it would have as an anchor and a keep probability.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .stage1 import (
    aggregate_dense,
    aggregate_windowed,
    regional_candidates,
    select_anchors,
)

BISECTION_STEPS = 60  # halvings of the threshold bracket: far below float precision at any scale
BRACKET_MARGIN = 30.0  # temperatures beyond the score range where a sigmoid is 0 or 1 in float32
LOG_KEEP_FLOOR = -40.0  # attention bias of a token with keep probability ~0 (see log_keep)


def standardise(scores: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Zero-mean, unit-variance scores over each row's candidates, so temperatures mean the same
    thing for CLS-attention sums and for LLM attention rows."""
    weight = candidates.to(scores.dtype)
    count = weight.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (scores * weight).sum(dim=1, keepdim=True) / count
    var = (((scores - mean) * weight) ** 2).sum(dim=1, keepdim=True) / count
    return (scores - mean) / var.clamp(min=1e-12).sqrt()


def gumbel_like(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    uniform = torch.rand(scores.shape, generator=generator, device=scores.device).clamp(1e-10, 1 - 1e-10)
    return -torch.log(-torch.log(uniform)).to(scores.dtype)


def soft_topk(
    scores: torch.Tensor,
    k: torch.Tensor | int,
    temperature: float,
    candidates: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep probabilities p = sigmoid((z - theta) / temperature) with sum(p) = k per row.

    z are the standardised scores (plus optional Gumbel `noise`); theta is solved by bisection and
    differentiated implicitly (d theta / d z_i = s'_i / sum_j s'_j), so gradients respect the budget.
    Non-candidates get p = 0. k may be per row; it is clipped to the number of candidates.
    """
    batch, _ = scores.shape
    if candidates is None:
        candidates = torch.ones_like(scores, dtype=torch.bool)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = standardise(scores.float(), candidates)
    if noise is not None:
        z = z + noise.float()
    k = torch.as_tensor(k, device=scores.device, dtype=torch.float32).expand(batch)
    k = torch.minimum(k, candidates.sum(dim=1).float())
    with torch.no_grad():
        masked = z.masked_fill(~candidates, float("nan"))
        low = masked.nan_to_num(float("inf")).amin(dim=1) - BRACKET_MARGIN * temperature
        high = masked.nan_to_num(float("-inf")).amax(dim=1) + BRACKET_MARGIN * temperature
        for _ in range(BISECTION_STEPS):
            theta = (low + high) / 2
            total = (torch.sigmoid((z - theta[:, None]) / temperature) * candidates).sum(dim=1)
            too_many = total > k
            low = torch.where(too_many, theta, low)
            high = torch.where(too_many, high, theta)
        theta = (low + high) / 2
        slope = torch.sigmoid((z - theta[:, None]) / temperature)
        slope = slope * (1 - slope) * candidates
        weights = slope / slope.sum(dim=1, keepdim=True).clamp(min=1e-30)
    theta = theta + (weights * (z - z.detach())).sum(dim=1)  # implicit gradient of the budget constraint
    probs = torch.sigmoid((z - theta[:, None]) / temperature) * candidates
    return probs.to(scores.dtype)


def log_keep(probs: torch.Tensor) -> torch.Tensor:
    """Attention bias log p, floored at LOG_KEEP_FLOOR.

    A dropped token then weighs e^-40 ~ 4e-18 of a kept one: invisible in the outputs, but far from
    the subnormal floats (< 1.2e-38) that a log(0) bias would feed into softmax and its backward,
    which run an order of magnitude slower on CPUs.
    """
    return torch.log(probs.float().clamp(min=math.exp(LOG_KEEP_FLOOR)))  # clamp first: no 0/0 gradient


def straight_through(soft: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """The hard value forward, the soft gradient backward."""
    return hard.to(soft.dtype) + soft - soft.detach()


def temperature_at(step: int, start: float, end: float, anneal_steps: int, schedule: str = "exponential") -> float:
    """Annealed temperature: `start` at step 0, `end` from `anneal_steps` on."""
    progress = min(max(step, 0) / max(anneal_steps, 1), 1.0)
    if schedule == "exponential":
        return start * (end / start) ** progress
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"temperature schedule {schedule!r} must be 'exponential', 'linear' or 'cosine'")


@dataclass
class SoftStage1Output:
    tokens: torch.Tensor  # (B, N, D) every token as it would be as an anchor (aggregated or pillar)
    keep_prob: torch.Tensor  # (B, N) soft keep probability, sum = keep
    hard_indices: torch.Tensor  # (B, keep) the hard anchors (the limit as the temperature -> 0)


def nuwa_stage1_soft(
    features: torch.Tensor,
    sim_features: torch.Tensor,
    scores: torch.Tensor,
    grid: tuple[int, int],
    keep: int,
    temperature: float,
    *,
    top_n: int = 1,
    distance: float = 280.0,
    pillar_quantile: float = 0.55,
    region: int = 2,
    aggregation: str = "dense",
    window_tile: int = 32,
    noise: torch.Tensor | None = None,
) -> SoftStage1Output:
    """Stage 1 for training: regional candidates stay hard, the global top-K among them is soft.

    Pillars are decided by the hard anchors' score quantile, as in the hard path, so that at a
    vanishing temperature every kept token carries exactly its hard-path features.
    """
    batch, num_tokens, _ = features.shape
    candidates = torch.zeros(batch, num_tokens, dtype=torch.bool, device=features.device)
    candidates.scatter_(1, regional_candidates(scores.detach(), grid, top_n, region), True)
    keep_prob = soft_topk(scores, keep, temperature, candidates, noise)
    anchors = select_anchors(scores.detach(), grid, keep, top_n, region)
    threshold = torch.quantile(scores.detach().gather(1, anchors).float(), pillar_quantile, dim=1, keepdim=True)
    pillars = scores.detach() >= threshold
    every = torch.arange(num_tokens, device=features.device).expand(batch, -1)
    if aggregation == "dense":
        tokens = aggregate_dense(features, sim_features, every, grid, distance, pillars)
    else:
        tokens = aggregate_windowed(features, sim_features, every, grid, distance, pillars, window_tile)
    return SoftStage1Output(tokens, keep_prob, anchors)


__all__ = [
    "soft_topk",
    "log_keep",
    "straight_through",
    "temperature_at",
    "nuwa_stage1_soft",
    "SoftStage1Output",
    "standardise",
    "gumbel_like",
]
