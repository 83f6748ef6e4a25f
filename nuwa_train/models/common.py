"""Pieces several VLM families share, written once so the adapters cannot drift apart.

- which vision layers feed the similarity features (`similarity_layers`);
- a CLIP layer's CLS-query attention (`clip_cls_attention`: LLaVA's stage-1 score, and what the tiny
  base's presence head pools through);
- growing an image grid to whole stage-1 regions, and the score its padding gets (`pad_to_regions`,
  `padding_scores`);
- the peft LoRA pattern of a Llama-style decoder (`LLM_LORA_PATTERN`).
"""

from __future__ import annotations

import torch
from torch import nn

# peft `target_modules` regex of the attention and MLP projections of every decoder layer (HF 5.x layout)
LLM_LORA_PATTERN = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"

# Padding sits this share of the real scores' range below the lowest real score (see `padding_scores`).
PAD_SCORE_MARGIN = 0.01


def similarity_layers(sim_layers: tuple[float, float], depth: int) -> range:
    """Hidden-state indices (1 = the first layer's output, `depth` = the last) averaged for similarity.

    `sim_layers` are fractions of the tower's depth (NuwaConfig.sim_layers); both ends are inclusive and
    at least one layer is used.
    """
    low, high = sim_layers
    first = max(1, round(low * depth))
    last = max(first, round(high * depth))
    return range(first, last + 1)


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


def pad_to_regions(ids: torch.Tensor, offsets: torch.Tensor, region: int):
    """Grow an (h, w) grid at the bottom/right to multiples of `region`.

    `ids` say where each cell's features come from, `offsets` where it sits in the image's placeholder run.
    Padding repeats the edge row/column ids (padded features are edge copies, so similarity-weighted
    aggregation of a nearby anchor is not pulled toward zero vectors) and gets placeholder offset -1 (never
    kept). Every region keeps at least one real cell. Returns the padded ids (N,), offsets (N,) and grid.
    """
    h, w = ids.shape
    height, width = -(-h // region) * region, -(-w // region) * region
    rows = torch.arange(height, device=ids.device).clamp(max=h - 1)
    cols = torch.arange(width, device=ids.device).clamp(max=w - 1)
    padded_offsets = torch.full((height, width), -1, dtype=torch.long, device=offsets.device)
    padded_offsets[:h, :w] = offsets
    return ids[rows][:, cols].reshape(-1), padded_offsets.reshape(-1), (height, width)


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
