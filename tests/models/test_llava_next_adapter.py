"""The LLaVA-NeXT (anyres) adapter: exact, batched, newline-preserving, cache-consistent pruning."""

import re

import numpy as np
import pytest
import torch
from conftest import (
    PROMPTS,
    WORDS,
    assert_cached_generate_equals_greedy,
    causal_keys_mask,
    encode,
)

from nuwa_train.models import NuwaInputError, UnsupportedModelError, attach_nuwa
from nuwa_train.models.llava_next import LlavaNextAdapter, anyres_layout
from nuwa_train.models.tiny import build_tiny_llava_next
from nuwa_train.pruning import NuwaConfig

# (height, width) of the test images: 2x2 tiles -> 8x6 local grid; 1x2 tiles -> 2x8; the same 8x6 as the
# first (a different size with the same layout, so the two share stage-1 groups); 1x3 tiles -> 4x12.
SIZES = [(60, 50), (12, 60), (62, 52), (30, 90)]
# region_size 2 never needs grid padding on LLaVA-NeXT (every grid side is even); 3 pads base and local grids.
PADDED = dict(region_size=3, budget=100)  # 100 is not a paper preset, so the 24x24 reference plan fits 3x3 regions


@pytest.fixture(scope="module")
def tiny_next():
    torch.manual_seed(0)
    return build_tiny_llava_next(words=WORDS)


def make_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def inputs_for(processor, sizes=SIZES[:3], padding_side="left", prompts=PROMPTS):
    return encode(processor, list(prompts[: len(sizes)]), make_images(sizes), padding_side)


def reference_features(model, inputs):
    """HF's own packed image features (a list of (N_i, D)) on the un-attached model."""
    assert not hasattr(model, "_nuwa")
    with torch.no_grad():
        return list(
            model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
            ).pooler_output
        )


def image_slots(inputs, selection, image_token):
    """(batch row, column) of every image's placeholder run, image after image."""
    slots = (inputs["input_ids"] == image_token).nonzero()
    return torch.split(slots, selection.placeholder_counts.tolist())


def text_positions(inputs, token_map, image_token):
    """Pairs (b, pruned j, unpruned p) of every real text token in the pruned output."""
    is_text = (inputs["input_ids"] != image_token) & inputs["attention_mask"].bool()
    return [
        (b, j, p) for b, row in enumerate(token_map.tolist()) for j, p in enumerate(row) if p >= 0 and is_text[b, p]
    ]


def masked_reference(model, inputs, layout, stage2_layer):
    """The un-attached model at full length: dropped vision tokens are masked out, kept ones carry the
    pruned features (newlines included), every token has its original position."""
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image_token = model.config.image_token_index
    is_image = input_ids == image_token
    selection = layout.selection
    full = reference_features(model, inputs)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
        embeds[is_image] = torch.cat(full)
        kept1 = ~is_image
        for image, slots in enumerate(image_slots(inputs, selection, image_token)):
            assert len(slots) == len(full[image])  # the adapter's placeholder count is HF's
            kept = selection.kept[image]
            chosen = slots[selection.kept_indices[image][kept]]
            embeds[chosen[:, 0], chosen[:, 1]] = selection.pooler_output[image][kept]
            kept1[chosen[:, 0], chosen[:, 1]] = True
        allowed1 = kept1 & mask.bool()
        token_map = layout.token_map()
        kept2 = torch.zeros_like(kept1).scatter_(1, token_map.clamp(min=0), token_map >= 0)
        allowed2 = allowed1 & (kept2 | ~is_image)

        hooks = []
        if stage2_layer is not None:

            def later_layers(layer, args, kwargs):
                kwargs["attention_mask"] = causal_keys_mask(allowed2, eager=False)
                return args, kwargs

            hooks = [
                layer.register_forward_pre_hook(later_layers, with_kwargs=True)
                for layer in model.model.language_model.layers[stage2_layer:]
            ]
        try:
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            mask1 = causal_keys_mask(allowed1, eager=False)
            return model(inputs_embeds=embeds, attention_mask=mask1, position_ids=positions).logits
        finally:
            for hook in hooks:
                hook.remove()


@pytest.mark.parametrize("method", ["nuwa", "nuwa_stage1"])
@pytest.mark.parametrize("grid", ["even", "padded"])
def test_hard_pruning_equals_masking_the_same_tokens(tiny_next, method, grid):
    model, processor = tiny_next
    inputs = inputs_for(processor, SIZES[:3], "left")
    config = NuwaConfig(method=method, **(PADDED if grid == "padded" else dict(budget=128)))
    with attach_nuwa(model, config) as handle, torch.no_grad():
        pruned = model(**inputs).logits
        layout, stage2_layer = handle._layout, handle.stage2_layer if method == "nuwa" else None
    assert layout.selection.placeholder_counts.tolist() == [72, 34, 72]
    assert pruned.shape[1] < inputs["input_ids"].shape[1]
    if method == "nuwa":
        assert layout.stage2 is not None and layout.stage2.source.shape[1] < layout.source.shape[1]
    reference = masked_reference(model, inputs, layout, stage2_layer)
    pairs = text_positions(inputs, layout.token_map(), model.config.image_token_index)
    assert len(pairs) > 30
    b, j, p = map(torch.tensor, zip(*pairs))
    torch.testing.assert_close(pruned[b, j], reference[b, p], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("region_size", [2, 3])
def test_kept_tokens_are_the_models_own_tokens_at_their_placeholders(tiny_next, region_size):
    """Without aggregation (a radius below one patch) every kept token must be exactly the token HF
    packs at that placeholder: base, local (after unpadding) and newline alike."""
    model, processor = tiny_next
    inputs = inputs_for(processor, SIZES[:3] + SIZES[3:], "right", prompts=PROMPTS + PROMPTS[:1])
    full = reference_features(model, inputs)
    config = NuwaConfig(method="nuwa_stage1", distance=0.5, **(PADDED if region_size == 3 else dict(budget=128)))
    with attach_nuwa(model, config) as handle, torch.no_grad():
        selection = handle.image_features(inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    for image, reference in enumerate(full):
        offsets = selection.kept_indices[image][selection.kept[image]]
        assert offsets.unique().numel() == offsets.numel() and (offsets < len(reference)).all()
        assert (offsets >= 16).any() and (offsets < 16).any()  # both grids contribute
        torch.testing.assert_close(
            selection.pooler_output[image][: len(offsets)], reference[offsets], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("region_size", [2, 3])
def test_encode_reads_each_tiles_cls_row_in_hf_packing_order(tiny_next, region_size):
    model, processor = tiny_next
    inputs = inputs_for(processor, SIZES, "left", prompts=PROMPTS + PROMPTS[:1])
    config = model.config
    side = config.vision_config.image_size // config.vision_config.patch_size
    # Where HF packs every (tile, patch): sentinel features through the model's own pack_image_features.
    tiles = [1 + r * c for r, c in (anyres_layout(s, config).tiles for s in inputs["image_sizes"])]
    first_tile = np.cumsum([0] + tiles[:-1])
    sentinels = [
        torch.stack(
            [(int(t0) + torch.arange(n))[:, None].expand(n, side * side), torch.arange(side * side).expand(n, -1)], -1
        ).float()
        for t0, n in zip(first_tile, tiles)
    ]
    packed, _ = model.model.pack_image_features(
        sentinels, inputs["image_sizes"], "default", image_newline=torch.tensor([-1.0, -1.0])
    )
    real_tiles = torch.cat([pixels[:n] for pixels, n in zip(inputs["pixel_values"], tiles)])
    tower = model.model.vision_tower
    feature_index = config.vision_feature_layer % (config.vision_config.num_hidden_layers + 1)
    with torch.no_grad():
        hidden = tower(real_tiles, output_hidden_states=True).hidden_states[feature_index][:, 1:]
        tower.config._attn_implementation = "eager"
        try:
            cls_row = tower(real_tiles, output_attentions=True).attentions[feature_index - 1][:, :, 0, 1:].sum(1)
        finally:
            tower.config._attn_implementation = "sdpa"
    expected_scores = cls_row / cls_row.sum(1, keepdim=True)
    with attach_nuwa(model, NuwaConfig(region_size=region_size, budget=100)) as handle, torch.no_grad():
        encodings = handle.adapter.encode(
            inputs["pixel_values"], handle.config, image_sizes=inputs["image_sizes"]
        ).segments
    assert any(e.images.tolist() == [0, 2] for e in encodings)  # same-layout images share groups
    assert any(e.images.tolist() == list(range(len(SIZES))) for e in encodings)  # all base tiles: one group
    covered = [0] * len(tiles)
    for e in encodings:
        assert e.grid[0] % region_size == 0 and e.grid[1] % region_size == 0
        real = e.placeholder_offsets >= 0
        for row, image in enumerate(e.images.tolist()):
            tile, patch = packed[image][e.placeholder_offsets[real]].long().unbind(-1)
            assert (tile >= 0).all()  # never a newline placeholder
            torch.testing.assert_close(e.features[row, real], hidden[tile, patch], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(e.scores[row, real], expected_scores[tile, patch], atol=1e-5, rtol=1e-5)
            assert (e.scores[row, ~real] < e.scores[row, real].min()).all()
            grid = e.features[row].view(*e.grid, -1)
            h, w = int(real.view(e.grid).any(1).sum()), int(real.view(e.grid).any(0).sum())
            assert torch.equal(grid[h:], grid[h - 1 : h].expand_as(grid[h:]))  # padding repeats the edge
            assert torch.equal(grid[:, w:], grid[:, w - 1 : w].expand_as(grid[:, w:]))
            covered[image] += int(real.sum())
    newlines = [int((p[:, 0] < 0).sum()) for p in packed]
    assert [c + n for c, n in zip(covered, newlines)] == [len(p) for p in packed]  # every token exactly once


def test_one_newline_per_local_row_that_keeps_a_token(tiny_next):
    model, processor = tiny_next
    inputs = inputs_for(processor, SIZES[:3], "right")
    full = reference_features(model, inputs)
    newline = model.model.image_newline
    seen = {}

    def capture(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    with attach_nuwa(model, NuwaConfig(method="nuwa_stage1", budget=48)) as handle, torch.no_grad():
        hook = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            model(**inputs)
        finally:
            hook.remove()
        layout = handle._layout
    selection, dropped_rows, kept_rows = layout.selection, 0, 0
    slots = image_slots(inputs, selection, model.config.image_token_index)
    for image, reference in enumerate(full):
        newline_at = (reference == newline).all(-1).nonzero().flatten().tolist()  # HF's newline placeholders
        kept = selection.kept_indices[image][selection.kept[image]].tolist()
        expected, row_start = [], 16
        for position in newline_at:  # local row r spans the placeholders between consecutive newlines
            if any(row_start <= k < position for k in kept):
                expected.append(position)
            row_start = position + 1
        got = [k for k in kept if k in newline_at]
        assert got == expected
        kept_rows, dropped_rows = kept_rows + len(expected), dropped_rows + len(newline_at) - len(expected)
        tokens = selection.pooler_output[image][selection.kept[image]]
        is_newline = torch.tensor([k in newline_at for k in kept])
        assert torch.equal(tokens[is_newline], newline.expand(len(expected), -1))  # not projected
        assert not torch.isclose(tokens[~is_newline], newline).all(-1).any()
        # the LLM receives them at their own placeholders, with their original positions
        for position in expected:
            b, column = slots[image][position].tolist()
            j = layout.source[b].tolist().index(column)
            assert torch.equal(seen["embeds"][b, j], newline)
            assert layout.position_ids[b, j] == inputs["attention_mask"][b, : column + 1].sum() - 1
    assert kept_rows > 0 and dropped_rows > 0  # the budget leaves some rows empty


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("grid", ["even", "padded"])
def test_batched_equals_one_by_one(tiny_next, padding_side, grid):
    model, processor = tiny_next
    sizes = SIZES[:3]  # different sizes and aspect ratios; images 0 and 2 share their stage-1 groups
    inputs = inputs_for(processor, sizes, padding_side)
    config = NuwaConfig(**(PADDED if grid == "padded" else dict(budget=128)))
    with attach_nuwa(model, config) as handle, torch.no_grad():
        batched = model(**inputs).logits
        batched_map = handle.kept.token_map()
        for b in range(len(sizes)):
            alone_inputs = encode(processor, [PROMPTS[b]], make_images(sizes)[b : b + 1])
            alone = model(**alone_inputs).logits[0]
            alone_map = handle.kept.token_map()[0]
            offset = int(inputs["attention_mask"][b].nonzero().min())  # left padding shifts the unpruned index
            rows = {p: j for j, p in enumerate(batched_map[b].tolist()) if p >= 0}
            common = [(rows[p + offset], j) for j, p in enumerate(alone_map.tolist()) if p + offset in rows]
            assert len(common) == alone.shape[0]  # the lone run keeps exactly the same tokens
            jb, ja = map(torch.tensor, zip(*common))
            torch.testing.assert_close(batched[b, jb], alone[ja], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grid", ["even", "padded"])
def test_generate_with_cache_equals_cache_free_greedy_loop(tiny_next, grid):
    model, processor = tiny_next
    inputs = inputs_for(processor, SIZES[:3], "left")
    steps = 4
    config = NuwaConfig(**(PADDED if grid == "padded" else dict(budget=128)))
    with attach_nuwa(model, config):
        assert_cached_generate_equals_greedy(model, inputs, steps, image_keys=("pixel_values", "image_sizes"))


@pytest.mark.parametrize(
    "method,mode,grid",
    [
        ("nuwa", "soft", "even"),
        ("nuwa_stage1", "soft", "even"),
        ("nuwa", "soft", "padded"),
        ("nuwa", "straight_through", "even"),
    ],
)
def test_soft_at_tiny_temperature_equals_hard(tiny_next, method, mode, grid):
    model, processor = tiny_next
    inputs = inputs_for(processor, SIZES[:3], "left")
    config = NuwaConfig(method=method, **(PADDED if grid == "padded" else dict(budget=128)))
    image_token = model.config.image_token_index

    def text_logits(logits, token_map):
        return {(b, p): logits[b, j] for b, j, p in text_positions(inputs, token_map, image_token)}

    with attach_nuwa(model, config) as handle, torch.no_grad():
        hard = text_logits(model(**inputs).logits, handle.kept.token_map())
        handle.set_selection(mode, temperature=1e-6)
        soft_logits = model(**inputs).logits
        assert soft_logits.shape[1] == inputs["input_ids"].shape[1]  # soft keeps every token
        bias = handle._layout.selection.keep_bias
        soft = text_logits(soft_logits, handle.kept.token_map())
    assert (bias < -1).any() and (bias > -1e-3).any()  # tokens are really switched off and on
    assert hard.keys() == soft.keys() and len(hard) > 30
    keys = sorted(hard)
    torch.testing.assert_close(
        torch.stack([soft[k] for k in keys]), torch.stack([hard[k] for k in keys]), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize(
    "override,key",
    [
        (dict(vision_feature_select_strategy="full"), "vision_feature_select_strategy"),
        (dict(vision_feature_layer=[-2, -1]), "vision_feature_layer"),
        (dict(image_grid_pinpoints=[[32, 64], [48, 32]]), "image_grid_pinpoints"),
    ],
)
def test_unsupported_layouts_are_refused_by_name(override, key):
    model, _ = build_tiny_llava_next(words=WORDS, **override)
    with pytest.raises(UnsupportedModelError, match=key):
        attach_nuwa(model)
    assert not hasattr(model, "_nuwa")


def test_bad_image_inputs_raise_clear_errors(tiny_next):
    model, processor = tiny_next
    inputs = inputs_for(processor, SIZES[:2])
    with attach_nuwa(model, NuwaConfig()) as handle:
        with pytest.raises(NuwaInputError, match="needs image_sizes"):
            handle.image_features(inputs["pixel_values"])
        with pytest.raises(NuwaInputError, match="do not hold the"):
            handle.image_features(inputs["pixel_values"][:, :3], image_sizes=inputs["image_sizes"])
        with pytest.raises(NuwaInputError, match="expected"):
            handle.image_features(inputs["pixel_values"][0, :4], image_sizes=inputs["image_sizes"])


def test_blank_image_and_lora_targets(tiny_next):
    model, processor = tiny_next
    adapter = LlavaNextAdapter(model)
    count, image_inputs = adapter.blank_image(torch.device("cpu"))
    size = image_inputs["image_sizes"].tolist()
    assert count == processor._get_num_multimodal_tokens(image_sizes=size).num_image_tokens[0]
    ids = processor.tokenizer(["user : <image> what is the circle ?"], return_tensors="pt").input_ids
    image_at = int((ids[0] == model.config.image_token_index).nonzero())
    ids = torch.cat([ids[:, :image_at], ids[:, image_at : image_at + 1].expand(1, count), ids[:, image_at + 1 :]], 1)
    with attach_nuwa(model, NuwaConfig()) as handle, torch.no_grad():
        model(input_ids=ids, **image_inputs)
        assert handle._layout.selection.placeholder_counts.tolist() == [count]
    pattern = re.compile(adapter.lora_target_pattern(include_vision=True))
    names = [name for name, _ in model.named_modules() if pattern.fullmatch(name)]
    assert "model.language_model.layers.0.self_attn.q_proj" in names
    assert "model.vision_tower.encoder.layers.0.self_attn.k_proj" in names
    assert not any(f"encoder.layers.{adapter.clip.feature_index}." in name for name in names)  # after the feature layer
