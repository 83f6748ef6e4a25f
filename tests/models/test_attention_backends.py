"""Which LLM attention backends Nüwa runs on: sdpa (with the fused keep bias) and eager give the same pruned logits and
gradients; others are refused."""

from types import SimpleNamespace

import pytest
import torch
from conftest import PROMPTS, WORDS, encode, make_images
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from nuwa_train.models import attach_nuwa
from nuwa_train.models.attention import KEY_BIAS_ATTENTION, KEY_BIAS_KWARG, SUPPORTED_ATTENTION, key_bias_sdpa
from nuwa_train.models.tiny import TinyLlavaSpec, build_tiny_llava
from nuwa_train.pruning import NuwaConfig, NuwaConfigError

CONFIG = NuwaConfig(budget=64, stage2_layer=2)


@pytest.fixture(scope="module")
def backends():
    """The same weights under each supported backend, and a padded batch of three."""
    torch.manual_seed(0)
    models = {}
    for backend in SUPPORTED_ATTENTION:
        model, processor = build_tiny_llava(TinyLlavaSpec(attn_implementation=backend), WORDS)
        if models:
            model.load_state_dict(next(iter(models.values())).state_dict())
        models[backend] = model
    return models, encode(processor, PROMPTS, make_images(len(PROMPTS)))


@pytest.mark.parametrize("mode", ["hard", "soft", "straight_through"])
def test_supported_backends_give_the_same_pruned_logits(backends, mode):
    models, inputs = backends
    logits, real = {}, {}
    for backend, model in models.items():
        with attach_nuwa(model, CONFIG) as handle, torch.no_grad():
            handle.set_selection(mode, 0.3)
            logits[backend] = model(**inputs).logits
            # padding rows differ by backend even unpruned: compare the outputs of real input tokens
            real[backend] = inputs["attention_mask"].gather(1, handle.kept.token_map().clamp(min=0)).bool()
    sdpa, eager = logits["sdpa"], logits["eager"]
    assert sdpa.shape == eager.shape and torch.equal(real["sdpa"], real["eager"]) and not real["sdpa"].all()
    assert torch.allclose(sdpa[real["sdpa"]], eager[real["sdpa"]], atol=1e-5)


@pytest.mark.parametrize("backend", ["flash_attention_2", "flash_attention_3", "flex_attention"])
def test_other_backends_are_refused_at_attach_with_the_fix(tiny_llava, backend):
    model, _ = tiny_llava
    text_config = model.config.text_config
    previous = text_config._attn_implementation
    text_config._attn_implementation = backend
    try:
        with pytest.raises(NuwaConfigError, match=rf"attn_implementation='{backend}'.*attn_implementation='sdpa'"):
            attach_nuwa(model, CONFIG)
        assert getattr(model, "_nuwa", None) is None  # nothing was attached
    finally:
        text_config._attn_implementation = previous


def test_switching_backend_after_attach_is_refused_at_the_next_prefill(tiny_llava):
    model, processor = tiny_llava
    inputs = encode(processor, PROMPTS[:1], make_images(1))
    text_config = model.config.text_config
    with attach_nuwa(model, CONFIG):
        text_config._attn_implementation = "flash_attention_2"
        try:
            with pytest.raises(NuwaConfigError, match="flash_attention_2"):
                model(**inputs)
        finally:
            text_config._attn_implementation = "sdpa"
        assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("mode", ["soft", "straight_through"])
def test_soft_training_gradients_are_the_same_under_the_fused_keep_bias_and_eager(backends, mode):
    """sdpa takes the keep bias as a widened head (fused kernels), eager as a float mask: same loss gradients."""
    models, inputs = backends
    grads = {}
    for backend, model in models.items():
        model.zero_grad(set_to_none=True)
        with attach_nuwa(model, CONFIG) as handle:
            handle.set_selection(mode, 0.3)
            logits = model(**inputs).logits
            real = inputs["attention_mask"].gather(1, handle.kept.token_map().clamp(min=0)).bool()
            (logits[real].float().square().mean()).backward()
        grads[backend] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads["sdpa"].keys() == grads["eager"].keys() and len(grads["sdpa"]) > 10
    for name, grad in grads["sdpa"].items():
        assert torch.allclose(grad, grads["eager"][name], atol=1e-6, rtol=1e-4), name
    for model in models.values():
        model.zero_grad(set_to_none=True)


def test_sdpa_soft_layers_get_the_bias_as_a_kwarg_not_a_differentiable_mask(backends):
    models, inputs = backends
    model = models["sdpa"]
    seen = []

    def record(attention, args, kwargs):
        mask = kwargs.get("attention_mask")
        seen.append((kwargs.get(KEY_BIAS_KWARG), mask is not None and mask.requires_grad))

    hooks = [
        layer.self_attn.register_forward_pre_hook(record, with_kwargs=True)
        for layer in model.model.language_model.layers
    ]
    try:
        with attach_nuwa(model, CONFIG) as handle:
            assert model.config.text_config._attn_implementation == KEY_BIAS_ATTENTION
            assert model.config.vision_config._attn_implementation == "sdpa"  # the tower keeps its own
            assert KEY_BIAS_ATTENTION not in model.config.to_json_string()  # nor does a saved config record it
            handle.set_selection("soft", 0.3)
            model(**inputs)
            stage2 = handle.stage2_layer
        assert model.config.text_config._attn_implementation == "sdpa"  # detach restores it
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == len(model.model.language_model.layers) and not any(grad for _, grad in seen)
    biases = [bias for bias, _ in seen]
    assert all(bias is not None and bias.requires_grad for bias in biases)
    assert all(b is biases[0] for b in biases[:stage2]) and all(b is biases[stage2] for b in biases[stage2:])
    assert not torch.equal(biases[0], biases[stage2])  # from L2 on, stage 2's bias joins stage 1's


@pytest.mark.parametrize("key_heads", [4, 2])  # multi-head and grouped-query attention
def test_key_bias_sdpa_equals_a_float_mask_forward_and_backward(key_heads):
    torch.manual_seed(0)
    batch, heads, length, head_dim = 2, 4, 9, 16
    attention = SimpleNamespace(num_key_value_groups=heads // key_heads, is_causal=True)
    query = torch.randn(batch, heads, length, head_dim, requires_grad=True)
    key = torch.randn(batch, key_heads, length, head_dim, requires_grad=True)
    value = torch.randn(batch, key_heads, length, head_dim, requires_grad=True)
    bias = (torch.randn(batch, length) * 3).requires_grad_()
    allowed = torch.ones(length, length, dtype=torch.bool).tril().expand(batch, 1, -1, -1).clone()
    allowed[1, :, :, :2] = False  # a left-padded row ...
    allowed[1, :, torch.arange(length), torch.arange(length)] = True  # ... whose queries still see themselves

    fused, _ = key_bias_sdpa(attention, query, key, value, allowed, scaling=0.3, **{KEY_BIAS_KWARG: bias})
    float_mask = torch.where(allowed, bias[:, None, None, :], torch.finfo(bias.dtype).min)
    reference, _ = sdpa_attention_forward(attention, query, key, value, float_mask, scaling=0.3)
    assert fused.shape == reference.shape == (batch, length, heads, head_dim)
    assert torch.allclose(fused, reference, atol=1e-5)
    weights = torch.randn_like(reference)
    fused_grads = torch.autograd.grad((fused * weights).sum(), (query, key, value, bias))
    reference_grads = torch.autograd.grad((reference * weights).sum(), (query, key, value, bias))
    for name, got, want in zip("qkvb", fused_grads, reference_grads):
        assert torch.allclose(got, want, atol=1e-5), name
    with pytest.raises(ValueError, match="one bias per key"):
        key_bias_sdpa(attention, query, key, value, allowed, **{KEY_BIAS_KWARG: bias[:, 1:]})
