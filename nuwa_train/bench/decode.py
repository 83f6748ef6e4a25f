"""Decode cost after a long multimodal prompt: per-token latency and KV-cache bytes, full vs Nüwa-pruned.

Pruned prefill leaves a shorter KV cache (stage 1 everywhere, stage 2 shorter still in the deeper layers),
so every generated token attends over fewer keys and the cache holds fewer bytes. At batch 1 a decode step
mostly streams the weights, so the latency saving is expected to be far below the prefill's.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from ..models import attach_nuwa
from ..pruning import NuwaConfig
from ..timing import Stopwatch, WallClock
from .shapes import BenchShape, build_random_model, prompt_batch

# ~600 prompt tokens on LLaVA-1.5's grid: 576 image placeholders and a short system prompt and question.
DECODE_TEXT_WORDS = 8
DECODE_QUESTION_WORDS = 8
NEW_TOKENS = 32


@dataclass
class DecodeTiming:
    shape: str
    budget: int | None  # None: all tokens
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float
    token_ms: float  # median per generated token after the first, on the measured layers
    full_depth_token_ms: float  # with all the real model's decoder layers (LLM part x full/measured)
    kv_cache_bytes: int  # after generation, measured layers
    full_depth_kv_cache_bytes: int
    token_ratio: float = 1.0  # pruned / full per-token latency at full depth
    kv_ratio: float = 1.0


def cache_bytes(cache) -> int:
    """Bytes of every key and value tensor a transformers 5.x cache holds."""
    return sum(
        tensor.numel() * tensor.element_size()
        for layer in cache.layers
        for tensor in (layer.keys, layer.values)
        if tensor is not None
    )


def time_decode(
    shape_name: str,
    shape: BenchShape,
    budgets: list[int],
    new_tokens: int = NEW_TOKENS,
    device: str = "cpu",
    clock: WallClock | None = None,
) -> list[DecodeTiming]:
    clock = clock or WallClock()
    model, processor = build_random_model(shape, device)
    batch = prompt_batch(model, processor, shape, DECODE_TEXT_WORDS, DECODE_QUESTION_WORDS, device)
    prompt_tokens = batch["input_ids"].shape[1]
    calls, llm_calls = Stopwatch(model, clock), Stopwatch(model.model.language_model, clock)
    rows = []
    for budget in [None, *budgets]:
        handle = attach_nuwa(model, NuwaConfig(budget=budget)) if budget else None
        with torch.inference_mode():
            model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
            calls.clear()
            llm_calls.clear()
            out = model.generate(
                **batch,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                return_dict_in_generate=True,
            )
        steps, llm_steps = calls.calls(), llm_calls.calls()
        token = statistics.median(steps[1:]) * 1e3
        llm_token = statistics.median(llm_steps[1:]) * 1e3
        kv = cache_bytes(out.past_key_values)
        rows.append(
            DecodeTiming(
                shape_name,
                budget,
                prompt_tokens,
                new_tokens,
                steps[0] * 1e3,
                token,
                shape.full_depth_ms(token, llm_token),
                kv,
                round(kv * shape.depth_scale),
            )
        )
        if handle:
            handle.detach()
    calls.remove()
    llm_calls.remove()
    full = rows[0]
    for row in rows:
        row.token_ratio = row.full_depth_token_ms / full.full_depth_token_ms
        row.kv_ratio = row.full_depth_kv_cache_bytes / full.full_depth_kv_cache_bytes
    return rows


def decode_markdown(rows: list[DecodeTiming], shape: BenchShape) -> str:
    lines = [
        f"## Decode: {rows[0].new_tokens} new tokens after a {rows[0].prompt_tokens}-token prompt, batch 1",
        "",
        f"Measured on {shape.measured_layers} decoder layers; full depth = {shape.depth} layers (the LLM part "
        f"of a step and the cache scale with depth).",
        "",
        "| shape | budget | prefill ms | ms / token | full-depth ms / token | token ratio | KV cache MiB (full "
        "depth) | KV ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.budget or 'all'} | {r.prefill_ms:.0f} | {r.token_ms:.1f} | "
            f"{r.full_depth_token_ms:.1f} | {r.token_ratio:.3f} | {r.full_depth_kv_cache_bytes / 2**20:.1f} | "
            f"{r.kv_ratio:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_decode(rows: list[DecodeTiming], path) -> None:
    """Per-token latency and KV-cache size against budget (full depth), all tokens as the dotted reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full, pruned = rows[0], rows[1:]
    budgets = [r.budget for r in pruned]
    fig, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(9, 3.6))
    for axis, key, scale, label in (
        (time_axis, "full_depth_token_ms", 1, "ms / generated token"),
        (memory_axis, "full_depth_kv_cache_bytes", 2**20, "KV cache MiB"),
    ):
        axis.plot(budgets, [getattr(r, key) / scale for r in pruned], marker="o", label="Nüwa")
        axis.axhline(getattr(full, key) / scale, linestyle=":", color="grey", label="all tokens")
        axis.set_xlabel("budget (tokens per image, 24x24 grid)")
        axis.set_ylabel(label)
        axis.set_ylim(bottom=0)
        axis.legend()
    fig.suptitle(f"decode, {full.shape}: {full.new_tokens} tokens after a {full.prompt_tokens}-token prompt")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
