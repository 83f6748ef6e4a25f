"""A tiny LLaVA-architecture model and word-level processor, built from configs (no network).

It is the real `LlavaForConditionalGeneration` (CLIP vision tower + Llama LM), only small, so every
code path used on `llava-hf/llava-1.5-7b-hf` is exercised on a CPU. `build_tiny_llava_next` does the
same for LLaVA-NeXT (`LlavaNextForConditionalGeneration`, anyres tiles and row newlines).
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoProcessor,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
CHAT_WORDS = ("user", "assistant", ":")
# A chat template in the LLaVA-1.5 style: "<s> user : <image> question assistant : answer </s>".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}user : "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} "
    "{% endif %}{% endfor %}"
    "{% else %}assistant : {% for part in message['content'] %}{{ part['text'] }} {% endfor %}</s> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)
# The same template with every image placed after the user's text ("user : question <image> assistant :"),
# whatever the order of the content parts: the vision tokens can then attend to the question.
CHAT_TEMPLATE_IMAGE_LAST = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}user : "
    "{% for part in message['content'] %}{% if part['type'] != 'image' %}{{ part['text'] }} {% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image> {% endif %}{% endfor %}"
    "{% else %}assistant : {% for part in message['content'] %}{{ part['text'] }} {% endfor %}</s> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
)


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Sizes of the tiny model. 96 px / 8 px patches give a 12x12 grid (even, as stage 1 needs)."""

    image_size: int = 96
    patch_size: int = 8
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    vision_feature_layer: int = -1
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    mlp_ratio: int = 2
    vision_mlp: int | None = None  # MLP widths when not hidden * mlp_ratio (CLIP-L: 4096; Llama-2-7B: 11008)
    text_mlp: int | None = None
    vocab_size: int | None = None  # embedding rows when larger than the tokenizer (a real model's vocabulary)
    max_positions: int = 1024
    attn_implementation: str = "sdpa"
    image_after_text: bool = False  # chat template puts the image after the question (CHAT_TEMPLATE_IMAGE_LAST)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side


SPACE = "\u2581"  # SentencePiece's word-start marker, as in the real families' tokenizers
# A round-trip pre-token: one digit, one punctuation mark, or one run of letters, each with its leading space.
ROUND_TRIP_PIECE = Regex(rf"{SPACE}?[0-9]|{SPACE}?[^\w\s{SPACE}]|{SPACE}?[^\W_]+|{SPACE}|_")


def build_tokenizer(
    words: list[str], atomic_tokens: list[str] = (), image_token: str = IMAGE, round_trip: bool = False
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: `Whitespace` splitting (\\w+ | punctuation runs), atomic extra tokens.

    `round_trip`: decode(encode(text)) == text for any text of `words`, digits and ASCII punctuation, spaces
    included (SentencePiece-style word-start markers, digits and punctuation one by one), so a family's native
    answers ("[0.39, 0.57, 0.52, 0.88]", JSON boxes) are representable; the shipped tiny base keeps the plain form.
    """
    specials = [PAD, UNK, BOS, EOS, image_token]
    vocab: dict[str, int] = {}
    pieces = [*CHAT_WORDS, *words]
    if round_trip:
        pieces += list(string.digits + string.punctuation)
        pieces = [SPACE, *pieces, *(SPACE + piece for piece in pieces)]
    for token in [*specials, *pieces]:
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    if round_trip:
        core.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never"),
                pre_tokenizers.Split(ROUND_TRIP_PIECE, behavior="isolated"),
            ]
        )
        core.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never")
    else:
        core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": image_token},
    )
    if atomic_tokens:
        tokenizer.add_tokens(list(atomic_tokens))
    return tokenizer


def build_processor(
    spec: TinyLlavaSpec, words: list[str], atomic_tokens: list[str] = (), round_trip: bool = False
) -> LlavaProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size}, crop_size={"height": spec.image_size, "width": spec.image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(words, atomic_tokens, round_trip=round_trip),
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE,
        chat_template=CHAT_TEMPLATE_IMAGE_LAST if spec.image_after_text else CHAT_TEMPLATE,
    )


def _tower_configs(spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerFast) -> tuple[CLIPVisionConfig, LlamaConfig]:
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_mlp or spec.vision_hidden * spec.mlp_ratio,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=max(len(tokenizer), spec.vocab_size or 0),
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_mlp or spec.text_hidden * spec.mlp_ratio,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return vision, text


def with_generation_tokens(model, tokenizer):
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    return model.eval()


def build_model(
    spec: TinyLlavaSpec, tokenizer: PreTrainedTokenizerFast, dtype: torch.dtype | None = None, device: str = "cpu"
) -> LlavaForConditionalGeneration:
    """Random weights, initialised directly in `dtype` on `device` (a 7B-width stack never exists in fp32)."""
    vision, text = _tower_configs(spec, tokenizer)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy="default",
        image_seq_length=spec.grid[0] * spec.grid[1],
        pad_token_id=tokenizer.pad_token_id,
    )
    config._attn_implementation = spec.attn_implementation
    with torch.device(device):
        model = (
            LlavaForConditionalGeneration._from_config(config, dtype=dtype)
            if dtype
            else LlavaForConditionalGeneration(config)
        )
    return with_generation_tokens(model, tokenizer)


def build_tiny_llava(
    spec: TinyLlavaSpec = TinyLlavaSpec(),
    words: list[str] = (),
    atomic_tokens: list[str] = (),
    round_trip: bool = False,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
):
    """(model, processor) for a tiny LLaVA with random weights and a vocabulary of `words`."""
    processor = build_processor(spec, list(words), list(atomic_tokens), round_trip)
    return build_model(spec, processor.tokenizer, dtype, device), processor


# LLaVA-NeXT's anyres pinpoints (1x2, 2x1, 2x2, 3x1, 1x3 tiles, as (rows, cols)), in tiles of the vision input.
NEXT_TILE_LAYOUTS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
# A tiny LLaVA-NeXT: 32 px tiles of 8 px patches, so the base grid is 4x4 and the local grids up to 8x8 / 12x4.
TINY_LLAVA_NEXT = TinyLlavaSpec(
    image_size=32,
    patch_size=8,
    vision_hidden=32,
    vision_layers=3,
    vision_heads=2,
    vision_feature_layer=-2,
    text_hidden=64,
    text_layers=4,
    text_heads=4,
    text_kv_heads=2,
)


def build_tiny_llava_next(
    spec: TinyLlavaSpec = TINY_LLAVA_NEXT,
    words: list[str] = (),
    atomic_tokens: list[str] = (),
    tile_layouts=NEXT_TILE_LAYOUTS,
    round_trip: bool = False,
    **config_overrides,
):
    """(model, processor) for a tiny LLaVA-NeXT (anyres) with random weights and a vocabulary of `words`.

    `config_overrides` go to `LlavaNextConfig` (e.g. an unsupported vision_feature_select_strategy).
    The processor is the PIL backend (no torchvision needed); it accepts numpy HWC uint8 images.
    """
    tokenizer = build_tokenizer(list(words), list(atomic_tokens), round_trip=round_trip)
    pinpoints = [[rows * spec.image_size, cols * spec.image_size] for rows, cols in tile_layouts]
    vision, text = _tower_configs(spec, tokenizer)
    settings = dict(
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=spec.vision_feature_layer,
        vision_feature_select_strategy="default",
        image_seq_length=spec.grid[0] * spec.grid[1],
    )
    settings.update(config_overrides)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    config._attn_implementation = spec.attn_implementation
    model = with_generation_tokens(LlavaNextForConditionalGeneration(config), tokenizer)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=IMAGE,
        chat_template=CHAT_TEMPLATE_IMAGE_LAST if spec.image_after_text else CHAT_TEMPLATE,
    )
    return model, processor


def save_tiny_llava(model, processor, path: str | Path) -> None:
    model.save_pretrained(path)
    processor.save_pretrained(path)


def load_tiny_llava(path: str | Path):
    """Load with the plain `from_pretrained` path that real checkpoints use."""
    return LlavaForConditionalGeneration.from_pretrained(path).eval(), AutoProcessor.from_pretrained(path)
