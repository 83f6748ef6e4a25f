"""Shared fixtures: a tiny random-weight LLaVA and prompts of different lengths (no network)."""

import os

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from nuwa_train.models.tiny import TinyLlavaSpec, build_tiny_llava

WORDS = "what colour is the red blue green circle square triangle left right of how many are there ? yes no".split()

# Two threads match CI's two cores; NUWA_TEST_THREADS=1 avoids oversubscription next to another job.
torch.set_num_threads(int(os.environ.get("NUWA_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def tiny_llava():
    """(model, processor): 12x12 grid, 3 CLIP layers, 4 Llama layers (GQA), fp32, SDPA."""
    torch.manual_seed(0)
    return build_tiny_llava(TinyLlavaSpec(), WORDS)


def make_images(count: int, size: int = 96, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(count)]


PROMPTS = [
    "user : <image> what colour is the circle ? assistant :",
    "user : <image> how many red squares are there left of the blue triangle ? assistant :",
    "user : <image> is there a green circle ? assistant :",
]


def encode(processor, prompts, images, padding_side="left"):
    processor.tokenizer.padding_side = padding_side
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> str:
    """A tiny random LLaVA with the synthetic benchmark's vocabulary, saved like the shipped base."""
    from nuwa_train.data import SyntheticConfig, coordinate_tokens, vocabulary
    from nuwa_train.models.tiny import save_tiny_llava

    torch.manual_seed(0)
    config = SyntheticConfig()
    model, processor = build_tiny_llava(TinyLlavaSpec(), vocabulary(config), coordinate_tokens(config))
    path = tmp_path_factory.mktemp("tiny_base")
    save_tiny_llava(model, processor, path)
    return str(path)


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts from the same RNG state, so random inputs cannot make a test flaky."""
    torch.manual_seed(0)


def assert_cached_generate_equals_greedy(
    model, inputs: dict, steps: int, image_keys=("pixel_values",), token_keys=()
) -> None:
    """`generate()` with the KV cache == a cache-free greedy loop of full (pruned) forwards: logits, tokens.

    `image_keys` are passed unchanged on every forward; `token_keys` are per-token inputs (e.g. Qwen-VL's
    mm_token_type_ids) extended with 0 for every generated token.
    """
    IGNORE = -100
    with torch.no_grad():
        generated = model.generate(
            **inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        per_token = {key: inputs[key] for key in token_keys}
        prompt_length = ids.shape[1]
        for step in range(steps):
            # labels mark the generated part as the answer: the stage-2 query stays the prompt's end
            labels = torch.full_like(ids, IGNORE)
            labels[:, prompt_length:] = ids[:, prompt_length:]
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                **{k: inputs[k] for k in image_keys},
                **per_token,
                labels=labels if step else None,
            ).logits[:, -1]
            torch.testing.assert_close(logits, generated.logits[step], atol=1e-4, rtol=1e-4)
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            per_token = {k: torch.cat([v, torch.zeros_like(v[:, :1])], 1) for k, v in per_token.items()}
    assert torch.equal(ids, generated.sequences)


def causal_keys_mask(allowed: torch.Tensor, eager: bool) -> torch.Tensor:
    """(B, 1, L, L): causal, only `allowed` keys, every query may see itself (no empty rows).

    Bool (True = attend) for SDPA; additive float for eager, which adds the mask to the scores.
    """
    length = allowed.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (causal & allowed[:, None, None, :]) | torch.eye(length, dtype=torch.bool)
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min) if eager else mask


class LossRecorder(Callback):
    """The loss of every optimizer step, by global step (runs compare step by step)."""

    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index):
        self.losses[trainer.global_step] = float(outputs["loss"])


class CodeOnLoad:
    """A pickle payload: unpickling it calls `Path.touch(marker)`, the way a malicious file would run a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return Path.touch, (Path(self.marker),)
