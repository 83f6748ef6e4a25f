"""vLLM with the Nüwa plugin answers exactly what `load_pruned` answers, on the shipped tiny base.

One vLLM process runs four engines (eager; chunked prefill that splits the image over prefill chunks; compiled
(torch.compile); compact positions) on the 24 records of data/synthetic_sample, four requests at a time (different
images and prompt lengths in one batch). The compact engine is the control: with the kept tokens
renumbered contiguously the answers must stop matching the original-position reference, so the exactness checks
can fail; it must match `load_pruned` run with compact positions instead.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nuwa_train.pruning import NuwaConfig
from nuwa_train.serving.settings import hf_overrides, served_pruning

from .conftest import BUDGET, MODEL, largest_logprob_difference, matching, reference_answers, vllm_answers

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
    runs = {
        "eager": {"hf_overrides": hf_overrides(ORIGINAL, HEAD_DIM)},
        "chunked": {"hf_overrides": hf_overrides(ORIGINAL, HEAD_DIM), "engine": CHUNKED},
        "compiled": {"hf_overrides": hf_overrides(ORIGINAL, HEAD_DIM), "engine": {"enforce_eager": False}},
        "compact": {"hf_overrides": hf_overrides(COMPACT, HEAD_DIM)},
    }
    return vllm_answers(serving_python, references["original"], runs, tmp_path_factory.mktemp("vllm"))


@pytest.mark.parametrize("run", ["eager", "chunked", "compiled"])
def test_vllm_answers_keeps_and_logprobs_equal_load_pruned(served, references, run):
    reference, answers = references["original"], served[run]
    assert len(reference.answers) >= 16
    assert answers["kept"] == reference.kept  # the same 16 raster indices on every image
    assert all(len(kept) == 16 for kept in answers["kept"])
    assert answers["answers"] == reference.answers
    difference = largest_logprob_difference(answers, reference)
    print(
        f"{run}: {matching(answers, reference)}/{len(reference.answers)} answers equal, largest first-token "
        f"log-prob difference {difference:.2e}, engine start {answers['init_s']:.1f} s"
    )
    assert difference < LOGPROB_TOLERANCE


def test_compact_positions_are_caught_and_match_compact_load_pruned(served, references):
    compact = served["compact"]
    print(
        f"compact positions: {matching(compact, references['original'])}/{len(compact['answers'])} answers equal "
        f"the original-position reference, {matching(compact, references['compact'])} the compact one"
    )
    assert compact["kept"] == references["original"].kept  # same selection: only the positions differ
    assert matching(compact, references["original"]) < len(references["original"].answers) // 2
    assert largest_logprob_difference(compact, references["original"]) > LOGPROB_TOLERANCE
    assert compact["answers"] == references["compact"].answers
    assert largest_logprob_difference(compact, references["compact"]) < LOGPROB_TOLERANCE


EXPORT_BUDGET = 128  # 32 of 144 tokens: K comes from the export, not from the served default
EXPORT_NOISE = 0.02  # relative weight perturbation that stands in for merged LoRA updates


def test_a_two_stage_export_served_stage1_only_equals_its_stage1_load_pruned(serving_python, tmp_path):
    """An export written by the project's exporter (nuwa_config.json with two-stage Nüwa at budget 128 and a
    non-default distance): served stage-1-only, answers equal load_pruned with the served config."""
    from nuwa_train.export import read_nuwa_config, write_pretrained
    from nuwa_train.models.loading import load_vlm

    model, processor = load_vlm(MODEL)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(EXPORT_NOISE * weight.std().nan_to_num() * torch.randn(weight.shape, generator=generator))
    trained = NuwaConfig(method="nuwa", budget=EXPORT_BUDGET, distance=100.0)
    export = write_pretrained(model, processor, trained, tmp_path / "export")
    served = served_pruning(read_nuwa_config(export))
    assert served.config == NuwaConfig(method="nuwa_stage1", budget=EXPORT_BUDGET, distance=100.0) and served.note
    reference = reference_answers(served.config, export)
    runs = {"export": {"hf_overrides": hf_overrides(served.config, HEAD_DIM)}}
    answers = vllm_answers(serving_python, reference, runs, tmp_path, export)["export"]
    assert all(len(kept) == 32 for kept in answers["kept"]) and answers["kept"] == reference.kept
    assert answers["answers"] == reference.answers
    difference = largest_logprob_difference(answers, reference)
    print(
        f"export: {matching(answers, reference)}/{len(reference.answers)} answers equal, largest first-token "
        f"log-prob difference {difference:.2e}"
    )
    assert difference < LOGPROB_TOLERANCE


def test_features_from_the_penultimate_layer_rebuild_the_whole_tower(serving_python, tmp_path):
    """LLaVA-1.5's setting (vision_feature_layer -2): vLLM builds the tower only up to the feature layer, the
    similarity features need the last one, so the plugin builds it whole; still equal to load_pruned."""
    model_dir = tmp_path / "penultimate"
    shutil.copytree(MODEL, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "vision_feature_layer": -2}))
    reference = reference_answers(ORIGINAL, model_dir)
    runs = {"penultimate": {"hf_overrides": hf_overrides(ORIGINAL, HEAD_DIM)}}
    answers = vllm_answers(serving_python, reference, runs, tmp_path, model_dir)["penultimate"]
    assert answers["kept"] == reference.kept and answers["answers"] == reference.answers
    assert largest_logprob_difference(answers, reference) < LOGPROB_TOLERANCE
