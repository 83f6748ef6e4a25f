"""Soft selection: exact budget, the hard limit as tau -> 0, and useful gradients."""

import pytest
import torch

from nuwa_train.pruning import SELECTORS, SOFT_METHODS, NuwaConfig, nuwa_stage1, run_stage1, run_stage1_soft
from nuwa_train.pruning.soft import (
    log_keep,
    nuwa_stage1_soft,
    soft_topk,
    straight_through,
    temperature_at,
)


def test_soft_topk_keeps_exactly_k_in_expectation_per_row():
    scores = torch.randn(3, 50)
    candidates = torch.rand(3, 50) > 0.3
    k = torch.tensor([5, 10, 20])
    for temperature in (2.0, 0.5, 0.05):
        probs = soft_topk(scores, k, temperature, candidates)
        torch.testing.assert_close(probs.sum(1), k.float(), atol=1e-4, rtol=0)
        assert (probs[~candidates] == 0).all() and ((probs >= 0) & (probs <= 1)).all()


def test_soft_topk_tends_to_the_hard_top_k():
    scores = torch.randn(4, 64)
    probs = soft_topk(scores, 12, 1e-4)
    hard = torch.zeros_like(probs).scatter_(1, scores.topk(12, dim=1).indices, 1.0)
    torch.testing.assert_close(probs, hard, atol=1e-6, rtol=0)


def test_soft_topk_gradient_respects_the_budget_and_prefers_higher_scores():
    scores = torch.randn(2, 30, requires_grad=True)
    probs = soft_topk(scores, 8, 0.5)
    (grad,) = torch.autograd.grad(probs.sum(), scores)
    assert grad.abs().max() < 1e-4  # the budget is fixed, so the total cannot move
    first = torch.autograd.grad(soft_topk(scores, 8, 0.5)[0, 0], scores)[0]
    assert first[0, 0] > 5 * first[0, 1:].abs().max()  # raising its own score keeps a token most
    assert first[1].abs().max() == 0  # rows are independent


def test_straight_through_and_log_keep():
    soft = torch.tensor([0.2, 0.9], requires_grad=True)
    value = straight_through(soft, torch.tensor([0.0, 1.0]))
    assert value.tolist() == [0.0, 1.0]
    value.sum().backward()
    assert soft.grad.tolist() == [1.0, 1.0]
    assert torch.isfinite(log_keep(torch.tensor([0.0, 1.0]))).all()


def test_temperature_schedules():
    assert temperature_at(0, 1.0, 0.01, 100) == 1.0
    assert temperature_at(100, 1.0, 0.01, 100) == pytest.approx(0.01)
    assert temperature_at(500, 1.0, 0.01, 100) == pytest.approx(0.01)
    assert temperature_at(50, 1.0, 0.01, 100) == pytest.approx(0.1)
    assert temperature_at(50, 1.0, 0.0, 100, "linear") == pytest.approx(0.5)
    assert temperature_at(50, 1.0, 0.0, 100, "cosine") == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule 'step'"):
        temperature_at(1, 1.0, 0.1, 10, "step")


def test_soft_stage1_tends_to_hard_stage1():
    gen = torch.Generator().manual_seed(0)
    features, sim, scores = (
        torch.randn(2, 144, 16, generator=gen),
        torch.randn(2, 144, 8, generator=gen),
        torch.rand(2, 144, generator=gen),
    )
    hard = nuwa_stage1(features, sim, scores, (12, 12), 28)
    soft = nuwa_stage1_soft(features, sim, scores, (12, 12), 28, temperature=1e-4)
    indicator = torch.zeros_like(scores).scatter_(1, hard.indices, 1.0)
    torch.testing.assert_close(soft.keep_prob, indicator, atol=1e-5, rtol=0)
    assert torch.equal(soft.hard_indices, hard.indices)
    torch.testing.assert_close(
        soft.tokens.gather(1, hard.indices[..., None].expand(-1, -1, 16)), hard.tokens, atol=1e-5, rtol=1e-5
    )
    windowed = nuwa_stage1_soft(
        features, sim, scores, (12, 12), 28, temperature=1e-4, aggregation="windowed", window_tile=4
    )
    torch.testing.assert_close(windowed.tokens, soft.tokens, atol=1e-5, rtol=1e-5)


def test_soft_stage1_passes_gradients_to_scores_and_features():
    features = torch.randn(1, 144, 16, requires_grad=True)
    sim = torch.randn(1, 144, 8, requires_grad=True)
    scores = torch.rand(1, 144, requires_grad=True)
    soft = nuwa_stage1_soft(features, sim, scores, (12, 12), 28, temperature=0.5)
    weights = torch.randn(144)
    ((soft.keep_prob * weights).sum() + soft.tokens.square().sum()).backward()
    assert scores.grad.abs().sum() > 0 and sim.grad.abs().sum() > 0 and features.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- the selector registry
@pytest.mark.parametrize("method", list(SELECTORS))
def test_every_registered_selector_plans_the_stages_its_entry_declares(method):
    selector = SELECTORS[method]
    plan = NuwaConfig(method=method, budget=64, fastv_layer=2).plan((24, 24), 32)
    assert (plan.stage1 is not None) == (selector.stage1 is not None)
    assert (plan.stage2 is not None) == selector.stage2
    assert (method in SOFT_METHODS) == (selector.stage1 is None or selector.stage1_soft is not None)
    if plan.stage1 is not None:
        features, scores = torch.randn(2, 576, 16), torch.rand(2, 576)
        hard = run_stage1(
            plan.stage1,
            NuwaConfig(method=method),
            features,
            features,
            scores,
            (24, 24),
            torch.Generator().manual_seed(0),
        )
        assert hard.indices.shape == (2, plan.stage1.keep)


@pytest.mark.parametrize("method", [m for m, s in SELECTORS.items() if s.stage1_soft is not None])
def test_every_soft_stage1_selector_tends_to_its_hard_form(method):
    """At a vanishing temperature the soft selection keeps exactly the hard tokens, with the hard features."""
    config = NuwaConfig(method=method, budget=64)
    plan = config.plan((12, 12), 10).stage1
    features, sim = torch.randn(2, 144, 16), torch.randn(2, 144, 16)
    scores = torch.rand(2, 144)
    hard = run_stage1(plan, config, features, sim, scores, (12, 12))
    soft = run_stage1_soft(plan, config, features, sim, scores, (12, 12), temperature=1e-4)
    kept = torch.zeros(2, 144).scatter_(1, hard.indices, 1.0)
    torch.testing.assert_close(soft.keep_prob, kept, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        soft.tokens.gather(1, hard.indices[..., None].expand(-1, -1, 16)), hard.tokens, atol=1e-5, rtol=1e-5
    )
