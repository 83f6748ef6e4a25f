"""Pieces several VLM families share, written once so the adapters cannot drift apart.

- which vision layers feed the similarity features (`similarity_layers`);
- growing an image grid to whole stage-1 regions (`pad_to_regions`; the score its padding gets is
  `scoring.padding_scores`, with the other stage-1 saliency pieces in models/scoring.py);
- the peft LoRA pattern of a Llama-style decoder (`LLM_LORA_PATTERN`).
"""

from __future__ import annotations

import torch

# peft `target_modules` regex of the attention and MLP projections of every decoder layer (HF 5.x layout)
LLM_LORA_PATTERN = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def similarity_layers(sim_layers: tuple[float, float], depth: int) -> range:
    """Hidden-state indices (1 = the first layer's output, `depth` = the last) averaged for similarity.

    `sim_layers` are fractions of the tower's depth (NuwaConfig.sim_layers); both ends are inclusive and
    at least one layer is used.
    """
    low, high = sim_layers
    first = max(1, round(low * depth))
    last = max(first, round(high * depth))
    return range(first, last + 1)


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
