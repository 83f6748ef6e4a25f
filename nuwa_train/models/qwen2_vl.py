"""What Nüwa needs to know about Qwen2-VL and Qwen2.5-VL (HF `Qwen2VLForConditionalGeneration`,
`Qwen2_5_VLForConditionalGeneration`).

- No CLS token: the stage-1 score of a merged token is the attention its four patches *receive*
  (mean over heads and queries) in one full-attention vision block, recomputed from that block's
  own q/k so the tower keeps its attention kernel.
- Selection happens after the projector: the aggregated features are the merger outputs, on the
  merged grid (h/2, w/2), padded to whole stage-1 regions with edge copies that are never kept.
- Qwen2.5-VL runs its blocks in window order; every per-patch quantity is put back in raster order
  before anything spatial happens.
- Positions are M-RoPE (3, B, L) ids of the *unpruned* sequence, gathered at the kept columns.
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict

import torch
from torch import nn
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision
from transformers.processing_utils import ProcessorMixin

from ..pruning import NuwaConfig
from .base import Adapter, ImageEncoding, NuwaInputError, Timer, UnsupportedModelError, VisionEncoding, no_timer
from .common import LLM_LORA_PATTERN, pad_to_regions, similarity_layers
from .scoring import padding_scores, received_attention


class Qwen2VLImageProcessorOnly(Qwen2VLProcessor):
    """`Qwen2VLProcessor` without its video processor, which needs torchvision (not installable here
    next to a CPU torch). Images, chat template and `mm_token_type_ids` behave as upstream."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def image_only_processors(*upstream_names: str) -> dict[str, type]:
    """The processor classes to load instead of the ones a processor_config.json names: ours always, and in place
    of the upstream Qwen-VL processors on a machine without torchvision (their video half needs it)."""
    replaced = upstream_names if importlib.util.find_spec("torchvision") is None else ()
    return {name: Qwen2VLImageProcessorOnly for name in (Qwen2VLImageProcessorOnly.__name__, *replaced)}


class QwenVLAdapter(Adapter):
    """Qwen2-VL / Qwen2.5-VL: ViT with 2-D RoPE and 2x2 patch merger, dynamic resolution, M-RoPE LM."""

    model_classes = (Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration)
    grid = None  # every image has its own grid
    multimodal_positions = True
    projector_name = "merger"
    image_input_names = ("image_grid_thw",)
    rotary_vision = staticmethod(apply_rotary_pos_emb_vision)  # the tower's own 2-D RoPE of queries and keys

    def __init__(self, model):
        super().__init__(model, model.config.image_token_id)
        config = model.config
        vision = config.vision_config
        self.merge = vision.spatial_merge_size
        self.unit = self.merge**2
        self.num_blocks = vision.depth
        self.windowed = isinstance(model, Qwen2_5_VLForConditionalGeneration)
        self.full_attention_blocks = (
            list(getattr(vision, "fullatt_block_indexes", None) or range(self.num_blocks))
            if self.windowed
            else list(range(self.num_blocks))
        )

    # ----------------------------------------------------------------------------------- modules
    @property
    def visual(self) -> nn.Module:
        return self.model.model.visual

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens  # the features already are the merger (projector) outputs

    def lora_target_pattern(self, include_vision: bool) -> str:
        """peft `target_modules` regex: LLM projections, plus every vision block (all feed the merger)."""
        if not include_vision:
            return LLM_LORA_PATTERN
        mlp = r"mlp\.(gate|up|down)_proj" if self.windowed else r"mlp\.fc(1|2)"
        return rf"{LLM_LORA_PATTERN}|model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|{mlp})"

    def blank_image(self, device: torch.device) -> tuple[int, dict]:
        vision = self.model.config.vision_config
        side = self.merge * 2  # the smallest even merged grid: 2x2 merged tokens
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.zeros(side * side, patch_dim, device=device)
        grid = torch.tensor([[1, side, side]], device=device)
        return side * side // self.unit, {"pixel_values": pixels, "image_grid_thw": grid}

    def token_inputs(self, input_ids: torch.Tensor) -> dict:
        return {"mm_token_type_ids": (input_ids == self.image_token_id).to(torch.int32)}

    # ----------------------------------------------------------------------------------- positions
    def position_ids(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, inputs: dict, image_inputs: dict
    ) -> torch.Tensor:
        """(3, B, L) M-RoPE ids of the unpruned sequence.

        The model's own `rope_deltas` are left alone: the handle passes explicit positions at prefill and
        at every decode step, and `generate` computes its own deltas from the unpruned prompt.
        """
        token_types = inputs.get("mm_token_type_ids")
        if token_types is None:
            raise NuwaInputError(
                "mm_token_type_ids is missing: without it Qwen-VL silently falls back to 1-D positions (the processor "
                "returns it; or pass (input_ids == image_token_id) as int)"
            )
        given = inputs.get("position_ids")
        if given is not None:
            if given.dim() != 3 or given.shape[0] not in (3, 4):
                raise NuwaInputError(
                    f"position_ids of shape {tuple(given.shape)}: Qwen-VL needs (3, B, L) M-RoPE ids "
                    f"(or none, to compute them)"
                )
            return given[-3:]
        grid = image_inputs.get("image_grid_thw", inputs.get("image_grid_thw"))
        positions, _ = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=token_types, image_grid_thw=grid, attention_mask=attention_mask
        )
        return positions

    def decode_positions(self, positions: torch.Tensor) -> torch.Tensor:
        return positions.unsqueeze(0).expand(3, -1, -1)

    def prune_inputs(self, inputs: dict, source: torch.Tensor) -> None:
        if inputs.get("pixel_values_videos") is not None or inputs.get("video_grid_thw") is not None:
            raise NuwaInputError("videos are not supported by Nüwa yet; pass images only")
        for name in ("mm_token_type_ids", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
            inputs.pop(name, None)

    # ----------------------------------------------------------------------------------- stage 1
    def encode(
        self,
        pixel_values: torch.Tensor,
        config: NuwaConfig,
        timer: Timer = no_timer,
        image_grid_thw: torch.Tensor | None = None,
        **unused,
    ) -> ImageEncoding:
        if image_grid_thw is None:
            raise NuwaInputError("Qwen-VL images need image_grid_thw next to pixel_values (the processor returns it)")
        if (image_grid_thw[:, 0] != 1).any():
            raise NuwaInputError("image_grid_thw has a temporal size > 1 (video frames): Nüwa prunes images only")
        block_index = self._score_block(config)
        sim_blocks = self._sim_blocks(config)
        captured, outputs = {}, {}

        def grab_input(module, args, kwargs):
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["kwargs"] = kwargs

        def keep_output(index):
            return lambda module, args, output: outputs.__setitem__(index, output)

        blocks = self.visual.blocks
        hooks = [blocks[block_index].register_forward_pre_hook(grab_input, with_kwargs=True)]
        hooks += [blocks[i].register_forward_hook(keep_output(i)) for i in sim_blocks]
        try:
            output = self.visual(pixel_values.to(self.visual.dtype), grid_thw=image_grid_thw)
        finally:
            for hook in hooks:
                hook.remove()
        with timer("saliency"):
            received = self._received_attention(blocks[block_index], captured["hidden"], captured["kwargs"])
            sim = torch.stack([outputs[i] for i in sim_blocks]).mean(0)
            if self.windowed:
                raster = self._raster_order(image_grid_thw)
                received, sim = received.view(-1, self.unit)[raster], sim.view(-1, self.unit, sim.shape[-1])[raster]
            scores = received.reshape(-1, self.unit).mean(1)  # (M,) one score per merged token, raster order
            sim = sim.reshape(-1, self.unit, sim.shape[-1]).mean(1)
            return ImageEncoding(
                self._group_by_grid(
                    output.pooler_output, sim, scores, image_grid_thw, config.region_size, self.layer_tokens(output)
                )
            )

    def layer_tokens(self, vision_output) -> torch.Tensor | None:
        """(M, k, D_text) per merged token: what the LLM's first k layers add to it (none for Qwen2/2.5-VL)."""
        return None

    def _score_block(self, config: NuwaConfig) -> int:
        if config.score_block is None:
            return self.full_attention_blocks[-1]
        block = config.score_block % self.num_blocks
        if block not in self.full_attention_blocks:
            raise UnsupportedModelError(
                f"score_block={config.score_block} is a window-attention block; choose one of "
                f"the full-attention blocks {self.full_attention_blocks}"
            )
        return block

    def _sim_blocks(self, config: NuwaConfig) -> list[int]:
        """Blocks whose outputs are averaged for similarity (the config's fractions of depth)."""
        return [
            index - 1 for index in similarity_layers(config.sim_layers, self.num_blocks)
        ]  # block i outputs state i+1

    def _received_attention(self, block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """(S,) attention each patch receives in `block`, mean over heads and queries of its own image."""
        attn = block.attn
        length = hidden.shape[0]
        qkv = attn.qkv(block.norm1(hidden)).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
        cos, sin = kwargs["position_embeddings"]
        query, key = self.rotary_vision(qkv[0], qkv[1], cos, sin)
        return received_attention(
            query.transpose(0, 1), key.transpose(0, 1), kwargs["cu_seqlens"].tolist(), attn.scaling
        )

    def _raster_order(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """Index that puts Qwen2.5-VL's window-ordered merge units back in raster order."""
        from transformers.vision_utils import get_vision_window_index

        vision = self.model.config.vision_config
        window_index, _ = get_vision_window_index(
            grid_thw, spatial_merge_size=self.merge, window_size=vision.window_size, patch_size=vision.patch_size
        )
        return torch.argsort(window_index.to(grid_thw.device))

    def _group_by_grid(
        self,
        merged: torch.Tensor,
        sim: torch.Tensor,
        scores: torch.Tensor,
        grid_thw: torch.Tensor,
        region: int,
        layer_tokens: torch.Tensor | None = None,
    ) -> list[VisionEncoding]:
        """One encoding per merged grid size (images of one size are batched), padded to whole regions."""
        counts = (grid_thw[:, 1] * grid_thw[:, 2] // self.unit).tolist()
        starts = [sum(counts[:i]) for i in range(len(counts))]
        groups = defaultdict(list)
        for image, (_, height, width) in enumerate(grid_thw.tolist()):
            groups[(height // self.merge, width // self.merge)].append(image)
        encodings = []
        for (rows, cols), images in groups.items():
            raster = torch.arange(rows * cols, device=merged.device).view(rows, cols)
            ids, offsets, padded = pad_to_regions(raster, raster, region)
            parts = [starts[i] + ids for i in images]  # each image's merged tokens on its padded grid
            encodings.append(
                VisionEncoding(
                    features=torch.stack([merged[p] for p in parts]),
                    sim_features=torch.stack([sim[p] for p in parts]),
                    scores=padding_scores(torch.stack([scores[p] for p in parts]), offsets >= 0),
                    grid=padded,
                    images=torch.tensor(images),
                    placeholder_offsets=None if padded == (rows, cols) else offsets,
                    placeholder_count=rows * cols,
                    layer_features=None if layer_tokens is None else torch.stack([layer_tokens[p] for p in parts]),
                )
            )
        return encodings
