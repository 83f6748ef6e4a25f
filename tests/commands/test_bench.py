"""The benchmark runs end to end, its derivations hold and its device dispatch is right (timings are not asserted)."""

import json

import pytest
import torch

from nuwa_train.bench import SHAPES, BenchSuite, llm_flops, run_bench
from nuwa_train.bench.shapes import build_random_model
from nuwa_train.bench.training import _extrapolate
from nuwa_train.cli import main
from nuwa_train.pruning import NuwaConfig
from nuwa_train.timing import CudaClock, DeviceUnavailable, Timings, WallClock, clock_for


def test_llm_flops_counts_tokens_per_layer():
    assert llm_flops([10, 10], hidden=4, intermediate=8) == 2 * (4 * 10 * 16 + 2 * 100 * 4 + 2 * 10 * 4 * 8)
    assert llm_flops([100] * 4, 64, 128) > llm_flops([100, 100, 20, 20], 64, 128)


def test_bench_writes_its_report(tmp_path):
    suite = BenchSuite(shapes=("tiny",), budgets=(64, 128, 192), repeats=1, decode="tiny", aggregation_grids=(8, 12))
    report = run_bench(suite, tmp_path)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["prefill"] == report["prefill"] and (tmp_path / "bench.png").stat().st_size > 0
    rows = {(r["method"], r["budget"]): r for r in report["prefill"]}
    # FastV keeps all 144 tokens in its first layers: 192 is met after layer 1 of the tiny LM's 4 (not its own 2),
    # 64 and 128 at no layer. Those are reported as not measured, with the reason, not dropped silently.
    measured = {(method, budget) for method in ("nuwa", "visionzip") for budget in (64, 128, 192)}
    assert set(rows) == {("none", None), ("fastv", 192)} | measured
    assert rows["fastv", 192]["note"] == "FastV after layer 1: fastv_layer=2 cannot meet budget 192 on this 4-layer LLM"
    assert rows["fastv", 192]["vision_tokens_per_layer"] == (144 + 3 * 16) / 4 and rows["nuwa", 64]["note"] == ""
    assert [(a["method"], a["budget"]) for a in saved["absent"]] == [("fastv", 64), ("fastv", 128)]
    assert all("cannot be met by FastV at fastv_layer=2 of 4 layers" in a["reason"] for a in saved["absent"])
    for row in report["prefill"]:  # the schema scripts read
        assert {"shape", "budget", "realised_saving", "overhead_share"} <= set(row)
    assert 0 < rows["nuwa", 64]["flop_ratio"] < rows["nuwa", 128]["flop_ratio"] < 1
    assert rows["nuwa", 64]["vision_tokens_per_layer"] == 16 and rows["nuwa", 64]["measured_layers"] == 4
    assert rows["none", None]["full_depth_total_ms"] == rows["none", None]["total_ms"]  # measured at full depth
    assert [a["tokens"] for a in report["aggregation"]] == [64, 144]
    full, *pruned = report["decode"]
    assert full["kv_ratio"] == 1 and all(0 < r["kv_ratio"] < 1 for r in pruned)
    assert pruned[0]["kv_cache_bytes"] < pruned[1]["kv_cache_bytes"] < full["kv_cache_bytes"]
    markdown = (tmp_path / "bench.md").read_text()
    assert "| tiny | float32, cpu | 4 / 4 | Nüwa | 64 |" in markdown and "## Decode" in markdown
    assert "| tiny | - | - | FastV | 64 | - |" in markdown and "not measured: budget=64 cannot be met" in markdown
    assert (tmp_path / "decode.png").stat().st_size > 0


@pytest.mark.parametrize("method", ["nuwa", "visionzip", "fastv"])
@pytest.mark.parametrize("budget", [64, 128, 192])
def test_measured_layers_keep_the_full_depth_token_schedule(method, budget):
    """What lets 16 measured layers stand for 32: every selector's per-layer tokens, each layer doubled."""
    shape = SHAPES["llava15-7b"]
    grid = shape.spec.grid
    measured = shape.selector_config(method, budget).plan(grid, shape.measured_layers).tokens_per_layer
    real = NuwaConfig(method=method, budget=budget).plan(grid, shape.depth).tokens_per_layer
    assert [n for n in measured for _ in range(round(shape.depth_scale))] == real


def test_full_depth_runs_every_real_layer():
    shape = SHAPES["llava15-7b"]
    assert (shape.measured_layers, shape.depth, shape.depth_scale) == (16, 32, 2)
    full = shape.at_depth(shape.depth)
    assert full.depth_scale == 1 and full.selector_config("fastv", 64).fastv_layer == NuwaConfig().fastv_layer


def test_random_weights_are_finite_and_norms_are_one():
    model, _ = build_random_model(SHAPES["tiny"])
    for name, weight in model.named_parameters():
        assert torch.isfinite(weight).all(), name
        if "norm" in name and name.endswith("weight"):
            assert torch.all(weight == 1), name
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_training_step_extrapolates_linearly_in_depth():
    assert _extrapolate({4: 10.0, 8: 18.0}, 32) == pytest.approx(66.0)
    assert _extrapolate({2: 1.0, 4: 7.0, 8: 18.0}, 16) == pytest.approx(40.0)  # the two deepest points


class _FakeEvent:
    """torch.cuda.Event's timing interface: each recorded event is 5 ms after the previous one."""

    recorded = 0

    def __init__(self, enable_timing):
        assert enable_timing
        self.at = None

    def record(self):
        _FakeEvent.recorded += 1
        self.at = 5.0 * _FakeEvent.recorded

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return end.at - self.at


def test_clock_dispatch(monkeypatch):
    assert type(clock_for("cpu")) is WallClock
    with pytest.raises(ValueError, match="tpu"):
        clock_for("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailable, match="cuda:1"):
        clock_for("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    clock = clock_for("cuda")
    assert isinstance(clock, CudaClock)
    timings = Timings(clock)
    for _ in range(3):
        with timings.measure("stage1"):
            pass
    assert timings.totals() == {"stage1": pytest.approx(3 * 0.005)}  # events, in seconds


def test_gpu_suite_without_a_gpu_is_skipped_cleanly(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    main(["bench", "--suite", "gpu", "--out", str(tmp_path / "gpu")])
    assert "skipped" in capsys.readouterr().out and not (tmp_path / "gpu").exists()


def test_gpu_suite_preset():
    from argparse import Namespace

    from nuwa_train.commands.bench import bench_suite

    suite, out = bench_suite(Namespace(suite="gpu", out=None))
    assert (suite.device, suite.full_depth, suite.shapes, suite.decode, suite.training) == (
        "cuda",
        True,
        ("llava15-7b",),
        "llava15-7b",
        "llava15-7b",
    )
    assert suite.training_depths == (SHAPES["llava15-7b"].depth,) and str(out) == "outputs/bench_gpu"


def test_unknown_shape_is_named(capsys):
    with pytest.raises(SystemExit, match="unknown --decode llava99"):
        main(["bench", "--decode", "llava99"])


def _die_before_reporting(queue):
    import os

    os._exit(3)


def test_a_probe_that_dies_is_an_error_not_a_hang():
    import multiprocessing

    from nuwa_train.bench.training import _probe_result

    with pytest.raises(RuntimeError, match=r"probe for plain LoRA at 8 layers exited with code 3"):
        _probe_result(multiprocessing.get_context("fork"), _die_before_reporting, (), "plain LoRA at 8 layers")


def test_training_bench_on_a_model_dir_times_every_mode(tiny_base_dir, tmp_path):
    """`nuwa-train bench --training MODEL_DIR`: one fresh process per mode, ratios against plain LoRA."""
    from nuwa_train.bench.training import TRAINING_MODES

    main(["bench", "--training", tiny_base_dir, "--batch-size", "2", "--train-steps", "1", "--out", str(tmp_path)])
    table = (tmp_path / "training.md").read_text().splitlines()
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")[1:] for line in table if line.startswith("| ")}
    assert set(TRAINING_MODES) <= set(rows)
    assert rows["plain LoRA"][1] == "1.00" and rows["plain LoRA"][3] == "1.00"  # time and memory ratios
    for mode in TRAINING_MODES:
        step_ms, time_ratio, peak_mib = (float(value) for value in rows[mode][:3])
        assert step_ms > 0 and time_ratio > 0 and peak_mib > 0, mode
