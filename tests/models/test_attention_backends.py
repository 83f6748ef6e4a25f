"""Which LLM attention backends Nüwa runs on: sdpa and eager give the same pruned logits; others are refused."""

import pytest
import torch
from conftest import PROMPTS, WORDS, encode, make_images

from nuwa_train.models import attach_nuwa
from nuwa_train.models.attach import SUPPORTED_ATTENTION
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
