"""evaluate(): well-formed metrics, correct scoring, vision-token accounting with and without pruning."""

import pytest
import torch

from nuwa_train.data import (
    SyntheticConfig,
    coordinate_tokens,
    generate_records,
    render,
    vocabulary,
)
from nuwa_train.evaluation import EvalResult, _score, evaluate, question_kind
from nuwa_train.models.tiny import TinyLlavaSpec, build_tiny_llava
from nuwa_train.pruning import NuwaConfig

CONFIG = SyntheticConfig()


@pytest.fixture(scope="module")
def model_and_processor():
    torch.manual_seed(0)
    return build_tiny_llava(
        TinyLlavaSpec(vision_hidden=32, vision_layers=2, text_hidden=32, text_layers=4, text_heads=2, text_kv_heads=1),
        vocabulary(CONFIG),
        coordinate_tokens(CONFIG),
    )


@pytest.fixture(scope="module")
def records():
    return list(generate_records(CONFIG, "test", 3))  # 3 VQA + 3 grounding


def _check_shape(result: EvalResult, records):
    assert result.num_vqa == 3 and result.num_grounding == 3 and len(result.predictions) == 6
    for value in (result.vqa_exact_match, result.grounding_acc50, result.grounding_miou):
        assert 0.0 <= value <= 1.0
    assert 0 <= result.unparseable <= 3
    assert sum(result.per_kind_count.values()) == 6
    assert set(result.per_kind) == {r.kind for r in records}
    assert all(0.0 <= v <= 1.0 for v in result.per_kind.values())
    assert result.vision_tokens_total == 144
    data = result.to_dict()
    assert "predictions" not in data and data["method"] == result.method


def test_full_tokens(model_and_processor, records):
    model, processor = model_and_processor
    result = evaluate(model, processor, records, batch_size=4, max_new_tokens=5, progress=False)
    _check_shape(result, records)
    assert result.method == "none" and result.average_vision_tokens == 144.0
    # left-padded batches generate exactly what one-at-a-time generation does
    single = evaluate(model, processor, records, batch_size=1, max_new_tokens=5, progress=False)
    assert [p.prediction for p in single.predictions] == [p.prediction for p in result.predictions]


@pytest.mark.parametrize(
    "method, budget, expected",
    [
        ("nuwa", 64, (2 * 28 + 2 * 4) / 4),  # K=28 for layers 0-1, K2=4 for layers 2-3 (stage 2 at half depth)
        ("random", 64, 16.0),  # 64/576 of the 144 patches at every layer
        ("fastv", 192, (144 + 3 * 16) / 4),  # all tokens at layer 0, then K such that the average is 48
    ],
)
def test_pruned_counts_vision_tokens(model_and_processor, records, method, budget, expected):
    model, processor = model_and_processor
    config = NuwaConfig(method=method, budget=budget, fastv_layer=1)
    result = evaluate(model, processor, records, pruning=config, batch_size=3, max_new_tokens=5, progress=False)
    _check_shape(result, records)
    plan = config.plan((12, 12), 4)
    assert result.average_vision_tokens == pytest.approx(plan.average_tokens)
    assert result.average_vision_tokens == pytest.approx(expected)
    assert result.average_vision_tokens < 144
    assert getattr(model, "_nuwa", None) is None  # detached again
    assert not model.training


def test_datasets_rows_and_limit(model_and_processor, records):
    model, processor = model_and_processor
    rows = [
        {
            "id": r.id,
            "image": render(r.scene, CONFIG),
            "prompt": r.prompt,
            "answer": r.answer,
            "task": r.task,
            "box": list(r.box) if r.box else None,
        }
        for r in records
    ]
    result = evaluate(model, processor, rows, batch_size=8, max_new_tokens=5, limit=4, progress=False)
    assert result.num_vqa + result.num_grounding == 4
    assert {p.kind for p in result.predictions} <= {r.kind for r in records}


def test_scoring():
    box = (100, 200, 300, 400)
    row = {"id": "g", "task": "grounding", "kind": "attribute", "answer": "", "box": box}
    exact = _score(row, "<loc_3> <loc_6> <loc_9> <loc_12>", 32)  # bin centres of the box
    assert exact.correct and exact.iou >= 0.5
    wrong = _score(row, "<loc_20><loc_20><loc_30><loc_30>", 32)
    assert not wrong.correct and wrong.iou == 0.0
    broken = _score(row, "<loc_3><loc_6>", 32)
    assert not broken.correct and broken.iou is None
    vqa = {"id": "v", "task": "vqa", "kind": "colour", "answer": "red circle"}
    assert _score(vqa, " Red  circle. ", 32).correct and not _score(vqa, "red", 32).correct


def test_unparseable_are_counted(monkeypatch, model_and_processor, records):
    model, processor = model_and_processor
    answers = {"vqa": "red", "grounding": "<loc_1>"}

    def fake_generate(input_ids, **kwargs):
        tail = [processor.tokenizer(" " + answers["grounding"], add_special_tokens=False)["input_ids"]] * len(input_ids)
        return torch.cat([input_ids, torch.tensor(tail)], 1)

    monkeypatch.setattr(model, "generate", fake_generate)
    result = evaluate(model, processor, records, batch_size=6, progress=False)
    assert result.unparseable == 3 and result.grounding_acc50 == 0.0 and result.grounding_miou == 0.0


def test_question_kind():
    assert question_kind("vqa", "what colour is the circle?") == "colour"
    assert question_kind("vqa", "is there a red square?") == "existence"
    assert question_kind("vqa", "what is to the left of the circle?") == "spatial"
    assert question_kind("grounding", "locate the circle above the square.") == "relational"
    assert question_kind("grounding", "locate the red circle.") == "attribute"


def test_generation_allows_what_an_answer_in_the_box_format_needs(monkeypatch, model_and_processor, records):
    """A LLaVA box ("[0.39, 0.57, 0.52, 0.88]") is ~25 Llama tokens: a fixed short cap would cut every one."""
    import nuwa_train.evaluation as evaluation
    from nuwa_train.data.boxes import LlavaBox, LocTokens

    asked = []

    def answers(model, tokenizer, batch, max_new_tokens):
        asked.append(max_new_tokens)
        return [""] * batch["input_ids"].shape[0]

    monkeypatch.setattr(evaluation, "generate_answers", answers)
    model, processor = model_and_processor
    for codec in (LocTokens(), LlavaBox()):
        evaluate(model, processor, records, box_format=codec, progress=False)
    evaluate(model, processor, records, box_format=LlavaBox(), max_new_tokens=5, progress=False)
    assert asked == [LocTokens.max_answer_tokens, LlavaBox.max_answer_tokens, 5] and LlavaBox.max_answer_tokens >= 25
