"""What Nüwa needs to know about Qwen3-VL (HF `Qwen3VLForConditionalGeneration`, and the MoE variant
`Qwen3VLMoeForConditionalGeneration`), beyond Qwen2-VL.

- The vision tower is Qwen2-VL's in shape (2-D RoPE blocks, full attention everywhere, a 2x2 merger after the
  projector, no CLS): stage 1 scores a merged token by the attention its patches *receive* (models/scoring.py).
- DeepStack: the mergers of a few vision blocks (`deepstack_visual_indexes`) give every merged token one more
  feature per early LLM layer, added to its hidden state after LLM layers 0 .. k-1 (the model's own
  `_deepstack_process`). Nüwa gathers them at exactly the kept set of the main tokens (hard), or keeps them all
  beside the soft keep bias, and adds them to the kept tokens' columns of the pruned sequence (the handle's
  layer post-hooks). They are gathered, not aggregated: a kept anchor's main feature folds its neighbours in,
  its DeepStack features stay its own. Stage 2 must start after the last DeepStack layer.
- Positions: Qwen3-VL's own `get_rope_index` ((t, h, w) of the unpruned sequence; an image advances the text
  position by max(h, w) merged cells), gathered at the kept columns; the LM rotates them interleaved
  (`mrope_interleaved`), which its rotary embedding does itself from the ids.
- The LM is Qwen3: per-head RMS norms of queries and keys before RoPE (stage 2 recomputes them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

from .common import LLM_LORA_PATTERN
from .qwen2_vl import QwenVLAdapter


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL and Qwen3-VL-MoE: Qwen2-VL's dynamic-resolution ViT and M-RoPE, plus DeepStack features and a
    QK-norm LM. The MoE variant differs only inside the LM's MLPs (experts), which Nüwa never reads; its experts are
    fused parameters, not linear layers, so LoRA adapts its attention (and any dense MLP layers)."""

    model_classes = (Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration)
    rotary_vision = staticmethod(apply_rotary_pos_emb_vision)

    def __init__(self, model: Qwen3VLForConditionalGeneration):
        super().__init__(model)
        self.injected_layers = len(model.config.vision_config.deepstack_visual_indexes)

    def layer_tokens(self, vision_output) -> torch.Tensor:
        """(M, k, D_text) every merged token's DeepStack features, in the order of the main merger's output."""
        return torch.stack(vision_output.deepstack_features, dim=1)

    def head_norms(self, attention: nn.Module) -> tuple[Callable, Callable]:
        return attention.q_norm, attention.k_norm

    def lora_target_pattern(self, include_vision: bool) -> str:
        """peft `target_modules` regex: LLM projections, plus every vision block (all feed a merger)."""
        if not include_vision:
            return LLM_LORA_PATTERN
        return rf"{LLM_LORA_PATTERN}|model\.visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.linear_fc(1|2))"
