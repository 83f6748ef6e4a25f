"""The LLaVA adapter: hard pruning is exact, batched, position-preserving and cache-consistent."""

import pytest
import torch
from conftest import (
    PROMPTS,
    WORDS,
    assert_cached_generate_equals_greedy,
    causal_keys_mask,
    encode,
    make_images,
)
from transformers import LlamaConfig, LlamaForCausalLM

from nuwa_train.models import NuwaInputError, UnsupportedModelError, attach_nuwa
from nuwa_train.models.tiny import TinyLlavaSpec, build_tiny_llava
from nuwa_train.pruning import NuwaConfig, NuwaConfigError

IGNORE = -100


def masked_reference(model, inputs, layout, plan, labels=None):
    """Full-length forward where the dropped vision tokens are excluded by attention masks only.

    Kept vision slots carry the pruned (aggregated) tokens; dropped slots keep the unpruned features
    but no query may attend to them (from layer 0 for stage 1, from layer L2 on for stage 2).
    """
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    is_image = input_ids == model.config.image_token_index
    batch = input_ids.shape[0]
    assert not hasattr(model, "_nuwa"), "the reference runs on the unpatched model"
    with torch.no_grad():
        full_features = torch.cat(
            list(model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output)
        )
        embeds = model.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        embeds[is_image] = full_features
        slots = is_image.nonzero()[:, 1].view(-1, plan.num_tokens)
        kept_slots = slots.gather(1, layout.selection.kept_indices)
        rows = torch.repeat_interleave(torch.arange(batch), layout.images_per_sample)[:, None].expand_as(kept_slots)
        embeds[rows, kept_slots] = layout.selection.pooler_output
        kept1 = ~is_image
        kept1[rows, kept_slots] = True
        allowed1 = kept1 & mask.bool()
        token_map = layout.token_map()
        kept2 = torch.zeros_like(kept1)
        kept2.scatter_(1, token_map.clamp(min=0), token_map >= 0)
        allowed2 = allowed1 & (kept2 | ~is_image)
        eager = model.config.text_config._attn_implementation == "eager"
        masks = (causal_keys_mask(allowed1, eager), causal_keys_mask(allowed2, eager))

        def later_layers(layer, args, kwargs):
            kwargs["attention_mask"] = masks[1]
            return args, kwargs

        hooks = []
        if plan.stage2 is not None:
            hooks = [
                layer.register_forward_pre_hook(later_layers, with_kwargs=True)
                for layer in model.model.language_model.layers[plan.stage2.layer :]
            ]
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = model(inputs_embeds=embeds, attention_mask=masks[0], position_ids=positions, labels=labels)
        for hook in hooks:
            hook.remove()
    return out


def pruned_and_reference(model, inputs, config, labels=None):
    """The hard-pruned forward, then the masked full-length reference, and the pruned layout."""
    with attach_nuwa(model, config) as handle, torch.no_grad():
        pruned = model(**inputs, labels=labels)
        layout, plan = handle._layout, handle.plan
    return pruned, masked_reference(model, inputs, layout, plan, labels), layout


def test_hard_pruning_equals_masking_under_eager_attention():
    model, processor = build_tiny_llava(TinyLlavaSpec(attn_implementation="eager"), WORDS)
    inputs = encode(processor, PROMPTS, make_images(3), "left")
    pruned, reference, layout = pruned_and_reference(model, inputs, NuwaConfig(budget=128))
    b, j, p = map(torch.tensor, zip(*text_positions(inputs, layout.token_map(), model)))
    torch.testing.assert_close(pruned.logits[b, j], reference.logits[b, p], atol=1e-5, rtol=1e-5)


def text_positions(inputs, token_map, model):
    """Pairs (b, pruned j, unpruned p) of every real text token in the pruned output."""
    is_text = (inputs["input_ids"] != model.config.image_token_index) & inputs["attention_mask"].bool()
    pairs = []
    for b, row in enumerate(token_map.tolist()):
        pairs += [(b, j, p) for j, p in enumerate(row) if p >= 0 and is_text[b, p]]
    return pairs


@pytest.mark.parametrize("method", ["nuwa", "nuwa_stage1", "fastv", "visionzip"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_hard_pruning_equals_masking_the_same_tokens(tiny_llava, method, padding_side):
    model, processor = tiny_llava
    inputs = encode(processor, PROMPTS, make_images(3), padding_side)
    config = NuwaConfig(method=method, budget=128, fastv_layer=1, stage2_keep=12 if method == "fastv" else None)
    pruned, reference, layout = pruned_and_reference(model, inputs, config)
    assert pruned.logits.shape[1] < inputs["input_ids"].shape[1]
    pairs = text_positions(inputs, layout.token_map(), model)
    assert len(pairs) > 30
    b, j, p = map(torch.tensor, zip(*pairs))
    torch.testing.assert_close(pruned.logits[b, j], reference.logits[b, p], atol=1e-5, rtol=1e-5)


def test_loss_on_the_pruned_sequence_equals_the_masked_loss(tiny_llava):
    model, processor = tiny_llava
    answers = [" red", " two", " no"]
    inputs = encode(processor, [p + a for p, a in zip(PROMPTS, answers)], make_images(3), "right")
    labels = torch.full_like(inputs["input_ids"], IGNORE)
    for b in range(3):  # the answer is the last real token of every sample
        last = int(inputs["attention_mask"][b].nonzero().max())
        labels[b, last] = inputs["input_ids"][b, last]
    pruned, reference, layout = pruned_and_reference(model, inputs, NuwaConfig(budget=128), labels)
    # the stage-2 query is the token right before the answer, read from the labels
    before_answer = torch.tensor([int(inputs["attention_mask"][b].nonzero().max()) - 1 for b in range(3)])
    assert torch.equal(layout.source.gather(1, layout.prompt_end[:, None])[:, 0], before_answer)
    torch.testing.assert_close(pruned.loss, reference.loss, atol=1e-5, rtol=1e-5)


def assert_batched_equals_one_by_one(model, processor, handle, prompts, per_sample, padding_side):
    """Every text and kept-vision logit of the batched forward equals the record's forward alone."""
    inputs = encode(processor, prompts, [image for images in per_sample for image in images], padding_side)
    with torch.no_grad():
        batched = model(**inputs).logits
        batched_map = handle.kept.token_map()
        assert handle.kept.images_per_sample.tolist() == [len(images) for images in per_sample]
        for b in range(len(prompts)):
            alone_inputs = encode(processor, [prompts[b]], per_sample[b])
            alone = model(**alone_inputs).logits[0]
            alone_map = handle.kept.token_map()[0]
            offset = int(inputs["attention_mask"][b].nonzero().min())  # left padding shifts the unpruned index
            rows = {p: j for j, p in enumerate(batched_map[b].tolist()) if p >= 0}
            common = [(rows[p + offset], j) for j, p in enumerate(alone_map.tolist()) if p + offset in rows]
            assert len(common) == alone.shape[0]  # every token of the lone run is in the batched run
            jb, ja = map(torch.tensor, zip(*common))
            torch.testing.assert_close(batched[b, jb], alone[ja], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("method", ["nuwa", "uniform"])
def test_batched_equals_one_by_one_with_padding_and_multiple_images(tiny_llava, padding_side, method):
    model, processor = tiny_llava
    prompts = [PROMPTS[1], PROMPTS[0].replace("<image>", "<image> <image>"), PROMPTS[2]]
    images = make_images(4, seed=1)
    with attach_nuwa(model, NuwaConfig(method=method, budget=64)) as handle:
        assert_batched_equals_one_by_one(
            model, processor, handle, prompts, [[images[0]], images[1:3], [images[3]]], padding_side
        )


def test_records_sharing_an_image_share_one_tower_pass(tiny_llava):
    """Two questions about one image run the tower once for it, and each gets what it would alone."""
    model, processor = tiny_llava
    shared, other = make_images(2, seed=3)
    tower_batches = []
    hook = model.model.vision_tower.register_forward_pre_hook(lambda tower, args: tower_batches.append(len(args[0])))
    try:
        with attach_nuwa(model, NuwaConfig(budget=64)) as handle:
            assert_batched_equals_one_by_one(model, processor, handle, PROMPTS, [[shared], [other], [shared]], "left")
    finally:
        hook.remove()
    assert tower_batches[0] == 2  # the batched forward: two distinct images for three records
    assert tower_batches[1:] == [1, 1, 1]


@pytest.mark.parametrize("method", ["nuwa", "fastv"])
def test_generate_with_cache_equals_cache_free_greedy_loop(tiny_llava, method):
    model, processor = tiny_llava
    inputs = encode(processor, PROMPTS, make_images(3), "left")
    steps = 6
    config = NuwaConfig(method=method, budget=128, fastv_layer=1, stage2_keep=12 if method == "fastv" else None)
    with attach_nuwa(model, config):
        assert_cached_generate_equals_greedy(model, inputs, steps)


def test_positions_original_and_compact(tiny_llava):
    model, processor = tiny_llava
    inputs = encode(processor, PROMPTS[:2], make_images(2), "right")
    with attach_nuwa(model, NuwaConfig(budget=64)) as handle, torch.no_grad():
        model(**inputs)
        layout = handle._layout
        unpruned = (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)
        assert torch.equal(layout.position_ids, unpruned.gather(1, layout.source))  # original ids, with gaps
        assert (layout.position_ids[0, 1:].diff() > 1).any()
        # text after the image keeps its unpruned position; decoding continues after the unpruned prompt
        assert torch.equal(layout.next_position, inputs["attention_mask"].sum(1))
    with attach_nuwa(model, NuwaConfig(budget=64, position_mode="compact")) as handle, torch.no_grad():
        model(**inputs)
        valid = handle._layout.attention_mask.bool()
        assert torch.equal(handle._layout.position_ids[valid], torch.cat([torch.arange(int(n)) for n in valid.sum(1)]))


def test_detach_restores_the_model_exactly(tiny_llava):
    model, processor = tiny_llava
    inputs = encode(processor, PROMPTS, make_images(3))
    with torch.no_grad():
        before = model(**inputs).logits
        handle = attach_nuwa(model, NuwaConfig())
        assert model(**inputs).logits.shape != before.shape
        with pytest.raises(RuntimeError, match="already attached"):
            attach_nuwa(model)
        handle.detach()
        assert "get_image_features" not in model.model.__dict__ and not hasattr(model, "_nuwa")
        assert not model._forward_pre_hooks and not any(
            layer._forward_pre_hooks for layer in model.model.language_model.layers
        )
        torch.testing.assert_close(model(**inputs).logits, before, atol=0, rtol=0)


def test_bad_inputs_raise_clear_errors(tiny_llava):
    model, processor = tiny_llava
    inputs = encode(processor, PROMPTS[:2], make_images(2))
    with attach_nuwa(model, NuwaConfig()):
        text_only = processor.tokenizer(["user : what colour is the circle ?"], return_tensors="pt")
        with pytest.raises(NuwaInputError, match="contain no image token"):
            model(**text_only, pixel_values=inputs["pixel_values"][:1])
        with pytest.raises(NuwaInputError, match="pixel_values hold 1 image"):
            model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs["pixel_values"][:1],
            )
        row = inputs["input_ids"][0]
        one_short = torch.cat([row[: int(row.eq(model.config.image_token_index).nonzero()[0])], row[-20:]])[None]
        with pytest.raises(NuwaInputError, match=r"sample 0 has \d+ image tokens, not a multiple of the 144"):
            model(input_ids=one_short, pixel_values=inputs["pixel_values"][:1])
        with pytest.raises(NuwaInputError, match="no pixel_values were given"):
            model(input_ids=inputs["input_ids"])
        with pytest.raises(NuwaInputError, match="must be 2-D"):
            model(**{**inputs, "attention_mask": inputs["attention_mask"][:, None, None, :]})
    with pytest.raises(NuwaConfigError, match="budget=640 is too large for grid 12x12"):
        attach_nuwa(model, NuwaConfig(budget=640))
    llama = LlamaForCausalLM(
        LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    )
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM is not supported"):
        attach_nuwa(llama)


@pytest.mark.parametrize("method", ["nuwa", "fastv", "uniform"])
def test_vision_tokens_per_layer_count_what_each_layer_saw(tiny_llava, method):
    model, processor = tiny_llava
    inputs = encode(processor, PROMPTS, make_images(3), "left")
    config = NuwaConfig(method=method, budget=128, fastv_layer=1, stage2_keep=12 if method == "fastv" else None)
    with attach_nuwa(model, config) as handle, torch.no_grad():
        model(**inputs)
        counted = handle.vision_tokens_per_layer()
        planned = torch.tensor(handle.plan.tokens_per_layer, dtype=torch.float32) * 3
        if method == "uniform":  # an even lattice keeps at most the budget: 5 x 6 of 12 x 12 for 32
            assert torch.equal(counted, torch.full_like(counted, 3 * 30.0)) and (counted < planned).all()
            return
        torch.testing.assert_close(counted, planned)  # 3 images, each as the plan says, layer by layer
        handle.set_selection("soft", temperature=1e-6)
        model(**inputs)  # soft: expected counts, the same in the hard limit
        torch.testing.assert_close(handle.vision_tokens_per_layer(), planned, atol=1e-3, rtol=0)
