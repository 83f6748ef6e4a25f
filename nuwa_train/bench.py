"""`nuwa-train bench`: does pruning make prefill as fast as the FLOP count says, and what does Nüwa cost?

For each model shape and budget it times the unpruned and the Nüwa-pruned prefill (median of
repeats), splits out the LLM part (hooks on the language model) and Nüwa's own work (saliency,
stage-1 selection/aggregation, stage-2 scoring), and prints the measured LLM time ratio beside the
theoretical FLOP ratio. A second table times stage-1 aggregation dense (K x N), windowed (only
pairs inside the radius) and the released code's N x N similarity, across grid sizes.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .models import attach_nuwa
from .models.tiny import TinyLlavaSpec, build_tiny_llava
from .pruning import PAPER_PRESETS, NuwaConfig
from .pruning.stage1 import (
    aggregate_dense,
    aggregate_windowed,
    grid_coordinates,
    pillar_mask,
    proximity,
    select_anchors,
)

# Model shapes benchmarked. "llava15" keeps LLaVA-1.5's structure (24x24 grid from 336 px / 14 px
# patches, 24 CLIP layers, 32 LLM layers, stage 2 at 16) at CPU-sized widths.
SHAPES = {
    "tiny": TinyLlavaSpec(),
    "llava15": TinyLlavaSpec(image_size=336, patch_size=14, vision_hidden=256, vision_layers=24, vision_heads=4,
                             vision_feature_layer=-2, text_hidden=512, text_layers=32, text_heads=8, text_kv_heads=8,
                             mlp_ratio=3),
}
SYSTEM_PROMPT_WORDS = 30  # text before the image, like LLaVA-1.5's system prompt
QUESTION_WORDS = 20
AGGREGATION_GRIDS = (24, 32, 48, 64, 96)
AGGREGATION_DIM = 1024  # CLIP-L width: the size aggregation runs at on real checkpoints
# Anchors as a share of the grid: the paper's stage-1 K at its smallest budget (112 of LLaVA-1.5's 576 at 64).
STAGE1_SHARE = PAPER_PRESETS[64][1] / (24 * 24)


def llm_flops(tokens_per_layer: list[int], hidden: int, intermediate: int) -> float:
    """The paper's (FastV's) per-layer cost 4nd^2 + 2n^2d + 2ndm, summed over layers."""
    return sum(4 * n * hidden**2 + 2 * n**2 * hidden + 2 * n * hidden * intermediate for n in tokens_per_layer)


class _Stopwatch:
    """Wall time of one module's forward, via hooks (so it includes whatever runs inside it)."""

    def __init__(self, module: torch.nn.Module):
        self.seconds = 0.0
        self._start = 0.0
        self._hooks = [module.register_forward_pre_hook(self._begin), module.register_forward_hook(self._end)]

    def _begin(self, *_):
        self._start = time.perf_counter()

    def _end(self, *_):
        self.seconds += time.perf_counter() - self._start

    def remove(self):
        for hook in self._hooks:
            hook.remove()


@dataclass
class PrefillTiming:
    shape: str
    budget: int | None  # None: all tokens
    total_ms: float
    llm_ms: float
    overhead_ms: float
    vision_tokens_per_layer: float
    flop_ratio: float = 1.0
    time_ratio: float = 1.0
    realised_saving: float | None = None  # measured LLM saving / theoretical saving
    overhead_share: float | None = None  # Nüwa's own time / unpruned prefill


BENCH_WORDS = [f"w{i}" for i in range(64)]


def _prompt(words: int, question: int) -> str:
    text = lambda n, k: " ".join(BENCH_WORDS[(i + k) % len(BENCH_WORDS)] for i in range(n))  # noqa: E731
    return f"{text(words, 0)} user : <image> {text(question, 7)} ? assistant :"


def time_prefill(shape: str, spec: TinyLlavaSpec, budgets: list[int], repeats: int, seed: int = 0) -> list[PrefillTiming]:
    torch.manual_seed(seed)
    model, processor = build_tiny_llava(spec, words=BENCH_WORDS)
    image = torch.rand(1, 3, spec.image_size, spec.image_size)
    inputs = processor.tokenizer([_prompt(SYSTEM_PROMPT_WORDS, QUESTION_WORDS)], return_tensors="pt")
    image_id = model.config.image_token_index
    ids = inputs["input_ids"][0]
    at = int(ids.eq(image_id).nonzero()[0])
    num_tokens = spec.grid[0] * spec.grid[1]
    ids = torch.cat([ids[:at], torch.full((num_tokens,), image_id), ids[at + 1:]])[None]
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=image, logits_to_keep=1)
    text_tokens = ids.shape[1] - num_tokens
    text_cfg = model.config.text_config

    def measure(config: NuwaConfig | None):
        handle = attach_nuwa(model, config) if config else None
        stopwatch = _Stopwatch(model.model.language_model)
        samples = []
        with torch.inference_mode():
            for run in range(repeats + 1):  # the first run warms up
                stopwatch.seconds = 0.0
                if handle:
                    handle.overhead_seconds.clear()
                start = time.perf_counter()
                model(**batch)
                total = time.perf_counter() - start
                overhead = sum(handle.overhead_seconds.values()) if handle else 0.0
                if run:
                    samples.append((total, stopwatch.seconds, overhead))
        stopwatch.remove()
        plan = handle.plan if handle else None
        if handle:
            handle.detach()
        return [statistics.median(s[i] for s in samples) * 1e3 for i in range(3)], plan

    (total, llm, _), _ = measure(None)
    full = PrefillTiming(shape, None, total, llm, 0.0, num_tokens)
    full_flops = llm_flops([text_tokens + num_tokens] * text_cfg.num_hidden_layers, text_cfg.hidden_size,
                           text_cfg.intermediate_size)
    results = [full]
    for budget in budgets:
        (total, llm, overhead), plan = measure(NuwaConfig(budget=budget))
        flops = llm_flops([text_tokens + n for n in plan.tokens_per_layer], text_cfg.hidden_size,
                          text_cfg.intermediate_size)
        flop_ratio, time_ratio = flops / full_flops, llm / full.llm_ms
        results.append(PrefillTiming(shape, budget, total, llm, overhead, plan.average_tokens, flop_ratio, time_ratio,
                                     (1 - time_ratio) / (1 - flop_ratio), overhead / full.total_ms))
    return results


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


def time_aggregation(grids=AGGREGATION_GRIDS, repeats: int = 3, config: NuwaConfig = NuwaConfig()) -> list[AggregationTiming]:
    results = []
    for side in grids:
        grid, tokens = (side, side), side * side
        keep = max(1, round(tokens * STAGE1_SHARE))
        features = torch.randn(1, tokens, AGGREGATION_DIM)
        sim = torch.randn(1, tokens, AGGREGATION_DIM)
        anchors = select_anchors(torch.rand(1, tokens), grid, keep, top_n=1)
        pillars = pillar_mask(torch.rand(1, keep), config.pillar_quantile)
        timings = []
        for fn in (lambda: _released_nxn(features, sim, anchors, grid, config.distance, pillars),
                   lambda: aggregate_dense(features, sim, anchors, grid, config.distance, pillars),
                   lambda: aggregate_windowed(features, sim, anchors, grid, config.distance, pillars,
                                              config.window_tile)):
            fn()
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                runs.append((time.perf_counter() - start) * 1e3)
            timings.append(statistics.median(runs))
        results.append(AggregationTiming(side, tokens, keep, *timings))
    return results


def _markdown(prefill: list[PrefillTiming], aggregation: list[AggregationTiming]) -> str:
    lines = ["## Prefill: full vs Nüwa-pruned (median ms)", "",
             "| shape | budget | avg vision tokens/layer | total ms | LLM ms | Nüwa overhead ms | LLM FLOP ratio | "
             "LLM time ratio | realised saving | overhead / full prefill |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in prefill:
        fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)  # noqa: E731
        lines.append(f"| {r.shape} | {r.budget or 'all'} | {r.vision_tokens_per_layer:.1f} | {r.total_ms:.1f} | "
                     f"{r.llm_ms:.1f} | {r.overhead_ms:.2f} | {r.flop_ratio:.3f} | {r.time_ratio:.3f} | "
                     f"{fmt(r.realised_saving, '{:.0%}')} | {fmt(r.overhead_share, '{:.1%}')} |")
    lines += ["", "## Stage-1 aggregation (64-token budget share, D=1024, median ms)", "",
              "| grid | tokens N | anchors K | released N x N | dense K x N | windowed |", "|---|---|---|---|---|---|"]
    for a in aggregation:
        lines.append(f"| {a.grid}x{a.grid} | {a.tokens} | {a.anchors} | {a.full_nxn_ms:.1f} | {a.dense_ms:.1f} | "
                     f"{a.windowed_ms:.1f} |")
    return "\n".join(lines) + "\n"


def _plot(prefill: list[PrefillTiming], aggregation: list[AggregationTiming], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    pruned = [r for r in prefill if r.budget]
    labels = [f"{r.shape}\n{r.budget}" for r in pruned]
    x = range(len(pruned))
    left.bar([i - 0.2 for i in x], [r.flop_ratio for r in pruned], 0.4, label="theoretical FLOP ratio")
    left.bar([i + 0.2 for i in x], [r.time_ratio for r in pruned], 0.4, label="measured LLM time ratio")
    left.set_xticks(list(x), labels)
    left.set_ylabel("pruned / full")
    left.set_title("LLM prefill")
    left.legend()
    tokens = [a.tokens for a in aggregation]
    for name, key in (("released N x N", "full_nxn_ms"), ("dense K x N", "dense_ms"), ("windowed", "windowed_ms")):
        right.plot(tokens, [getattr(a, key) for a in aggregation], marker="o", label=name)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("grid tokens N")
    right.set_ylabel("ms")
    right.set_title("stage-1 aggregation")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(shapes: list[str], budgets: list[int], repeats: int, out_dir: Path, aggregation_grids=AGGREGATION_GRIDS,
              console=None) -> dict:
    from rich.console import Console

    console = console or Console()
    prefill = []
    for shape in shapes:
        with console.status(f"timing prefill of the {shape} shape ({repeats} repeats per budget)"):
            prefill += time_prefill(shape, SHAPES[shape], budgets, repeats)
    with console.status("timing stage-1 aggregation across grid sizes"):
        aggregation = time_aggregation(aggregation_grids)
    crossover = next((a.tokens for a in aggregation if a.windowed_ms < a.dense_ms), None)
    report = {"threads": torch.get_num_threads(), "repeats": repeats, "prefill": [asdict(r) for r in prefill],
              "aggregation": [asdict(a) for a in aggregation], "windowed_faster_from_tokens": crossover}
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = _markdown(prefill, aggregation)
    markdown += f"\nWindowed aggregation is faster than dense from N = {crossover} tokens.\n" if crossover else \
        "\nWindowed aggregation was not faster than dense at any measured grid.\n"
    (out_dir / "bench.md").write_text(markdown)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
    _plot(prefill, aggregation, out_dir / "bench.png")
    console.print(markdown)
    console.print(f"wrote {out_dir / 'bench.md'}, {out_dir / 'bench.json'}, {out_dir / 'bench.png'}")
    return report


# ------------------------------------------------------------------------------------------ training step
TRAINING_MODES = {  # label -> (pruning method, selection mode)
    "plain LoRA": ("none", "hard"),
    "Nüwa soft": ("nuwa", "soft"),
    "Nüwa straight-through": ("nuwa", "straight_through"),
    "Nüwa hard": ("nuwa", "hard"),
}


def _training_probe(model_path: str, method: str, mode: str, steps: int, batch_size: int, threads: int, queue) -> None:
    """One mode in a fresh process, so its peak RSS is its own: median step time and memory growth."""
    import resource

    torch.set_num_threads(threads)
    from .lightning import LoraSettings, NuwaDataModule, NuwaFineTuner

    module = NuwaFineTuner(model_path=model_path, pruning=NuwaConfig(method=method), lora=LoraSettings(dropout=0.0))
    module.setup("fit")  # what the Trainer calls first (CPU numerics)
    module.configure_model()
    data = NuwaDataModule(processor_path=model_path)
    records = data.dataset("train")
    batch = data.collator()([records[i] for i in range(batch_size)])
    optimizer = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-4)
    module.nuwa.set_selection(mode, 0.5)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        module.model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"step_ms": statistics.median(times[1:]) * 1e3, "peak_rss_mb": peak, "growth_mb": peak - before})


def time_training(model_path: str, steps: int = 8, batch_size: int = 16, threads: int = 2) -> list[dict]:
    """Training step time and peak memory of each selection mode vs plain LoRA, on the same batch."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    rows = []
    for label, (method, mode) in TRAINING_MODES.items():
        queue = context.Queue()
        process = context.Process(target=_training_probe,
                                  args=(model_path, method, mode, steps, batch_size, threads, queue))
        process.start()
        result = queue.get()
        process.join()
        rows.append({"mode": label, **result})
    base = rows[0]
    for row in rows:
        row["time_ratio"] = row["step_ms"] / base["step_ms"]
        row["memory_ratio"] = row["peak_rss_mb"] / base["peak_rss_mb"]
        row["growth_ratio"] = row["growth_mb"] / max(base["growth_mb"], 1e-9)
    return rows


def training_markdown(rows: list[dict], model_path: str, batch_size: int) -> str:
    lines = [f"## Training step: {model_path}, batch {batch_size} (median ms; peak RSS of a fresh process)", "",
             "| mode | step ms | time ratio | peak RSS MB | memory ratio | growth during steps MB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['step_ms']:.0f} | {r['time_ratio']:.2f} | {r['peak_rss_mb']:.0f} | "
                     f"{r['memory_ratio']:.2f} | {r['growth_mb']:.0f} |")
    return "\n".join(lines) + "\n"


__all__ = ["run_bench", "time_prefill", "time_aggregation", "llm_flops", "SHAPES", "time_training",
           "training_markdown"]


# ------------------------------------------------------------------------------------------ data start-up
def write_startup_dataset(out_dir: Path, records: int) -> Path:
    """A LLaVA file of `records` VQA records, each with its own (small) image file, as a large user dataset has."""
    import io

    from PIL import Image

    from .data.formats import IMAGE_DIR, IMAGE_TOKEN, LLAVA_FILE

    images = out_dir / IMAGE_DIR
    images.mkdir(parents=True, exist_ok=True)
    encoded = io.BytesIO()
    Image.new("RGB", (96, 96), (200, 40, 40)).save(encoded, "PNG")
    rows = []
    for i in range(records):
        name = f"{IMAGE_DIR}/{i:07d}.png"
        (out_dir / name).write_bytes(encoded.getvalue())
        rows.append({"id": f"r{i}", "image": name, "conversations": [
            {"from": "human", "value": f"{IMAGE_TOKEN}\nwhat colour is the square ?"}, {"from": "gpt", "value": "red"}]})
    (out_dir / LLAVA_FILE).write_text(json.dumps(rows))
    return out_dir / LLAVA_FILE


def time_data_startup(model_path: str, llava_file: Path, batch_size: int = 16) -> dict:
    """Seconds from building the data module to the first training step of a real `fit` on a user file."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from .lightning import NuwaDataModule, NuwaFineTuner

    marks = {}

    class FirstStep(Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_index):
            marks["first_step"] = time.perf_counter()

    started = time.perf_counter()
    data = NuwaDataModule(processor_path=model_path, train_files={"llava": [str(llava_file)]}, batch_size=batch_size)
    records = len(data.dataset("train"))
    marks["records_loaded"] = time.perf_counter()
    module = NuwaFineTuner(model_path=model_path)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[FirstStep()],
                        default_root_dir=str(llava_file.parent / "run"))
    trainer.fit(module, data)
    return {"records": records, "load_seconds": round(marks["records_loaded"] - started, 2),
            "first_step_seconds": round(marks["first_step"] - started, 2)}
