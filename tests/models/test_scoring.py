"""Stage-1 scoring pieces shared by every adapter (models/scoring.py): moving them out of the Qwen adapter
changed no score, bit for bit."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

from nuwa_train.models import attach_nuwa, scoring
from nuwa_train.models.tiny_qwen import TinyQwenSpec, build_tiny_qwen
from nuwa_train.pruning import NuwaConfig

SIZES = [(96, 96), (80, 128), (64, 96)]  # (height, width): 6x6, 5x8 and 4x6 merged grids
SMALL_CHUNK = 7  # fewer queries per step than any image has patches: several chunks, one ragged


def received_attention_before_the_move(block, hidden, kwargs, query_chunk):
    """The Qwen adapter's private `_received_attention` as it was before models/scoring.py (the reference)."""
    attn = block.attn
    length = hidden.shape[0]
    qkv = attn.qkv(block.norm1(hidden)).reshape(length, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
    cos, sin = kwargs["position_embeddings"]
    query, key = apply_rotary_pos_emb_vision(qkv[0], qkv[1], cos, sin)
    query, key = query.transpose(0, 1), key.transpose(0, 1)
    bounds = kwargs["cu_seqlens"].tolist()
    received = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        keys = key[:, start:end]
        total = keys.new_zeros(end - start, dtype=torch.float32)
        for first in range(start, end, query_chunk):
            queries = query[:, first : min(end, first + query_chunk)]
            probs = ((queries @ keys.transpose(-1, -2)) * attn.scaling).float().softmax(dim=-1)
            total = total + probs.sum(dim=(0, 1))
        received.append(total / (attn.num_heads * (end - start)))
    return torch.cat(received)


@pytest.mark.parametrize("version", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("query_chunk", [scoring.QUERY_CHUNK, SMALL_CHUNK])
def test_qwen_scores_are_bitwise_those_of_the_adapters_own_code_before_the_move(version, query_chunk, monkeypatch):
    torch.manual_seed(0)
    model, processor = build_tiny_qwen(TinyQwenSpec(version=version), ["what", "is", "it"])
    with torch.no_grad():
        for block in model.model.visual.blocks:
            block.attn.qkv.weight.mul_(8)  # sharp attention: scores far from uniform
    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for size in SIZES]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
    monkeypatch.setattr(scoring, "QUERY_CHUNK", query_chunk)
    captured = {}
    with attach_nuwa(model, NuwaConfig()) as handle, torch.no_grad():
        adapter = handle.adapter
        block = model.model.visual.blocks[adapter._score_block(handle.config)]

        def capture(module, args, kwargs):
            captured.update(hidden=args[0] if args else kwargs["hidden_states"], kwargs=kwargs)

        hook = block.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        finally:
            hook.remove()
        after = adapter._received_attention(block, captured["hidden"], captured["kwargs"])
        before = received_attention_before_the_move(block, captured["hidden"], captured["kwargs"], query_chunk)
        encodings = adapter.encode(
            inputs["pixel_values"], handle.config, image_grid_thw=inputs["image_grid_thw"]
        ).segments
    assert after.shape == (sum(h * w for _, h, w in inputs["image_grid_thw"].tolist()),)
    assert after.dtype == torch.float32 and torch.equal(after, before)
    # per image, the mean over its queries and heads of a softmax: one unit of attention per query, spread
    counts = [h * w for _, h, w in inputs["image_grid_thw"].tolist()]
    for image_scores, count in zip(after.split(counts), counts):
        torch.testing.assert_close(image_scores.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
        assert image_scores.std() > 0.1 / count  # not uniform: the ranking is defined
    assert sum(len(e.images) for e in encodings) == len(SIZES)  # the adapter's encode still reads them all


def test_received_attention_keeps_images_apart_and_does_not_depend_on_the_chunk(monkeypatch):
    torch.manual_seed(1)
    query, key = torch.randn(2, 11, 4), torch.randn(2, 11, 4)
    bounds = [0, 5, 11]
    whole = scoring.received_attention(query, key, bounds, 0.5)
    for chunk in (1, 3, 64):
        monkeypatch.setattr(scoring, "QUERY_CHUNK", chunk)
        torch.testing.assert_close(scoring.received_attention(query, key, bounds, 0.5), whole, atol=1e-6, rtol=0)
    # image 2 alone gives the same scores: image 1's tokens are neither queries nor keys of it
    alone = scoring.received_attention(query[:, 5:], key[:, 5:], [0, 6], 0.5)
    torch.testing.assert_close(whole[5:], alone, atol=1e-6, rtol=0)
    expected = ((query[:, :5] @ key[:, :5].transpose(-1, -2)) * 0.5).softmax(-1).mean(dim=(0, 1))
    torch.testing.assert_close(whole[:5], expected, atol=1e-6, rtol=1e-6)
