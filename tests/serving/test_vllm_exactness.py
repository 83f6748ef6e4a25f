"""vLLM with the Nüwa plugin answers exactly what `load_pruned` answers, on the shipped tiny base.

One vLLM process runs four engines (eager; chunked prefill that splits the image over prefill chunks; compiled
(torch.compile); compact positions) on the 24 records of data/synthetic_sample, four requests at a time (different
images and prompt lengths in one batch). The compact engine is the control: with the kept tokens
renumbered contiguously the answers must stop matching the original-position reference, so the exactness checks
can fail; it must match `load_pruned` run with compact positions instead.
"""

from __future__ import annotations

import pytest

from nuwa_train.pruning import NuwaConfig
from nuwa_train.serving.settings import hf_overrides

from .conftest import BUDGET, largest_logprob_difference, matching, reference_answers, vllm_answers

LOGPROB_TOLERANCE = 1e-4  # float32 on both sides; measured 9e-6
HEAD_DIM = 32  # the tiny base's
# 8 tokens per step: the prompts' 16 image placeholders span three prefill chunks
CHUNKED = {"enable_chunked_prefill": True, "max_num_batched_tokens": 8}

ORIGINAL = NuwaConfig(method="nuwa_stage1", budget=BUDGET)
COMPACT = NuwaConfig(method="nuwa_stage1", budget=BUDGET, position_mode="compact")


@pytest.fixture(scope="module")
def references():
    return {"original": reference_answers(ORIGINAL), "compact": reference_answers(COMPACT)}


@pytest.fixture(scope="module")
def served(serving_python, references, tmp_path_factory):
    runs = {"eager": {"hf_overrides": hf_overrides(ORIGINAL, HEAD_DIM)},
            "chunked": {"hf_overrides": hf_overrides(ORIGINAL, HEAD_DIM), "engine": CHUNKED},
            "compiled": {"hf_overrides": hf_overrides(ORIGINAL, HEAD_DIM), "engine": {"enforce_eager": False}},
            "compact": {"hf_overrides": hf_overrides(COMPACT, HEAD_DIM)}}
    return vllm_answers(serving_python, references["original"], runs, tmp_path_factory.mktemp("vllm"))


@pytest.mark.parametrize("run", ["eager", "chunked", "compiled"])
def test_vllm_answers_keeps_and_logprobs_equal_load_pruned(served, references, run):
    reference, answers = references["original"], served[run]
    assert len(reference.answers) >= 16
    assert answers["kept"] == reference.kept  # the same 16 raster indices on every image
    assert all(len(kept) == 16 for kept in answers["kept"])
    assert answers["answers"] == reference.answers
    difference = largest_logprob_difference(answers, reference)
    print(f"{run}: {matching(answers, reference)}/{len(reference.answers)} answers equal, largest first-token "
          f"log-prob difference {difference:.2e}, engine start {answers['init_s']:.1f} s")
    assert difference < LOGPROB_TOLERANCE


def test_compact_positions_are_caught_and_match_compact_load_pruned(served, references):
    compact = served["compact"]
    print(f"compact positions: {matching(compact, references['original'])}/{len(compact['answers'])} answers equal "
          f"the original-position reference, {matching(compact, references['compact'])} the compact one")
    assert compact["kept"] == references["original"].kept  # same selection: only the positions differ
    assert matching(compact, references["original"]) < len(references["original"].answers) // 2
    assert largest_logprob_difference(compact, references["original"]) > LOGPROB_TOLERANCE
    assert compact["answers"] == references["compact"].answers
    assert largest_logprob_difference(compact, references["compact"]) < LOGPROB_TOLERANCE
