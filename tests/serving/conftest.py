"""Shared by the vLLM tests: the serving environment, the `load_pruned` reference, and the records both answer.

The tests run in the training environment; vLLM runs in the serving environment (.venv-serve) as a subprocess
(vllm_answers.py for the offline engine, `nuwa-train serve` for the HTTP server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "data" / "tiny_base"
DATA = ROOT / "data" / "synthetic_sample"
BUDGET = 64  # 16 of the tiny base's 144 image tokens
MAX_TOKENS = 16  # longer than any tiny-base answer (they end with </s>)
TOP_LOGPROBS = 5
# Single-threaded, small KV cache, no thread pinning: the machine is shared (FIELD_NOTES, "vLLM on this CPU")
VLLM_ENVIRONMENT = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
}
VLLM_TIMEOUT_S = 1800
SKIP_ENV = "NUWA_SKIP_SERVING"  # launch.sh's switch: no serving environment, no vLLM tests


@pytest.fixture(scope="session")
def serving_python() -> str:
    from nuwa_train.serving.server import ServeError, serving_python

    if os.environ.get(SKIP_ENV, "0") != "0":
        pytest.skip(f"{SKIP_ENV} is set: the vLLM tests are skipped")
    try:
        return serving_python()
    except ServeError as error:
        pytest.skip(f"no serving environment ({error})")


@dataclass
class Reference:
    """What `load_pruned` answers on the records, and the prompts vLLM gets for them."""

    prompt_token_ids: list[list[int]]  # with ONE image placeholder each (vLLM expands it to the plan's K)
    images: list[str]
    answers: list[list[int]]
    first_logprobs: list[torch.Tensor]  # (vocab,) log-softmax of the first generated token's logits
    kept: list[list[int]]  # stage-1 raster indices per image


def load_records() -> list[tuple[str, Path]]:
    """(question, image path) of every record of the shipped synthetic sample (24, one image each)."""
    records = json.loads((DATA / "llava_vqa.json").read_text())
    return [(r["conversations"][0]["value"].replace("<image>", "").strip(), DATA / r["image"]) for r in records]


def reference_answers(config, model_dir: Path = MODEL) -> Reference:
    from PIL import Image

    from nuwa_train.export import load_pruned

    model, processor = load_pruned(model_dir, config=config, return_processor=True)
    image_token = model.config.image_token_index
    reference = Reference([], [], [], [], [])
    for question, image_path in load_records():
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        with Image.open(image_path) as image:
            inputs = processor(images=[image.convert("RGB")], text=[text], return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        first, count = ids.index(image_token), ids.count(image_token)
        reference.prompt_token_ids.append(ids[: first + 1] + ids[first + count :])
        reference.images.append(str(image_path))
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True
            )
        reference.answers.append(out.sequences[0, len(ids) :].tolist())
        reference.first_logprobs.append(torch.log_softmax(out.scores[0][0].float(), dim=-1))
        reference.kept.append(model._nuwa.kept.first_image_of(0).stage1)
    return reference


def vllm_answers(python: str, reference: Reference, runs: dict, tmp_path: Path, model_dir: Path = MODEL) -> dict:
    """{run name: vllm_answers.py's result} for the reference's prompts; each run is one engine."""
    job = {
        "model": str(model_dir),
        "max_tokens": MAX_TOKENS,
        "logprobs": TOP_LOGPROBS,
        "runs": runs,
        "records": [
            {"prompt_token_ids": ids, "image": image}
            for ids, image in zip(reference.prompt_token_ids, reference.images)
        ],
    }
    job_path, out_path = tmp_path / "job.json", tmp_path / "answers.json"
    job_path.write_text(json.dumps(job))
    done = subprocess.run(
        [python, str(Path(__file__).with_name("vllm_answers.py")), str(job_path), str(out_path)],
        env={**os.environ, **VLLM_ENVIRONMENT},
        capture_output=True,
        text=True,
        timeout=VLLM_TIMEOUT_S,
        check=False,
    )
    if done.returncode:
        sys.stderr.write(done.stderr[-20000:])
        raise AssertionError(f"vLLM run failed with status {done.returncode} (its stderr is above)")
    return json.loads(out_path.read_text())


def largest_logprob_difference(served: dict, reference: Reference) -> float:
    """Largest |log p| difference over vLLM's top first-token candidates of every record."""
    return max(
        abs(logprob - float(full[int(token)]))
        for top, full in zip(served["first_logprobs"], reference.first_logprobs)
        for token, logprob in top.items()
    )


def matching(served: dict, reference: Reference) -> int:
    return sum(a == b for a, b in zip(served["answers"], reference.answers))
