"""Stage 2: text-guided selection inside the LLM from the last prompt token's attention.

Only the one attention row that matters is computed (from the layer's own queries and keys), so the
model keeps running SDPA; the released code switched the whole layer to eager attention instead.
"""

from __future__ import annotations

import torch


def last_token_attention(
    query: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Head-averaged attention probabilities of one query per sample.

    query (B, H, Dh) and keys (B, H, L, Dh) are post-RoPE (keys already repeated for GQA);
    visible (B, L) marks the keys the query may attend to; bias (B, L) is added to the logits
    (the soft keep log-probabilities during training). Returns (B, L).
    """
    logits = torch.einsum("bhd,bhld->bhl", query.float(), keys.float()) * scale
    if bias is not None:
        logits = logits + bias.float().unsqueeze(1)
    logits = logits.masked_fill(~visible.unsqueeze(1), float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


def select_top(scores: torch.Tensor, candidates: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-sample top-k over candidate positions with a per-sample k.

    scores (B, L), candidates (B, L) bool, keep (B,) int. Returns a (B, L) bool mask with exactly
    min(keep[b], candidates[b].sum()) True entries per row, all inside the candidates.
    """
    ranked = scores.float().masked_fill(~candidates, float("-inf"))
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return (rank < keep.unsqueeze(1)) & candidates
