"""What Nüwa needs to know about the LLaVA-1.5 family (HF `LlavaForConditionalGeneration`).

Everything model-specific lives here: where the vision tower, projector and decoder layers are, how
the stage-1 saliency is read (the CLS-query row of the feature layer, from its own q/k projections,
so the tower keeps running SDPA), and how a decoder layer's queries/keys are formed for stage 2.
`ClipVision` is the CLIP half, which LLaVA-NeXT composes too.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration

from ..pruning import NuwaConfig
from .base import Adapter, ImageEncoding, Timer, UnsupportedModelError, VisionEncoding, no_timer
from .common import LLM_LORA_PATTERN, similarity_layers
from .scoring import clip_cls_attention


class ClipVision:
    """A LLaVA-style CLIP tower as stage 1 reads it: features of one layer, similarity, CLS saliency."""

    def __init__(self, model: nn.Module):
        config = model.config
        if config.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(
                f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}: Nüwa needs the patch grid "
                f"without the CLS feature ('default')"
            )
        if not isinstance(config.vision_feature_layer, int):
            raise UnsupportedModelError(
                f"vision_feature_layer={config.vision_feature_layer!r}: only a single feature layer is supported"
            )
        self.model = model
        vision = config.vision_config
        self.side = vision.image_size // vision.patch_size  # every image (or tile) is a side x side patch grid
        self.num_layers = vision.num_hidden_layers
        self.feature_index = config.vision_feature_layer % (self.num_layers + 1)
        if self.feature_index == 0:
            raise UnsupportedModelError("vision_feature_layer points at the embeddings; no attention to score with")

    @property
    def tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def hidden_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the tower once per distinct image, keeping every layer's hidden states (CLS first).

        Records that ask about the same image share its pass (and sum their gradients through it).
        """
        tower = self.tower
        pixel_values = pixel_values.to(dtype=next(tower.parameters()).dtype)
        distinct, copies = torch.unique(pixel_values.flatten(1), dim=0, return_inverse=True)
        if len(distinct) == len(pixel_values):
            return tower(pixel_values, output_hidden_states=True).hidden_states
        hidden = tower(distinct.view(-1, *pixel_values.shape[1:]), output_hidden_states=True).hidden_states
        return tuple(states[copies] for states in hidden)

    def features(self, hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(n, side^2, D) the feature layer's patches: what the projector receives."""
        features = hidden[self.feature_index][:, 1:]
        if features.shape[1] != self.side**2:
            raise UnsupportedModelError(
                f"the tower returned {features.shape[1]} patches, not the "
                f"{self.side}x{self.side} grid its config implies"
            )
        return features

    def sim_features(self, hidden: tuple[torch.Tensor, ...], config: NuwaConfig) -> torch.Tensor:
        """(n, side^2, D) the mean patch states of the configured layers, for similarity."""
        layers = similarity_layers(config.sim_layers, self.num_layers)
        return torch.stack(hidden[layers.start : layers.stop]).mean(0)[:, 1:]

    def cls_scores(self, hidden: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(n, side^2) attention of the CLS query to every patch in the feature layer, summed over heads."""
        layer = self.tower.encoder.layers[self.feature_index - 1]
        return clip_cls_attention(layer, hidden[self.feature_index - 1])[:, :, 1:].sum(dim=1)

    def lora_target_pattern(self) -> str:
        """The vision layers that feed the features; later ones never get a gradient (and break plain DDP)."""
        layers = "|".join(str(i) for i in range(self.feature_index))
        return rf"model\.vision_tower\.encoder\.layers\.({layers})\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))"

    def blank_pixels(self, device: torch.device, *leading: int) -> torch.Tensor:
        vision = self.model.config.vision_config
        return torch.zeros(*leading, vision.num_channels, vision.image_size, vision.image_size, device=device)


class LlavaAdapter(Adapter):
    """LLaVA-1.5: CLIP tower (CLS + square patch grid), MLP projector, Llama-family LM."""

    model_classes = (LlavaForConditionalGeneration,)

    def __init__(self, model: LlavaForConditionalGeneration):
        super().__init__(model, model.config.image_token_index)
        self.clip = ClipVision(model)
        self.grid = (self.clip.side, self.clip.side)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(tokens)

    def lora_target_pattern(self, include_vision: bool) -> str:
        return f"{LLM_LORA_PATTERN}|{self.clip.lora_target_pattern()}" if include_vision else LLM_LORA_PATTERN

    def blank_image(self, device: torch.device) -> tuple[int, dict]:
        return self.grid[0] * self.grid[1], {"pixel_values": self.clip.blank_pixels(device, 1)}

    def encode(
        self, pixel_values: torch.Tensor, config: NuwaConfig, timer: Timer = no_timer, **unused
    ) -> ImageEncoding:
        clip = self.clip
        hidden = clip.hidden_states(pixel_values)
        with timer("saliency"):
            encoding = VisionEncoding(
                clip.features(hidden), clip.sim_features(hidden, config), clip.cls_scores(hidden), self.grid
            )
        return ImageEncoding([encoding])
