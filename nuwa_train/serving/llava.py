"""The LLaVA-1.5 family in vLLM with stage-1 Nüwa: K aggregated anchors per image at their original positions.

Imported by vLLM (in the serving environment) when a model is served with the architecture
`NuwaLlavaForConditionalGeneration`. What differs from vLLM's own LLaVA:

- placeholders: an image gets the plan's K placeholders (`NuwaConfig.plan` on the tower's grid), known before the
  model runs, instead of one per patch;
- embeddings: the vision tower runs with every layer; the family adapter's code reads the feature layer, the
  similarity features and the CLS saliency from its hidden states (`ClipVision`), `run_stage1` (Nüwa stage 1 of
  `nuwa_train.pruning`) selects and aggregates the anchors, and the projector maps them;
- positions: the model declares M-RoPE (every rotary frequency on the first row: 1-D RoPE), the one way vLLM takes
  per-request positions. `get_mrope_input_positions` shifts the text after each image to its unpruned position;
  `recompute_mrope_positions` moves each kept token to image start + its raster index once the image is encoded
  (the raster index rides along as two extra channels of its embedding, row and column, which stay exact in
  bfloat16, and is stripped there).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModalPruning
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.utils import WeightsMapper, maybe_prefix
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..models.llava import ClipVision
from ..models.scoring import clip_cls_attention
from ..pruning import NuwaConfig, PruningPlan
from ..pruning.selectors import run_stage1
from . import NUWA_MODEL_MARK
from .positions import kept_positions, prompt_positions
from .settings import config_from_overrides

RASTER_CHANNELS = 2  # (row, column) of each kept token, appended to its embedding until positions are written
RECENT_IMAGES = 64  # kept indices remembered for inspection (tests, overlays), newest last
# transformers 5.x writes the CLIP tower as `vision_tower.X`; vLLM's module is `vision_tower.vision_model.X`
TOWER_WEIGHTS = re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)")


def served_plan(hf_config) -> tuple[NuwaConfig, PruningPlan, tuple[int, int]]:
    """(served NuwaConfig, its plan for the tower's grid, the grid) from vLLM's copy of a LLaVA config."""
    config = config_from_overrides(hf_config)
    vision = hf_config.vision_config
    side = vision.image_size // vision.patch_size
    grid = (side, side)
    return config, config.plan(grid, hf_config.text_config.num_hidden_layers), grid


class NuwaLlavaProcessingInfo(LlavaProcessingInfo):
    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        """The plan's K: every image is resized to the tower's square grid, so K is the same for every image."""
        return served_plan(self.get_hf_config())[1].stage1.keep


class _AttentionView:
    """vLLM's fused CLIP attention under the names `clip_cls_attention` reads (q_proj, k_proj, heads, scale)."""

    def __init__(self, attention):
        self._qkv = attention.qkv_proj
        self.num_heads, self.head_dim, self.scale = attention.num_heads, attention.head_dim, attention.scale

    def _part(self, hidden: torch.Tensor, index: int) -> torch.Tensor:
        return self._qkv(hidden)[0].chunk(3, dim=-1)[index]

    def q_proj(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._part(hidden, 0)

    def k_proj(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._part(hidden, 1)


class _LayerView:
    def __init__(self, layer):
        self.layer_norm1, self.self_attn = layer.layer_norm1, _AttentionView(layer.self_attn)


class ServedClipVision(ClipVision):
    """The adapter's CLIP reading (features, similarity features, CLS saliency) on vLLM's CLIP modules."""

    @property
    def tower(self):
        return self.model.vision_tower.vision_model

    def hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tower = self.tower
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values.to(tower.dtype)))
        states = [hidden]
        for layer in tower.encoder.layers:
            hidden = layer(hidden)
            states.append(hidden)
        return tuple(states)

    def cls_scores(self, hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
        layer = _LayerView(self.tower.encoder.layers[self.feature_index - 1])
        return clip_cls_attention(layer, hidden[self.feature_index - 1])[:, :, 1:].sum(dim=1)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaMultiModalProcessor, info=NuwaLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class NuwaLlavaForConditionalGeneration(LlavaForConditionalGeneration, SupportsMRoPE, SupportsMultiModalPruning):
    hf_to_vllm_mapper = (
        WeightsMapper(orig_to_new_regex={TOWER_WEIGHTS: "vision_tower.vision_model."})
        | LlavaForConditionalGeneration.hf_to_vllm_mapper
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        setattr(self, NUWA_MODEL_MARK, True)
        self.nuwa_config, self.plan, self.grid = served_plan(self.config)
        vision = self.config.vision_config
        if len(self.vision_tower.vision_model.encoder.layers) < vision.num_hidden_layers:
            # vLLM builds the tower up to the feature layer; the similarity features reach the last one
            with self._mark_tower_model(vllm_config, "image"):
                self.vision_tower = CLIPVisionModel(
                    vision,
                    quant_config=vllm_config.quant_config,
                    require_post_norm=False,
                    prefix=maybe_prefix(prefix, "vision_tower"),
                )
        self.clip = ServedClipVision(self)
        self.full_tokens = self.grid[0] * self.grid[1]
        self.original_positions = self.nuwa_config.position_mode == "original"
        self.recent_kept: deque[list[int]] = deque(maxlen=RECENT_IMAGES)

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise ValueError(
                "Nüwa needs the image's pixels to select tokens; precomputed image embeddings cannot be pruned"
            )
        clip = self.clip
        hidden = clip.hidden_states(image_input["pixel_values"])
        selection = run_stage1(
            self.plan.stage1,
            self.nuwa_config,
            clip.features(hidden),
            clip.sim_features(hidden, self.nuwa_config),
            clip.cls_scores(hidden),
            self.grid,
        )
        embeddings = self.multi_modal_projector(selection.tokens)
        self.recent_kept.extend(selection.indices.tolist())
        width = self.grid[1]
        raster = torch.stack([selection.indices // width, selection.indices % width], dim=-1)
        return list(torch.cat([embeddings, raster.to(embeddings.dtype)], dim=-1))

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list) -> tuple[torch.Tensor, int]:
        positions, delta = prompt_positions(
            torch.tensor(input_tokens, dtype=torch.long),
            self.config.image_token_index,
            self.plan.stage1.keep,
            self.full_tokens,
            self.original_positions,
        )
        return positions.expand(3, -1).clone(), delta

    def recompute_mrope_positions(
        self,
        input_ids,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.Tensor,
        num_computed_tokens: int,
    ):
        embeddings = [embedding[:, :-RASTER_CHANNELS] for embedding in multimodal_embeddings]
        input_ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
        token, keep = self.config.image_token_index, self.plan.stage1.keep
        positions, delta = prompt_positions(input_ids, token, keep, self.full_tokens, self.original_positions)
        if self.original_positions and multimodal_embeddings:
            raster = torch.cat([embedding[:, -RASTER_CHANNELS:] for embedding in multimodal_embeddings]).round().long()
            indices = (raster[:, 0] * self.grid[1] + raster[:, 1]).cpu()
            positions = kept_positions(positions, input_ids, token, keep, num_computed_tokens, indices)
        updated = mrope_positions.clone()
        updated[:, num_computed_tokens : len(input_ids)] = positions[num_computed_tokens:].to(updated.device)
        return embeddings, updated, delta

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ):
        # M-RoPE positions arrive as (3, tokens) with equal rows; the Llama LLM takes the 1-D row
        if positions.dim() == 2:
            positions = positions[0]
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
