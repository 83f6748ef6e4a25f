"""The pruning handle's lifecycle: another setting in place (use / using), without detaching and re-attaching."""

import pytest
import torch
from conftest import PROMPTS, encode, make_images

from nuwa_train.evaluation import evaluate
from nuwa_train.models import attach_nuwa
from nuwa_train.pruning import NuwaConfig, NuwaConfigError

FIRST = NuwaConfig(method="nuwa", budget=64, stage2_layer=2)
SECOND = NuwaConfig(method="visionzip", budget=128)


def logits_with(model, inputs, config):
    with attach_nuwa(model, config), torch.no_grad():
        return model(**inputs).logits


@pytest.fixture
def inputs(tiny_llava):
    _, processor = tiny_llava
    return encode(processor, PROMPTS, make_images(len(PROMPTS)))


def test_use_prunes_exactly_as_a_fresh_attach_with_that_setting(tiny_llava, inputs):
    model, _ = tiny_llava
    first, second = logits_with(model, inputs, FIRST), logits_with(model, inputs, SECOND)
    assert first.shape != second.shape  # the settings differ, so the test can tell them apart
    with attach_nuwa(model, FIRST) as handle, torch.no_grad():
        handle.use(SECOND)
        assert handle.stage2_layer is None and torch.equal(model(**inputs).logits, second)
        handle.use(FIRST)
        assert handle.stage2_layer == 2 and torch.equal(model(**inputs).logits, first)


def test_using_restores_the_setting_and_the_selection_mode(tiny_llava, inputs):
    model, _ = tiny_llava
    first = logits_with(model, inputs, FIRST)
    with attach_nuwa(model, FIRST) as handle:
        handle.set_selection("soft", 0.3)
        with handle.using(SECOND):
            assert (handle.config, handle.mode) == (SECOND, "hard")
        assert (handle.config, handle.mode, handle.temperature) == (FIRST, "soft", 0.3)
        handle.set_selection("hard")
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, first)


def test_a_setting_that_cannot_work_leaves_the_handle_as_it_was(tiny_llava, inputs):
    model, _ = tiny_llava
    first = logits_with(model, inputs, FIRST)
    with attach_nuwa(model, FIRST) as handle:
        with pytest.raises(NuwaConfigError, match="stage2_layer"):
            handle.use(NuwaConfig(stage2_layer=9))  # a 4-layer LLM
        with torch.no_grad():
            assert handle.config == FIRST and torch.equal(model(**inputs).logits, first)


def test_evaluate_runs_an_attached_models_own_handle_with_the_given_setting(tiny_llava):
    model, processor = tiny_llava
    records = [
        {"id": str(i), "image": image, "prompt": "what colour is the circle ?", "answer": "red", "task": "vqa"}
        for i, image in enumerate(make_images(3))
    ]
    alone = evaluate(model, processor, records, pruning=SECOND, progress=False, max_new_tokens=2)
    with attach_nuwa(model, FIRST) as handle:
        attached = evaluate(model, processor, records, pruning=SECOND, progress=False, max_new_tokens=2)
        assert handle.config == FIRST and model._nuwa is handle  # still attached, as it was
    assert [p.prediction for p in attached.predictions] == [p.prediction for p in alone.predictions]
    assert attached.average_vision_tokens == alone.average_vision_tokens
