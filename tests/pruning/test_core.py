"""The pure-tensor core: faithful stage 1, batched independence, stage-2 selection, budgets."""

import pytest
import torch
import torch.nn.functional as F

from nuwa_train.pruning import PAPER_PRESETS, NuwaConfig, NuwaConfigError, nuwa_stage1, select_top
from nuwa_train.pruning.baselines import (
    pooling_stage1,
    random_stage1,
    uniform_stage1,
    visionzip_stage1,
)


def released_stage1(features, sim_features, scores, grid, keep, top_n, distance, quantile):
    """The authors' released hard selection and aggregation for ONE image, written out naively
    (loops over regions, the full N x N weight matrix) as an independent reference."""
    height, width = grid
    candidates = []
    for region_row in range(height // 2):
        for region_col in range(width // 2):
            ids = [(2 * region_row + dy) * width + 2 * region_col + dx for dy in (0, 1) for dx in (0, 1)]
            best = torch.topk(scores[ids], top_n).indices.tolist()
            candidates += [ids[i] for i in best]
    candidates = torch.tensor(candidates)
    anchors = candidates[torch.topk(scores[candidates], keep).indices].sort().values
    coords = torch.tensor([[r, c] for r in range(height) for c in range(width)], dtype=torch.float32)
    near = 1.0 - (torch.cdist(coords, coords) / distance**0.5).clamp(max=1.0)
    unit = F.normalize(sim_features, dim=-1)
    weights = (F.relu(unit @ unit.T) * near)[anchors]
    anchor_scores = scores[anchors]
    pillars = anchor_scores >= torch.quantile(anchor_scores, quantile)
    penalty = torch.ones_like(weights)
    penalty[pillars] = 0.0
    penalty[torch.arange(keep), anchors] = 1.0
    weights = weights * penalty
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-8)
    weights[torch.arange(keep), anchors] = 1.0
    return weights @ features, anchors


def random_grid_inputs(batch, grid, dim=32, sim_dim=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = grid[0] * grid[1]
    features = torch.randn(batch, tokens, dim, generator=gen)
    # Smoothly varying similarity features so aggregation weights are far from trivial.
    sim = torch.randn(batch, tokens, sim_dim, generator=gen) + torch.randn(batch, 1, sim_dim, generator=gen) * 2
    scores = torch.rand(batch, tokens, generator=gen).softmax(-1)
    return features, sim, scores


@pytest.mark.parametrize(
    "grid,keep,top_n", [((24, 24), 112, 1), ((24, 24), 224, 2), ((24, 24), 336, 3), ((12, 12), 28, 1), ((8, 12), 40, 2)]
)
def test_stage1_reproduces_released_code_for_every_batch_element(grid, keep, top_n):
    features, sim, scores = random_grid_inputs(3, grid)
    out = nuwa_stage1(features, sim, scores, grid, keep, top_n=top_n)
    assert out.tokens.shape == (3, keep, features.shape[-1]) and out.indices.shape == (3, keep)
    for b in range(3):
        tokens, anchors = released_stage1(features[b], sim[b], scores[b], grid, keep, top_n, 280.0, 0.55)
        assert torch.equal(out.indices[b], anchors)
        torch.testing.assert_close(out.tokens[b], tokens, atol=1e-5, rtol=1e-5)


def test_batch_elements_are_independent_and_keep_the_full_budget():
    features, sim, scores = random_grid_inputs(4, (24, 24))
    batched = nuwa_stage1(features, sim, scores, (24, 24), 112)
    for b in range(4):
        alone = nuwa_stage1(features[b : b + 1], sim[b : b + 1], scores[b : b + 1], (24, 24), 112)
        assert torch.equal(batched.indices[b], alone.indices[0])
        torch.testing.assert_close(batched.tokens[b], alone.tokens[0])


def test_windowed_aggregation_equals_dense():
    features, sim, scores = random_grid_inputs(2, (24, 24))
    dense = nuwa_stage1(features, sim, scores, (24, 24), 112, aggregation="dense")
    windowed = nuwa_stage1(features, sim, scores, (24, 24), 112, aggregation="windowed", window_tile=5)
    torch.testing.assert_close(windowed.tokens, dense.tokens, atol=1e-5, rtol=1e-5)


def test_small_radius_and_pillars_keep_anchor_features():
    features, sim, scores = random_grid_inputs(1, (12, 12))
    out = nuwa_stage1(features, sim, scores, (12, 12), 20, distance=0.5)  # no neighbour within the radius
    torch.testing.assert_close(out.tokens[0], features[0, out.indices[0]])
    out = nuwa_stage1(features, sim, scores, (12, 12), 20)
    pillar_ids = out.indices[0][out.pillars[0]]
    torch.testing.assert_close(out.tokens[0][out.pillars[0]], features[0, pillar_ids])
    assert 0 < out.pillars.sum() < 20  # the 0.55 quantile splits anchors into both kinds


def test_anchors_are_spread_one_per_region_at_top_n_1():
    _, _, scores = random_grid_inputs(2, (12, 12))
    out = nuwa_stage1(torch.zeros(2, 144, 4), torch.randn(2, 144, 4), scores, (12, 12), 36)
    regions = (out.indices // 12 // 2) * 6 + (out.indices % 12) // 2
    assert all(len(set(r.tolist())) == 36 for r in regions)


def test_stage1_bad_input_is_a_clear_error():
    features, sim, scores = random_grid_inputs(1, (12, 12))
    with pytest.raises(ValueError, match="do not form the 12x10 grid"):
        nuwa_stage1(features, sim, scores, (12, 10), 10)
    with pytest.raises(ValueError, match="exceeds the 36 regional candidates"):
        nuwa_stage1(features, sim, scores, (12, 12), 40, top_n=1)
    with pytest.raises(ValueError, match="keep=200"):
        nuwa_stage1(features, sim, scores, (12, 12), 200)


def test_select_top_with_per_sample_budgets():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3], [0.6, 0.2, 0.8, 0.4, 0.1]])
    candidates = torch.tensor([[False, True, True, True, True], [True, True, True, False, False]])
    kept = select_top(scores, candidates, torch.tensor([2, 5]))
    assert kept.tolist() == [[False, True, False, True, False], [True, True, True, False, False]]


def test_paper_presets_and_derived_budgets():
    published = {64: (1, 112, 16), 128: (2, 224, 32), 192: (3, 336, 48)}  # the paper, LLaVA-1.5-7B
    assert PAPER_PRESETS == published
    for budget, (top_n, keep1, keep2) in published.items():  # the published values come out of the rule
        plan = NuwaConfig(budget=budget).plan((24, 24), 32)
        assert (plan.stage1.top_n, plan.stage1.keep, plan.stage2.keep, plan.stage2.layer) == (top_n, keep1, keep2, 16)
        assert plan.average_tokens == budget
    plan = NuwaConfig(budget=64).plan((12, 12), 4)  # same 11% rule on a tiny grid
    assert (plan.stage1.top_n, plan.stage1.keep, plan.stage2.keep, plan.stage2.layer) == (1, 28, 4, 2)
    assert plan.average_tokens == 16
    for layer, keep1 in ((2, 64), (5, 28), (8, 19), (9, 17)):  # K solves the depth-average at any stage-2 layer
        plan = NuwaConfig(budget=64, stage2_layer=layer).plan((12, 12), 10)
        assert (plan.stage1.keep, plan.stage2.keep) == (keep1, 4)
        assert abs(plan.average_tokens - 16) <= 0.5 * layer / 10  # only the rounding of K
    assert NuwaConfig(method="nuwa_stage1", budget=128).plan((24, 24), 32).stage1.keep == 128
    fastv = NuwaConfig(method="fastv", budget=64).plan((24, 24), 32)
    assert fastv.stage1 is None and fastv.stage2.layer == 2 and abs(fastv.average_tokens - 64) < 1


@pytest.mark.parametrize(
    "kwargs,grid,layers,message",
    [
        (dict(budget=640), (24, 24), 32, "top_n=8 exceeds the 4 tokens"),
        (dict(budget=64), (11, 12), 32, "not divisible by region_size=2"),
        (dict(budget=64, stage2_layer=40), (24, 24), 32, "stage2_layer=40"),
        (dict(method="fastv", budget=64, fastv_layer=2), (12, 12), 3, "cannot be met by FastV"),
        (dict(method="random", budget=4000), (24, 24), 32, "grid has only 576"),
        (dict(budget=64, stage1_keep=100, top_n=1), (12, 12), 4, "exceeds the 36 regional candidates"),
    ],
)
def test_budget_the_grid_cannot_satisfy_is_a_clear_error(kwargs, grid, layers, message):
    with pytest.raises(NuwaConfigError, match=message):
        NuwaConfig(**kwargs).plan(grid, layers)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(budget=0), "budget=0"),
        (dict(method="tome"), "method='tome'"),
        (dict(pillar_quantile=1.5), "pillar_quantile"),
        (dict(stage2_layer=1.5), "stage2_layer"),
    ],
)
def test_config_validation_names_the_key(kwargs, message):
    with pytest.raises(NuwaConfigError, match=message):
        NuwaConfig(**kwargs)


def test_config_round_trips_through_dict():
    config = NuwaConfig(budget=128, position_mode="compact", sim_layers=(0.5, 1.0))
    assert NuwaConfig.from_dict(config.to_dict()) == config
    with pytest.raises(NuwaConfigError, match="unknown NuwaConfig key"):
        NuwaConfig.from_dict({"budgte": 64})


def test_baselines_keep_ascending_indices_and_sensible_tokens():
    features, sim, scores = random_grid_inputs(2, (12, 12))
    for out in (
        random_stage1(features, 16, torch.Generator().manual_seed(0)),
        uniform_stage1(features, (12, 12), 16),
        pooling_stage1(features, (12, 12), 16),
        visionzip_stage1(features, sim, scores, 16, 10 / 64),
    ):
        assert out.indices.shape[1] <= 16 and out.tokens.shape[:2] == out.indices.shape
        assert (out.indices.diff(dim=1) > 0).all()
    pooled = pooling_stage1(features, (12, 12), 16)  # a 4x4 lattice of 3x3 windows
    torch.testing.assert_close(pooled.tokens[0, 0], features[0].reshape(12, 12, -1)[:3, :3].mean((0, 1)))
    zipped = visionzip_stage1(features, sim, scores, 16, 0.25)
    dominant = scores.topk(12, dim=1).indices
    assert all(set(dominant[b].tolist()) <= set(zipped.indices[b].tolist()) for b in range(2))
