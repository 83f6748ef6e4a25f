"""One typed config for every pruning knob, with the paper's defaults, and its resolution into a plan.

Budgets are stated the way the paper states them: an *average* number of vision tokens per image
on the reference 24x24 grid of LLaVA-1.5 (64, 128, 192 of 576). For any other grid the same
fraction is kept, and the stage-1 / stage-2 counts follow the paper's rule (see `plan`).
"""

from __future__ import annotations

import math
import types
from dataclasses import asdict, dataclass, fields
from typing import Literal, Union, get_args, get_origin, get_type_hints

from .selectors import METHODS, SELECTORS, Stage1Plan

Method = Literal[METHODS]  # the registry's names (selectors.py), checked when a recipe is parsed
PositionMode = Literal["original", "compact"]
Aggregation = Literal["auto", "dense", "windowed"]

# The paper's presets for LLaVA-1.5-7B (24x24 grid, 32 LLM layers, stage 2 at layer 16):
# average budget -> (top-n per 2x2 region, stage-1 anchors K, stage-2 kept K2).
# They follow K2 = average / 4 and K = 7/4 * average, which is the K that makes the depth-average
# (L2 * K + (L - L2) * K2) / L equal the budget when stage 2 sits at half depth. `plan` solves that
# equation for the configured stage-2 layer, so the budget holds at any depth (a test checks that
# the presets come out).
PAPER_PRESETS: dict[int, tuple[int, int, int]] = {64: (1, 112, 16), 128: (2, 224, 32), 192: (3, 336, 48)}
STAGE2_PER_AVERAGE = 1 / 4


class NuwaConfigError(ValueError):
    """A pruning config value that cannot work; the message names the config key."""


def _matches(value: object, hint: object) -> bool:
    """Whether `value` has the declared type (JSON's view: a bool is not a number, an int is a float)."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, option) for option in get_args(hint))
    if origin is Literal:
        return value in get_args(hint)
    if origin is tuple:
        return (
            isinstance(value, tuple)
            and len(value) == len(get_args(hint))
            and all(_matches(v, h) for v, h in zip(value, get_args(hint)))
        )
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _describe(hint: object) -> str:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(option) for option in get_args(hint))
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in get_args(hint))
    if origin is tuple:
        return f"a list of {len(get_args(hint))} ({', '.join(_describe(h) for h in get_args(hint))})"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}.get(
        hint, getattr(hint, "__name__", str(hint))
    )


@dataclass(frozen=True)
class NuwaConfig:
    """Every pruning knob. Defaults reproduce the paper / released code on LLaVA-1.5-7B at 64 tokens."""

    method: Method = "nuwa"
    budget: int = 64  # average vision tokens per image on `reference_grid`
    reference_grid: tuple[int, int] = (24, 24)
    region_size: int = 2  # stage-1 separation regions are region_size x region_size patches
    top_n: int | None = None  # candidates per region; None -> derived from the budget
    stage1_keep: int | None = None  # stage-1 anchors K per image; None -> derived
    stage2_keep: int | None = None  # stage-2 kept tokens K2 per image; None -> derived
    stage2_layer: int | float = 0.5  # absolute decoder-layer index, or a fraction of depth (16 of 32)
    distance: float = 280.0  # squared proximity radius, in patch units
    pillar_quantile: float = 0.55  # anchors scoring at or above this quantile are not aggregated
    sim_layers: tuple[float, float] = (16 / 24, 24 / 24)  # similarity = mean of these vision layers
    score_block: int | None = None  # Qwen-VL: vision block whose received attention is the stage-1 score
    #                                 (None: the last full-attention block)
    position_mode: PositionMode = "original"  # "compact" renumbers kept tokens (ablation)
    aggregation: Aggregation = "auto"  # "windowed" skips pairs beyond the radius; "auto" picks by size
    windowed_min_tokens: int = 4096  # "auto" switches to windowed from this many grid tokens (see bench)
    window_tile: int = 32  # windowed aggregation works in tile x tile blocks of the grid
    fastv_layer: int = 2  # FastV baseline: prune after this many decoder layers
    visionzip_contextual: float = 10 / 64  # VisionZip baseline: share of merged contextual tokens
    seed: int = 0  # random baseline

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for item in fields(self):
            value = getattr(self, item.name)
            if not _matches(value, hints[item.name]):
                raise NuwaConfigError(f"{item.name}={value!r} must be {_describe(hints[item.name])}")
        if self.method not in METHODS:
            raise NuwaConfigError(f"method={self.method!r} is not one of {', '.join(METHODS)}")
        _positive_int("budget", self.budget)
        _positive_int("region_size", self.region_size)
        if self.score_block is not None and (
            isinstance(self.score_block, bool) or not isinstance(self.score_block, int)
        ):
            raise NuwaConfigError(f"score_block={self.score_block!r} must be a vision block index or None")
        for key in ("top_n", "stage1_keep", "stage2_keep"):
            if getattr(self, key) is not None:
                _positive_int(key, getattr(self, key))
        if len(self.reference_grid) != 2 or min(self.reference_grid) <= 0:
            raise NuwaConfigError(f"reference_grid={self.reference_grid!r} must be two positive ints (H, W)")
        if not self.distance > 0:
            raise NuwaConfigError(f"distance={self.distance!r} must be > 0 (a squared radius in patches)")
        if not 0.0 <= self.pillar_quantile <= 1.0:
            raise NuwaConfigError(f"pillar_quantile={self.pillar_quantile!r} must be in [0, 1]")
        low, high = self.sim_layers
        if not 0.0 <= low <= high <= 1.0:
            raise NuwaConfigError(f"sim_layers={self.sim_layers!r} must be fractions 0 <= low <= high <= 1")
        if self.position_mode not in ("original", "compact"):
            raise NuwaConfigError(f"position_mode={self.position_mode!r} must be 'original' or 'compact'")
        if self.aggregation not in ("auto", "dense", "windowed"):
            raise NuwaConfigError(f"aggregation={self.aggregation!r} must be 'auto', 'dense' or 'windowed'")
        _positive_int("window_tile", self.window_tile)
        _positive_int("fastv_layer", self.fastv_layer)
        if not 0.0 <= self.visionzip_contextual < 1.0:
            raise NuwaConfigError(f"visionzip_contextual={self.visionzip_contextual!r} must be in [0, 1)")
        if isinstance(self.stage2_layer, float) and not 0.0 < self.stage2_layer < 1.0:
            raise NuwaConfigError(f"stage2_layer={self.stage2_layer!r}: a fraction of depth must be in (0, 1)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NuwaConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise NuwaConfigError(f"unknown NuwaConfig key(s): {', '.join(unknown)}")
        data = dict(data)
        for key in ("reference_grid", "sim_layers"):
            if isinstance(data.get(key), list):  # JSON / YAML have no tuples
                data[key] = tuple(data[key])
        return cls(**data)

    def plan(self, grid: tuple[int, int], num_layers: int, real_tokens: int | None = None) -> PruningPlan:
        """Resolve the budget for one image grid and an LLM depth into concrete per-stage counts.

        `real_tokens`: tokens of the grid that are not padding (adapters pad odd grids to whole
        regions); the budget is that share of them. Default: the whole grid.
        """
        height, width = grid
        num_tokens = height * width
        real = num_tokens if real_tokens is None else real_tokens
        average = self.budget * real / (self.reference_grid[0] * self.reference_grid[1])
        selector = SELECTORS[self.method]
        if selector.stage1 is None and not selector.stage2:  # all tokens
            return PruningPlan(None, None, num_tokens, num_tokens, num_layers)
        if selector.stage1 is None:  # pruning inside the LLM only
            return self._plan_fastv(num_tokens, average, num_layers)
        if selector.stage2:
            layer = self.resolve_stage2_layer(num_layers)
            keep1, keep2, top_n = self._nuwa_counts(grid, average, layer, num_layers)
            if keep2 > keep1:
                raise NuwaConfigError(f"stage2_keep={keep2} exceeds the stage-1 keep K={keep1}")
            return PruningPlan(
                Stage1Plan(self.method, keep1, top_n), Stage2Plan(layer, keep2), num_tokens, average, num_layers
            )
        # Single-stage methods keep the average budget at every layer.
        keep = self.stage1_keep or max(1, round(average))
        if keep > num_tokens:
            raise NuwaConfigError(
                f"budget={self.budget} keeps {keep} tokens but the {height}x{width} grid has only {num_tokens}"
            )
        top_n = 0
        if selector.regional:
            top_n = self.top_n or self._min_top_n(grid, keep)
            self._check_regions(grid, keep, top_n)
        return PruningPlan(Stage1Plan(self.method, keep, top_n), None, num_tokens, average, num_layers)

    def aggregation_for(self, grid: tuple[int, int]) -> str:
        """ "dense" or "windowed" for this grid ("auto" switches at `windowed_min_tokens`)."""
        if self.aggregation != "auto":
            return self.aggregation
        return "windowed" if grid[0] * grid[1] >= self.windowed_min_tokens else "dense"

    def resolve_stage2_layer(self, num_layers: int) -> int:
        layer = self.stage2_layer
        if isinstance(layer, float):
            layer = round(layer * num_layers)
        if not 1 <= layer < num_layers:
            raise NuwaConfigError(
                f"stage2_layer={self.stage2_layer!r} resolves to layer {layer}, outside "
                f"[1, {num_layers - 1}] for a {num_layers}-layer LLM"
            )
        return layer

    def _nuwa_counts(self, grid: tuple[int, int], average: float, layer: int, num_layers: int) -> tuple[int, int, int]:
        """(K, K2, top_n) with K2 = average / 4 and K solving the depth-average for stage 2 at `layer`."""
        keep2 = self.stage2_keep or max(1, round(STAGE2_PER_AVERAGE * average))
        keep1 = self.stage1_keep or max(1, round((num_layers * average - (num_layers - layer) * keep2) / layer))
        top_n = self.top_n or self._min_top_n(grid, keep1)
        self._check_regions(grid, keep1, top_n)
        return keep1, keep2, top_n

    def _min_top_n(self, grid: tuple[int, int], keep: int) -> int:
        return max(1, math.ceil(keep / self._num_regions(grid)))

    def _num_regions(self, grid: tuple[int, int]) -> int:
        height, width = grid
        if height % self.region_size or width % self.region_size:
            raise NuwaConfigError(
                f"grid {height}x{width} is not divisible by region_size={self.region_size}; "
                f"pad the grid (adapters do) or change region_size"
            )
        return (height // self.region_size) * (width // self.region_size)

    def _check_regions(self, grid: tuple[int, int], keep: int, top_n: int) -> None:
        per_region = self.region_size**2
        if top_n > per_region:
            raise NuwaConfigError(
                f"top_n={top_n} exceeds the {per_region} tokens of a {self.region_size}x"
                f"{self.region_size} region (budget={self.budget} is too large for grid "
                f"{grid[0]}x{grid[1]})"
            )
        capacity = self._num_regions(grid) * top_n
        if keep > capacity:
            raise NuwaConfigError(
                f"stage-1 keep K={keep} exceeds the {capacity} regional candidates "
                f"(top_n={top_n} per region on grid {grid[0]}x{grid[1]}); raise top_n or "
                f"lower budget={self.budget}"
            )

    def _plan_fastv(self, num_tokens: int, average: float, num_layers: int) -> PruningPlan:
        layer = self.fastv_layer
        if not 1 <= layer < num_layers:
            raise NuwaConfigError(f"fastv_layer={layer} must be in [1, {num_layers - 1}] for a {num_layers}-layer LLM")
        # Keep K_f after `layer` layers so that the depth-average equals the budget.
        keep = self.stage2_keep or round((num_layers * average - layer * num_tokens) / (num_layers - layer))
        if keep < 1:
            raise NuwaConfigError(
                f"budget={self.budget} cannot be met by FastV at fastv_layer={layer} of "
                f"{num_layers} layers (the first {layer} layers alone exceed it); lower fastv_layer"
            )
        return PruningPlan(None, Stage2Plan(layer, keep), num_tokens, average, num_layers)


@dataclass(frozen=True)
class Stage2Plan:
    layer: int  # vision tokens are dropped before this decoder layer
    keep: int  # tokens kept per image from this layer on


@dataclass(frozen=True)
class PruningPlan:
    stage1: Stage1Plan | None
    stage2: Stage2Plan | None
    num_tokens: int  # unpruned vision tokens per image
    target_average: float  # the budget on this grid
    num_layers: int

    @property
    def tokens_per_layer(self) -> list[int]:
        """Vision tokens per image seen by each decoder layer."""
        first = self.stage1.keep if self.stage1 else self.num_tokens
        counts = [first] * self.num_layers
        if self.stage2:
            counts[self.stage2.layer :] = [self.stage2.keep] * (self.num_layers - self.stage2.layer)
        return counts

    @property
    def average_tokens(self) -> float:
        return sum(self.tokens_per_layer) / self.num_layers


def _positive_int(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise NuwaConfigError(f"{key}={value!r} must be a positive integer")
