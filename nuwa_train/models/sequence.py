"""Sequence surgery: how a pruned prefill maps onto the caller's unpruned sequence, and back.

Pure tensor functions and the records they produce, with no hooks and no model state: the handle
(attach.py) calls them. Conventions: a `source` tensor (B, L') holds, for every position of a shorter
sequence, its index in the longer one, and -1 for inserted (left) padding; left padding keeps each row's
last token last, which generation relies on.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from ..data.schema import IGNORE_INDEX
from ..pruning.config import PruningPlan
from .base import NuwaInputError, VisionEncoding


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
    layer_tokens: torch.Tensor | None = None  # (images, K, k, D_text) what the LLM's first k layers add to each kept
    #                                           token (Qwen3-VL's DeepStack, gathered at the same kept set)

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

    def output_labels(self) -> torch.Tensor | None:
        """The labels aligned with the output logits (pruned columns, stage 2 included)."""
        if self.labels is None or self.stage2 is None:
            return self.labels
        return gather_rows(self.labels, self.stage2.source, IGNORE_INDEX)


@dataclass(frozen=True)
class KeptTokens:
    """Which placeholder offsets of one image survive each stage (grid raster indices on a fixed grid)."""

    stage1: list[int]
    pillars: list[int]
    stage2: list[int] | None  # None when the method has no stage 2


class KeptView:
    """What the last prefill kept: the public read-out for plots, logging and evaluation.

    Counts are exact in hard mode and expected counts (sums of keep probabilities) in the soft modes.
    """

    def __init__(self, layout: PrefillLayout, num_layers: int, stage2_layer: int | None):
        self._layout, self._num_layers, self._stage2_layer = layout, num_layers, stage2_layer

    @property
    def images_per_sample(self) -> torch.Tensor:
        """(B,) images of each sample of the batch."""
        return self._layout.images_per_sample

    @property
    def soft(self) -> bool:
        return self._layout.selection.keep_bias is not None

    def stage1_vision_tokens(self) -> torch.Tensor:
        """Vision tokens the layers before stage 2 saw, summed over the batch's images.

        Soft: the sum of keep probabilities over real slots only; images that keep fewer tokens (mixed sizes)
        pad their rows, and padding is never kept.
        """
        selection = self._layout.selection
        if self.soft:
            return selection.keep_bias.detach().float().exp()[selection.kept].sum()
        return self._layout.is_vision.sum().float()

    def stage2_vision_tokens(self) -> torch.Tensor | None:
        """Vision tokens from the stage-2 layer on, summed over the batch's images (None: no stage 2)."""
        stage2 = self._layout.stage2
        return None if stage2 is None else stage2.kept_vision.detach().float().sum()

    def vision_tokens_per_layer(self) -> torch.Tensor:
        """(num_layers,) vision tokens each decoder layer saw, summed over the batch's images.

        Counted on the sequence, so padding of odd grids and newline tokens are what the model really saw,
        not what a plan promised.
        """
        counts = torch.full((self._num_layers,), float(self.stage1_vision_tokens()))
        stage2 = self.stage2_vision_tokens()
        if stage2 is not None:
            counts[self._stage2_layer :] = float(stage2)
        return counts

    def token_map(self) -> torch.Tensor:
        """(B, L_out) index into the caller's unpruned input of every output position (-1: padding)."""
        return self._layout.token_map()

    def image(self, image: int) -> KeptTokens:
        """The kept placeholder offsets of image `image` (numbered across the batch) in hard mode."""
        if self.soft:
            raise RuntimeError("per-token lists exist for hard selection; call set_selection('hard') first")
        layout, selection = self._layout, self._layout.selection
        if not 0 <= image < len(selection.kept_indices):
            raise IndexError(f"image {image} of a batch with {len(selection.kept_indices)} images")
        real = selection.kept[image]
        stage1 = selection.kept_indices[image][real]
        pillars = stage1[selection.pillars[image][real]] if selection.pillars is not None else stage1[:0]
        stage2 = None
        if layout.stage2 is not None:
            per_sample = layout.images_per_sample.cumsum(0)
            sample = int(torch.searchsorted(per_sample, torch.tensor(image, device=per_sample.device), right=True))
            first_image = int(per_sample[sample] - layout.images_per_sample[sample])
            before = int(selection.kept[first_image:image].sum())  # the sample's earlier images' slots
            slots = layout.is_vision[sample].nonzero().squeeze(1)[before : before + len(stage1)]
            stage2 = stage1[layout.stage2.kept_vision[sample, slots].bool()].tolist()
        return KeptTokens(stage1.tolist(), pillars.tolist(), stage2)

    def first_image_of(self, sample: int) -> KeptTokens:
        return self.image(int(self._layout.images_per_sample[:sample].sum()))


# ----------------------------------------------------------------------------------- gathers
def compact(keep: torch.Tensor) -> torch.Tensor:
    """(B, L') source indices of the kept positions in order, left-padded with -1 to the longest row."""
    counts = keep.sum(dim=1)
    length = int(counts.max())
    kept_first = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, : max(length, 1)]
    slot = torch.arange(length, device=keep.device) - (length - counts).unsqueeze(1)
    return torch.where(slot >= 0, kept_first.gather(1, slot.clamp(min=0)), torch.full_like(slot, -1))


def gather_rows(values: torch.Tensor, source: torch.Tensor, fill=0) -> torch.Tensor:
    """values (B, L, ...) gathered along dim 1 at `source` (B, L'); -1 entries become `fill`."""
    index = source.clamp(min=0)
    if values.dim() == 2:
        return values.gather(1, index).masked_fill(source < 0, fill)
    expanded = index.view(*index.shape, *([1] * (values.dim() - 2))).expand(-1, -1, *values.shape[2:])
    return values.gather(1, expanded).masked_fill((source < 0).view(*source.shape, *([1] * (values.dim() - 2))), fill)


def gather_positions(positions: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Position ids (B, L) or multimodal (C, B, L) gathered at `source` (B, L'); padding gets 0."""
    if positions.dim() == 2:
        return gather_rows(positions.expand(source.shape[0], -1), source)
    return torch.stack([gather_rows(p.expand(source.shape[0], -1), source) for p in positions])


def next_position(positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) the position id of the first generated token: one past the largest prompt position."""
    largest = (positions * mask).amax(dim=-1)
    return (largest if largest.dim() == 1 else largest.amax(dim=0)) + 1


def soft_attention_mask(mask: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, L, L) additive mask: causal and padding as the float minimum, `bias` on key columns.

    Every query may see itself, so padded rows stay finite; such a mask works under SDPA and eager.
    """
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    allowed = (causal & mask.bool()[:, None, None, :]) | torch.eye(length, dtype=torch.bool, device=mask.device)
    return torch.where(allowed, bias[:, None, None, :].to(dtype), torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------- stage 1 -> images
@dataclass
class StageOneSelection:
    """Stage-1 result for one group of same-grid images, before it is laid out per image."""

    encoding: VisionEncoding
    plan: PruningPlan
    tokens: torch.Tensor  # (n, K, D_text) projected
    indices: torch.Tensor  # (n, K) grid indices, ascending
    pillars: torch.Tensor | None = None
    keep_bias: torch.Tensor | None = None
    anchors: torch.Tensor | None = None
    layer_tokens: torch.Tensor | None = None  # (n, K, k, D_text) the encoding's layer features at `indices`


def assemble(selections: list[StageOneSelection], extra_tokens=None) -> NuwaImageFeatures:
    """Lay the groups' selections out per image, in image order, as ascending placeholder offsets.

    One group of same-grid images covering every image (LLaVA-1.5) is laid out as it is. Otherwise
    (images of different sizes, several grids per image, padded grids) each image collects its
    segments' kept tokens, drops grid padding, adds the adapter's `extra_tokens` (e.g. LLaVA-NeXT's
    row newlines) and sorts by offset; images keeping fewer tokens are padded with -1 / zeros.
    """
    only = selections[0]
    if (
        len(selections) == 1
        and only.encoding.images is None
        and only.encoding.placeholder_offsets is None
        and extra_tokens is None
    ):
        n, device = only.indices.shape[0], only.indices.device
        stage2 = only.plan.stage2.keep if only.plan.stage2 is not None else 0
        return NuwaImageFeatures(
            pooler_output=only.tokens,
            kept_indices=only.indices,
            pillars=only.pillars,
            keep_bias=only.keep_bias,
            anchor_indices=only.anchors,
            placeholder_counts=torch.tensor(only.encoding.placeholders_per_image(), device=device),
            stage2_keep=torch.full((n,), stage2, device=device),
            layer_tokens=only.layer_tokens,
        )
    parts: dict[int, list] = defaultdict(list)
    placeholders, stage2_keep = {}, defaultdict(int)
    soft = only.keep_bias is not None
    layered = only.layer_tokens is not None
    for s in selections:
        encoding = s.encoding
        images = encoding.images.tolist() if encoding.images is not None else range(s.indices.shape[0])
        offsets = s.indices if encoding.placeholder_offsets is None else encoding.placeholder_offsets[s.indices]
        counts = encoding.placeholders_per_image()
        for row, image in enumerate(images):
            real = offsets[row] >= 0
            pillars = (
                s.pillars[row][real] if s.pillars is not None else torch.zeros_like(offsets[row][real], dtype=bool)
            )
            bias = s.keep_bias[row][real] if soft else None
            layers = s.layer_tokens[row][real] if layered else None
            parts[image].append((offsets[row][real], s.tokens[row][real], pillars, bias, layers))
            placeholders[image] = counts[row]
            stage2_keep[image] += s.plan.stage2.keep if s.plan.stage2 is not None else 0
    num_images = len(parts)
    if sorted(parts) != list(range(num_images)):
        raise RuntimeError(f"the adapter's encodings cover images {sorted(parts)}, not 0..{num_images - 1}")
    laid_out = []
    for image in range(num_images):
        offsets, tokens, pillars, bias, layers = (list(column) for column in zip(*parts[image]))
        if extra_tokens is not None:
            # soft: every token is present; the adapter turns their keep probabilities into the extras' bias
            keep = torch.cat(bias).float().exp() if soft else None
            extra = extra_tokens(image, torch.cat(offsets), keep)
            if extra is not None:
                offsets.append(extra[0])
                tokens.append(extra[1].to(tokens[0].dtype))
                pillars.append(torch.zeros_like(extra[0], dtype=torch.bool))
                if soft:
                    bias.append(extra[2].to(bias[0].dtype))
                if layered:  # tokens the adapter adds get nothing from the encoder's layers
                    layers.append(layers[0].new_zeros(len(extra[0]), *layers[0].shape[1:]))
        offsets = torch.cat(offsets)
        order = torch.argsort(offsets)
        laid_out.append(
            (
                offsets[order],
                torch.cat(tokens)[order],
                torch.cat(pillars)[order],
                torch.cat(bias)[order] if soft else None,
                torch.cat(layers)[order] if layered else None,
            )
        )
    width = max(len(offsets) for offsets, *_ in laid_out)
    pooler = only.tokens.new_zeros(num_images, width, only.tokens.shape[-1])
    kept = torch.full((num_images, width), -1, dtype=torch.long, device=pooler.device)
    pillars = torch.zeros(num_images, width, dtype=torch.bool, device=pooler.device)
    bias = only.tokens.new_zeros(num_images, width) if soft else None
    layer_tokens = only.layer_tokens.new_zeros(num_images, width, *only.layer_tokens.shape[2:]) if layered else None
    for image, (offsets, tokens, image_pillars, image_bias, image_layers) in enumerate(laid_out):
        k = len(offsets)
        pooler[image, :k], kept[image, :k], pillars[image, :k] = tokens, offsets, image_pillars
        if soft:
            bias[image, :k] = image_bias.to(bias.dtype)
        if layered:
            layer_tokens[image, :k] = image_layers
    return NuwaImageFeatures(
        pooler_output=pooler,
        kept_indices=kept,
        pillars=pillars if only.pillars is not None else None,
        keep_bias=bias,
        placeholder_counts=torch.tensor([placeholders[i] for i in range(num_images)], device=pooler.device),
        stage2_keep=torch.tensor([stage2_keep[i] for i in range(num_images)], device=pooler.device),
        layer_tokens=layer_tokens,
    )


# ----------------------------------------------------------------------------------- prefill
def prefill_mask(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """The caller's 2-D mask (all ones when none is given); other shapes cannot be pruned."""
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if attention_mask.dim() != 2:
        raise NuwaInputError(
            f"attention_mask must be 2-D (batch, length) for Nüwa, got shape {tuple(attention_mask.shape)}"
        )
    return attention_mask


def kept_columns(is_image: torch.Tensor, images: NuwaImageFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """(source (B, L1) of the kept columns, images per sample (B,)): text stays, the selected placeholders stay.

    Placeholders are numbered image after image in reading order.
    """
    counts = images.placeholder_counts.to(is_image.device)
    images_per_sample = check_image_tokens(is_image, counts)
    slots = is_image.nonzero()
    starts = counts.cumsum(0) - counts
    chosen = (starts.unsqueeze(1) + images.kept_indices.clamp(min=0))[images.kept]
    keep = ~is_image
    keep[slots[chosen, 0], slots[chosen, 1]] = True
    return compact(keep), images_per_sample


def check_image_tokens(is_image: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """(B,) images per sample, checking that every sample's image tokens make up whole images."""
    per_row, needs = is_image.sum(dim=1).tolist(), counts.tolist()
    if len(set(needs)) == 1:
        for row, count in enumerate(per_row):
            if count % needs[0]:
                raise NuwaInputError(
                    f"sample {row} has {count} image tokens, not a multiple of the {needs[0]} "
                    f"patches per image; the prompt and the image grid disagree"
                )
    if sum(per_row) != sum(needs):
        raise NuwaInputError(
            f"input_ids hold {sum(per_row)} image tokens but pixel_values hold {len(needs)} "
            f"image(s) with {sum(needs)} patches in all"
        )
    images_per_sample, image = [], 0
    for row, count in enumerate(per_row):
        first, taken = image, 0
        while taken < count:
            taken, image = taken + needs[image], image + 1
        if taken != count:
            raise NuwaInputError(
                f"sample {row} has {count} image tokens, which do not make up whole images "
                f"(its images need {needs[first:image]}); the prompt and the image grids disagree"
            )
        images_per_sample.append(image - first)
    return torch.tensor(images_per_sample, device=is_image.device)


def prompt_end(mask: torch.Tensor, labels: torch.Tensor | None, source: torch.Tensor) -> torch.Tensor:
    """Index (in the pruned sequence) of the token right before the answer: the stage-2 query."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    last_valid = (positions * mask.bool()).amax(dim=1)
    end = last_valid
    if labels is not None:
        answered = labels != IGNORE_INDEX
        first_answer = torch.where(answered, positions, mask.shape[1]).amin(dim=1)
        end = torch.where(answered.any(dim=1), first_answer - 1, last_valid)
    return (torch.searchsorted(source.contiguous(), end.unsqueeze(1), right=True) - 1).squeeze(1).clamp(min=0)


def per_sample(per_image: torch.Tensor, images_per_sample: torch.Tensor) -> torch.Tensor:
    """(B,) the sum of a per-image quantity over each sample's images."""
    rows = torch.repeat_interleave(
        torch.arange(len(images_per_sample), device=images_per_sample.device), images_per_sample
    )
    return torch.zeros(len(images_per_sample), dtype=per_image.dtype, device=per_image.device).index_add_(
        0, rows.to(per_image.device), per_image
    )


def prefill_layout(
    source: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    is_image: torch.Tensor,
    labels: torch.Tensor | None,
    images: NuwaImageFeatures,
    images_per_sample: torch.Tensor,
    original_positions: bool,
) -> PrefillLayout:
    """The record of one pruned prefill: kept columns, their mask, positions and labels.

    `original_positions`: the kept tokens keep their unpruned position ids (Nüwa's spatial anchors), else the
    pruned sequence is renumbered from 0.
    """
    pruned_mask = gather_rows(mask, source)
    if original_positions:
        pruned_positions = gather_positions(positions, source)
    else:
        pruned_positions = (pruned_mask.long().cumsum(1) - 1).clamp(min=0)
    return PrefillLayout(
        source=source,
        attention_mask=pruned_mask,
        position_ids=pruned_positions,
        is_vision=gather_rows(is_image, source, False),
        prompt_end=prompt_end(mask, labels, source),
        images_per_sample=images_per_sample,
        input_length=is_image.shape[1],
        next_position=next_position(pruned_positions, pruned_mask),
        selection=images,
        stage2_budget=per_sample(images.stage2_keep, images_per_sample),
        labels=None if labels is None else gather_rows(labels, source, IGNORE_INDEX),
    )


# ----------------------------------------------------------------------------------- decode
def decode_columns(
    layout: PrefillLayout, cached: int, batch: int, new: int, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map a decode step's unpruned mask onto the pruned KV cache.

    Returns the mask columns of the generated tokens (B, generated + new), the full mask for the step
    (pruned prompt + those columns) and the (B, new) text positions of the new tokens.
    """
    if batch != layout.source.shape[0]:
        raise NuwaInputError(f"decoding a batch of {batch} on a cache prefilled for {layout.source.shape[0]}")
    generated = cached - layout.source.shape[1]  # tokens appended since the prefill
    if attention_mask is None:
        columns = layout.attention_mask.new_ones(batch, generated + new)
    elif attention_mask.shape[1] != layout.input_length + generated + new:
        raise NuwaInputError(
            f"attention_mask has {attention_mask.shape[1]} columns; expected the unpruned prompt "
            f"({layout.input_length}) + {generated} generated + {new} new"
        )
    else:
        columns = attention_mask[:, layout.input_length :]
    steps = torch.arange(generated, generated + new, device=columns.device)
    mask = torch.cat([layout.attention_mask, columns.to(layout.attention_mask.dtype)], 1)
    return columns, mask, layout.next_position.unsqueeze(1) + steps
