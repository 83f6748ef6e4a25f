"""Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models and an image-only word-level processor, built from configs.

They are the real HF classes (ViT with 2-D RoPE + 2x2 merger, M-RoPE LM; Qwen2.5-VL with window
attention; Qwen3-VL with learned position embeddings, DeepStack mergers, interleaved M-RoPE and a QK-norm LM),
only small, so the code paths used on real checkpoints run on a CPU in seconds. Qwen3-VL's processor differs
from Qwen2-VL's only in its video half, so the image-only processor serves all three.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

from .qwen2_vl import Qwen2VLImageProcessorOnly
from .tiny import build_tokenizer, with_generation_tokens

VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"
# "<s> user : <|vision_start|> <|image_pad|> <|vision_end|> question assistant : answer </s>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}user : "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    f"{VISION_START} {IMAGE_PAD} {VISION_END} "
    "{% else %}{{ part['text'] }} {% endif %}{% endfor %}"
    "{% else %}assistant : {% for part in message['content'] %}{{ part['text'] }} {% endfor %}</s> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)


@dataclass(frozen=True)
class TinyQwenSpec:
    """Sizes of the tiny Qwen-VL. 8 px patches merged 2x2: a 96 px image is a 6x6 merged grid."""

    version: str = "qwen2_vl"  # or "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"
    patch_size: int = 8
    vision_hidden: int = 32
    vision_layers: int = 4
    vision_heads: int = 2
    full_attention_blocks: tuple[int, ...] = (1, 3)  # Qwen2.5-VL; the others use windows
    window_size: int = 32  # Qwen2.5-VL window side in pixels: 2x2 merged tokens
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to head_dim / 2
    deepstack_blocks: tuple[int, ...] = (1, 2)  # Qwen3-VL: vision blocks whose mergers feed LLM layers 0, 1
    position_grid: int = 8  # Qwen3-VL: side of its learned vision position grid (resampled to every image)
    experts: int = 4  # Qwen3-VL-MoE: experts per MoE layer (every LLM layer), of which 2 run per token
    min_pixels: int = 16 * 16 * 4
    max_pixels: int = 16 * 16 * 256
    attn_implementation: str = "sdpa"


def build_processor(
    spec: TinyQwenSpec, words: list[str] = (), atomic_tokens: list[str] = (), round_trip: bool = False
) -> Qwen2VLImageProcessorOnly:
    tokenizer = build_tokenizer(
        list(words), [VISION_START, VISION_END, VIDEO_PAD, *atomic_tokens], image_token=IMAGE_PAD, round_trip=round_trip
    )
    images = Qwen2VLImageProcessorPil(
        patch_size=spec.patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels},
    )
    return Qwen2VLImageProcessorOnly(image_processor=images, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def build_model(spec: TinyQwenSpec, tokenizer):
    ids = {
        name: tokenizer.convert_tokens_to_ids(token)
        for name, token in (
            ("image_token_id", IMAGE_PAD),
            ("video_token_id", VIDEO_PAD),
            ("vision_start_token_id", VISION_START),
            ("vision_end_token_id", VISION_END),
        )
    }
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.text_hidden,
        intermediate_size=2 * spec.text_hidden,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(spec.mrope_section)},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    common = dict(
        depth=spec.vision_layers,
        num_heads=spec.vision_heads,
        patch_size=spec.patch_size,
        temporal_patch_size=2,
        spatial_merge_size=2,
    )
    if spec.version == "qwen2_vl":
        vision = dict(common, embed_dim=spec.vision_hidden, hidden_size=spec.text_hidden, mlp_ratio=2)
        config, cls = Qwen2VLConfig(text_config=text, vision_config=vision, **ids), Qwen2VLForConditionalGeneration
    elif spec.version == "qwen2_5_vl":
        vision = dict(
            common,
            hidden_size=spec.vision_hidden,
            intermediate_size=2 * spec.vision_hidden,
            out_hidden_size=spec.text_hidden,
            window_size=spec.window_size,
            fullatt_block_indexes=list(spec.full_attention_blocks),
        )
        config, cls = (
            Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids),
            Qwen2_5_VLForConditionalGeneration,
        )
    elif spec.version in ("qwen3_vl", "qwen3_vl_moe"):
        text["head_dim"] = spec.text_hidden // spec.text_heads
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
        vision = dict(
            common,
            hidden_size=spec.vision_hidden,
            intermediate_size=2 * spec.vision_hidden,
            out_hidden_size=spec.text_hidden,
            num_position_embeddings=spec.position_grid**2,
            deepstack_visual_indexes=list(spec.deepstack_blocks),
        )
        config, cls = Qwen3VLConfig, Qwen3VLForConditionalGeneration
        if spec.version == "qwen3_vl_moe":
            text.update(num_experts=spec.experts, num_experts_per_tok=2, moe_intermediate_size=spec.text_hidden)
            config, cls = Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
        config = config(text_config=text, vision_config=vision, **ids)
    else:
        raise ValueError(f"version={spec.version!r} must be 'qwen2_vl', 'qwen2_5_vl', 'qwen3_vl' or 'qwen3_vl_moe'")
    return with_generation_tokens(cls._from_config(config, attn_implementation=spec.attn_implementation), tokenizer)


def build_tiny_qwen(
    spec: TinyQwenSpec = TinyQwenSpec(), words: list[str] = (), atomic_tokens: list[str] = (), round_trip: bool = False
):
    """(model, processor) for a tiny Qwen2-VL / 2.5-VL / 3-VL with random weights and a vocabulary of `words`."""
    processor = build_processor(spec, words, atomic_tokens, round_trip)
    return build_model(spec, processor.tokenizer), processor
