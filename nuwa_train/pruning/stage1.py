"""Nüwa stage 1: spatially spread anchors, chosen per region, that absorb their neighbourhoods.

Pure tensors, batched: every batch element is selected independently with the same budget
(the released code divided the budget by the batch size; this does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Added to the row sum before normalising aggregation weights, as the released code does.
NORMALISATION_EPS = 1e-8


@dataclass
class Stage1Output:
    tokens: torch.Tensor  # (B, K, D) tokens handed to the projector
    indices: torch.Tensor  # (B, K) raster indices into the grid, ascending
    pillars: torch.Tensor | None = None  # (B, K) True where the anchor kept only itself


def _check_inputs(features: torch.Tensor, scores: torch.Tensor, grid: tuple[int, int], keep: int) -> None:
    height, width = grid
    if features.dim() != 3:
        raise ValueError(f"features must be (batch, tokens, dim), got shape {tuple(features.shape)}")
    if scores.shape != features.shape[:2]:
        raise ValueError(f"scores shape {tuple(scores.shape)} must be (batch, tokens) = {tuple(features.shape[:2])}")
    if features.shape[1] != height * width:
        raise ValueError(f"{features.shape[1]} tokens do not form the {height}x{width} grid")
    if not 1 <= keep <= height * width:
        raise ValueError(f"keep={keep} must be in [1, {height * width}] for a {height}x{width} grid")


def regional_candidates(scores: torch.Tensor, grid: tuple[int, int], top_n: int, region: int = 2) -> torch.Tensor:
    """Separation: the top-n tokens by score inside every region x region block, as raster indices.

    Returns (B, num_regions * top_n), regions in raster order, each region's picks by descending score.
    """
    batch = scores.shape[0]
    height, width = grid
    if height % region or width % region:
        raise ValueError(f"grid {height}x{width} is not divisible by the region size {region}")
    if not 1 <= top_n <= region * region:
        raise ValueError(f"top_n={top_n} must be in [1, {region * region}] for {region}x{region} regions")
    rows, cols = height // region, width // region
    blocks = scores.reshape(batch, rows, region, cols, region).permute(0, 1, 3, 2, 4).reshape(batch, rows * cols, -1)
    local = blocks.topk(top_n, dim=-1).indices  # (B, R, top_n), index inside the block
    region_ids = torch.arange(rows * cols, device=scores.device)
    top = (region_ids // cols).unsqueeze(-1) * region + local // region
    left = (region_ids % cols).unsqueeze(-1) * region + local % region
    return (top * width + left).reshape(batch, -1)


def select_anchors(scores: torch.Tensor, grid: tuple[int, int], keep: int, top_n: int, region: int = 2) -> torch.Tensor:
    """Alignment: the global top-`keep` regional candidates by score, sorted by raster index."""
    candidates = regional_candidates(scores, grid, top_n, region)
    if keep > candidates.shape[1]:
        raise ValueError(
            f"keep={keep} exceeds the {candidates.shape[1]} regional candidates "
            f"(top_n={top_n} per {region}x{region} region); raise top_n"
        )
    best = scores.gather(1, candidates).topk(keep, dim=1).indices
    return candidates.gather(1, best).sort(dim=1).values


def grid_coordinates(grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(N, 2) float (row, col) of every raster index."""
    height, width = grid
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([rows, cols], dim=-1).float()


def proximity(gap: torch.Tensor, distance: float) -> torch.Tensor:
    """P = max(0, 1 - gap / sqrt(distance)) for patch distances `gap`; `distance` is a squared radius."""
    return 1.0 - (gap / distance**0.5).clamp(max=1.0)


def pillar_mask(anchor_scores: torch.Tensor, quantile: float) -> torch.Tensor:
    """Anchors whose score is at or above the quantile of the anchors' scores keep only themselves."""
    threshold = torch.quantile(anchor_scores.float(), quantile, dim=1, keepdim=True)
    return anchor_scores >= threshold


def _normalise_rows(weights: torch.Tensor, self_column: torch.Tensor, pillars: torch.Tensor) -> torch.Tensor:
    """Zero pillar rows but their self weight, normalise rows to sum 1, then set the self weight to 1."""
    keep_self = torch.zeros_like(weights, dtype=torch.bool).scatter_(-1, self_column.unsqueeze(-1), True)
    weights = weights.masked_fill(pillars.unsqueeze(-1) & ~keep_self, 0.0)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + NORMALISATION_EPS)
    return weights.masked_fill(keep_self, 1.0)


def aggregate_dense(features, sim_features, anchors, grid, distance, pillars) -> torch.Tensor:
    """Aggregation over the anchors' rows of the K x N weight matrix (the released code built N x N)."""
    sim = F.normalize(sim_features, p=2, dim=-1)
    anchor_sim = sim.gather(1, anchors.unsqueeze(-1).expand(-1, -1, sim.shape[-1]))
    xy = grid_coordinates(grid, features.device)
    near = proximity(torch.cdist(xy[anchors], xy.expand(anchors.shape[0], -1, -1)), distance)  # (B, K, N)
    weights = F.relu(anchor_sim @ sim.transpose(1, 2)) * near
    weights = _normalise_rows(weights, anchors, pillars)
    return weights.to(features.dtype) @ features


def aggregate_windowed(features, sim_features, anchors, grid, distance, pillars, tile: int) -> torch.Tensor:
    """Aggregation that skips token pairs beyond the proximity radius, where the weight is zero.

    The grid is cut into tile x tile blocks; the anchors of a block only meet the tokens of the block
    grown by the radius, so each block is one small dense product instead of a row of the full grid.
    """
    height, width = grid
    reach = int(distance**0.5)  # whole patches that can still carry weight
    xy = grid_coordinates(grid, features.device)
    unit = F.normalize(sim_features, p=2, dim=-1)
    out = torch.empty(*anchors.shape, features.shape[-1], dtype=features.dtype, device=features.device)
    rows, cols = anchors // width, anchors % width
    for top in range(0, height, tile):
        window_rows = torch.arange(max(0, top - reach), min(height, top + tile + reach), device=features.device)
        for left in range(0, width, tile):
            window_cols = torch.arange(max(0, left - reach), min(width, left + tile + reach), device=features.device)
            window = (window_rows[:, None] * width + window_cols[None, :]).reshape(-1)  # ascending raster ids
            in_tile = (rows >= top) & (rows < top + tile) & (cols >= left) & (cols < left + tile)
            for b in range(anchors.shape[0]):
                members = in_tile[b].nonzero().squeeze(1)
                if members.numel() == 0:
                    continue
                ids = anchors[b, members]
                weights = F.relu(unit[b, ids] @ unit[b, window].T) * proximity(
                    torch.cdist(xy[ids], xy[window]), distance
                )
                self_column = torch.searchsorted(window, ids)
                weights = _normalise_rows(weights, self_column, pillars[b, members])
                out[b, members] = weights.to(features.dtype) @ features[b, window]
    return out


def nuwa_stage1(
    features: torch.Tensor,
    sim_features: torch.Tensor,
    scores: torch.Tensor,
    grid: tuple[int, int],
    keep: int,
    *,
    top_n: int = 1,
    distance: float = 280.0,
    pillar_quantile: float = 0.55,
    region: int = 2,
    aggregation: str = "dense",
    window_tile: int = 32,
) -> Stage1Output:
    """Nüwa stage 1 (separation, alignment, aggregation) on a batch of patch grids.

    features (B, N, D) feed the projector; sim_features (B, N, Ds) define similarity; scores (B, N)
    are CLS-attention saliencies; grid = (H, W) with N = H * W. Returns `keep` tokens per image.
    """
    _check_inputs(features, scores, grid, keep)
    if sim_features.shape[:2] != features.shape[:2]:
        raise ValueError(f"sim_features shape {tuple(sim_features.shape)} must match features' (batch, tokens)")
    anchors = select_anchors(scores, grid, keep, top_n, region)
    pillars = pillar_mask(scores.gather(1, anchors), pillar_quantile)
    if aggregation == "dense":
        tokens = aggregate_dense(features, sim_features, anchors, grid, distance, pillars)
    elif aggregation == "windowed":
        tokens = aggregate_windowed(features, sim_features, anchors, grid, distance, pillars, window_tile)
    else:
        raise ValueError(f"aggregation={aggregation!r} must be 'dense' or 'windowed'")
    return Stage1Output(tokens, anchors, pillars)
