"""Soft and straight-through selection on the LLaVA adapter: the hard limit and the gradient paths."""

import pytest
import torch
from conftest import PROMPTS, encode, make_images

from nuwa_train.models import NuwaInputError, attach_nuwa
from nuwa_train.pruning import NuwaConfig, NuwaConfigError


def text_logits_by_position(logits, token_map, inputs, image_token):
    """{(b, unpruned position): logits} for every real text token."""
    is_text = (inputs["input_ids"] != image_token) & inputs["attention_mask"].bool()
    return {
        (b, p): logits[b, j]
        for b, row in enumerate(token_map.tolist())
        for j, p in enumerate(row)
        if p >= 0 and is_text[b, p]
    }


@pytest.mark.parametrize("method", ["nuwa", "nuwa_stage1", "fastv"])
@pytest.mark.parametrize("mode", ["soft", "straight_through"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_soft_at_tiny_temperature_equals_hard(tiny_llava, method, mode, padding_side):
    model, processor = tiny_llava
    inputs = encode(processor, PROMPTS, make_images(3), padding_side)
    config = NuwaConfig(method=method, budget=128, fastv_layer=1, stage2_keep=12 if method == "fastv" else None)
    image_token = model.config.image_token_index
    with attach_nuwa(model, config) as handle, torch.no_grad():
        hard = model(**inputs).logits
        hard_text = text_logits_by_position(hard, handle.kept.token_map(), inputs, image_token)
        handle.set_selection(mode, temperature=1e-6)
        soft = model(**inputs).logits
        assert soft.shape[1] == inputs["input_ids"].shape[1]  # soft keeps every token
        soft_text = text_logits_by_position(soft, handle.kept.token_map(), inputs, image_token)
    assert hard_text.keys() == soft_text.keys() and len(hard_text) > 30
    keys = sorted(hard_text)
    torch.testing.assert_close(
        torch.stack([soft_text[k] for k in keys]), torch.stack([hard_text[k] for k in keys]), atol=1e-5, rtol=1e-5
    )


def test_soft_selection_sends_gradients_to_both_score_paths(tiny_llava):
    model, processor = tiny_llava
    inputs = encode(processor, [p + " red" for p in PROMPTS], make_images(3), "right")
    labels = torch.full_like(inputs["input_ids"], -100)
    last = inputs["attention_mask"].sum(1) - 1
    labels[torch.arange(3), last] = inputs["input_ids"][torch.arange(3), last]
    with attach_nuwa(model, NuwaConfig(budget=128)) as handle:
        handle.set_selection("soft", temperature=0.5)
        loss = model(**inputs, labels=labels).loss
        stage1_bias = handle._layout.selection.keep_bias
        stage2_keep = handle._layout.stage2.kept_vision
        grad1, grad2 = torch.autograd.grad(loss, [stage1_bias, stage2_keep], retain_graph=True)
        assert grad1.abs().sum() > 0 and grad2.abs().sum() > 0  # the loss reaches both keep probabilities
        vision_layer = model.model.vision_tower.encoder.layers[handle.adapter.clip.feature_index - 1].self_attn
        llm_layer = model.model.language_model.layers[handle.plan.stage2.layer - 1].self_attn
        direction = torch.randn_like(stage1_bias)
        (to_vision,) = torch.autograd.grad(
            (stage1_bias * direction).sum(), vision_layer.k_proj.weight, retain_graph=True
        )
        (to_llm,) = torch.autograd.grad((stage2_keep * torch.randn_like(stage2_keep)).sum(), llm_layer.q_proj.weight)
        assert to_vision.abs().sum() > 0  # stage-1 scores come from the vision tower's own attention
        assert to_llm.abs().sum() > 0  # stage-2 scores come from the LLM's attention at layer L2-1
        expected = handle.kept.images_per_sample.float() * handle.plan.stage1.keep
        torch.testing.assert_close(stage1_bias.exp().sum(1), expected, atol=1e-3, rtol=0)


def test_straight_through_forward_is_hard_and_backward_is_soft(tiny_llava):
    model, processor = tiny_llava
    inputs = encode(processor, PROMPTS[:2], make_images(2), "left")
    with attach_nuwa(model, NuwaConfig(method="nuwa_stage1", budget=128)) as handle:
        handle.set_selection("straight_through", temperature=0.5)
        logits = model(**inputs).logits
        bias = handle._layout.selection.keep_bias
        kept = bias > -1.0
        assert kept.sum(1).tolist() == [handle.plan.stage1.keep] * 2  # exactly the hard anchors are visible
        (grad,) = torch.autograd.grad(logits[:, -1].sum(), bias)
        assert grad[kept].abs().sum() > 0


def test_soft_modes_refuse_what_they_cannot_do(tiny_llava):
    model, processor = tiny_llava
    inputs = encode(processor, PROMPTS[:1], make_images(1))
    with attach_nuwa(model, NuwaConfig(method="visionzip")) as handle:
        with pytest.raises(NuwaConfigError, match="method='visionzip' has no differentiable selection"):
            handle.set_selection("soft")
    with attach_nuwa(model, NuwaConfig()) as handle:
        with pytest.raises(NuwaConfigError, match="selection mode 'gumbel'"):
            handle.set_selection("gumbel")
        handle.set_selection("soft", temperature=0.3)
        with pytest.raises(NuwaInputError, match="call set_selection\\('hard'\\) before generating"):
            model.generate(**inputs, max_new_tokens=2)


def test_paused_runs_the_unpruned_model(tiny_llava):
    model, processor = tiny_llava
    inputs = encode(processor, PROMPTS[:2], make_images(2))
    with torch.no_grad():
        full = model(**inputs).logits
        with attach_nuwa(model, NuwaConfig()) as handle:
            with handle.paused():
                torch.testing.assert_close(model(**inputs).logits, full, atol=0, rtol=0)
            assert model(**inputs).logits.shape[1] < full.shape[1]
