"""The scores Nüwa reads without eager attention equal what eager attention would have returned."""

import torch
from conftest import PROMPTS, WORDS, encode, make_images

from nuwa_train.models import LlavaAdapter
from nuwa_train.models.tiny import (
    TinyLlavaSpec,
    build_tiny_llava,
    load_tiny_llava,
    save_tiny_llava,
)
from nuwa_train.pruning import NuwaConfig, last_token_attention


def eager_tiny():
    torch.manual_seed(1)
    return build_tiny_llava(TinyLlavaSpec(attn_implementation="eager", vision_layers=4, vision_feature_layer=-2), WORDS)


def test_cls_saliency_and_similarity_features_match_the_vision_tower():
    model, processor = eager_tiny()
    adapter = LlavaAdapter(model)
    pixels = encode(processor, PROMPTS[:2], make_images(2))["pixel_values"]
    with torch.no_grad():
        out = model.model.vision_tower(pixels, output_hidden_states=True, output_attentions=True)
        encoding = adapter.encode(pixels, NuwaConfig(sim_layers=(0.5, 1.0))).segments[0]
    feature_layer = 4 - 2 + 1  # hidden_states index of vision_feature_layer=-2 in a 4-layer tower
    expected = out.attentions[feature_layer - 1][:, :, 0, 1:].sum(dim=1)
    torch.testing.assert_close(encoding.scores, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(encoding.features, out.hidden_states[feature_layer][:, 1:])
    torch.testing.assert_close(encoding.sim_features, torch.stack(out.hidden_states[2:5]).mean(0)[:, 1:])


def test_stage2_row_matches_eager_attention_of_the_last_prompt_token():
    model, processor = eager_tiny()
    adapter = LlavaAdapter(model)
    inputs = encode(processor, PROMPTS, make_images(3), "right")
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    prompt_end = mask.sum(1) - 1
    layer_index = 2
    with torch.no_grad():
        out = model(**inputs, position_ids=positions, output_attentions=True, output_hidden_states=True)
        lm = model.model.language_model
        hidden = out.hidden_states[layer_index]  # input of decoder layer 2
        rotary = lm.rotary_emb(hidden, positions)
        query, keys, scale = adapter.query_and_keys(lm.layers[layer_index], hidden, prompt_end, rotary)
        visible = mask.bool() & (torch.arange(mask.shape[1]) <= prompt_end[:, None])
        row = last_token_attention(query, keys, visible, scale)
    expected = out.attentions[layer_index][torch.arange(3), :, prompt_end].mean(dim=1)
    torch.testing.assert_close(row, expected, atol=1e-6, rtol=1e-5)


def test_tiny_model_round_trips_through_save_and_from_pretrained(tmp_path):
    model, processor = build_tiny_llava(TinyLlavaSpec(), WORDS, atomic_tokens=["<loc_0>", "<loc_1>"])
    inputs = encode(processor, [PROMPTS[0] + " <loc_1>"], make_images(1))
    save_tiny_llava(model, processor, tmp_path)
    loaded, loaded_processor = load_tiny_llava(tmp_path)
    again = encode(loaded_processor, [PROMPTS[0] + " <loc_1>"], make_images(1))
    assert torch.equal(inputs["input_ids"], again["input_ids"])
    assert loaded_processor.tokenizer.convert_ids_to_tokens(int(again["input_ids"][0, -1])) == "<loc_1>"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**again).logits, model(**inputs).logits, atol=0, rtol=0)
