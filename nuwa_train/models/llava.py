"""What Nüwa needs to know about the LLaVA-1.5 family (HF `LlavaForConditionalGeneration`).

Everything model-specific lives here: where the vision tower, projector and decoder layers are, how
the stage-1 saliency is read (the CLS-query row of the feature layer, from its own q/k projections,
so the tower keeps running SDPA), and how a decoder layer's queries/keys are formed for stage 2.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from ..pruning import NuwaConfig
from .base import Adapter, UnsupportedModelError, VisionEncoding


class LlavaAdapter(Adapter):
    """LLaVA-1.5: CLIP tower (CLS + square patch grid), MLP projector, Llama-family LM."""

    model_classes = (LlavaForConditionalGeneration,)

    def __init__(self, model: LlavaForConditionalGeneration):
        config = model.config
        if config.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}: Nüwa needs the patch grid "
                f"without the CLS feature ('default')")
        if not isinstance(config.vision_feature_layer, int):
            raise UnsupportedModelError(f"vision_feature_layer={config.vision_feature_layer!r}: only a single "
                                        f"feature layer is supported")
        self.model = model
        vision = config.vision_config
        side = vision.image_size // vision.patch_size
        self.grid = (side, side)
        self.num_vision_layers = vision.num_hidden_layers
        self.feature_index = config.vision_feature_layer % (self.num_vision_layers + 1)
        if self.feature_index == 0:
            raise UnsupportedModelError("vision_feature_layer points at the embeddings; no attention to score with")
        self.image_token_id = config.image_token_index

    # ----------------------------------------------------------------------------------- modules
    @property
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(tokens)

    def lora_target_pattern(self, include_vision: bool) -> str:
        """peft `target_modules` regex: LLM projections, plus the vision layers that feed the features.

        Vision layers after the feature layer never receive a gradient (and would break plain DDP).
        """
        llm = r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
        if not include_vision:
            return llm
        layers = "|".join(str(i) for i in range(self.feature_index))
        return rf"{llm}|model\.vision_tower\.encoder\.layers\.({layers})\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))"

    def blank_image(self, device: torch.device) -> tuple[int, dict]:
        vision = self.model.config.vision_config
        pixels = torch.zeros(1, vision.num_channels, vision.image_size, vision.image_size, device=device)
        return self.grid[0] * self.grid[1], {"pixel_values": pixels}

    # ----------------------------------------------------------------------------------- stage 1
    def encode(self, pixel_values: torch.Tensor, config: NuwaConfig, **unused) -> list[VisionEncoding]:
        hidden = self.vision_hidden_states(pixel_values)
        with self.timer("saliency"):
            return [self.read_encoding(hidden, config)]

    def vision_hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the tower once per distinct image, keeping every layer's hidden states (CLS first).

        Records that ask about the same image share its pass (and sum their gradients through it).
        """
        tower = self.vision_tower
        pixel_values = pixel_values.to(dtype=next(tower.parameters()).dtype)
        distinct, copies = torch.unique(pixel_values.flatten(1), dim=0, return_inverse=True)
        if len(distinct) == len(pixel_values):
            return tower(pixel_values, output_hidden_states=True).hidden_states
        hidden = tower(distinct.view(-1, *pixel_values.shape[1:]), output_hidden_states=True).hidden_states
        return tuple(states[copies] for states in hidden)

    def read_encoding(self, hidden: tuple[torch.Tensor, ...], config: NuwaConfig) -> VisionEncoding:
        """Features, similarity features and CLS saliency, read from the tower's hidden states."""
        features = hidden[self.feature_index][:, 1:]
        if features.shape[1] != self.grid[0] * self.grid[1]:
            raise UnsupportedModelError(f"the tower returned {features.shape[1]} patches, not the "
                                        f"{self.grid[0]}x{self.grid[1]} grid its config implies")
        low, high = config.sim_layers
        first = max(1, round(low * self.num_vision_layers))
        last = max(first, round(high * self.num_vision_layers))
        sim_features = torch.stack(hidden[first:last + 1]).mean(0)[:, 1:]
        scores = self._cls_attention(hidden[self.feature_index - 1])
        return VisionEncoding(features, sim_features, scores, self.grid)

    def _cls_attention(self, layer_input: torch.Tensor) -> torch.Tensor:
        """Attention of the CLS query to every patch in the feature layer, summed over heads."""
        layer = self.vision_tower.encoder.layers[self.feature_index - 1]
        attn = layer.self_attn
        normed = layer.layer_norm1(layer_input)
        batch, length, _ = normed.shape
        query = attn.q_proj(normed[:, :1]).view(batch, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        keys = attn.k_proj(normed).view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        probs = ((query @ keys.transpose(-1, -2)) * attn.scale).float().softmax(dim=-1)  # (B, heads, 1, N+1)
        return probs[:, :, 0, 1:].sum(dim=1)
