"""What Nüwa needs to know about LLaVA-NeXT (HF `LlavaNextForConditionalGeneration`, "anyres").

Every image reaches the CLIP tower as tiles: tile 0 is the *base* tile (the whole image resized to
one tile), tiles 1.. are the *local* tiles of a higher-resolution copy letterboxed into a pinpoint
shape, in row-major order. HF packs the image's placeholders as

    [base: side x side, raster] [local row 0: w tokens, newline] ... [local row h-1: w tokens, newline]

where the h x w local grid is the stitched local tiles with the letterbox rows/columns removed
(`unpad_image`), and the newline is `model.model.image_newline`, a text-space vector.

Stage 1 therefore sees two grids per image (two `VisionEncoding` segments): the base grid and the
unpadded local grid, each scored by the CLS attention rows of its own tiles. The newline of every
local row that keeps a token is put back afterwards (`ImageEncoding.extra_tokens`) at its own placeholder,
so kept tokens and newlines never share a position (the released code overwrote newline indices).
The CLIP half is LLaVA's own `ClipVision`, composed rather than inherited.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import partial

import torch
from transformers import LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)

from ..pruning import NuwaConfig
from ..pruning.soft import log_keep
from .base import Adapter, ImageEncoding, NuwaInputError, Timer, UnsupportedModelError, VisionEncoding, no_timer
from .common import LLM_LORA_PATTERN, pad_to_regions
from .llava import ClipVision
from .scoring import padding_scores


@dataclass(frozen=True)
class AnyresLayout:
    """Where one image's placeholders come from (mirrors HF `pack_image_features`)."""

    side: int  # the base grid is side x side; every tile has side * side patches
    tiles: tuple[int, int]  # (rows, cols) of local tiles
    local: torch.Tensor  # (h, w) unpadded local grid: index of each token into the image's tile tokens
    #                      (tile * side^2 + patch, tile 0 = base), so local ids start at side^2

    @property
    def num_tiles(self) -> int:
        return 1 + self.tiles[0] * self.tiles[1]

    @property
    def local_grid(self) -> tuple[int, int]:
        return tuple(self.local.shape)

    @property
    def num_placeholders(self) -> int:
        h, w = self.local_grid
        return self.side**2 + h * w + h

    def local_offsets(self) -> torch.Tensor:
        """(h, w) placeholder offset of every local token: side^2 + r * (w + 1) + c."""
        h, w = self.local_grid
        return self.side**2 + torch.arange(h)[:, None] * (w + 1) + torch.arange(w)[None, :]

    def newline_offsets(self, rows: torch.Tensor) -> torch.Tensor:
        """Placeholder offsets of the newlines closing local `rows`."""
        w = self.local_grid[1]
        return self.side**2 + rows * (w + 1) + w


def anyres_layout(image_size, config) -> AnyresLayout:
    """The layout of one image of (height, width) `image_size`, from HF's own tiling and unpadding."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    size = [int(v) for v in (image_size.tolist() if hasattr(image_size, "tolist") else image_size)]
    rows, cols = get_anyres_image_grid_shape(size, config.image_grid_pinpoints, vision.image_size)
    # Local tile t, patch p is token side^2 * (1 + t) + p of the image; stitch them as pack_image_features
    # does, then let HF's unpad_image crop the letterbox so the rounding is exactly the model's.
    ids = torch.arange(side * side, (1 + rows * cols) * side * side).view(rows, cols, side, side)
    stitched = ids.permute(0, 2, 1, 3).reshape(rows * side, cols * side)
    return AnyresLayout(side, (rows, cols), unpad_image(stitched[None], size)[0])


class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT: LLaVA-1.5's CLIP tower, projector and LM, with anyres tiling and row newlines."""

    model_classes = (LlavaNextForConditionalGeneration,)
    image_input_names = ("image_sizes",)
    grid = None  # dynamic: every image has its own local grid

    def __init__(self, model: LlavaNextForConditionalGeneration):
        super().__init__(model, model.config.image_token_index)
        self.clip = ClipVision(model)  # refuses vision_feature_select_strategy != "default" and list feature layers
        config = model.config
        tile = config.vision_config.image_size
        pinpoints = config.image_grid_pinpoints
        if not isinstance(pinpoints, list) or not pinpoints:
            raise UnsupportedModelError(f"image_grid_pinpoints={pinpoints!r}: expected a list of (height, width) pairs")
        bad = [p for p in pinpoints if len(p) != 2 or min(p) <= 0 or p[0] % tile or p[1] % tile]
        if bad:
            raise UnsupportedModelError(
                f"image_grid_pinpoints {bad} are not whole multiples of the {tile}-px vision "
                f"tile; anyres tiling (and the placeholder layout) needs that"
            )
        self.side = self.clip.side

    @property
    def image_newline(self) -> torch.Tensor:
        return self.model.model.image_newline

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(tokens)

    def lora_target_pattern(self, include_vision: bool) -> str:
        return f"{LLM_LORA_PATTERN}|{self.clip.lora_target_pattern()}" if include_vision else LLM_LORA_PATTERN

    def blank_image(self, device: torch.device) -> tuple[int, dict]:
        size = [self.model.config.vision_config.image_size] * 2
        layout = anyres_layout(size, self.model.config)
        pixels = self.clip.blank_pixels(device, 1, layout.num_tiles)
        return layout.num_placeholders, {"pixel_values": pixels, "image_sizes": torch.tensor([size], device=device)}

    # ----------------------------------------------------------------------------------- stage 1
    def encode(
        self, pixel_values: torch.Tensor, config: NuwaConfig, timer: Timer = no_timer, image_sizes=None, **unused
    ) -> ImageEncoding:
        """Per image two segments, base grid and local grid, grouped across images by identical layout."""
        if image_sizes is None:
            raise NuwaInputError(
                "LLaVA-NeXT needs image_sizes (the processor returns it with pixel_values) to lay out the anyres tiles"
            )
        layouts = [anyres_layout(size, self.model.config) for size in image_sizes]
        tiles = self._real_tiles(pixel_values, [layout.num_tiles for layout in layouts])
        hidden = self.clip.hidden_states(tiles)
        with timer("saliency"):
            segments = self._segments(hidden, layouts, config)
        return ImageEncoding(segments, partial(self._row_newlines, layouts))

    def _segments(
        self, hidden: tuple[torch.Tensor, ...], layouts: list[AnyresLayout], config: NuwaConfig
    ) -> list[VisionEncoding]:
        """The base and local grid of every image, from the tower's hidden states over all real tiles."""
        patches = self.side * self.side

        # Everything per tile token, flattened over all tiles of the call (an image's tokens are contiguous).
        features = self.clip.features(hidden).flatten(0, 1)
        sim_features = self.clip.sim_features(hidden, config).flatten(0, 1)
        # Every tile is its own CLIP image with its own CLS softmax, whose patch mass (1 - p(CLS -> CLS))
        # varies: normalise each tile's row to sum 1 so the local tiles of one grid compare.
        raw = self.clip.cls_scores(hidden)
        scores = (raw / raw.sum(dim=1, keepdim=True).clamp(min=1e-12)).flatten()

        groups: dict[tuple, list] = defaultdict(list)
        start = 0
        for image, layout in enumerate(layouts):
            count = layout.num_placeholders
            base = torch.arange(patches).view(self.side, self.side)
            segments = [(base, base)]
            if layout.local.numel():
                segments.append((layout.local, layout.local_offsets()))
            for ids, offsets in segments:
                ids, offsets, grid = pad_to_regions(ids, offsets, config.region_size)
                # Segments with the same grid and offsets share an encoding (every image's base tile does)
                groups[(grid, tuple(offsets.tolist()))].append((image, start + ids, count))
            start += layout.num_tiles * patches

        encodings = []
        device = features.device
        for (grid, offsets), members in groups.items():
            offsets = torch.tensor(offsets, device=device)
            ids = torch.stack([member_ids for _, member_ids, _ in members]).to(device)
            encodings.append(
                VisionEncoding(
                    features[ids],
                    sim_features[ids],
                    padding_scores(scores[ids], offsets >= 0),
                    grid,
                    images=torch.tensor([image for image, _, _ in members], device=device),
                    placeholder_offsets=offsets,
                    placeholder_count=torch.tensor([count for _, _, count in members]),
                )
            )
        return encodings

    def _real_tiles(self, pixel_values: torch.Tensor, num_tiles: list[int]) -> torch.Tensor:
        """(sum of tiles, C, H, W): the images' real tiles, without the processor's batch padding."""
        if pixel_values.dim() == 5:
            if pixel_values.shape[0] != len(num_tiles) or pixel_values.shape[1] < max(num_tiles):
                raise NuwaInputError(
                    f"pixel_values of shape {tuple(pixel_values.shape)} do not hold the {num_tiles} "
                    f"tiles that image_sizes imply per image"
                )
            return torch.cat([pixels[:n] for pixels, n in zip(pixel_values, num_tiles)])
        if pixel_values.dim() == 4 and pixel_values.shape[0] == sum(num_tiles):
            return pixel_values
        raise NuwaInputError(
            f"pixel_values of shape {tuple(pixel_values.shape)}: expected (images, tiles, C, H, W) "
            f"or (all tiles, C, H, W) with the {num_tiles} tiles that image_sizes imply"
        )

    def _row_newlines(
        self, layouts: list[AnyresLayout], image: int, kept_offsets: torch.Tensor, keep: torch.Tensor | None = None
    ):
        """The newline of every local row that keeps a token, at its own placeholder offset.

        image_newline already lives in the LLM's embedding space: it is not projected. With `keep`
        (soft selection: the keep probability of every offset in `kept_offsets`, which then holds every
        token) each row's newline also gets the attention bias log P(the row keeps a token) =
        log(1 - prod(1 - p)): 0 or ~-40 in the hard limit, i.e. exactly the hard rule above.
        """
        layout = layouts[image]
        first_local = layout.side**2
        w = layout.local_grid[1]
        is_local = kept_offsets >= first_local
        row_of = torch.div(kept_offsets[is_local] - first_local, w + 1, rounding_mode="floor")
        rows = torch.unique(row_of)
        if rows.numel() == 0:
            return None
        newline = self.image_newline
        offsets = layout.newline_offsets(rows).to(kept_offsets.device)
        tokens = newline.expand(rows.numel(), newline.shape[0])
        if keep is None:
            return offsets, tokens
        # log prod(1 - p) per row; p is capped below 1 so a certain token leaves a finite gradient
        missed = torch.log1p(-keep[is_local].float().clamp(0.0, 1.0 - 1e-6))
        log_missed = torch.zeros(int(rows.max()) + 1, device=missed.device).index_add(0, row_of, missed)[rows]
        return offsets, tokens, log_keep(-torch.expm1(log_missed))
