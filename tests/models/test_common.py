"""The pieces every adapter shares: one padding rule, one layer range, one registry."""

import pytest
import torch

from nuwa_train.models import FAMILIES, UnsupportedModelError, adapter_for
from nuwa_train.models.common import pad_to_regions, similarity_layers
from nuwa_train.models.scoring import PAD_SCORE_MARGIN, padding_scores
from nuwa_train.pruning.soft import nuwa_stage1_soft
from nuwa_train.pruning.stage1 import nuwa_stage1


@pytest.mark.parametrize("grid", [(5, 5), (3, 7), (6, 4)])
def test_padding_is_edge_copies_with_scores_just_below_every_real_one(grid):
    h, w = grid
    raster = torch.arange(h * w).view(h, w)
    ids, offsets, padded = pad_to_regions(raster, raster, 2)
    assert padded == (h + h % 2, w + w % 2)
    real = offsets >= 0
    assert torch.equal(offsets[real], torch.arange(h * w)) and int(real.sum()) == h * w
    table = ids.view(padded)
    assert torch.equal(table[:h, :w], raster)
    assert torch.equal(table[h:, :w], raster[-1:].expand(padded[0] - h, -1))  # bottom rows repeat the last row
    scores = torch.rand(3, ids.numel()).requires_grad_()
    ranked = padding_scores(scores, real)
    low, high = scores[:, real].amin(1, keepdim=True), scores[:, real].amax(1, keepdim=True)
    assert (ranked[:, ~real] < low).all()
    assert (ranked[:, ~real] >= low - 2 * PAD_SCORE_MARGIN * (high - low)).all()  # just below, not far below
    assert torch.equal(ranked[:, real], scores[:, real])
    ranked.sum().backward()
    assert torch.equal(scores.grad, real.float().expand_as(scores))  # padding carries no gradient


def test_padding_stays_below_equal_real_scores():
    real = torch.tensor([True, True, False])
    ranked = padding_scores(torch.full((1, 3), 0.25), real)
    assert ranked[0, 2] < 0.25


@pytest.mark.parametrize("keep, top_n", [(4, 1), (9, 1), (12, 2), (16, 2)])
def test_padding_is_never_kept_and_never_outranks_a_real_token(keep, top_n):
    """The rule's promise. With one candidate per region padding is never a candidate: its soft keep probability
    is exactly 0. With more (a region of one real cell then offers padding), padding still ranks last."""
    torch.manual_seed(keep)
    raster = torch.arange(25).view(5, 5)
    ids, offsets, grid = pad_to_regions(raster, raster, 2)  # 6x6: the corner region holds a single real cell
    real = offsets >= 0
    features, sim = torch.randn(2, 25, 8)[:, ids], torch.randn(2, 25, 8)[:, ids]
    scores = padding_scores(torch.rand(2, 25)[:, ids], real)
    hard = nuwa_stage1(features, sim, scores, grid, keep, top_n=top_n)
    assert real[hard.indices].all()
    for temperature in (1.0, 0.1, 0.01):
        soft = nuwa_stage1_soft(features, sim, scores, grid, keep, temperature, top_n=top_n)
        torch.testing.assert_close(soft.keep_prob.sum(1), torch.full((2,), float(keep)))
        padding = soft.keep_prob[:, ~real]
        if top_n == 1:
            assert torch.equal(padding, torch.zeros_like(padding))
        else:
            chosen = soft.keep_prob[:, real]
            lowest_real = chosen.masked_fill(chosen == 0, 1.0).amin(1, keepdim=True)  # among real candidates
            assert (padding <= lowest_real).all()


def test_similarity_layers_cover_the_configured_share_of_depth():
    assert list(similarity_layers((0.5, 1.0), 4)) == [2, 3, 4]
    assert list(similarity_layers((0.0, 0.0), 24)) == [1]  # at least one real layer, never the embeddings
    assert list(similarity_layers((0.25, 0.5), 24)) == list(range(6, 13))


def test_every_family_is_found_from_its_model_and_a_foreign_model_is_refused_by_name():
    for name, family in FAMILIES.items():
        model, _ = family.build_tiny()
        adapter = adapter_for(model)
        assert isinstance(adapter, family.adapter), name
        assert adapter.image_token_id is not None
        assert adapter.lora_target_pattern(False) in adapter.lora_target_pattern(True)
    with pytest.raises(UnsupportedModelError, match="Linear is not supported.*LlavaForConditionalGeneration"):
        adapter_for(torch.nn.Linear(2, 2))
