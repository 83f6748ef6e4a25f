"""Training-free stage-1 baselines behind the same interface as `nuwa_stage1` (for comparison tables).

Each returns a `Stage1Output` with ascending grid indices, so the adapters give every kept token its
original position id exactly as for Nüwa. (FastV is not here: it is a stage-2-only plan, see config.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .stage1 import Stage1Output


def _lattice_shape(grid: tuple[int, int], keep: int) -> tuple[int, int]:
    """The largest rows x cols lattice with rows * cols <= keep and the grid's aspect ratio."""
    height, width = grid
    rows = max(1, min(height, math.floor(math.sqrt(keep * height / width))))
    cols = max(1, min(width, keep // rows))
    return rows, cols


def _gather(features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return features.gather(1, indices.unsqueeze(-1).expand(-1, -1, features.shape[-1]))


def random_stage1(features: torch.Tensor, keep: int, generator: torch.Generator | None = None) -> Stage1Output:
    """`keep` uniformly random tokens per image."""
    batch, num_tokens, _ = features.shape
    noise = torch.rand(batch, num_tokens, generator=generator, device=generator.device if generator else None)
    indices = noise.to(features.device).topk(keep, dim=1).indices.sort(dim=1).values
    return Stage1Output(_gather(features, indices), indices)


def _lattice_centres(grid: tuple[int, int], rows: int, cols: int, batch: int, device) -> torch.Tensor:
    """(B, rows * cols) raster index of the centre patch of every lattice cell."""
    height, width = grid
    row_ids = ((torch.arange(rows, device=device) + 0.5) * height / rows).long()
    col_ids = ((torch.arange(cols, device=device) + 0.5) * width / cols).long()
    return (row_ids[:, None] * width + col_ids[None, :]).reshape(1, -1).expand(batch, -1)


def uniform_stage1(features: torch.Tensor, grid: tuple[int, int], keep: int) -> Stage1Output:
    """The token at the centre of each cell of an even lattice (at most `keep` tokens)."""
    rows, cols = _lattice_shape(grid, keep)
    indices = _lattice_centres(grid, rows, cols, features.shape[0], features.device)
    return Stage1Output(_gather(features, indices), indices)


def pooling_stage1(features: torch.Tensor, grid: tuple[int, int], keep: int) -> Stage1Output:
    """Adaptive average pooling to an even lattice; each pooled token sits at its cell's centre patch."""
    height, width = grid
    rows, cols = _lattice_shape(grid, keep)
    batch, _, dim = features.shape
    image = features.transpose(1, 2).reshape(batch, dim, height, width)
    pooled = F.adaptive_avg_pool2d(image.float(), (rows, cols)).to(features.dtype)
    indices = _lattice_centres(grid, rows, cols, batch, features.device)
    return Stage1Output(pooled.flatten(2).transpose(1, 2), indices)


def visionzip_stage1(
    features: torch.Tensor, sim_features: torch.Tensor, scores: torch.Tensor, keep: int, contextual_share: float
) -> Stage1Output:
    """VisionZip-like: dominant tokens by CLS attention plus contextual tokens merged by similarity.

    The remaining tokens are assigned to evenly spaced target tokens by cosine similarity and averaged
    into them; a merged token keeps its target's grid index (hence its original position).
    """
    batch, num_tokens, dim = features.shape
    contextual = min(round(keep * contextual_share), keep - 1)
    dominant = scores.topk(keep - contextual, dim=1).indices
    rest_mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=features.device)
    rest_mask.scatter_(1, dominant, False)
    rest = rest_mask.nonzero()[:, 1].reshape(batch, -1)  # (B, R) ascending
    if contextual == 0:
        indices = dominant.sort(dim=1).values
        return Stage1Output(_gather(features, indices), indices)
    step = rest.shape[1] / contextual
    target_slots = (torch.arange(contextual, device=features.device) * step).long()
    targets = rest[:, target_slots]  # (B, C)
    sim = F.normalize(sim_features.float(), dim=-1)
    affinity = _gather(sim, rest) @ _gather(sim, targets).transpose(1, 2)  # (B, R, C)
    assignment = affinity.argmax(dim=-1)
    assignment.scatter_(
        1, target_slots.expand(batch, -1), torch.arange(contextual, device=features.device).expand(batch, -1)
    )  # each target belongs to itself
    sums = torch.zeros(batch, contextual, dim, dtype=torch.float32, device=features.device)
    sums.scatter_add_(1, assignment.unsqueeze(-1).expand(-1, -1, dim), _gather(features, rest).float())
    counts = torch.zeros(batch, contextual, device=features.device).scatter_add_(
        1, assignment, torch.ones_like(assignment, dtype=torch.float32)
    )
    merged = (sums / counts.unsqueeze(-1)).to(features.dtype)
    indices = torch.cat([dominant, targets], dim=1)
    tokens = torch.cat([_gather(features, dominant), merged], dim=1)
    indices, order = indices.sort(dim=1)
    return Stage1Output(_gather(tokens, order), indices)
