"""Stage-1 saliency pieces every adapter can use, whatever its vision tower.

- `clip_cls_attention`: a tower with a CLS token scores each patch by the CLS query's attention to it
  (LLaVA-1.5, LLaVA-NeXT; the tiny base's presence head pools through it too);
- `received_attention`: a tower without one (Qwen-VL's ViT, SigLIP) scores each patch by the attention it
  *receives*, averaged over heads and over the queries of its own image;
- `padding_scores`: grid padding (cells added to make whole stage-1 regions) ranked just below every real cell.

Each recomputes its attention row(s) from the layer's own projections, so the tower keeps its fused kernel.
"""

from __future__ import annotations

import torch
from torch import nn

QUERY_CHUNK = 256  # queries per step when summing received attention: memory heads x 256 x N (fp32)
# Padding sits this share of the real scores' range below the lowest real score (see `padding_scores`).
PAD_SCORE_MARGIN = 0.01


def clip_cls_attention(layer: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """(B, heads, L) attention of the CLS query (token 0) over all tokens in one CLIP encoder layer.

    Recomputed from the layer's own layer norm and q/k projections (fp32 softmax), so the tower itself
    keeps its fused attention kernel.
    """
    attn = layer.self_attn
    normed = layer.layer_norm1(layer_input)
    batch, length, _ = normed.shape
    query = attn.q_proj(normed[:, :1]).view(batch, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    keys = attn.k_proj(normed).view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)
    return ((query @ keys.transpose(-1, -2)) * attn.scale).float().softmax(dim=-1)[:, :, 0]


def received_attention(query: torch.Tensor, key: torch.Tensor, bounds: list[int], scale: float) -> torch.Tensor:
    """(S,) attention each token receives, mean over heads and over the queries of its own image.

    `query`, `key`: (heads, S, Dh) after the tower's position encoding, the images' tokens concatenated;
    `bounds`: cumulative token counts [0, n_1, n_1 + n_2, ...] (a packed tower's cu_seqlens), so images never
    attend to each other. Queries are taken `QUERY_CHUNK` at a time (fp32 softmax), never the full S x S map.
    """
    heads = query.shape[0]
    received = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        keys = key[:, start:end]
        total = keys.new_zeros(end - start, dtype=torch.float32)
        for first in range(start, end, QUERY_CHUNK):
            queries = query[:, first : min(end, first + QUERY_CHUNK)]
            probs = ((queries @ keys.transpose(-1, -2)) * scale).float().softmax(dim=-1)
            total = total + probs.sum(dim=(0, 1))
        received.append(total / (heads * (end - start)))
    return torch.cat(received)


def padding_scores(scores: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(n, N) scores with every padding cell (`real` False, (N,)) just below the row's lowest real score.

    Only the order matters. Every region holds a real cell that outranks its padding, so with one candidate per
    region (top_n = 1) padding is never a regional candidate, never a top-k pick and never a soft candidate
    (keep probability exactly 0: the soft top-k only spreads its budget over candidates). With top_n > 1 a
    region of one real cell offers padding as a candidate; it then ranks below every real token, hard and
    soft. Just below rather than far below: a far-below candidate would stretch the spread the soft top-k
    standardises by, which sharpens nothing and blurs the real tokens' ranking (a higher effective temperature).
    """
    if bool(real.all()):
        return scores
    known = scores.detach()[:, real]
    low, high = known.amin(dim=1, keepdim=True), known.amax(dim=1, keepdim=True)
    floor = torch.minimum(low - PAD_SCORE_MARGIN * (high - low), torch.nextafter(low, torch.full_like(low, -torch.inf)))
    return torch.where(real, scores, floor)  # nextafter: strictly below even when every real score is equal
