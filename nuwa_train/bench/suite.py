"""The bench command's runs: which parts, shapes and budgets, on which device; the report files they write."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..timing import clock_for
from .decode import decode_markdown, plot_decode, time_decode
from .prefill import (
    AGGREGATION_GRIDS,
    PREFILL_METHODS,
    AbsentSetting,
    PrefillTiming,
    plot_prefill,
    prefill_markdown,
    time_aggregation,
    time_prefill,
)
from .shapes import SHAPES
from .training import (
    SHAPE_TRAINING_BATCH,
    SHAPE_TRAINING_DEPTHS,
    SHAPE_TRAINING_STEPS,
    shape_training_markdown,
    time_shape_training,
)


@dataclass(frozen=True)
class BenchSuite:
    """One bench run. `decode`/`training` name the shape those parts run on (None: skipped)."""

    shapes: tuple[str, ...] = ("tiny", "llava15")
    budgets: tuple[int, ...] = (64, 128, 192)
    repeats: int = 5
    methods: tuple[str, ...] = PREFILL_METHODS
    device: str = "cpu"
    full_depth: bool = False  # run every real decoder layer instead of the shape's measured subset
    decode: str | None = None
    training: str | None = None
    training_depths: tuple[int, ...] = SHAPE_TRAINING_DEPTHS
    training_steps: int = SHAPE_TRAINING_STEPS  # timed steps per mode and depth, after the warm-up steps
    aggregation_grids: tuple[int, ...] = AGGREGATION_GRIDS  # () skips the aggregation table


# One GPU, everything at LLaVA-1.5-7B's real widths and full depth (~14 GB of bf16 weights), in under 8 minutes:
#   nuwa-train bench --suite gpu     -> outputs/bench_gpu/{bench.md, bench.json, bench.png}
GPU_SUITE = BenchSuite(
    shapes=("llava15-7b",),
    repeats=10,
    device="cuda",
    full_depth=True,
    decode="llava15-7b",
    training="llava15-7b",
    training_depths=(32,),
    aggregation_grids=(),
)
GPU_SUITE_OUT = "outputs/bench_gpu"


def _shape(name: str, suite: BenchSuite):
    shape = SHAPES[name]
    return shape.at_depth(shape.depth) if suite.full_depth else shape


def run_bench(suite: BenchSuite, out_dir: Path, console=None) -> dict:
    """Run the suite's parts and write bench.md, bench.json, bench.png (and decode.png) under `out_dir`.

    A device this machine lacks raises `DeviceUnavailable` before anything is built or written.
    """
    from ..logs import print_text, report_console

    console = console or report_console()
    clock = clock_for(suite.device)
    out_dir.mkdir(parents=True, exist_ok=True)
    budgets = list(suite.budgets)
    prefill: list[PrefillTiming] = []
    absent: list[AbsentSetting] = []
    for name in suite.shapes:
        with console.status(f"timing prefill of the {name} shape ({suite.repeats} repeats per setting)"):
            rows, unmet = time_prefill(
                name, _shape(name, suite), budgets, suite.repeats, suite.methods, suite.device, clock
            )
        prefill += rows
        absent += unmet
    report = {
        "device": suite.device,
        "threads": torch.get_num_threads(),
        "repeats": suite.repeats,
        "prefill": [asdict(r) for r in prefill],
        "absent": [asdict(a) for a in absent],
    }
    markdown = []
    aggregation = []
    if suite.aggregation_grids:
        with console.status("timing stage-1 aggregation across grid sizes (CPU)"):
            aggregation = time_aggregation(suite.aggregation_grids)
        crossover = next((a.tokens for a in aggregation if a.windowed_ms < a.dense_ms), None)
        report["aggregation"] = [asdict(a) for a in aggregation]
        report["windowed_faster_from_tokens"] = crossover
    markdown.append(prefill_markdown(prefill, aggregation, absent))
    if aggregation:
        markdown.append(
            f"Windowed aggregation is faster than dense from N = {crossover} tokens.\n"
            if crossover
            else "Windowed aggregation was not faster than dense at any measured grid.\n"
        )
    if suite.decode:
        shape = _shape(suite.decode, suite)
        with console.status(f"timing decode of the {suite.decode} shape"):
            rows = time_decode(suite.decode, shape, budgets, device=suite.device, clock=clock)
        report["decode"] = [asdict(r) for r in rows]
        markdown.append(decode_markdown(rows, shape))
        plot_decode(rows, out_dir / "decode.png")
    if suite.training:
        with console.status(
            f"timing training steps of the {suite.training} shape (a fresh process per mode and depth)"
        ):
            rows = time_shape_training(
                suite.training,
                suite.training_depths,
                suite.training_steps,
                device=suite.device,
                threads=torch.get_num_threads(),
            )
        report["training"] = rows
        markdown.append(shape_training_markdown(rows, suite.training, SHAPE_TRAINING_BATCH, suite.training_depths))
    text = "\n".join(markdown)
    (out_dir / "bench.md").write_text(text)
    (out_dir / "bench.json").write_text(json.dumps(report, indent=2))
    plot_prefill(prefill, aggregation, out_dir / "bench.png")
    print_text(console, text)
    console.print(f"wrote {out_dir / 'bench.md'}, {out_dir / 'bench.json'}, {out_dir / 'bench.png'}")
    return report
