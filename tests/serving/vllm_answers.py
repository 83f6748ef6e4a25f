"""Run in the serving environment (.venv-serve) by tests/serving: greedy answers of vLLM's offline engine.

    python vllm_answers.py JOB.json OUT.json

JOB: {"model", "max_tokens", "logprobs", "records": [{"prompt_token_ids": ids with ONE image placeholder, "image":
path}], "runs": {NAME: {"hf_overrides", "engine": extra LLM(...) arguments}}}: one engine per run, in one process.
OUT: {NAME: {"answers": [token ids], "first_logprobs": [{token id: log-prob}], "kept": [raster indices per encoded
image, in encoding order], "init_s": engine start-up seconds}}.
"""

from __future__ import annotations

import gc
import json
import sys
import time

# Small and deterministic on a shared 2-core machine (FIELD_NOTES, "vLLM on this CPU")
ENGINE_DEFAULTS = {
    "dtype": "float32",
    "max_model_len": 512,
    "max_num_seqs": 4,
    "limit_mm_per_prompt": {"image": 1},
    "enforce_eager": True,
    "seed": 0,
}


def main(job_path: str, out_path: str) -> None:
    with open(job_path) as handle:
        job = json.load(handle)
    results = {name: answer(job, run) for name, run in job["runs"].items()}
    with open(out_path, "w") as handle:
        json.dump(results, handle)


def answer(job: dict, run: dict) -> dict:
    from PIL import Image
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    started = time.perf_counter()
    llm = LLM(model=job["model"], hf_overrides=run["hf_overrides"], **{**ENGINE_DEFAULTS, **run.get("engine", {})})
    init_s = time.perf_counter() - started
    llm.apply_model(lambda model: model.recent_kept.clear())  # the profiling run's dummy image
    prompts = []
    for record in job["records"]:
        with Image.open(record["image"]) as image:
            prompts.append(
                TokensPrompt(
                    prompt_token_ids=record["prompt_token_ids"], multi_modal_data={"image": image.convert("RGB")}
                )
            )
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=job["logprobs"])
    outputs = llm.generate(prompts, params, use_tqdm=False)
    kept = llm.apply_model(lambda model: list(model.recent_kept))[0]
    result = {
        "answers": [list(output.outputs[0].token_ids) for output in outputs],
        "first_logprobs": [
            {str(token): entry.logprob for token, entry in output.outputs[0].logprobs[0].items()} for output in outputs
        ],
        "kept": kept,
        "init_s": init_s,
    }
    del llm
    gc.collect()
    return result


if __name__ == "__main__":
    main(*sys.argv[1:])
