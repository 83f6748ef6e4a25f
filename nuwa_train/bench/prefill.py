"""Prefill: does pruning make prefill as fast as the FLOP count says, and what does each selector cost?

For each model shape, selector and budget it times the unpruned and the pruned prefill (median of
repeats), splits out the LLM part (hooks on the language model) and the selector's own work (saliency,
stage-1 selection/aggregation, stage-2 scoring), and prints the measured LLM time ratio beside the
theoretical FLOP ratio. A second table times stage-1 aggregation dense (K x N), windowed (only
pairs inside the radius) and the released code's N x N similarity, across grid sizes.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models import attach_nuwa
from ..pruning import PAPER_PRESETS, NuwaConfig, NuwaConfigError
from ..pruning.stage1 import (
    aggregate_dense,
    aggregate_windowed,
    grid_coordinates,
    pillar_mask,
    proximity,
    select_anchors,
)
from ..pruning.within_budget import fastv_within_budget
from ..timing import Stopwatch, Timings, WallClock
from .shapes import BenchShape, build_random_model, prompt_batch

SYSTEM_PROMPT_WORDS = 30  # text before the image, like LLaVA-1.5's system prompt
QUESTION_WORDS = 20
METHOD_LABELS = {"none": "full tokens", "nuwa": "Nüwa", "visionzip": "VisionZip-like", "fastv": "FastV"}
PREFILL_METHODS = ("nuwa", "visionzip", "fastv")  # the paper's table: Nüwa beside a vision-side and an LLM-side pruner
AGGREGATION_GRIDS = (24, 32, 48, 64, 96)
AGGREGATION_DIM = 1024  # CLIP-L width: the size aggregation runs at on real checkpoints
# Anchors as a share of the grid: the paper's stage-1 K at its smallest budget (112 of LLaVA-1.5's 576 at 64).
STAGE1_SHARE = PAPER_PRESETS[64][1] / (24 * 24)


def llm_flops(tokens_per_layer: list[int], hidden: int, intermediate: int) -> float:
    """The paper's (FastV's) per-layer cost 4nd^2 + 2n^2d + 2ndm, summed over layers."""
    return sum(4 * n * hidden**2 + 2 * n**2 * hidden + 2 * n * hidden * intermediate for n in tokens_per_layer)


@dataclass
class PrefillTiming:
    shape: str
    budget: int | None  # None: all tokens
    total_ms: float
    llm_ms: float
    overhead_ms: float  # the selector's own work (Nüwa: saliency, stage 1, stage 2 scoring)
    vision_tokens_per_layer: float
    method: str = "nuwa"  # "none": all tokens
    dtype: str = "float32"
    device: str = "cpu"
    measured_layers: int = 0
    full_depth: int = 0
    full_depth_total_ms: float = 0.0  # the prefill with all `full_depth` decoder layers (shapes.py)
    flop_ratio: float = 1.0
    time_ratio: float = 1.0
    realised_saving: float | None = None  # measured LLM saving / theoretical saving
    overhead_share: float | None = None  # the selector's own time / unpruned prefill at full depth
    note: str = ""  # a setting changed so that the budget can be met (FastV's layer)


@dataclass
class AbsentSetting:
    """A selector and budget the bench could not time, and why (e.g. FastV on an LLM too shallow for the budget)."""

    shape: str
    method: str
    budget: int
    reason: str


def time_prefill(
    shape_name: str,
    shape: BenchShape,
    budgets: list[int],
    repeats: int,
    methods: tuple[str, ...] = PREFILL_METHODS,
    device: str = "cpu",
    clock: WallClock | None = None,
) -> tuple[list[PrefillTiming], list[AbsentSetting]]:
    """Full vs pruned prefill of one image and its prompt, each selector at each budget (median of `repeats`), and
    the settings this shape cannot run, with the reason (reported as such, not dropped)."""
    clock = clock or WallClock()
    model, processor = build_random_model(shape, device)
    batch = prompt_batch(model, processor, shape, SYSTEM_PROMPT_WORDS, QUESTION_WORDS, device)
    batch["logits_to_keep"] = 1
    num_tokens = shape.spec.grid[0] * shape.spec.grid[1]
    text_tokens = batch["input_ids"].shape[1] - num_tokens
    text_cfg = model.config.text_config

    def flops(per_layer):
        return llm_flops([text_tokens + n for n in per_layer], text_cfg.hidden_size, text_cfg.intermediate_size)

    common = dict(
        shape=shape_name,
        dtype=str(shape.dtype).removeprefix("torch."),
        device=device,
        measured_layers=shape.measured_layers,
        full_depth=shape.depth,
    )

    def measure(config: NuwaConfig | None):
        handle = attach_nuwa(model, config) if config else None
        if handle:
            handle.timings = Timings(clock)
        stopwatch = Stopwatch(model.model.language_model, clock)
        samples = []
        with torch.inference_mode():
            for run in range(repeats + 1):  # the first run warms up
                stopwatch.clear()
                if handle:
                    handle.timings.clear()
                start = clock.mark()
                model(**batch)
                total = clock.seconds(start, clock.mark())
                if run:
                    samples.append((total, stopwatch.seconds, handle.timings.total() if handle else 0.0))
        stopwatch.remove()
        plan = handle.plan if handle else None
        if handle:
            handle.detach()
        return [statistics.median(s[i] for s in samples) * 1e3 for i in range(3)], plan

    def timing(method, budget, times, tokens, flop_ratio=1.0, reference=None, note=""):
        total, llm, overhead = times
        row = PrefillTiming(
            method=method,
            budget=budget,
            total_ms=total,
            llm_ms=llm,
            overhead_ms=overhead,
            vision_tokens_per_layer=tokens,
            full_depth_total_ms=shape.full_depth_ms(total, llm),
            note=note,
            **common,
        )
        if reference is not None:
            row.flop_ratio, row.time_ratio = flop_ratio, llm / reference.llm_ms
            row.realised_saving = (1 - row.time_ratio) / (1 - flop_ratio)
            row.overhead_share = overhead / reference.full_depth_total_ms
        return row

    times, _ = measure(None)
    full = timing("none", None, times, num_tokens)
    full_flops = flops([num_tokens] * text_cfg.num_hidden_layers)
    results, absent = [full], []
    for method in methods:
        for budget in budgets:
            try:  # FastV's layer moves earlier where its own cannot meet the budget (`fastv_within_budget`)
                config, note = fastv_within_budget(
                    shape.selector_config(method, budget), shape.spec.grid, shape.measured_layers
                )
                times, plan = measure(config)
            except NuwaConfigError as reason:  # e.g. FastV on an LLM too shallow for this budget at any layer
                absent.append(AbsentSetting(shape_name, method, budget, str(reason)))
                continue
            results.append(
                timing(
                    method, budget, times, plan.average_tokens, flops(plan.tokens_per_layer) / full_flops, full, note
                )
            )
    return results, absent


@dataclass
class AggregationTiming:
    grid: int
    tokens: int
    anchors: int
    full_nxn_ms: float
    dense_ms: float
    windowed_ms: float


def _released_nxn(features, sim_features, anchors, grid, distance, pillars):
    """Cost model of the released code: the full N x N similarity and proximity, then the K rows."""
    unit = F.normalize(sim_features, dim=-1)
    xy = grid_coordinates(grid, features.device)
    weights = F.relu(unit @ unit.transpose(1, 2)) * proximity(torch.cdist(xy, xy), distance)
    rows = weights.gather(1, anchors.unsqueeze(-1).expand(-1, -1, weights.shape[-1]))
    rows = rows.masked_fill(pillars.unsqueeze(-1), 0.0)
    return (rows / (rows.sum(-1, keepdim=True) + 1e-8)) @ features


def time_aggregation(
    grids=AGGREGATION_GRIDS, repeats: int = 3, config: NuwaConfig = NuwaConfig()
) -> list[AggregationTiming]:
    results = []
    for side in grids:
        grid, tokens = (side, side), side * side
        keep = max(1, round(tokens * STAGE1_SHARE))
        features = torch.randn(1, tokens, AGGREGATION_DIM)
        sim = torch.randn(1, tokens, AGGREGATION_DIM)
        anchors = select_anchors(torch.rand(1, tokens), grid, keep, top_n=1)
        pillars = pillar_mask(torch.rand(1, keep), config.pillar_quantile)
        timings = []
        for fn in (
            lambda: _released_nxn(features, sim, anchors, grid, config.distance, pillars),
            lambda: aggregate_dense(features, sim, anchors, grid, config.distance, pillars),
            lambda: aggregate_windowed(features, sim, anchors, grid, config.distance, pillars, config.window_tile),
        ):
            fn()
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                runs.append((time.perf_counter() - start) * 1e3)
            timings.append(statistics.median(runs))
        results.append(AggregationTiming(side, tokens, keep, *timings))
    return results


def prefill_markdown(
    prefill: list[PrefillTiming], aggregation: list[AggregationTiming], absent: list[AbsentSetting] = ()
) -> str:
    lines = [
        "## Prefill: full vs pruned (median ms)",
        "",
        "Total and LLM ms are measured on `measured` decoder layers; `full-depth total` is the prefill with all "
        "the real model's layers (LLM ms x full/measured: each selector keeps its schedule at the same relative "
        "depth). The overhead share is the selector's own work over the full-depth unpruned prefill.",
        "",
        "| shape | dtype, device | layers measured / real | method | budget | avg vision tokens/layer | "
        "total ms | LLM ms | selector overhead ms | full-depth total ms | LLM FLOP ratio | LLM time ratio | "
        "realised saving | overhead / full prefill | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in prefill:
        fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
        lines.append(
            f"| {r.shape} | {r.dtype}, {r.device} | {r.measured_layers} / {r.full_depth} | "
            f"{METHOD_LABELS[r.method]} | {r.budget or 'all'} | {r.vision_tokens_per_layer:.1f} | "
            f"{r.total_ms:.1f} | {r.llm_ms:.1f} | {r.overhead_ms:.2f} | {r.full_depth_total_ms:.0f} | "
            f"{r.flop_ratio:.3f} | {r.time_ratio:.3f} | {fmt(r.realised_saving, '{:.0%}')} | "
            f"{fmt(r.overhead_share, '{:.1%}')} | {r.note} |"
        )
    unmeasured = " | ".join(["-"] * 9)  # from the vision tokens to the overhead share
    for a in absent:
        lines.append(
            f"| {a.shape} | - | - | {METHOD_LABELS[a.method]} | {a.budget} | {unmeasured} | not measured: {a.reason} |"
        )
    lines += [
        "",
        "## Stage-1 aggregation (64-token budget share, D=1024, median ms)",
        "",
        "| grid | tokens N | anchors K | released N x N | dense K x N | windowed |",
        "|---|---|---|---|---|---|",
    ]
    for a in aggregation:
        lines.append(
            f"| {a.grid}x{a.grid} | {a.tokens} | {a.anchors} | {a.full_nxn_ms:.1f} | {a.dense_ms:.1f} | "
            f"{a.windowed_ms:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_prefill(prefill: list[PrefillTiming], aggregation: list[AggregationTiming], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.2))
    pruned = [r for r in prefill if r.budget]
    labels = [f"{r.shape}\n{r.method} {r.budget}" for r in pruned]
    x = range(len(pruned))
    left.bar([i - 0.2 for i in x], [r.flop_ratio for r in pruned], 0.4, label="theoretical FLOP ratio")
    left.bar([i + 0.2 for i in x], [r.time_ratio for r in pruned], 0.4, label="measured LLM time ratio")
    left.set_xticks(list(x), labels, rotation=90, fontsize=7)
    left.set_ylabel("pruned / full")
    left.set_title("LLM prefill")
    left.legend()
    for shape, method in dict.fromkeys((r.shape, r.method) for r in pruned):
        rows = [r for r in pruned if (r.shape, r.method) == (shape, method)]
        middle.plot(
            [r.budget for r in rows],
            [r.full_depth_total_ms for r in rows],
            marker="o",
            label=f"{shape} {METHOD_LABELS[method]}",
        )
    for full in (r for r in prefill if r.budget is None):
        middle.axhline(full.full_depth_total_ms, linestyle=":", color="grey")
    middle.set_xlabel("budget (tokens per image, 24x24 grid)")
    middle.set_ylabel("ms (full depth; dotted: all tokens)")
    middle.set_yscale("log")
    middle.set_title("prefill time vs budget")
    middle.legend(fontsize=7)
    if aggregation:
        tokens = [a.tokens for a in aggregation]
        for name, key in (("released N x N", "full_nxn_ms"), ("dense K x N", "dense_ms"), ("windowed", "windowed_ms")):
            right.plot(tokens, [getattr(a, key) for a in aggregation], marker="o", label=name)
        right.set_xscale("log")
        right.set_yscale("log")
        right.set_xlabel("grid tokens N")
        right.set_ylabel("ms")
        right.set_title("stage-1 aggregation")
        right.legend()
    else:
        right.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
