"""The adapter contract: everything the handle and the Lightning module ask of a VLM family.

An adapter reads one HF model instance and never changes it: per-call results (the vision encodings,
the tokens added after stage 1, positions) are returned, not stored. Defaults here fit a decoder-only VLM
with 1-D positions and a Llama-style decoder; a family overrides what differs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from ..pruning import NuwaConfig

Timer = Callable[[str], AbstractContextManager]  # name -> a context that times Nüwa's own work under that name


def no_timer(name: str) -> AbstractContextManager:
    return nullcontext()


class UnsupportedModelError(TypeError):
    """The model (or one of its settings) is not something this adapter can prune."""


class NuwaInputError(ValueError):
    """The inputs cannot be pruned as given; the message says which input and why."""


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
    placeholder_count: int | torch.Tensor | None = None  # placeholders of each image: one int, (n,) per image,
    #                                                      or None (N: the grid is the whole placeholder run)
    layer_features: torch.Tensor | None = None  # (n, N, k, D_text) what the LLM's first k layers add to each grid
    #                                             token's hidden state (Qwen3-VL's DeepStack); None: nothing

    @property
    def real_tokens(self) -> int | None:
        """Grid tokens that are not padding (None: no padding)."""
        if self.placeholder_offsets is None:
            return None
        return int((self.placeholder_offsets >= 0).sum())

    def placeholders_per_image(self) -> list[int]:
        n, count = self.features.shape[0], self.placeholder_count
        if count is None:
            return [self.features.shape[1]] * n
        return [int(count)] * n if isinstance(count, int) else [int(c) for c in count]


# (image, kept placeholder offsets (K,), their keep probabilities (K,) in soft modes else None) ->
# None, or (offsets (E,), tokens (E, D_text)) hard, or (offsets, tokens, attention bias (E,)) soft.
ExtraTokens = Callable[[int, torch.Tensor, "torch.Tensor | None"], tuple | None]


@dataclass
class ImageEncoding:
    """What `Adapter.encode` returns for one call's images."""

    segments: list[VisionEncoding]  # groups of same-grid images (one image may span several segments)
    extra_tokens: ExtraTokens | None = None  # tokens the family adds after stage 1 (LLaVA-NeXT's row newlines)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama-style rotary embedding; x (B, heads, L, Dh), cos/sin (B, L, Dh)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class Adapter(ABC):
    """One VLM family as Nüwa sees it. Subclasses set the class attributes and implement the abstract
    methods; `model` is the HF model instance (not a peft wrapper) and `image_token_id` its placeholder id."""

    model_classes: tuple[type, ...] = ()  # the HF classes this adapter reads
    grid: tuple[int, int] | None = None  # fixed image grid, or None for dynamic resolution
    multimodal_positions = False  # True for M-RoPE (C, B, L) position ids
    projector_name = "multi_modal_projector"  # module trained as peft `modules_to_save` when asked
    image_input_names: tuple[str, ...] = ()  # inputs besides pixel_values that the image encoder needs
    injected_layers = 0  # decoder layers after which `VisionEncoding.layer_features` join the vision tokens

    def __init__(self, model: nn.Module, image_token_id: int):
        self.model, self.image_token_id = model, image_token_id

    @abstractmethod
    def encode(
        self, pixel_values: torch.Tensor, config: NuwaConfig, timer: Timer = no_timer, **image_inputs
    ) -> ImageEncoding:
        """Run the vision tower once and read what stage 1 needs (features, similarity features, scores).

        `timer("saliency")` wraps the scoring work that Nüwa adds on top of the tower's own forward.
        """

    @abstractmethod
    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Selected (aggregated) vision features -> the LLM's embedding space (identity if already there)."""

    @abstractmethod
    def lora_target_pattern(self, include_vision: bool) -> str:
        """peft `target_modules` regex: the LLM's projections, plus the vision layers that get gradients."""

    @abstractmethod
    def blank_image(self, device: torch.device) -> tuple[int, dict]:
        """Placeholders and model inputs of one blank image (keeps image-free batches on the image path)."""

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def token_inputs(self, input_ids: torch.Tensor) -> dict:
        """Per-token inputs the family derives from input_ids (Qwen-VL's mm_token_type_ids); none by default."""
        return {}

    def position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: dict, image_inputs: dict
    ) -> torch.Tensor:
        """Position ids of the unpruned sequence: the caller's, or counted over the attention mask.

        `inputs` are the forward's remaining keyword arguments, `image_inputs` what the image encoder got.
        """
        given = inputs.get("position_ids")
        return given if given is not None else (attention_mask.long().cumsum(1) - 1).clamp(min=0)

    def decode_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Position ids for decode steps from the (B, new) text positions."""
        return positions

    def prune_inputs(self, inputs: dict, source: torch.Tensor) -> None:
        """Drop or gather (at `source`) family-specific forward inputs that follow the unpruned sequence."""
        return None  # most families have none: only inputs_embeds, masks and positions, which attach prunes itself

    def gather_rotary(self, table: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """A decoder layer's rotary cos or sin table (B, L, Dh) gathered at `source` (B, L')."""
        index = source.clamp(min=0).unsqueeze(-1).expand(-1, -1, table.shape[-1])
        return table.expand(source.shape[0], -1, -1).gather(1, index).masked_fill((source < 0).unsqueeze(-1), 0)

    def head_norms(self, attention: nn.Module) -> tuple[Callable, Callable]:
        """Per-head norms of queries and keys before RoPE (QK-norm decoders such as Qwen3); none by default."""
        return _identity, _identity

    def query_and_keys(
        self,
        layer: nn.Module,
        hidden: torch.Tensor,
        query_index: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ):
        """Post-RoPE query of one token per sample and all keys, as `layer` computes them.

        Returns query (B, heads, Dh), keys (B, heads, L, Dh) (GQA heads repeated) and the scale.
        """
        attn = layer.self_attn
        cos, sin = position_embeddings
        batch, length, _ = hidden.shape
        rows = torch.arange(batch, device=hidden.device)
        normed = layer.input_layernorm(hidden)
        head_dim = attn.head_dim
        query_norm, key_norm = self.head_norms(attn)
        query = query_norm(attn.q_proj(normed[rows, query_index]).view(batch, 1, -1, head_dim)).transpose(1, 2)
        query = _rope(query, cos[rows, query_index].unsqueeze(1), sin[rows, query_index].unsqueeze(1))
        keys = key_norm(attn.k_proj(normed).view(batch, length, -1, head_dim)).transpose(1, 2)
        keys = _rope(keys, cos, sin)
        keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
        return query[:, :, 0], keys, attn.scaling
