"""Attach Nüwa pruning to one loaded HF VLM instance, ToMe-style, and take it off again.

Nothing global is patched. `attach_nuwa(model)` changes that instance only:
- its `get_image_features` (the entry point `generate` uses to pre-encode images) returns the
  stage-1 tokens: selection is purely visual, so it happens where HF encodes images;
- a pre-hook on the model runs the vision tower once, selects/aggregates the stage-1 tokens and
  hands the LLM a *physically shorter* sequence (inputs_embeds) whose kept vision tokens carry their
  original position ids, with an explicit 2-D mask (gapped positions without a mask would be read as
  packed sequences in transformers 5.x); on decode steps it maps the caller's unpruned mask and
  positions onto the pruned KV cache;
- pre-hooks on decoder layers L2-1 .. L run stage 2: one attention row is recomputed at L2-1, the
  vision tokens are dropped before L2, and the later layers get the matching positions, rotary
  tables and masks (sized against their own, shorter, KV cache);
- a post-hook computes the loss on the pruned sequence when labels are given.
Training modes (`handle.set_selection`): "soft" keeps every token and biases attention by log p of
a differentiable top-k (stage 1 from the first layer, stage 2 from L2), "straight_through" uses the
hard masks forward and the soft gradient backward; both tend to "hard" as the temperature -> 0.
All per-call state lives in one small `NuwaHandle`; `handle.detach()` restores the model exactly.
"""

from __future__ import annotations

import inspect
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.utils import ModelOutput

from ..pruning import (
    SOFT_METHODS,
    NuwaConfig,
    NuwaConfigError,
    Stage1Output,
    last_token_attention,
    run_stage1,
    run_stage1_soft,
    select_top,
)
from ..pruning.config import PruningPlan
from ..pruning.soft import (
    gumbel_like,
    log_keep,
    soft_topk,
    straight_through,
)
from .base import NuwaInputError, UnsupportedModelError, VisionEncoding
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .qwen2_vl import QwenVLAdapter

ADAPTERS = (LlavaAdapter, LlavaNextAdapter, QwenVLAdapter)
IGNORE_INDEX = -100
SELECTION_MODES = ("hard", "soft", "straight_through")
# transformers 5.24 renamed the KV-cache argument `past_key_values` to `cache` (models, layers, masks).
CACHE_KWARGS = ("cache", "past_key_values")
MASK_CACHE_KWARG = next(name for name in CACHE_KWARGS if name in inspect.signature(create_causal_mask).parameters)


def _cache_in(kwargs: dict):
    """The KV cache a forward or layer call received, under either of its transformers 5.x names."""
    return next((kwargs[name] for name in CACHE_KWARGS if kwargs.get(name) is not None), None)


@dataclass
class NuwaImageFeatures(ModelOutput):
    """Stage-1 output in the place of HF's image features (what `generate` pre-encodes)."""

    pooler_output: torch.Tensor | None = None  # (images, K, D_text) projected kept tokens (zero rows pad)
    kept_indices: torch.Tensor | None = None  # (images, K) offsets into each image's placeholder run, ascending;
    #                                            -1 pads images that keep fewer (grids of different sizes)
    pillars: torch.Tensor | None = None  # (images, K) bool, Nüwa only
    keep_bias: torch.Tensor | None = None  # (images, K) attention bias log p (soft / straight-through only)
    anchor_indices: torch.Tensor | None = None  # (images, K1) hard anchors (soft / straight-through only)
    placeholder_counts: torch.Tensor | None = None  # (images,) image placeholders of each unpruned image
    image_inputs: dict | None = None  # what the encoder got besides pixel_values (e.g. image_grid_thw)
    stage2_keep: torch.Tensor | None = None  # (images,) stage-2 budget of each image (0 without stage 2)

    @property
    def kept(self) -> torch.Tensor:
        """(images, K) bool: which entries of `kept_indices` are real (not padding)."""
        return self.kept_indices >= 0


@dataclass
class Stage2Layout:
    source: torch.Tensor  # (B, L2) index into the stage-1 sequence, -1 for inserted padding
    attention_mask: torch.Tensor  # (B, L2)
    kept_vision: torch.Tensor  # (B, L1) bool (hard) or keep probability (soft) of the stage-1 vision tokens


@dataclass
class PrefillLayout:
    """How the pruned prefill maps onto the caller's unpruned sequence; kept for decoding."""

    source: torch.Tensor  # (B, L1) index into the unpruned input, -1 for inserted padding
    attention_mask: torch.Tensor  # (B, L1)
    position_ids: torch.Tensor  # (B, L1)
    is_vision: torch.Tensor  # (B, L1) bool
    prompt_end: torch.Tensor  # (B,) index in L1 of the last prompt token (stage-2 query)
    images_per_sample: torch.Tensor  # (B,)
    input_length: int  # unpruned prompt length L
    next_position: torch.Tensor  # (B,) position id of the first token after the prompt
    selection: NuwaImageFeatures  # stage-1 indices per image (into its grid), for inspection
    stage2_budget: torch.Tensor  # (B,) vision tokens each sample keeps from the stage-2 layer on
    labels: torch.Tensor | None = None  # (B, L1)
    stage2: Stage2Layout | None = None

    def token_map(self) -> torch.Tensor:
        """(B, L_final) index into the unpruned input of every output position (-1 for padding)."""
        if self.stage2 is None:
            return self.source
        mapped = self.source.gather(1, self.stage2.source.clamp(min=0))
        return mapped.masked_fill(self.stage2.source < 0, -1)


def compact(keep: torch.Tensor) -> torch.Tensor:
    """(B, L') source indices of the kept positions in order, left-padded with -1 to the longest row.

    Left padding keeps every row's last token last, which generation relies on.
    """
    counts = keep.sum(dim=1)
    length = int(counts.max())
    kept_first = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :max(length, 1)]
    slot = torch.arange(length, device=keep.device) - (length - counts).unsqueeze(1)
    return torch.where(slot >= 0, kept_first.gather(1, slot.clamp(min=0)), torch.full_like(slot, -1))


def _gather_rows(values: torch.Tensor, source: torch.Tensor, fill=0) -> torch.Tensor:
    """values (B, L, ...) gathered along dim 1 at `source` (B, L'); -1 entries become `fill`."""
    index = source.clamp(min=0)
    if values.dim() == 2:
        return values.gather(1, index).masked_fill(source < 0, fill)
    expanded = index.view(*index.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    return values.gather(1, expanded).masked_fill((source < 0).view(*source.shape, *([1] * (values.dim() - 2))), fill)


def _gather_positions(positions: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) or multimodal (C, B, L) gathered at `source` (B, L'); padding gets 0."""
    if positions.dim() == 2:
        return _gather_rows(positions.expand(source.shape[0], -1), source)
    return torch.stack([_gather_rows(p.expand(source.shape[0], -1), source) for p in positions])


def _next_position(positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) the position id of the first generated token: one past the largest prompt position."""
    largest = (positions * mask).amax(dim=-1)
    return (largest if largest.dim() == 1 else largest.amax(dim=0)) + 1


@dataclass
class _Selection:
    """Stage-1 result for one group of same-grid images, before it is laid out per image."""

    encoding: VisionEncoding
    plan: PruningPlan
    tokens: torch.Tensor  # (n, K, D_text) projected
    indices: torch.Tensor  # (n, K) grid indices, ascending
    pillars: torch.Tensor | None = None
    keep_bias: torch.Tensor | None = None
    anchors: torch.Tensor | None = None


def _assemble(selections: list[_Selection], extra_tokens=None) -> NuwaImageFeatures:
    """Lay the groups' selections out per image, in image order, as ascending placeholder offsets.

    One group of same-grid images covering every image (LLaVA-1.5) is laid out as it is. Otherwise
    (images of different sizes, several grids per image, padded grids) each image collects its
    segments' kept tokens, drops grid padding, adds the adapter's `extra_tokens` (e.g. LLaVA-NeXT's
    row newlines) and sorts by offset; images keeping fewer tokens are padded with -1 / zeros.
    """
    only = selections[0]
    if len(selections) == 1 and only.encoding.images is None and only.encoding.placeholder_offsets is None \
            and extra_tokens is None:
        n, device = only.indices.shape[0], only.indices.device
        stage2 = only.plan.stage2.keep if only.plan.stage2 is not None else 0
        return NuwaImageFeatures(pooler_output=only.tokens, kept_indices=only.indices, pillars=only.pillars,
                                 keep_bias=only.keep_bias, anchor_indices=only.anchors,
                                 placeholder_counts=torch.tensor(only.encoding.placeholders_per_image(), device=device),
                                 stage2_keep=torch.full((n,), stage2, device=device))
    parts: dict[int, list] = defaultdict(list)
    placeholders, stage2_keep = {}, defaultdict(int)
    soft = only.keep_bias is not None
    for s in selections:
        encoding = s.encoding
        images = encoding.images.tolist() if encoding.images is not None else range(s.indices.shape[0])
        offsets = s.indices if encoding.placeholder_offsets is None else encoding.placeholder_offsets[s.indices]
        counts = encoding.placeholders_per_image()
        for row, image in enumerate(images):
            real = offsets[row] >= 0
            pillars = s.pillars[row][real] if s.pillars is not None else torch.zeros_like(offsets[row][real], dtype=bool)
            bias = s.keep_bias[row][real] if soft else None
            parts[image].append((offsets[row][real], s.tokens[row][real], pillars, bias))
            placeholders[image] = counts[row]
            stage2_keep[image] += s.plan.stage2.keep if s.plan.stage2 is not None else 0
    num_images = len(parts)
    if sorted(parts) != list(range(num_images)):
        raise RuntimeError(f"the adapter's encodings cover images {sorted(parts)}, not 0..{num_images - 1}")
    laid_out = []
    for image in range(num_images):
        offsets, tokens, pillars, bias = (list(column) for column in zip(*parts[image]))
        if extra_tokens is not None:
            # soft: every token is present; the adapter turns their keep probabilities into the extras' bias
            keep = torch.cat(bias).float().exp() if soft else None
            extra = extra_tokens(image, torch.cat(offsets)) if keep is None else \
                extra_tokens(image, torch.cat(offsets), keep)
            if extra is not None:
                offsets.append(extra[0])
                tokens.append(extra[1].to(tokens[0].dtype))
                pillars.append(torch.zeros_like(extra[0], dtype=torch.bool))
                if soft:
                    bias.append(extra[2].to(bias[0].dtype))
        offsets = torch.cat(offsets)
        order = torch.argsort(offsets)
        laid_out.append((offsets[order], torch.cat(tokens)[order], torch.cat(pillars)[order],
                         torch.cat(bias)[order] if soft else None))
    width = max(len(offsets) for offsets, *_ in laid_out)
    pooler = only.tokens.new_zeros(num_images, width, only.tokens.shape[-1])
    kept = torch.full((num_images, width), -1, dtype=torch.long, device=pooler.device)
    pillars = torch.zeros(num_images, width, dtype=torch.bool, device=pooler.device)
    bias = only.tokens.new_zeros(num_images, width) if soft else None
    for image, (offsets, tokens, image_pillars, image_bias) in enumerate(laid_out):
        k = len(offsets)
        pooler[image, :k], kept[image, :k], pillars[image, :k] = tokens, offsets, image_pillars
        if soft:
            bias[image, :k] = image_bias.to(bias.dtype)
    return NuwaImageFeatures(pooler_output=pooler, kept_indices=kept,
                             pillars=pillars if only.pillars is not None else None, keep_bias=bias,
                             placeholder_counts=torch.tensor([placeholders[i] for i in range(num_images)],
                                                             device=pooler.device),
                             stage2_keep=torch.tensor([stage2_keep[i] for i in range(num_images)], device=pooler.device))


class NuwaHandle:
    """The state and hooks of Nüwa on one model instance. Use `detach()` (or `with`) to remove."""

    def __init__(self, model: nn.Module, adapter, config: NuwaConfig):
        self.model, self.adapter = model, adapter
        self.num_layers = len(adapter.decoder_layers)
        self.overhead_seconds: dict[str, float] = defaultdict(float)
        adapter.timer = self._timed
        self.mode, self.temperature, self.gumbel = "hard", 1.0, 0.0
        self._paused = False
        self._forward_params = list(inspect.signature(model.forward).parameters)
        self._encoder_owner = getattr(model, model.base_model_prefix)
        self._encoder_entry = self._make_encoder_entry()
        self._hooks: list = []
        self._install(config)

    def _install(self, config: NuwaConfig) -> None:
        """Plans, per-forward state and hooks for `config` (a stage-2 layer decides where hooks go)."""
        adapter, model = self.adapter, self.model
        self.config = config
        self._plans: dict[tuple, PruningPlan] = {}
        if config.position_mode != "original" and adapter.multimodal_positions:
            raise NuwaConfigError(f"position_mode={config.position_mode!r}: {type(model).__name__} uses multimodal "
                                  f"(M-RoPE) positions, which only 'original' keeps meaningful")
        reference = self.plan_for(adapter.grid or config.reference_grid)
        # One plan for fixed-grid models; dynamic-resolution models resolve a plan per image grid.
        self.plan: PruningPlan | None = reference if adapter.grid is not None else None
        self.stage2_layer = reference.stage2.layer if reference.stage2 is not None else None
        self.layout: PrefillLayout | None = None
        self._phase = "off"  # "prefill" | "decode" | "off" for the forward in flight
        self._soft_bias: torch.Tensor | None = None  # (B, L) stage-1 log p on vision columns, 0 elsewhere
        self._soft_bias2: torch.Tensor | None = None  # (B, L) the same for stage 2
        self._decode_columns: torch.Tensor | None = None
        self._stage2_kwargs: dict = {}
        self._generator = torch.Generator().manual_seed(config.seed)
        self._encoder_owner.get_image_features = self._encoder_entry
        self._hooks = [model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                       model.register_forward_hook(self._after_forward, with_kwargs=True)]
        if self.stage2_layer is not None:
            layers, first = adapter.decoder_layers, self.stage2_layer
            self._hooks.append(layers[first - 1].register_forward_pre_hook(self._score_stage2, with_kwargs=True))
            self._hooks.append(layers[first].register_forward_pre_hook(self._drop_stage2, with_kwargs=True))
            for layer in layers[first + 1:]:
                self._hooks.append(layer.register_forward_pre_hook(self._follow_stage2, with_kwargs=True))

    # ------------------------------------------------------------------------------- lifecycle
    def _uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._encoder_owner.__dict__.get("get_image_features") is self._encoder_entry:
            del self._encoder_owner.get_image_features
        self.layout = None

    def detach(self) -> None:
        self._uninstall()
        if getattr(self.model, "_nuwa", None) is self:
            del self.model._nuwa

    def use(self, config: NuwaConfig) -> None:
        """Prune with another setting from now on (method, budget, stage-2 layer ...), without detaching.

        The selection mode stays unless the new method cannot train soft, which falls back to "hard".
        """
        if self._paused:
            raise RuntimeError("use() inside paused(): leave the paused block first")
        previous = self.config
        self._uninstall()
        try:
            self._install(config)
        except BaseException:  # a setting that cannot work here (e.g. its plan fails): keep the old one
            self._install(previous)
            raise
        if self.mode != "hard" and config.method not in SOFT_METHODS:
            self.mode = "hard"

    @contextmanager
    def using(self, config: NuwaConfig, mode: str = "hard"):
        """Within the block, prune with `config` in `mode` (e.g. evaluate a training model's setting on the hard
        path); the previous setting and selection mode come back after it."""
        previous = (self.config, self.mode, self.temperature, self.gumbel)
        self.use(config)
        self.set_selection(mode)
        try:
            yield self
        finally:
            self.use(previous[0])
            self.set_selection(*previous[1:])

    def __enter__(self) -> NuwaHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _last_layout(self) -> PrefillLayout:
        if self.layout is None:
            raise RuntimeError("no prefill has run through this handle yet")
        return self.layout

    def stage1_vision_tokens(self) -> torch.Tensor:
        """Vision tokens the layers before stage 2 saw in the last prefill, summed over its images.

        Hard: the tokens on the sequence. Soft: the expected count, the sum of keep probabilities over real
        slots only; images that keep fewer tokens (mixed sizes) pad their rows, and padding is never kept.
        """
        layout = self._last_layout()
        selection = layout.selection
        if selection.keep_bias is not None:
            return selection.keep_bias.detach().float().exp()[selection.kept].sum()
        return layout.is_vision.sum().float()

    def vision_tokens_per_layer(self) -> torch.Tensor:
        """(num_layers,) vision tokens each decoder layer saw in the last prefill, summed over its images.

        Counted on the sequence (hard) or as expected counts (soft), so padding of odd grids and
        newline tokens are what the model really saw, not what a plan promised.
        """
        layout = self._last_layout()
        counts = torch.full((self.num_layers,), float(self.stage1_vision_tokens()))
        if layout.stage2 is not None:
            counts[self.stage2_layer:] = float(layout.stage2.kept_vision.detach().float().sum())
        return counts

    def _make_encoder_entry(self):
        """`get_image_features` for this instance, with a signature naming the adapter's image inputs.

        `generate` passes the encoder only the inputs its signature names (e.g. Qwen-VL's image_grid_thw).
        """
        def get_image_features(pixel_values, **image_inputs):
            return self.image_features(pixel_values, **image_inputs)

        keyword = inspect.Parameter.POSITIONAL_OR_KEYWORD
        get_image_features.__signature__ = inspect.Signature(
            [inspect.Parameter("pixel_values", keyword)]
            + [inspect.Parameter(name, keyword, default=None) for name in self.adapter.image_input_names]
            + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)])
        return get_image_features

    def plan_for(self, grid: tuple[int, int], real_tokens: int | None = None) -> PruningPlan:
        """The resolved budgets for one image grid (cached: dynamic-resolution batches repeat grids).

        `real_tokens` (grids padded to whole regions): the budget is a share of the real tokens only.
        """
        key = (tuple(int(side) for side in grid), real_tokens)
        if key not in self._plans:
            self._plans[key] = self.config.plan(key[0], self.num_layers, real_tokens)
        return self._plans[key]

    def set_selection(self, mode: str, temperature: float | None = None, gumbel: float | None = None) -> None:
        """Switch between "hard" (inference), "soft" and "straight_through" (training) selection."""
        if mode not in SELECTION_MODES:
            raise NuwaConfigError(f"selection mode {mode!r} must be one of {', '.join(SELECTION_MODES)}")
        if mode != "hard" and self.config.method not in SOFT_METHODS:
            raise NuwaConfigError(f"method={self.config.method!r} has no differentiable selection; use mode 'hard' "
                                  f"(soft modes exist for {', '.join(SOFT_METHODS)})")
        if temperature is not None and not temperature > 0:
            raise NuwaConfigError(f"temperature={temperature!r} must be > 0")
        self.mode = mode
        self.temperature = self.temperature if temperature is None else temperature
        self.gumbel = self.gumbel if gumbel is None else gumbel

    @contextmanager
    def paused(self):
        """Run the unpruned model (e.g. a distillation teacher) without detaching."""
        self._paused = True
        del self._encoder_owner.get_image_features
        try:
            yield
        finally:
            self._encoder_owner.get_image_features = self._encoder_entry
            self._paused = False

    @contextmanager
    def _timed(self, name: str):
        start = time.perf_counter()
        yield
        self.overhead_seconds[name] += time.perf_counter() - start

    # ------------------------------------------------------------------------------- model hooks
    def _before_forward(self, model, args, kwargs):
        if self._paused:
            self._phase = "off"
            return None
        kwargs = {**dict(zip(self._forward_params, args)), **kwargs}
        cache = _cache_in(kwargs)
        cached = cache.get_seq_length() if cache is not None else 0
        if cached > 0:
            if self.mode != "hard":
                raise NuwaInputError(f"selection mode {self.mode!r} is for training forwards; call "
                                     f"set_selection('hard') before generating")
            return (), self._decode(kwargs, cached)
        self.layout, self._phase = None, "off"
        input_ids, pixel_values = kwargs.pop("input_ids", None), kwargs.pop("pixel_values", None)
        images = (kwargs.pop("mm_encoder_outputs", None) or {}).get("image")
        image_inputs = {name: kwargs.pop(name) for name in self.adapter.image_input_names if name in kwargs}
        if pixel_values is not None:
            images = self.image_features(pixel_values, **image_inputs)
        elif images is not None and not isinstance(images, NuwaImageFeatures):
            raise NuwaInputError("pre-computed image features were not made by this Nüwa handle; pass pixel_values "
                                 "(generate with num_beams > 1 or num_return_sequences > 1 is not supported yet)")
        if images is None:
            if input_ids is not None and (input_ids == self.adapter.image_token_id).any():
                raise NuwaInputError("input_ids contain image tokens but no pixel_values were given")
            return (), {**kwargs, "input_ids": input_ids}
        if input_ids is None:
            raise NuwaInputError("Nüwa needs input_ids (to find the image tokens) when pixel_values are given")
        return (), self._prefill(kwargs, input_ids, images)

    def image_features(self, pixel_values: torch.Tensor, **image_inputs) -> NuwaImageFeatures:
        """Vision tower once, stage-1 selection/aggregation, projector: the pruned image tokens."""
        image_inputs = {k: v for k, v in image_inputs.items() if k in self.adapter.image_input_names}
        encodings = self.adapter.encode(pixel_values, self.config, **image_inputs)  # times its saliency part
        select = self._select_soft if self.mode != "hard" else self._select_hard
        features = _assemble([select(encoding) for encoding in encodings], self.adapter.extra_tokens)
        features.image_inputs = image_inputs
        return features

    def _select_hard(self, encoding: VisionEncoding) -> _Selection:
        plan = self.plan_for(encoding.grid, encoding.real_tokens)
        with self._timed("stage1"):
            if plan.stage1 is None:
                selection = Stage1Output(encoding.features, self._all_indices(encoding.features))
            else:
                selection = run_stage1(plan.stage1, self.config, encoding.features, encoding.sim_features,
                                       encoding.scores, encoding.grid, self._generator)
        return _Selection(encoding, plan, self.adapter.project(selection.tokens), selection.indices,
                          selection.pillars)

    def _select_soft(self, encoding: VisionEncoding) -> _Selection:
        """Every token, as it would be if kept, with its keep probability as an attention bias."""
        features, every = encoding.features, self._all_indices(encoding.features)
        plan = self.plan_for(encoding.grid, encoding.real_tokens)
        if plan.stage1 is None:
            return _Selection(encoding, plan, self.adapter.project(features), every, None,
                              torch.zeros(every.shape, device=features.device), every)
        noise = gumbel_like(encoding.scores) * self.gumbel if self.gumbel and self.model.training else None
        soft = run_stage1_soft(plan.stage1, self.config, features, encoding.sim_features, encoding.scores,
                               encoding.grid, self.temperature, noise)
        keep = soft.keep_prob
        if self.mode == "straight_through":
            keep = straight_through(keep, torch.zeros_like(keep).scatter_(1, soft.hard_indices, 1.0))
        return _Selection(encoding, plan, self.adapter.project(soft.tokens), every, None, log_keep(keep),
                          soft.hard_indices)

    @staticmethod
    def _all_indices(features: torch.Tensor) -> torch.Tensor:
        return torch.arange(features.shape[1], device=features.device).expand(features.shape[0], -1)

    def _after_forward(self, model, args, kwargs, output):
        labels = self.output_labels() if self._phase == "prefill" else None
        if labels is None:
            return output
        output.loss = model.loss_function(logits=output.logits, labels=labels,
                                          vocab_size=model.config.text_config.vocab_size)
        return output

    def output_labels(self) -> torch.Tensor | None:
        """The last prefill's labels aligned with its output logits (pruned columns, stage 2 included)."""
        layout = self.layout
        if layout is None or layout.labels is None:
            return None
        if layout.stage2 is not None:
            return _gather_rows(layout.labels, layout.stage2.source, IGNORE_INDEX)
        return layout.labels

    def _prefill(self, kwargs: dict, input_ids: torch.Tensor, images: NuwaImageFeatures) -> dict:
        batch, length = input_ids.shape
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        elif mask.dim() != 2:
            raise NuwaInputError(f"attention_mask must be 2-D (batch, length) for Nüwa, got shape {tuple(mask.shape)}")
        is_image = input_ids == self.adapter.image_token_id
        if not is_image.any():
            raise NuwaInputError(f"pixel_values were given but input_ids contain no image token "
                                 f"(id {self.adapter.image_token_id}); add the image placeholder to the prompt")
        counts = images.placeholder_counts.to(input_ids.device)
        images_per_sample = self._check_image_tokens(is_image, counts)

        # Placeholders are numbered image after image in reading order; keep the selected ones.
        slots = is_image.nonzero()
        starts = counts.cumsum(0) - counts
        chosen = (starts.unsqueeze(1) + images.kept_indices.clamp(min=0))[images.kept]
        keep = ~is_image
        keep[slots[chosen, 0], slots[chosen, 1]] = True
        source = compact(keep)

        # Positions of the unpruned sequence (M-RoPE for Qwen-VL), gathered at the kept columns.
        positions = self.adapter.position_ids(input_ids, mask, kwargs, images.image_inputs or {})
        text_ids = input_ids.masked_fill(is_image, 0)
        embeds = self.adapter.embed(_gather_rows(text_ids, source))
        is_vision = _gather_rows(is_image, source, False)
        embeds = embeds.masked_scatter(is_vision.unsqueeze(-1), images.pooler_output[images.kept].to(embeds.dtype))
        pruned_mask = _gather_rows(mask, source)
        if self.config.position_mode == "original":
            pruned_positions = _gather_positions(positions, source)
        else:
            pruned_positions = (pruned_mask.long().cumsum(1) - 1).clamp(min=0)
        self.adapter.prune_inputs(kwargs, source)

        labels = kwargs.pop("labels", None)
        self.layout = PrefillLayout(
            source=source, attention_mask=pruned_mask, position_ids=pruned_positions, is_vision=is_vision,
            prompt_end=self._prompt_end(mask, labels, source), images_per_sample=images_per_sample,
            input_length=length, next_position=_next_position(pruned_positions, pruned_mask),
            selection=images, stage2_budget=self._per_sample(images.stage2_keep, images_per_sample),
            labels=None if labels is None else _gather_rows(labels, source, IGNORE_INDEX))
        self._phase = "prefill"
        attention_mask, self._soft_bias = pruned_mask, None
        if images.keep_bias is not None:  # soft: all tokens stay, biased by log p
            self._soft_bias = torch.zeros(is_vision.shape, dtype=images.keep_bias.dtype, device=is_vision.device)
            self._soft_bias = self._soft_bias.masked_scatter(is_vision, images.keep_bias[images.kept])
            attention_mask = self._biased_mask(pruned_mask, self._soft_bias, embeds.dtype)
        kwargs.update(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=pruned_positions)
        return kwargs

    @staticmethod
    def _biased_mask(mask: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, L, L) additive mask: causal and padding as the float minimum, `bias` on key columns.

        Every query may see itself, so padded rows stay finite; such a mask works under SDPA and eager.
        """
        length = mask.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        allowed = (causal & mask.bool()[:, None, None, :]) | torch.eye(length, dtype=torch.bool, device=mask.device)
        return torch.where(allowed, bias[:, None, None, :].to(dtype), torch.finfo(dtype).min)

    @staticmethod
    def _per_sample(per_image: torch.Tensor, images_per_sample: torch.Tensor) -> torch.Tensor:
        rows = torch.repeat_interleave(torch.arange(len(images_per_sample), device=images_per_sample.device),
                                       images_per_sample)
        return torch.zeros(len(images_per_sample), dtype=per_image.dtype,
                           device=per_image.device).index_add_(0, rows.to(per_image.device), per_image)

    @staticmethod
    def _check_image_tokens(is_image: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """(B,) images per sample, checking that every sample's image tokens make up whole images."""
        per_row, needs = is_image.sum(dim=1).tolist(), counts.tolist()
        if len(set(needs)) == 1:
            for row, count in enumerate(per_row):
                if count % needs[0]:
                    raise NuwaInputError(f"sample {row} has {count} image tokens, not a multiple of the {needs[0]} "
                                         f"patches per image; the prompt and the image grid disagree")
        if sum(per_row) != sum(needs):
            raise NuwaInputError(f"input_ids hold {sum(per_row)} image tokens but pixel_values hold {len(needs)} "
                                 f"image(s) with {sum(needs)} patches in all")
        images_per_sample, image = [], 0
        for row, count in enumerate(per_row):
            first, taken = image, 0
            while taken < count:
                taken, image = taken + needs[image], image + 1
            if taken != count:
                raise NuwaInputError(f"sample {row} has {count} image tokens, which do not make up whole images "
                                     f"(its images need {needs[first:image]}); the prompt and the image grids disagree")
            images_per_sample.append(image - first)
        return torch.tensor(images_per_sample, device=is_image.device)

    @staticmethod
    def _prompt_end(mask: torch.Tensor, labels: torch.Tensor | None, source: torch.Tensor) -> torch.Tensor:
        """Index (in the pruned sequence) of the token right before the answer: the stage-2 query."""
        positions = torch.arange(mask.shape[1], device=mask.device)
        last_valid = (positions * mask.bool()).amax(dim=1)
        end = last_valid
        if labels is not None:
            answered = labels != IGNORE_INDEX
            first_answer = torch.where(answered, positions, mask.shape[1]).amin(dim=1)
            end = torch.where(answered.any(dim=1), first_answer - 1, last_valid)
        return (torch.searchsorted(source.contiguous(), end.unsqueeze(1), right=True) - 1).squeeze(1).clamp(min=0)

    def _decode(self, kwargs: dict, cached: int) -> dict:
        layout = self.layout
        if kwargs.get("pixel_values") is not None:
            raise NuwaInputError("pixel_values with a non-empty KV cache: Nüwa prunes images at prefill only")
        if layout is None:  # a text-only generation
            self._phase = "off"
            return kwargs
        step_ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        batch, new = step_ids.shape[:2]
        if batch != layout.source.shape[0]:
            raise NuwaInputError(f"decoding a batch of {batch} on a cache prefilled for {layout.source.shape[0]}")
        generated = cached - layout.source.shape[1]  # tokens appended since the prefill
        mask = kwargs.get("attention_mask")
        if mask is None:
            columns = layout.attention_mask.new_ones(batch, generated + new)
        elif mask.shape[1] != layout.input_length + generated + new:
            raise NuwaInputError(f"attention_mask has {mask.shape[1]} columns; expected the unpruned prompt "
                                 f"({layout.input_length}) + {generated} generated + {new} new")
        else:
            columns = mask[:, layout.input_length:]
        self._phase, self._decode_columns = "decode", columns
        steps = torch.arange(generated, generated + new, device=columns.device)
        kwargs.update(attention_mask=torch.cat([layout.attention_mask, columns.to(layout.attention_mask.dtype)], 1),
                      position_ids=self.adapter.decode_positions(layout.next_position.unsqueeze(1) + steps))
        return kwargs

    # ------------------------------------------------------------------------------- layer hooks
    def _score_stage2(self, layer, args, kwargs):
        layout = self.layout
        if self._phase != "prefill":
            return None
        soft = self.mode != "hard"
        with self._timed("stage2"), torch.set_grad_enabled(soft and torch.is_grad_enabled()):
            hidden = args[0] if args else kwargs["hidden_states"]
            query, keys, scale = self.adapter.query_and_keys(layer, hidden, layout.prompt_end,
                                                             kwargs["position_embeddings"])
            positions = torch.arange(hidden.shape[1], device=hidden.device)
            visible = layout.attention_mask.bool() & (positions <= layout.prompt_end.unsqueeze(1))
            scores = last_token_attention(query, keys, visible, scale, self._soft_bias if soft else None)
            budget = layout.stage2_budget
            candidates = layout.is_vision & layout.attention_mask.bool()
            kept_vision = select_top(scores.detach(), candidates, budget)
            if soft:  # rows without images (text-only samples) keep nothing; soft_topk has no budget to solve there
                keep = torch.zeros_like(scores)
                rows = candidates.any(dim=1)
                keep[rows] = soft_topk(scores[rows], budget[rows], self.temperature, candidates[rows])
                if self.mode == "straight_through":
                    keep = straight_through(keep, kept_vision)
                source = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
                self._soft_bias2 = torch.where(layout.is_vision, log_keep(keep), 0.0)
                kept_vision = keep
            else:
                source = compact(~layout.is_vision | kept_vision)
            layout.stage2 = Stage2Layout(source, _gather_rows(layout.attention_mask, source), kept_vision)
        return None

    def _drop_stage2(self, layer, args, kwargs):
        if self._phase == "off":
            return None
        if self.mode != "hard":  # soft: nothing is dropped, the stage-2 bias joins the stage-1 bias
            dtype = (args[0] if args else kwargs["hidden_states"]).dtype
            bias = self._soft_bias2 if self._soft_bias is None else self._soft_bias + self._soft_bias2
            self._stage2_kwargs = dict(attention_mask=self._biased_mask(self.layout.attention_mask, bias, dtype))
            kwargs.update(self._stage2_kwargs)
            return args, kwargs
        hidden = args[0] if args else kwargs.pop("hidden_states")
        stage2 = self.layout.stage2
        cos, sin = kwargs["position_embeddings"]
        positions = kwargs.get("position_ids")  # None for Qwen-VL (M-RoPE lives in cos/sin)
        if self._phase == "prefill":
            hidden = _gather_rows(hidden, stage2.source)
            cos, sin = self.adapter.gather_rotary(cos, stage2.source), self.adapter.gather_rotary(sin, stage2.source)
            positions = None if positions is None else _gather_positions(positions, stage2.source)
            mask_2d = stage2.attention_mask
        else:
            mask_2d = torch.cat([stage2.attention_mask, self._decode_columns.to(stage2.attention_mask.dtype)], 1)
        mask = create_causal_mask(config=self.adapter.language_model.config, inputs_embeds=hidden,
                                  attention_mask=mask_2d, position_ids=positions, layer_idx=self.stage2_layer,
                                  **{MASK_CACHE_KWARG: _cache_in(kwargs)})
        self._stage2_kwargs = dict(attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions)
        kwargs.update(self._stage2_kwargs)
        return (hidden, *args[1:]), kwargs

    def _follow_stage2(self, layer, args, kwargs):
        if self._phase == "off":
            return None
        kwargs.update(self._stage2_kwargs)
        return args, kwargs


def adapter_for(model: nn.Module):
    """The adapter of this model's VLM family (a supported HF VLM, or a peft model wrapping one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    adapter_class = next((a for a in ADAPTERS if isinstance(base, a.model_classes)), None)
    if adapter_class is None:
        supported = ", ".join(c.__name__ for a in ADAPTERS for c in a.model_classes)
        raise UnsupportedModelError(f"{type(base).__name__} is not supported by Nüwa yet; supported: {supported}")
    return adapter_class(base)


def attach_nuwa(model: nn.Module, config: NuwaConfig | None = None) -> NuwaHandle:
    """Attach Nüwa pruning to this model instance (a supported HF VLM, or a peft model wrapping one)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    adapter = adapter_for(base)
    if getattr(base, "_nuwa", None) is not None:
        raise RuntimeError("Nüwa is already attached to this model; call detach() on the existing handle first")
    handle = NuwaHandle(base, adapter, config or NuwaConfig())
    base._nuwa = handle
    return handle


def detach_nuwa(model: nn.Module) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    handle = getattr(base, "_nuwa", None)
    if handle is not None:
        handle.detach()
