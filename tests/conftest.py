"""Shared fixtures: a tiny random-weight LLaVA and prompts of different lengths (no network)."""

import os

import numpy as np
import pytest
import torch
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


PROMPTS = ["user : <image> what colour is the circle ? assistant :",
           "user : <image> how many red squares are there left of the blue triangle ? assistant :",
           "user : <image> is there a green circle ? assistant :"]


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
