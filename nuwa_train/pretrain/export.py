"""The export of a pre-trained base: model + processor, training log, eval report (JSON / Markdown) and README.

The auxiliary heads stay behind: the export is a plain `LlavaForConditionalGeneration` directory, swapped in
atomically so that a reader sees the old export or the new one, never half.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from ..data.synthetic import SyntheticConfig, generate_records, generate_scene, render
from ..io import write_directory_atomically
from ..models.tiny import TinyLlavaSpec, save_tiny_llava
from .conversations import conversation_markdown, evaluate_conversations
from .targets import COVER_THRESHOLD, TargetMaker

SALIENCY_TOP = 16  # objects_in_top: share of objects owning a patch among the top-16 CLS scores
SALIENCY_BATCH = 64  # images per forward when measuring saliency


@dataclass
class ExportSettings:
    export_dir: str = "data/tiny_base"
    snapshot_eval_images: int = 150
    final_eval_images: int = 1000
    saliency_images: int = 200
    eval_batch_size: int = 64
    max_new_tokens: int = 8
    test_data: dict = field(default_factory=dict)  # SyntheticConfig fields of the test split
    conversation_turns: int = 0  # > 0: also score test conversations of this many turns, turn by turn
    conversation_grounding: float = 0.3  # share of the conversations' turns that are referring expressions


def export_base(
    module,
    settings: ExportSettings,
    final: bool,
    recipe: dict,
    log_path: Path | None,
    progress: bool = False,
    recipe_file: str | None = None,
) -> Path:
    """Evaluate the module's model on the test split, then write the export directory (see the module docstring).

    `progress`: a bar per measurement (an export on its own takes minutes; during training it would interleave
    with the trainer's)."""
    from ..evaluation import evaluate

    images = settings.final_eval_images if final else settings.snapshot_eval_images
    test = SyntheticConfig.from_dict(settings.test_data)
    records = list(generate_records(test, "test", images))
    model, processor = module.model, module.processor
    was_training = model.training
    try:
        result = evaluate(
            model,
            processor,
            records,
            synthetic_config=test,
            batch_size=settings.eval_batch_size,
            max_new_tokens=settings.max_new_tokens,
            progress=progress,
            description=f"test split, {len(records)} records",
        )
        saliency = measure_saliency(
            model, processor, test, module.spec, min(images, settings.saliency_images), progress=progress
        )
        report = {
            "final": final,
            "step": module.position.step,
            "total_steps": module.total_steps,
            "phase_steps": module.phase_steps(),
            "train_seconds": round(module.elapsed, 1),
            "test_images": images,
            "test_records": len(records),
            "eval": result.to_dict(),
            "saliency": saliency,
            "recipe": recipe,
            "recipe_file": recipe_file,
        }
        if settings.conversation_turns:
            report["conversations"] = evaluate_conversations(
                model,
                processor,
                test,
                images,
                settings.conversation_turns,
                settings.conversation_grounding,
                settings.eval_batch_size,
                settings.max_new_tokens,
            )
        target = Path(settings.export_dir)
        model.eval()

        def write(staging: Path) -> None:
            save_tiny_llava(model, processor, staging)
            if log_path is not None and log_path.exists():
                shutil.copyfile(log_path, staging / "training_log.csv")
            (staging / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            (staging / "eval_report.md").write_text(report_markdown(report), encoding="utf-8")
            (staging / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
            (staging / "README.md").write_text(readme_text(report), encoding="utf-8")

        write_directory_atomically(target, write)
    finally:
        model.train(was_training)
    print(
        f"exported step {module.position.step} to {target}: vqa {result.vqa_exact_match:.3f} "
        f"grounding {result.grounding_acc50:.3f} miou {result.grounding_miou:.3f}",
        flush=True,
    )
    return target


@torch.no_grad()
def measure_saliency(
    model,
    processor,
    config: SyntheticConfig,
    spec: TinyLlavaSpec,
    images: int,
    top: int = SALIENCY_TOP,
    progress: bool = False,
) -> dict:
    """Is CLS attention (the pruners' stage-1 score) a saliency map? Measured on test images.

    mass_on_objects: share of the CLS-attention mass on object patches (>= 25% covered);
    area_on_objects: share of patches that are object patches (what uniform attention would give);
    objects_in_top: share of objects owning at least one patch among the top-`top` scores.
    """
    from ..evaluation import progress_bar
    from ..models.llava import LlavaAdapter
    from ..pruning import NuwaConfig

    adapter = LlavaAdapter(model)
    targets = TargetMaker(config, spec)
    mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    mass, area, found, total = 0.0, 0.0, 0, 0
    was_training = model.training
    model.eval()
    with progress_bar(progress) as bar:
        task = bar.add_task("CLS-attention saliency", total=images)
        for first in range(0, images, SALIENCY_BATCH):
            scenes = [generate_scene(config, "test", i) for i in range(first, min(images, first + SALIENCY_BATCH))]
            pixels = (
                torch.stack(
                    [torch.from_numpy(np.asarray(render(s, config), dtype=np.float32)).permute(2, 0, 1) for s in scenes]
                )
                / 255.0
            )
            pixels = (pixels - mean) / std
            scores = adapter.encode(pixels, NuwaConfig()).segments[0].scores
            scores = scores / scores.sum(1, keepdim=True)
            for scene, score in zip(scenes, scores):
                owned = targets.coverage(scene) >= COVER_THRESHOLD
                on_object = owned.any(0)
                mass += float(score[torch.from_numpy(on_object)].sum())
                area += float(on_object.mean())
                best = set(torch.topk(score, top).indices.tolist())
                found += sum(bool(set(np.flatnonzero(row)) & best) for row in owned)
                total += len(scene.objects)
            bar.advance(task, len(scenes))
    model.train(was_training)
    return {
        "images": images,
        "mass_on_objects": mass / images,
        "area_on_objects": area / images,
        "mass_over_area": (mass / images) / max(area / images, 1e-9),
        f"objects_in_top{top}": found / max(total, 1),
    }


def report_markdown(report: dict) -> str:
    ev, sal = report["eval"], report["saliency"]
    status = "final" if report["final"] else f"snapshot, training in progress at step {report['step']}"
    lines = [
        f"# Tiny base VLM: evaluation ({status})",
        "",
        f"Test split of the synthetic benchmark, {report['test_images']} images ({report['test_records']} "
        f"records), full vision tokens ({ev['vision_tokens_total']} per image), greedy decoding.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| VQA exact match | {ev['vqa_exact_match']:.3f} ({ev['num_vqa']} questions) |",
        f"| grounding Acc@IoU>=0.5 | {ev['grounding_acc50']:.3f} ({ev['num_grounding']} expressions) |",
        f"| grounding mean IoU | {ev['grounding_miou']:.3f} |",
        f"| unparseable boxes | {ev['unparseable']} |",
        "",
        "| question kind | accuracy | records |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {v:.3f} | {ev['per_kind_count'][k]} |" for k, v in ev["per_kind"].items()]
    if report.get("conversations"):
        lines += ["", *conversation_markdown(report["conversations"])]
    lines += [
        "",
        f"CLS attention of the vision feature layer (the stage-1 pruning score), on {sal['images']} test images:",
        "",
        f"- mass on object patches: {sal['mass_on_objects']:.3f} (object patches are "
        f"{sal['area_on_objects']:.3f} of the image: {sal['mass_over_area']:.2f}x uniform)",
        f"- objects with a patch in the CLS top-16: {sal['objects_in_top16']:.3f}",
        "",
        f"Training: {report['step']} steps ({', '.join(f'{k} {v}' for k, v in report.get('phase_steps', {}).items())})"
        f", {report['train_seconds'] / 60:.1f} minutes of training time.",
        "",
    ]
    return "\n".join(lines)


def _run_dir(recipe: dict) -> str:
    """Where the recipe's StateCheckpoint keeps the resume state."""
    for callback in recipe.get("trainer", {}).get("callbacks") or []:
        if str(callback.get("class_path", "")).endswith("StateCheckpoint"):
            return str(callback.get("init_args", {}).get("dirpath", "runs/tiny_base"))
    return "runs/tiny_base"


def readme_text(report: dict) -> str:
    recipe = report.get("recipe") or {}
    model = recipe.get("model", {})
    recipe_file = report.get("recipe_file") or "recipes/tiny_base.yaml"
    run_dir = _run_dir(recipe)
    export_dir = next(
        (
            str(c["init_args"]["export_dir"])
            for c in recipe.get("trainer", {}).get("callbacks") or []
            if str(c.get("class_path", "")).endswith("ExportBase") and "export_dir" in c.get("init_args", {})
        ),
        "data/tiny_base",
    )
    origin = (
        f"continued from `{model['init_from']}` (see `recipe.yaml`)"
        if model.get("init_from")
        else "trained from scratch"
    )
    layout = (
        "the question before the image (`user : question <image> assistant :`)"
        if model.get("spec", {}).get("image_after_text")
        else "the image first (`user : <image> question assistant :`), as LLaVA and Qwen-VL lay out a turn"
    )
    return f"""# Tiny base VLM (nuwa-train's stand-in for a pretrained VLM)

A tiny `LlavaForConditionalGeneration` (CLIP vision tower + Llama LM, word-level tokenizer with
`<loc_k>` coordinate tokens) {origin} on the synthetic shapes benchmark with all vision
tokens (no pruning). Its chat template puts {layout}. Load it with

```python
from nuwa_train.models.tiny import load_tiny_llava
model, processor = load_tiny_llava("{export_dir}")
```

Files: `model.safetensors` + `config.json` (weights), processor/tokenizer files, `recipe.yaml` (the
exact recipe), `training_log.csv` (losses), `eval_report.json` / `eval_report.md` (test-split metrics,
per question kind{", per conversation turn" if report.get("conversations") else ""}, and whether CLS attention is a
saliency map). This export is
{"final" if report["final"] else f"a snapshot at step {report['step']} (training in progress)"}.

## Reproduce

From the repository root (2 CPU cores, about {report["train_seconds"] / 60:.0f} minutes of training here):

```
OMP_NUM_THREADS=2 python -m nuwa_train.pretrain {recipe_file}    # or: nuwa-train pretrain-base {recipe_file}
```

Phases with `minutes` are time-budgeted (the schedule follows training seconds, or steps when those run
out first, so a slower or shared machine takes fewer steps). For a machine-independent re-run, pin the
phase lengths realised here (`phase_steps` in `eval_report.json`) and drop the budgets (the schedule then
follows steps, which matches this run up to the speed variations of a shared CPU): in a copy of the
recipe set each phase's `steps` to its realised length and `minutes: null`.

It writes its resume state (`last.safetensors`, a Lightning checkpoint stored as safetensors + JSON) and
`log.csv` to `{run_dir}/` and exports here every few minutes and at the end; re-running the same
command resumes from `{run_dir}/last.safetensors`. Add `--export-only` to re-export from it.
"""
