"""The Qwen2-VL / Qwen2.5-VL / Qwen3-VL adapters: M-RoPE positions, dynamic resolution, window order, DeepStack,
exactness."""

import numpy as np
import pytest
import torch
from conftest import assert_cached_generate_equals_greedy, causal_keys_mask
from PIL import Image

from nuwa_train.models import NuwaInputError, UnsupportedModelError, attach_nuwa
from nuwa_train.models.tiny_qwen import TinyQwenSpec, build_tiny_qwen
from nuwa_train.pruning import NuwaConfig

WORDS = "what colour is the red blue circle square left of how many are there ? yes no".split()
QUESTIONS = ["what colour is the circle ?", "how many square are there ?", "is the red circle left of the square ?"]
# (height, width) in pixels: 6x6, 5x8 (odd: padded to 6x8) and 4x6 merged grids
SIZES = [(96, 96), (80, 128), (64, 96)]
VERSIONS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"]


@pytest.fixture(scope="module", params=VERSIONS)
def tiny_qwen(request):
    torch.manual_seed(0)
    model, processor = build_tiny_qwen(TinyQwenSpec(version=request.param), WORDS)
    # At the default init (std 0.02) vision attention is near uniform, so received-attention scores tie to
    # ~1e-7 and the soft/hard comparison would test tie-breaking; sharper q/k make the ranking well defined.
    with torch.no_grad():
        for block in model.model.visual.blocks:
            block.attn.qkv.weight.mul_(8)
    return model, processor


def make_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for size in sizes]


def encode(processor, questions, images, padding_side="left", answers=None):
    texts = []
    for i, question in enumerate(questions):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        texts.append(text + (f" {answers[i]}" if answers else ""))
    processor.tokenizer.padding_side = padding_side
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def rope_positions(model, inputs):
    positions, _ = model.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    return positions


def masked_reference(model, inputs, layout, stage2_layer):
    """Unpatched full-length forward: kept image slots carry the pruned tokens, dropped ones are masked.

    Qwen3-VL: after each of the LLM's first layers, the kept slots get the DeepStack features HF's own vision
    tower computes for those placeholders (hooks on the reference forward, as the model's `_deepstack_process`)."""
    assert not hasattr(model, "_nuwa")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    is_image = ids == model.config.image_token_id
    with torch.no_grad():
        image_output = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        full = torch.cat(image_output.pooler_output)
        embeds = model.get_input_embeddings()(ids)
        embeds[is_image] = full
        selection = layout.selection
        slots = is_image.nonzero()
        counts = selection.placeholder_counts
        starts = counts.cumsum(0) - counts
        chosen = (starts[:, None] + selection.kept_indices.clamp(min=0))[selection.kept]
        embeds[slots[chosen, 0], slots[chosen, 1]] = selection.pooler_output[selection.kept]
        kept1 = ~is_image
        kept1[slots[chosen, 0], slots[chosen, 1]] = True
        allowed1 = kept1 & mask.bool()
        token_map = layout.token_map()
        kept2 = torch.zeros_like(kept1).scatter_(1, token_map.clamp(min=0), token_map >= 0)
        masks = causal_keys_mask(allowed1, eager=True), causal_keys_mask(allowed1 & (kept2 | ~is_image), eager=True)

        def later_layers(layer, args, kwargs):
            kwargs["attention_mask"] = masks[1]
            return args, kwargs

        hooks = (
            [
                layer.register_forward_pre_hook(later_layers, with_kwargs=True)
                for layer in model.model.language_model.layers[stage2_layer:]
            ]
            if stage2_layer
            else []
        )
        kept_slots = slots[chosen, 0], slots[chosen, 1]
        for index, features in enumerate(getattr(image_output, "deepstack_features", None) or []):
            added = torch.cat(features)[chosen]  # the placeholders' own DeepStack features, kept slots only
            hooks.append(
                model.model.language_model.layers[index].register_forward_hook(
                    lambda layer, args, output, added=added: output.index_put(kept_slots, added, accumulate=True)
                )
            )
        try:
            return model(inputs_embeds=embeds, attention_mask=masks[0], position_ids=rope_positions(model, inputs))
        finally:
            for hook in hooks:
                hook.remove()


def text_pairs(inputs, token_map, image_token):
    is_text = (inputs["input_ids"] != image_token) & inputs["attention_mask"].bool()
    return [
        (b, j, p) for b, row in enumerate(token_map.tolist()) for j, p in enumerate(row) if p >= 0 and is_text[b, p]
    ]


@pytest.mark.parametrize("method", ["nuwa", "nuwa_stage1"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_hard_pruning_equals_masking_with_mrope_and_mixed_sizes(tiny_qwen, method, padding_side):
    model, processor = tiny_qwen
    inputs = encode(processor, QUESTIONS, make_images(SIZES), padding_side)
    with attach_nuwa(model, NuwaConfig(method=method, budget=192, stage2_layer=2)) as handle, torch.no_grad():
        pruned = model(**inputs)
        layout, layer = handle._layout, handle.stage2_layer
    kept = layout.selection.kept.sum(1)
    assert kept.tolist() != [36, 40, 24] and (kept < layout.selection.placeholder_counts).all()
    assert layout.position_ids.shape[0] == 3  # M-RoPE ids, gathered
    reference = masked_reference(model, inputs, layout, layer)
    pairs = text_pairs(inputs, layout.token_map(), model.config.image_token_id)
    assert len(pairs) > 20
    b, j, p = map(torch.tensor, zip(*pairs))
    torch.testing.assert_close(pruned.logits[b, j], reference.logits[b, p], atol=1e-5, rtol=1e-5)


def test_positions_are_the_unpruned_mrope_ids_and_decoding_continues_after_them(tiny_qwen):
    model, processor = tiny_qwen
    inputs = encode(processor, QUESTIONS[:2], make_images(SIZES[:2]), "left")
    unpruned = rope_positions(model, inputs)
    model.model.rope_deltas = None
    with attach_nuwa(model, NuwaConfig(budget=128)) as handle, torch.no_grad():
        model(**inputs)
        layout = handle._layout
        gathered = torch.stack([unpruned[c].gather(1, layout.source.clamp(min=0)) for c in range(3)])
        valid = layout.attention_mask.bool()
        assert torch.equal(layout.position_ids[:, valid], gathered[:, valid])
        vision = layout.is_vision
        assert (layout.position_ids[1][vision] != layout.position_ids[2][vision]).any()  # real 2-D (h, w) ids
        assert torch.equal(layout.next_position, unpruned.amax(dim=(0, 2)) + 1)
        assert model.model.rope_deltas is None  # the adapter reads the model; it never writes its state


@pytest.mark.parametrize("method", ["nuwa", "nuwa_stage1"])
def test_padding_of_odd_merged_grids_is_never_kept_nor_budgeted(tiny_qwen, method):
    model, processor = tiny_qwen
    inputs = encode(processor, QUESTIONS[1:2], make_images(SIZES[1:2]))  # 5x8 merged grid, padded to 6x8
    with attach_nuwa(model, NuwaConfig(method=method, budget=576 // 2)) as handle, torch.no_grad():
        model(**inputs)
        selection = handle._layout.selection
    offsets = selection.kept_indices[selection.kept]
    assert offsets.max() < 40 and offsets.unique().numel() == offsets.numel()
    if method == "nuwa_stage1":  # half of the 40 real tokens, not of the 48 padded ones
        assert offsets.numel() == 20


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_equals_one_by_one_with_different_image_sizes(tiny_qwen, padding_side):
    model, processor = tiny_qwen
    images = make_images(SIZES, seed=1)
    inputs = encode(processor, QUESTIONS, images, padding_side)
    with attach_nuwa(model, NuwaConfig(budget=128)) as handle, torch.no_grad():
        batched = model(**inputs).logits
        batched_map = handle.kept.token_map()
        for b in range(3):
            alone = model(**encode(processor, QUESTIONS[b : b + 1], images[b : b + 1])).logits[0]
            alone_map = handle.kept.token_map()[0]
            offset = int(inputs["attention_mask"][b].nonzero().min())
            rows = {p: j for j, p in enumerate(batched_map[b].tolist()) if p >= 0}
            common = [(rows[p + offset], j) for j, p in enumerate(alone_map.tolist()) if p + offset in rows]
            assert len(common) == alone.shape[0]
            jb, ja = map(torch.tensor, zip(*common))
            torch.testing.assert_close(batched[b, jb], alone[ja], atol=1e-5, rtol=1e-5)


def test_generate_with_cache_equals_cache_free_greedy_loop(tiny_qwen):
    model, processor = tiny_qwen
    inputs = encode(processor, QUESTIONS[:2], make_images(SIZES[:2]), "left")
    steps = 5
    with attach_nuwa(model, NuwaConfig(budget=192, stage2_layer=2)):
        assert_cached_generate_equals_greedy(
            model, inputs, steps, image_keys=("pixel_values", "image_grid_thw"), token_keys=("mm_token_type_ids",)
        )


@pytest.mark.parametrize("mode", ["soft", "straight_through"])
def test_soft_at_tiny_temperature_equals_hard(tiny_qwen, mode):
    model, processor = tiny_qwen
    inputs = encode(processor, QUESTIONS, make_images(SIZES), "left")
    image_token = model.config.image_token_id
    with attach_nuwa(model, NuwaConfig(budget=192, stage2_layer=2)) as handle, torch.no_grad():
        hard = model(**inputs).logits
        hard_text = {(b, p): hard[b, j] for b, j, p in text_pairs(inputs, handle.kept.token_map(), image_token)}
        handle.set_selection(mode, temperature=1e-6)
        soft = model(**inputs).logits
        assert soft.shape[1] == inputs["input_ids"].shape[1]
        soft_text = {(b, p): soft[b, j] for b, j, p in text_pairs(inputs, handle.kept.token_map(), image_token)}
    keys = sorted(hard_text)
    assert keys == sorted(soft_text) and len(keys) > 20
    torch.testing.assert_close(
        torch.stack([soft_text[k] for k in keys]), torch.stack([hard_text[k] for k in keys]), atol=1e-5, rtol=1e-5
    )


def test_scores_are_received_attention_in_raster_order(tiny_qwen):
    """Independent recomputation: rerun the scoring block's attention on raster-ordered inputs."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        apply_rotary_pos_emb_vision,
    )
    from transformers.vision_utils import get_vision_position_ids

    model, processor = tiny_qwen
    images = make_images(SIZES[:2], seed=2)
    inputs = encode(processor, QUESTIONS[:2], images)
    visual = model.model.visual
    with attach_nuwa(model, NuwaConfig()) as handle, torch.no_grad():
        encodings = handle.adapter.encode(
            inputs["pixel_values"], handle.config, image_grid_thw=inputs["image_grid_thw"]
        ).segments
        block_index = handle.adapter._score_block(handle.config)
        hidden = visual(
            inputs["pixel_values"], grid_thw=inputs["image_grid_thw"], output_hidden_states=True
        ).hidden_states[block_index]
    grid = inputs["image_grid_thw"]
    if handle.adapter.windowed:  # hidden states are in window order: restore raster order per merge unit
        hidden = hidden.view(-1, 4, hidden.shape[-1])[handle.adapter._raster_order(grid)].reshape(hidden.shape)
    block = visual.blocks[block_index]
    qkv = block.attn.qkv(block.norm1(hidden)).reshape(hidden.shape[0], 3, block.attn.num_heads, -1)
    cos, sin = visual.rotary_pos_emb(hidden, get_vision_position_ids(grid, 2))
    query, key = apply_rotary_pos_emb_vision(qkv[:, 0], qkv[:, 1], cos, sin)
    start = 0
    for image, (_, h, w) in enumerate(grid.tolist()):
        q, k = query[start : start + h * w].transpose(0, 1), key[start : start + h * w].transpose(0, 1)
        start += h * w
        received = ((q @ k.transpose(-1, -2)) * block.attn.scaling).softmax(-1).mean(dim=(0, 1))
        expected = received.view(-1, 4).mean(1)  # per merged token, raster order of the merged grid
        encoding = next(e for e in encodings if image in e.images.tolist())
        row = encoding.images.tolist().index(image)
        real = encoding.placeholder_offsets >= 0 if encoding.placeholder_offsets is not None else slice(None)
        torch.testing.assert_close(encoding.scores[row][real], expected, atol=1e-6, rtol=1e-5)


def test_bad_inputs_raise_clear_errors(tiny_qwen):
    model, processor = tiny_qwen
    inputs = encode(processor, QUESTIONS[:1], make_images(SIZES[:1]))
    with attach_nuwa(model, NuwaConfig()):
        with pytest.raises(NuwaInputError, match="mm_token_type_ids is missing"):
            model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"})
        with pytest.raises(NuwaInputError, match="need image_grid_thw"):
            model(**{k: v for k, v in inputs.items() if k != "image_grid_thw"})
        video = inputs["image_grid_thw"].clone()
        video[:, 0] = 2
        with pytest.raises(NuwaInputError, match="temporal size > 1"):
            model(**{**inputs, "image_grid_thw": video})
    if model.config.vision_config.model_type == "qwen2_5_vl":  # block 0 uses window attention
        with attach_nuwa(model, NuwaConfig(score_block=0)), pytest.raises(UnsupportedModelError, match="window"):
            model(**inputs)
    with pytest.raises(Exception, match="position_mode='compact'"):
        attach_nuwa(model, NuwaConfig(position_mode="compact"))


def test_keeping_every_token_equals_the_models_own_forward(tiny_qwen):
    """method none through the handle: the same logits as the unpatched model (Qwen3-VL: its own DeepStack too)."""
    model, processor = tiny_qwen
    inputs = encode(processor, QUESTIONS, make_images(SIZES), "left")
    with torch.no_grad():
        expected = model(**inputs).logits
        with attach_nuwa(model, NuwaConfig(method="none")) as handle:
            kept = model(**inputs).logits
            selection = handle._layout.selection
    assert selection.kept.sum().item() == (inputs["input_ids"] == model.config.image_token_id).sum().item()
    torch.testing.assert_close(kept, expected, atol=1e-5, rtol=1e-5)


def test_deepstack_features_are_those_of_exactly_the_kept_tokens(tiny_qwen):
    model, processor = tiny_qwen
    if not model.config.model_type.startswith("qwen3_vl"):
        pytest.skip("DeepStack is Qwen3-VL's")
    inputs = encode(processor, QUESTIONS, make_images(SIZES), "left")
    with torch.no_grad():
        own = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).deepstack_features
        with attach_nuwa(model, NuwaConfig(budget=128, stage2_layer=2)) as handle:
            model(**inputs)
            selection = handle._layout.selection
    layers = len(model.config.vision_config.deepstack_visual_indexes)
    assert handle.adapter.injected_layers == layers and selection.layer_tokens.shape[2] == layers
    for image in range(len(SIZES)):
        offsets = selection.kept_indices[image][selection.kept[image]]
        assert 0 < len(offsets) < selection.placeholder_counts[image]
        for layer in range(layers):
            expected = own[layer][image][offsets]  # HF's own features of the kept placeholders, in order
            torch.testing.assert_close(selection.layer_tokens[image, : len(offsets), layer], expected)
        assert not selection.layer_tokens[image, len(offsets) :].any()  # padding rows carry nothing


def test_stage2_before_the_last_deepstack_layer_is_refused_by_name(tiny_qwen):
    model, _ = tiny_qwen
    if not model.config.model_type.startswith("qwen3_vl"):
        pytest.skip("DeepStack is Qwen3-VL's")
    with pytest.raises(Exception, match="DeepStack.*stage-2 layer >= 2"):
        attach_nuwa(model, NuwaConfig(stage2_layer=1))
    assert not hasattr(model, "_nuwa")
    assert model.model.language_model.config._attn_implementation == "sdpa"  # the refused attach changed nothing
