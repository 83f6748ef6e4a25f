"""The model shapes `nuwa-train bench` times, and how a shape's inputs and random weights are built.

A shape that runs fewer decoder layers than the real model (`full_depth`) keeps every selector's token
schedule at the same relative depth (stage 2 at half depth, FastV's layer scaled), so each measured layer
stands for `full_depth / text_layers` real ones: full-depth LLM times are the measured ones times that
factor, and everything outside the LLM (vision tower, projector, Nüwa's own work) runs once either way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..models.tiny import TinyLlavaSpec, build_tiny_llava
from ..pruning import NuwaConfig

BENCH_WORDS = [f"w{i}" for i in range(64)]
WEIGHT_STD = 0.02  # Llama/CLIP's initializer range: random weights of a realistic scale
RANDOM_POOL = 1 << 24  # values drawn once and tiled into every weight (drawing billions is slower than the bench)


@dataclass(frozen=True)
class BenchShape:
    spec: TinyLlavaSpec
    dtype: torch.dtype = torch.float32
    full_depth: int | None = None  # decoder layers of the real model, when `spec` runs fewer

    @property
    def measured_layers(self) -> int:
        return self.spec.text_layers

    @property
    def depth(self) -> int:
        return self.full_depth or self.spec.text_layers

    @property
    def depth_scale(self) -> float:
        """How many real decoder layers each measured one stands for."""
        return self.depth / self.measured_layers

    def full_depth_ms(self, measured_ms: float, llm_ms: float) -> float:
        """A time measured on `measured_layers` (of which `llm_ms` in the decoder layers) at the real depth."""
        return measured_ms + llm_ms * (self.depth_scale - 1)

    def at_depth(self, layers: int) -> BenchShape:
        """The same shape running `layers` decoder layers (e.g. the whole real depth on a GPU)."""
        return replace(self, spec=replace(self.spec, text_layers=layers))

    def selector_config(self, method: str, budget: int) -> NuwaConfig:
        """A selector at `budget`, its LLM layer at the real model's relative depth (stage 2 is a fraction)."""
        default = NuwaConfig()
        fastv_layer = max(1, round(default.fastv_layer * self.measured_layers / self.depth))
        return NuwaConfig(method=method, budget=budget, fastv_layer=fastv_layer)


# "llava15" keeps LLaVA-1.5's structure (24x24 grid from 336 px / 14 px patches, 24 CLIP layers, 32 LLM layers,
# stage 2 at 16) at CPU-sized widths. "llava15-7b" has the real widths: CLIP ViT-L/14-336 (1024 hidden, 16 heads,
# 4096 MLP, 577 tokens) and Llama-2-7B decoder layers (4096 hidden, 32 heads, 11008 MLP, 32064-token vocabulary),
# in bf16 (5x fp32's matmul throughput on this CPU's AVX-512 BF16: 410 vs 82 GFLOP/s), 16 of the 32 decoder layers
# on a CPU (FastV's layer 2 of 32 becomes 1 of 16; `--full-depth` runs all 32).
LLAVA15_7B_SPEC = TinyLlavaSpec(
    image_size=336,
    patch_size=14,
    vision_hidden=1024,
    vision_layers=24,
    vision_heads=16,
    vision_mlp=4096,
    vision_feature_layer=-2,
    text_hidden=4096,
    text_layers=16,
    text_heads=32,
    text_kv_heads=32,
    text_mlp=11008,
    vocab_size=32064,
    max_positions=4096,
)
SHAPES = {
    "tiny": BenchShape(TinyLlavaSpec()),
    "llava15": BenchShape(
        TinyLlavaSpec(
            image_size=336,
            patch_size=14,
            vision_hidden=256,
            vision_layers=24,
            vision_heads=4,
            vision_feature_layer=-2,
            text_hidden=512,
            text_layers=32,
            text_heads=8,
            text_kv_heads=8,
            mlp_ratio=3,
        )
    ),
    "llava15-7b": BenchShape(LLAVA15_7B_SPEC, torch.bfloat16, full_depth=32),
}


def build_random_model(shape: BenchShape, device: str = "cpu"):
    """(model, processor) with random weights of a realistic scale, allocated directly in the shape's dtype."""
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model, processor = build_tiny_llava(shape.spec, words=BENCH_WORDS, dtype=shape.dtype, device=device)
    generator = torch.Generator(device).manual_seed(0)
    pool = torch.randn(RANDOM_POOL, generator=generator, device=device, dtype=shape.dtype) * WEIGHT_STD
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" in name:
                weight.fill_(1.0)
            elif name.endswith("bias"):
                weight.zero_()
            else:
                flat = weight.view(-1)
                for start in range(0, flat.numel(), RANDOM_POOL):
                    stop = min(start + RANDOM_POOL, flat.numel())
                    flat[start:stop].copy_(pool[: stop - start])
    return model.eval(), processor


def _text(words: int, offset: int) -> str:
    return " ".join(BENCH_WORDS[(i + offset) % len(BENCH_WORDS)] for i in range(words))


def prompt_batch(
    model, processor, shape: BenchShape, text_before: int, question: int, device: str = "cpu", answer: int = 0
) -> dict:
    """One image's inputs: `text_before` words, the image's placeholders, a `question`, and an `answer` of that many
    words whose tokens are the labels (when answer > 0)."""
    spec = shape.spec
    prompt = f"{_text(text_before, 0)} user : <image> {_text(question, 7)} ? assistant :"
    ids = processor.tokenizer([prompt], return_tensors="pt")["input_ids"][0]
    image_id = model.config.image_token_index
    at = int(ids.eq(image_id).nonzero()[0])
    num_tokens = spec.grid[0] * spec.grid[1]
    ids = torch.cat([ids[:at], torch.full((num_tokens,), image_id), ids[at + 1 :]])
    labels = None
    if answer:
        answer_ids = processor.tokenizer([_text(answer, 3)], add_special_tokens=False, return_tensors="pt")
        answer_ids = answer_ids["input_ids"][0]
        labels = torch.cat([torch.full_like(ids, -100), answer_ids])[None].to(device)
        ids = torch.cat([ids, answer_ids])
    ids = ids[None].to(device)
    pixels = torch.rand(1, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels.to(device, shape.dtype))
    if labels is not None:
        batch["labels"] = labels
    return batch
