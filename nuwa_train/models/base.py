"""What every model adapter shares: the encoding it hands to the pruning core, and the defaults
of the hooks that differ between VLM families (positions, rotary tables, extra inputs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..pruning import NuwaConfig


class UnsupportedModelError(TypeError):
    """The model (or one of its settings) is not something this adapter can prune."""


@dataclass
class VisionEncoding:
    """One group of same-grid images, read from the vision tower for stage 1."""

    features: torch.Tensor  # (n, N, D) tokens stage 1 aggregates (before the projector, or after it for Qwen)
    sim_features: torch.Tensor  # (n, N, Ds) mean of the configured layers, for similarity
    scores: torch.Tensor  # (n, N) saliency of every grid token
    grid: tuple[int, int]  # (H, W), N = H * W, raster order
    images: torch.Tensor | None = None  # (n,) which images of the call these are (None: all, in order)
    placeholder_offsets: torch.Tensor | None = None  # (N,) offset of each grid token in the image's placeholder
    #                                                  run, -1 for grid padding (None: the identity)
    placeholder_count: int | None = None  # placeholders per image (None: N)

    @property
    def num_placeholders(self) -> int:
        return self.placeholder_count if self.placeholder_count is not None else self.features.shape[1]


class Adapter:
    """Defaults for a decoder-only VLM with 1-D positions; family adapters override what differs."""

    model_classes: tuple[type, ...] = ()
    grid: tuple[int, int] | None = None  # fixed image grid, or None for dynamic resolution
    multimodal_positions = False  # True for M-RoPE (C, B, L) position ids
    image_token_id: int

    def encode(self, pixel_values: torch.Tensor, config: NuwaConfig, **image_inputs) -> list[VisionEncoding]:
        raise NotImplementedError

    def position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: dict) -> torch.Tensor:
        """Position ids of the unpruned sequence: the caller's, or counted over the attention mask."""
        given = inputs.get("position_ids")
        return given if given is not None else (attention_mask.long().cumsum(1) - 1).clamp(min=0)

    def decode_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Position ids for decode steps from the (B, new) text positions."""
        return positions

    def prune_inputs(self, inputs: dict, source: torch.Tensor) -> None:
        """Drop or gather (at `source`) family-specific forward inputs that follow the unpruned sequence."""

    def gather_rotary(self, table: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """A decoder layer's rotary cos or sin table (B, L, Dh) gathered at `source` (B, L')."""
        index = source.clamp(min=0).unsqueeze(-1).expand(-1, -1, table.shape[-1])
        return table.expand(source.shape[0], -1, -1).gather(1, index).masked_fill((source < 0).unsqueeze(-1), 0)
