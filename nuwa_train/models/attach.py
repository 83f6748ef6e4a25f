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
All per-call state lives in one small `NuwaHandle`; `handle.detach()` restores the model exactly. The
handle owns the lifecycle and the hooks; the sequence bookkeeping (which columns survive, their positions,
masks and labels) is sequence.py's, the selection policy the core's; what was kept is read via `handle.kept`.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask

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
from ..timing import Timings
from .attention import (
    KEY_BIAS_KWARG,
    adopt_key_bias_attention,
    check_attention_backend,
    restore_attention,
    takes_key_bias,
)
from .base import Adapter, NuwaInputError, VisionEncoding
from .families import adapter_for, base_model
from .sequence import (
    KeptView,
    NuwaImageFeatures,
    PrefillLayout,
    Stage2Layout,
    StageOneSelection,
    assemble,
    compact,
    decode_columns,
    gather_positions,
    gather_rows,
    kept_columns,
    prefill_layout,
    prefill_mask,
    soft_attention_mask,
)

SELECTION_MODES = ("hard", "soft", "straight_through")
# transformers 5.24 renamed the KV-cache argument `past_key_values` to `cache` (models, layers, masks).
CACHE_KWARGS = ("cache", "past_key_values")
MASK_CACHE_KWARG = next(name for name in CACHE_KWARGS if name in inspect.signature(create_causal_mask).parameters)


def _cache_in(kwargs: dict):
    """The KV cache a forward or layer call received, under either of its transformers 5.x names."""
    return next((kwargs[name] for name in CACHE_KWARGS if kwargs.get(name) is not None), None)


class NuwaHandle:
    """The state and hooks of Nüwa on one model instance. Use `detach()` (or `with`) to remove."""

    def __init__(self, model: nn.Module, adapter: Adapter, config: NuwaConfig):
        self.model, self.adapter = model, adapter
        self._attention_before = adopt_key_bias_attention(adapter)  # sdpa takes the soft keep bias fused
        self.num_layers = len(adapter.decoder_layers)
        self.timings = Timings()  # Nüwa's own work by stage; a benchmark may give it a CUDA clock
        self.mode, self.temperature, self.gumbel = "hard", 1.0, 0.0
        self._paused = False
        self._forward_params = list(inspect.signature(model.forward).parameters)
        self._encoder_owner = getattr(model, model.base_model_prefix)
        self._encoder_entry = self._make_encoder_entry()
        self._hooks: list = []
        try:
            self._install(config)
        except BaseException:  # a setting refused at attach leaves the model as it was
            restore_attention(adapter, self._attention_before)
            raise

    def _install(self, config: NuwaConfig) -> None:
        """Plans, per-forward state and hooks for `config` (a stage-2 layer decides where hooks go)."""
        adapter, model = self.adapter, self.model
        self.config = config
        self._plans: dict[tuple, PruningPlan] = {}
        if config.position_mode != "original" and adapter.multimodal_positions:
            raise NuwaConfigError(
                f"position_mode={config.position_mode!r}: {type(model).__name__} uses multimodal "
                f"(M-RoPE) positions, which only 'original' keeps meaningful"
            )
        reference = self.plan_for(adapter.grid or config.reference_grid)
        # One plan for fixed-grid models; dynamic-resolution models resolve a plan per image grid.
        self.plan: PruningPlan | None = reference if adapter.grid is not None else None
        self.stage2_layer = reference.stage2.layer if reference.stage2 is not None else None
        if self.stage2_layer is not None and self.stage2_layer < adapter.injected_layers:
            raise NuwaConfigError(
                f"stage2_layer resolves to decoder layer {self.stage2_layer}, but "
                f"{type(model).__name__} adds vision features after each of its first "
                f"{adapter.injected_layers} layers (DeepStack): choose a stage-2 layer >= "
                f"{adapter.injected_layers}"
            )
        self._layout: PrefillLayout | None = None  # the last prefill's record (sequence.py); read it via `kept`
        self._phase = "off"  # "prefill" | "decode" | "off" for the forward in flight
        self._soft_bias: torch.Tensor | None = None  # (B, L) stage-1 log p on vision columns, 0 elsewhere
        self._soft_bias2: torch.Tensor | None = None  # (B, L) the same for stage 2
        self._layer_bias: torch.Tensor | None = None  # (B, L) the keep bias the next layer's attention adds
        self._decode_columns: torch.Tensor | None = None
        self._layer_tokens: torch.Tensor | None = None  # (kept vision tokens, k, D) the first k layers add (prefill)
        self._stage2_kwargs: dict = {}
        self._generator = torch.Generator().manual_seed(config.seed)
        self._encoder_owner.get_image_features = self._encoder_entry
        self._hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, with_kwargs=True),
        ]
        if self.stage2_layer is not None:
            layers, first = adapter.decoder_layers, self.stage2_layer
            self._hooks.append(layers[first - 1].register_forward_pre_hook(self._score_stage2, with_kwargs=True))
            self._hooks.append(layers[first].register_forward_pre_hook(self._drop_stage2, with_kwargs=True))
            for layer in layers[first + 1 :]:
                self._hooks.append(layer.register_forward_pre_hook(self._follow_stage2, with_kwargs=True))
        self._hooks.extend(
            layer.register_forward_hook(self._add_layer_tokens(index))
            for index, layer in enumerate(adapter.decoder_layers[: adapter.injected_layers])
        )
        # After the stage-2 hooks, so layer L2 passes on the bias its own hook just combined.
        self._hooks.extend(
            layer.register_forward_pre_hook(self._pass_key_bias, with_kwargs=True) for layer in adapter.decoder_layers
        )

    # ------------------------------------------------------------------------------- lifecycle
    def _uninstall(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._encoder_owner.__dict__.get("get_image_features") is self._encoder_entry:
            del self._encoder_owner.get_image_features
        self._layout = None

    def detach(self) -> None:
        self._uninstall()
        restore_attention(self.adapter, self._attention_before)
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

    @property
    def kept(self) -> KeptView:
        """What the last prefill kept: per-image kept offsets, vision tokens per stage and per layer, and the
        map from output positions to the caller's unpruned input (see `KeptView`)."""
        if self._layout is None:
            raise RuntimeError("no prefill has run through this handle yet")
        return KeptView(self._layout, self.num_layers, self.stage2_layer)

    def vision_tokens_per_layer(self) -> torch.Tensor:
        """Shorthand for `kept.vision_tokens_per_layer()`: what evaluation and benchmarks report."""
        return self.kept.vision_tokens_per_layer()

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
            + [inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)]
        )
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
            raise NuwaConfigError(
                f"method={self.config.method!r} has no differentiable selection; use mode 'hard' "
                f"(soft modes exist for {', '.join(SOFT_METHODS)})"
            )
        if temperature is not None and not temperature > 0:
            raise NuwaConfigError(f"temperature={temperature!r} must be > 0")
        self.mode = mode
        self.temperature = self.temperature if temperature is None else temperature
        self.gumbel = self.gumbel if gumbel is None else gumbel

    @property
    def active(self) -> bool:
        """False inside `paused()`, where the model runs all tokens."""
        return not self._paused

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

    @property
    def overhead_seconds(self) -> dict[str, float]:
        """Seconds of Nüwa's own work (saliency, stage 1, stage 2) since `timings.clear()`, per stage."""
        return self.timings.totals()

    def _timed(self, name: str):
        return self.timings.measure(name)

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
                raise NuwaInputError(
                    f"selection mode {self.mode!r} is for training forwards; call "
                    f"set_selection('hard') before generating"
                )
            return (), self._decode(kwargs, cached)
        self._layout, self._phase, self._layer_tokens = None, "off", None
        input_ids, pixel_values = kwargs.pop("input_ids", None), kwargs.pop("pixel_values", None)
        images = (kwargs.pop("mm_encoder_outputs", None) or {}).get("image")
        image_inputs = {name: kwargs.pop(name) for name in self.adapter.image_input_names if name in kwargs}
        if pixel_values is not None:
            images = self.image_features(pixel_values, **image_inputs)
        elif images is not None and not isinstance(images, NuwaImageFeatures):
            raise NuwaInputError(
                "pre-computed image features were not made by this Nüwa handle; pass pixel_values "
                "(generate with num_beams > 1 or num_return_sequences > 1 is not supported yet)"
            )
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
        encoded = self.adapter.encode(pixel_values, self.config, self._timed, **image_inputs)
        select = self._select_soft if self.mode != "hard" else self._select_hard
        features = assemble([select(segment) for segment in encoded.segments], encoded.extra_tokens)
        features.image_inputs = image_inputs
        return features

    def _select_hard(self, encoding: VisionEncoding) -> StageOneSelection:
        plan = self.plan_for(encoding.grid, encoding.real_tokens)
        with self._timed("stage1"):
            if plan.stage1 is None:
                selection = Stage1Output(encoding.features, self._all_indices(encoding.features))
            else:
                selection = run_stage1(
                    plan.stage1,
                    self.config,
                    encoding.features,
                    encoding.sim_features,
                    encoding.scores,
                    encoding.grid,
                    self._generator,
                )
        layer_tokens = None
        if encoding.layer_features is not None:  # exactly the kept set of the main tokens
            index = selection.indices[:, :, None, None].expand(-1, -1, *encoding.layer_features.shape[2:])
            layer_tokens = encoding.layer_features.gather(1, index)
        return StageOneSelection(
            encoding,
            plan,
            self.adapter.project(selection.tokens),
            selection.indices,
            selection.pillars,
            layer_tokens=layer_tokens,
        )

    def _select_soft(self, encoding: VisionEncoding) -> StageOneSelection:
        """Every token, as it would be if kept, with its keep probability as an attention bias."""
        features, every = encoding.features, self._all_indices(encoding.features)
        plan = self.plan_for(encoding.grid, encoding.real_tokens)
        if plan.stage1 is None:
            return StageOneSelection(
                encoding,
                plan,
                self.adapter.project(features),
                every,
                None,
                torch.zeros(every.shape, device=features.device),
                every,
                layer_tokens=encoding.layer_features,
            )
        noise = gumbel_like(encoding.scores) * self.gumbel if self.gumbel and self.model.training else None
        soft = run_stage1_soft(
            plan.stage1,
            self.config,
            features,
            encoding.sim_features,
            encoding.scores,
            encoding.grid,
            self.temperature,
            noise,
        )
        keep = soft.keep_prob
        if self.mode == "straight_through":
            keep = straight_through(keep, torch.zeros_like(keep).scatter_(1, soft.hard_indices, 1.0))
        return StageOneSelection(
            encoding,
            plan,
            self.adapter.project(soft.tokens),
            every,
            None,
            log_keep(keep),
            soft.hard_indices,
            layer_tokens=encoding.layer_features,
        )

    @staticmethod
    def _all_indices(features: torch.Tensor) -> torch.Tensor:
        return torch.arange(features.shape[1], device=features.device).expand(features.shape[0], -1)

    def _after_forward(self, model, args, kwargs, output):
        labels = self.output_labels() if self._phase == "prefill" else None
        if labels is None:
            return output
        output.loss = model.loss_function(
            logits=output.logits, labels=labels, vocab_size=model.config.text_config.vocab_size
        )
        return output

    def output_labels(self) -> torch.Tensor | None:
        """The last prefill's labels aligned with its output logits (pruned columns, stage 2 included)."""
        return None if self._layout is None else self._layout.output_labels()

    def _prefill(self, kwargs: dict, input_ids: torch.Tensor, images: NuwaImageFeatures) -> dict:
        check_attention_backend(self.adapter)  # set_attn_implementation may have switched it since attach
        mask = prefill_mask(kwargs.get("attention_mask"), input_ids)
        is_image = input_ids == self.adapter.image_token_id
        if not is_image.any():
            raise NuwaInputError(
                f"pixel_values were given but input_ids contain no image token "
                f"(id {self.adapter.image_token_id}); add the image placeholder to the prompt"
            )
        source, images_per_sample = kept_columns(is_image, images)
        # Positions of the unpruned sequence (M-RoPE for Qwen-VL), gathered at the kept columns.
        positions = self.adapter.position_ids(input_ids, mask, kwargs, images.image_inputs or {})
        layout = prefill_layout(
            source,
            mask,
            positions,
            is_image,
            kwargs.pop("labels", None),
            images,
            images_per_sample,
            self.config.position_mode == "original",
        )
        embeds = self.adapter.embed(gather_rows(input_ids.masked_fill(is_image, 0), source))
        vision_slots = layout.is_vision.unsqueeze(-1)
        embeds = embeds.masked_scatter(vision_slots, images.pooler_output[images.kept].to(embeds.dtype))
        self.adapter.prune_inputs(kwargs, source)
        self._layout, self._phase = layout, "prefill"
        if images.layer_tokens is not None:  # in the order the vision slots are filled
            self._layer_tokens = images.layer_tokens[images.kept]
        attention_mask, self._soft_bias, self._layer_bias = layout.attention_mask, None, None
        if images.keep_bias is not None:  # soft: all tokens stay, biased by log p
            self._soft_bias = torch.zeros(
                layout.is_vision.shape, dtype=images.keep_bias.dtype, device=layout.is_vision.device
            )
            self._soft_bias = self._soft_bias.masked_scatter(layout.is_vision, images.keep_bias[images.kept])
        kwargs.update(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=layout.position_ids)
        if self._soft_bias is not None:
            kwargs.update(self._soft_bias_kwargs(self._soft_bias, embeds.dtype))
        return kwargs

    def _soft_bias_kwargs(self, bias: torch.Tensor, dtype: torch.dtype) -> dict:
        """How the soft keep bias reaches the next layers' attention: under `nuwa_sdpa` as each layer's attention
        argument (the model's own masks stay), otherwise inside a 4-D float mask."""
        if takes_key_bias(self.adapter):
            self._layer_bias = bias
            return {}
        return dict(attention_mask=soft_attention_mask(self._layout.attention_mask, bias, dtype))

    def _decode(self, kwargs: dict, cached: int) -> dict:
        layout = self._layout
        if kwargs.get("pixel_values") is not None:
            raise NuwaInputError("pixel_values with a non-empty KV cache: Nüwa prunes images at prefill only")
        if layout is None:  # a text-only generation
            self._phase = "off"
            return kwargs
        step_ids = kwargs["input_ids"] if kwargs.get("input_ids") is not None else kwargs["inputs_embeds"]
        columns, mask, positions = decode_columns(layout, cached, *step_ids.shape[:2], kwargs.get("attention_mask"))
        self._phase, self._decode_columns = "decode", columns
        kwargs.update(attention_mask=mask, position_ids=self.adapter.decode_positions(positions))
        return kwargs

    # ------------------------------------------------------------------------------- layer hooks
    def _score_stage2(self, layer, args, kwargs):
        layout = self._layout
        if self._phase != "prefill":
            return None
        soft = self.mode != "hard"
        with self._timed("stage2"), torch.set_grad_enabled(soft and torch.is_grad_enabled()):
            hidden = args[0] if args else kwargs["hidden_states"]
            query, keys, scale = self.adapter.query_and_keys(
                layer, hidden, layout.prompt_end, kwargs["position_embeddings"]
            )
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
            layout.stage2 = Stage2Layout(source, gather_rows(layout.attention_mask, source), kept_vision)
        return None

    def _drop_stage2(self, layer, args, kwargs):
        if self._phase == "off":
            return None
        if self.mode != "hard":  # soft: nothing is dropped, the stage-2 bias joins the stage-1 bias
            bias = self._soft_bias2 if self._soft_bias is None else self._soft_bias + self._soft_bias2
            dtype = (args[0] if args else kwargs["hidden_states"]).dtype
            self._stage2_kwargs = self._soft_bias_kwargs(bias, dtype)
            kwargs.update(self._stage2_kwargs)
            return args, kwargs
        hidden = args[0] if args else kwargs.pop("hidden_states")
        stage2 = self._layout.stage2
        cos, sin = kwargs["position_embeddings"]
        positions = kwargs.get("position_ids")  # None for Qwen-VL (M-RoPE lives in cos/sin)
        if self._phase == "prefill":
            hidden = gather_rows(hidden, stage2.source)
            cos, sin = self.adapter.gather_rotary(cos, stage2.source), self.adapter.gather_rotary(sin, stage2.source)
            positions = None if positions is None else gather_positions(positions, stage2.source)
            mask_2d = stage2.attention_mask
        else:
            mask_2d = torch.cat([stage2.attention_mask, self._decode_columns.to(stage2.attention_mask.dtype)], 1)
        mask = create_causal_mask(
            config=self.adapter.language_model.config,
            inputs_embeds=hidden,
            attention_mask=mask_2d,
            position_ids=positions,
            layer_idx=self.stage2_layer,
            **{MASK_CACHE_KWARG: _cache_in(kwargs)},
        )
        self._stage2_kwargs = dict(attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions)
        kwargs.update(self._stage2_kwargs)
        return (hidden, *args[1:]), kwargs

    def _follow_stage2(self, layer, args, kwargs):
        if self._phase == "off":
            return None
        kwargs.update(self._stage2_kwargs)
        return args, kwargs

    def _add_layer_tokens(self, index: int):
        """Post-hook of decoder layer `index`: the kept tokens' layer features join their hidden states, as the
        model's own DeepStack adds them to every vision token (prefill only; decoding adds nothing)."""

        def add(layer, args, output):
            if self._phase != "prefill" or self._layer_tokens is None:
                return None
            rows, columns = self._layout.is_vision.nonzero(as_tuple=True)
            return output.index_put((rows, columns), self._layer_tokens[:, index].to(output.dtype), accumulate=True)

        return add

    def _pass_key_bias(self, layer, args, kwargs):
        if self._phase != "prefill" or self._layer_bias is None:
            return None
        kwargs[KEY_BIAS_KWARG] = self._layer_bias
        return args, kwargs


def attach_nuwa(model: nn.Module, config: NuwaConfig | None = None) -> NuwaHandle:
    """Attach Nüwa pruning to this model instance (a supported HF VLM, or a peft model wrapping one)."""
    base = base_model(model)
    adapter = adapter_for(base)
    check_attention_backend(adapter)
    if getattr(base, "_nuwa", None) is not None:
        raise RuntimeError("Nüwa is already attached to this model; call detach() on the existing handle first")
    handle = NuwaHandle(base, adapter, config or NuwaConfig())
    base._nuwa = handle
    return handle


def detach_nuwa(model: nn.Module) -> None:
    base = base_model(model)
    handle = getattr(base, "_nuwa", None)
    if handle is not None:
        handle.detach()
