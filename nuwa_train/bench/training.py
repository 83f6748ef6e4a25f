"""Training-step cost of pruning-aware fine-tuning vs plain LoRA: time and peak memory per selection mode.

Each mode runs in a fresh (spawned) process so its peak memory is its own.
"""

from __future__ import annotations

import statistics

import torch

from ..models import attach_nuwa
from ..pruning import NuwaConfig
from ..timing import WallClock

TRAINING_STEPS = 8  # timed steps per mode of the model-directory bench
# Untimed steps first. Measured at llava15-7b widths (8 layers, CPU): soft steps took 21.1, 18.6, 16.3, 15.7, 14.7,
# 15.5 s and plain LoRA 20.7, 14.1, 13.2, 14.0, 15.1, 14.8 s: after one warm-up step soft reads 1.3x plain, after
# three 1.04x.
WARMUP_STEPS = 3
PROBE_POLL_SECONDS = 5.0  # how often a waiting parent checks that its probe process is still alive


def _probe_result(context, target, args, what: str) -> dict:
    """Run `target(*args, queue)` in a fresh process and return what it put on the queue; a probe that dies
    (out of memory, an error) is an error naming it, not a parent waiting forever."""
    from queue import Empty

    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    try:
        while True:
            try:
                return queue.get(timeout=PROBE_POLL_SECONDS)
            except Empty:
                if not process.is_alive():
                    raise RuntimeError(
                        f"the training probe for {what} exited with code {process.exitcode} before "
                        f"reporting (its error is printed above; -9 usually means out of memory)"
                    ) from None
    finally:
        process.join()


def _with_ratios(rows: list[dict]) -> list[dict]:
    """Each mode's time, peak memory and memory growth relative to the first row (plain LoRA)."""
    base = rows[0]
    for row in rows:
        row["time_ratio"] = row["step_ms"] / base["step_ms"]
        row["memory_ratio"] = row["peak_mib"] / base["peak_mib"]
        row["growth_ratio"] = row["growth_mib"] / max(base["growth_mib"], 1e-9)
    return rows


def _measure_steps(model, batch: dict, optimizer, steps: int, clock: WallClock) -> dict:
    """Median time of `steps` optimizer steps after WARMUP_STEPS, the peak memory, and what the steps added to it."""
    clock.reset_peak_memory()
    before = clock.peak_memory_mib()
    times = []
    for _ in range(WARMUP_STEPS + steps):  # the first steps allocate the optimizer state and settle the allocator
        start = clock.mark()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(clock.seconds(start, clock.mark()))
    peak = clock.peak_memory_mib()
    return {"step_ms": statistics.median(times[WARMUP_STEPS:]) * 1e3, "peak_mib": peak, "growth_mib": peak - before}


TRAINING_MODES = {  # label -> (pruning method, selection mode)
    "plain LoRA": ("none", "hard"),
    "Nüwa soft": ("nuwa", "soft"),
    "Nüwa straight-through": ("nuwa", "straight_through"),
    "Nüwa hard": ("nuwa", "hard"),
}


def _start_probe(threads: int) -> None:
    """A fresh probe process runs with the CLI's numerics (cli.main): subnormals flushed to zero before any thread
    pool exists (worker threads inherit the mode of the thread that creates them), then its thread count. Training
    runs this way (NuwaFineTuner.setup too), and soft steps' near-zero keep probabilities make subnormals."""
    torch.set_flush_denormal(True)
    torch.set_num_threads(threads)


def _training_probe(model_path: str, method: str, mode: str, steps: int, batch_size: int, threads: int, queue) -> None:
    """One mode in a fresh process, so its peak RSS is its own: median step time and memory growth."""
    _start_probe(threads)
    from ..lightning import LoraSettings, NuwaDataModule, NuwaFineTuner

    module = NuwaFineTuner(model_path=model_path, pruning=NuwaConfig(method=method), lora=LoraSettings(dropout=0.0))
    module.setup("fit")  # what the Trainer calls first (CPU numerics)
    module.configure_model()
    data = NuwaDataModule(processor_path=model_path)
    records = data.dataset("train")
    batch = data.collator()([records[i] for i in range(batch_size)])
    optimizer = torch.optim.AdamW([p for p in module.model.parameters() if p.requires_grad], lr=1e-4)
    module.nuwa.set_selection(mode, 0.5)
    queue.put(_measure_steps(module.model, batch, optimizer, steps, WallClock()))


def time_training(model_path: str, steps: int = TRAINING_STEPS, batch_size: int = 16, threads: int = 2) -> list[dict]:
    """Training step time and peak memory of each selection mode vs plain LoRA, on the same batch."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    rows = []
    for label, (method, mode) in TRAINING_MODES.items():
        result = _probe_result(context, _training_probe, (model_path, method, mode, steps, batch_size, threads), label)
        rows.append({"mode": label, **result})
    return _with_ratios(rows)


def _mode_table(rows: list[dict]) -> list[str]:
    lines = [
        "| mode | step ms | time ratio | peak MiB | memory ratio | growth MiB | growth ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['step_ms']:.0f} | {r['time_ratio']:.2f} | {r['peak_mib']:.0f} | "
            f"{r['memory_ratio']:.2f} | {r['growth_mib']:.0f} | {r['growth_ratio']:.2f} |"
        )
    return lines


def training_markdown(rows: list[dict], model_path: str, batch_size: int) -> str:
    lines = [
        f"## Training step: {model_path}, batch {batch_size} (median ms; peak RSS of a fresh process)",
        "",
        *_mode_table(rows),
    ]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ real-width training
# Decoder layers measured; the full-depth step is extrapolated linearly. From 4 and 8 layers the line multiplied
# step noise by 6 on the way to 32 (two runs put soft at 1.62x and 1.57x plain while a profiled step was 1.01x);
# from 8 and 16 by 2. 16 llava15-7b layers peak at ~14 GiB in bf16.
SHAPE_TRAINING_DEPTHS = (8, 16)
ANSWER_WORDS = 8  # label tokens per record: a short answer, as the VQA/grounding records have
SHAPE_TRAINING_BATCH = 1
SHAPE_TRAINING_STEPS = 2


def _shape_probe(
    shape_name: str, layers: int, method: str, mode: str, steps: int, batch_size: int, device: str, threads: int, queue
) -> None:
    """One mode at one depth in a fresh process: median step time and peak memory (RSS, or CUDA allocated)."""
    _start_probe(threads)
    from peft import get_peft_model

    from ..lightning.module import LoraSettings, lora_config
    from ..timing import clock_for
    from .shapes import SHAPES, build_random_model, prompt_batch

    clock = clock_for(device)
    shape = SHAPES[shape_name].at_depth(layers)
    base, processor = build_random_model(shape, device)
    model = get_peft_model(base.train(), lora_config(base, LoraSettings(dropout=0.0, targets="lm+vision")))
    if method != "none":
        attach_nuwa(model, NuwaConfig(method=method)).set_selection(mode, 0.5)
    one = prompt_batch(base, processor, shape, 8, 8, device, answer=ANSWER_WORDS)
    batch = {key: value.expand(batch_size, *value.shape[1:]).contiguous() for key, value in one.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    queue.put(_measure_steps(model, batch, optimizer, steps, clock))


def _extrapolate(points: dict[int, float], depth: int) -> float:
    """The value at `depth` from a straight line through the two deepest measured depths."""
    (low, at_low), (high, at_high) = sorted(points.items())[-2:]
    return at_high + (at_high - at_low) * (depth - high) / (high - low)


def time_shape_training(
    shape_name: str,
    depths=SHAPE_TRAINING_DEPTHS,
    steps: int = SHAPE_TRAINING_STEPS,
    batch_size: int = SHAPE_TRAINING_BATCH,
    device: str = "cpu",
    threads: int = 2,
) -> list[dict]:
    """Plain LoRA vs pruning-aware soft / straight-through / hard steps on a shape's real-width layers.

    Each decoder layer adds the same time and memory (same widths, the same token schedule at the same relative
    depth), so the full-depth step is a straight line through the measured depths; depths equal to the real one
    are reported as measured.
    """
    import multiprocessing

    from .shapes import SHAPES

    full_depth = SHAPES[shape_name].depth
    context = multiprocessing.get_context("spawn")
    rows = []
    for label, (method, mode) in TRAINING_MODES.items():
        measured = {}
        for layers in depths:
            measured[layers] = _probe_result(
                context,
                _shape_probe,
                (shape_name, layers, method, mode, steps, batch_size, device, threads),
                f"{label} at {layers} layers",
            )
        row = {"mode": label, "measured": {str(k): v for k, v in measured.items()}, "depth": full_depth}
        for key in ("step_ms", "peak_mib", "growth_mib"):
            points = {layers: result[key] for layers, result in measured.items()}
            row[key] = points[full_depth] if full_depth in points else _extrapolate(points, full_depth)
        rows.append(row)
    return _with_ratios(rows)


def shape_training_markdown(rows: list[dict], shape_name: str, batch_size: int, depths) -> str:
    depth = rows[0]["depth"]
    how = "measured" if depth in depths else f"extrapolated linearly from {' and '.join(map(str, depths))} layers"
    lines = [
        f"## Training step: {shape_name}, batch {batch_size}, {depth} decoder layers ({how})",
        "",
        "LoRA rank 16 on the LLM and vision projections, projector trained, AdamW; peak memory is the fresh "
        "process's peak RSS (CPU) or max allocated (CUDA), growth is what the steps add on top of the weights.",
        "",
        *_mode_table(rows),
    ]
    return "\n".join(lines) + "\n"
