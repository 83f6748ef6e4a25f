"""FastV on an LLM too shallow for its configured layer: it runs at the deepest earlier layer that meets the budget,
and a budget no layer can meet is a row that says why (eval --compare and bench), never a silent gap."""

import json

import pytest

from nuwa_train.cli import main
from nuwa_train.pruning import NuwaConfig, NuwaConfigError
from nuwa_train.pruning.within_budget import fastv_within_budget

SHIPPED_GRID, SHIPPED_LAYERS = (12, 12), 10  # data/tiny_base


def test_fastv_moves_to_the_deepest_layer_that_meets_the_budget():
    llava = NuwaConfig(method="fastv", budget=64)
    assert fastv_within_budget(llava, (24, 24), 32) == (llava, "")  # LLaVA-1.5: its own layer 2 meets 64
    moved, note = fastv_within_budget(llava, SHIPPED_GRID, SHIPPED_LAYERS)
    assert moved == NuwaConfig(method="fastv", budget=64, fastv_layer=1)
    assert note == "FastV after layer 1: fastv_layer=2 cannot meet budget 64 on this 10-layer LLM"
    plan = moved.plan(SHIPPED_GRID, SHIPPED_LAYERS)
    assert plan.average_tokens <= 64 * 144 / 576 + 1 and plan.stage2.keep >= 1  # the budget holds, tokens remain
    deep = NuwaConfig(method="fastv", budget=128, fastv_layer=4)  # 3 and 2 cannot meet 128 either on 10 layers
    assert fastv_within_budget(deep, SHIPPED_GRID, SHIPPED_LAYERS)[0].fastv_layer == 2
    with pytest.raises(NuwaConfigError, match="fastv_layer=2 of 10 layers"):  # no layer: the configured one's error
        fastv_within_budget(NuwaConfig(method="fastv", budget=32), SHIPPED_GRID, SHIPPED_LAYERS)
    nuwa = NuwaConfig(budget=64)
    assert fastv_within_budget(nuwa, SHIPPED_GRID, 4) == (nuwa, "")  # other methods: unchanged


def test_eval_compare_keeps_fastv_rows_with_the_layer_they_ran_at_or_the_reason(tiny_base_dir, tmp_path):
    out = tmp_path / "compare"
    main(["eval", "--model", tiny_base_dir, "--compare", "--budgets", "64,192", "--images", "1", "--out", str(out)])
    rows = {(row["method"], row["budget"]): row for row in json.loads((out / "results.json").read_text())["rows"]}
    met, unmet = rows["FastV", 192], rows["FastV", 64]  # tiny_base_dir: 12x12 grid, 4 LLM layers
    assert met["note"] == "FastV after layer 1: fastv_layer=2 cannot meet budget 192 on this 4-layer LLM"
    assert met["vision_tokens"] == (144 + 3 * 16) / 4 and met["num_vqa"] == 1
    assert unmet["vqa_em"] is None and "budget=64 cannot be met by FastV at fastv_layer=2 of 4" in unmet["note"]
    assert rows["Nüwa", 64]["vqa_em"] is not None  # the other pruners are unaffected
    table = (out / "results.md").read_text()
    assert "| FastV | 192 | 48.0 |" in table and "FastV after layer 1" in table
