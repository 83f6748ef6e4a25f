"""The benchmark runs end to end and its FLOP model behaves (timings themselves are not asserted)."""

import json

from nuwa_train.bench import llm_flops, run_bench


def test_llm_flops_counts_tokens_per_layer():
    assert llm_flops([10, 10], hidden=4, intermediate=8) == 2 * (4 * 10 * 16 + 2 * 100 * 4 + 2 * 10 * 4 * 8)
    assert llm_flops([100] * 4, 64, 128) > llm_flops([100, 100, 20, 20], 64, 128)


def test_bench_writes_its_report(tmp_path):
    report = run_bench(["tiny"], [64], repeats=1, out_dir=tmp_path, aggregation_grids=(8, 12))
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["prefill"] == report["prefill"] and (tmp_path / "bench.png").stat().st_size > 0
    full, pruned = report["prefill"]
    assert full["budget"] is None and pruned["budget"] == 64
    assert 0 < pruned["flop_ratio"] < 1 and pruned["vision_tokens_per_layer"] == 16
    assert [a["tokens"] for a in report["aggregation"]] == [64, 144]
    assert "| tiny | 64 |" in (tmp_path / "bench.md").read_text()
