"""`--model nuwa` for lmms-eval: a supported VLM from a directory, pruned with `attach_nuwa`, answering greedily.

`--model_args pretrained=DIR[,method=nuwa,budget=64,stage2_layer=0.8,dtype=bfloat16]`. An export runs the
settings of its `nuwa_config.json` unless an argument overrides them (as `nuwa-train eval --model EXPORT`);
a plain model runs `NuwaConfig`'s defaults; `method=none` keeps every vision token. Questions go through
the project's own collator (each family's chat template, left padding, grounding asked and answered in the
family's box format), so the answers are those `nuwa-train eval` scores on the same records.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from ..data.boxes import ImageFrame
from ..data.collate import as_image
from ..data.formats import reduced
from ..evaluation import generate_answers, progress_bar, question_collator
from ..export import load_pruned, read_nuwa_config, untrained_budget_note
from ..models import attach_nuwa, detach_nuwa, load_vlm
from ..models.families import family_of
from ..pruning import NuwaConfig, NuwaConfigError
from .scoring import publish_answer_reader

# A task's `generation_kwargs` key naming what its text is: "grounding" means the text is a referring
# expression, asked with the model's own grounding question and answered in its own box format.
REQUEST_KIND = "nuwa_request"
GROUNDING = "grounding"
PRUNING_ARGS = ("method", "budget", "stage2_layer")


@dataclass
class Question:
    """One request as the collator batches it, and how its answer is returned."""

    record: dict
    image_size: tuple[int, int]  # of the image the task gave (a padded square is LLaVA's, not the task's)
    max_new_tokens: int
    stops: list[str]
    to_image_frame: bool  # the box returned measured on the task's image, not on the model's frame (LLaVA's square)


class NuwaLMM(lmms):
    """lmms-eval's "simple" model interface: one image and a question per request."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str | None = None,
        budget: int | None = None,
        stage2_layer: int | float | None = None,
        dtype: str = "float32",
        batch_size: int | str = 1,
        device: str | None = None,
        max_batch_size: int | None = None,
        **unknown,
    ):
        """`pretrained`: a HF model directory or an export (merged or adapter-only). `max_batch_size` is accepted
        because lmms-eval passes it when set; batches are `batch_size` requests."""
        super().__init__()
        if unknown:
            raise ValueError(
                f"--model_args {', '.join(sorted(unknown))}: not an argument of the nuwa model "
                f"(pretrained, {', '.join(PRUNING_ARGS)}, dtype)"
            )
        path = Path(str(pretrained))
        if not any((path / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise ValueError(
                f"--model_args pretrained={pretrained}: not a HF model directory or an export (no "
                f"config.json or adapter_config.json)"
            )
        given = {key: value for key, value in zip(PRUNING_ARGS, (method, budget, stage2_layer)) if value is not None}
        try:
            self.pruning = replace(read_nuwa_config(path) or NuwaConfig(), **given)
        except NuwaConfigError as error:
            raise ValueError(f"--model_args: {error}") from None
        self.device = torch.device(device or "cpu")
        if (path / "adapter_config.json").is_file():  # an adapter-only export: merged onto its recorded base
            self.model, self.processor = load_pruned(path, getattr(torch, dtype), self.pruning, return_processor=True)
            if self.pruning.method == "none":
                detach_nuwa(self.model)
        else:
            untrained = untrained_budget_note(path, self.pruning.budget) if self.pruning.method != "none" else ""
            if untrained:  # load_pruned warns the same way on the other branch
                warnings.warn(untrained, stacklevel=2)
            self.model, self.processor = load_vlm(path, dtype)
            if self.pruning.method != "none":
                attach_nuwa(self.model, self.pruning)
        self.model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.collator = question_collator(self.model, self.processor)
        self.image_side = family_of(self.model).image_side(self.processor)
        publish_answer_reader(self.collator, self.image_side)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers in request order, batched by generation length."""
        questions = [self._question(request) for request in requests]
        answers: list[str] = [""] * len(requests)
        groups: dict[int, list[int]] = {}
        for position, question in enumerate(questions):
            groups.setdefault(question.max_new_tokens, []).append(position)
        with progress_bar(self.rank == 0) as bar:
            task = bar.add_task(f"nuwa ({self.pruning.method})", total=len(requests))
            for max_new_tokens, positions in groups.items():
                for first in range(0, len(positions), self.batch_size):
                    chunk = positions[first : first + self.batch_size]
                    batch = {
                        key: value.to(self.device)
                        for key, value in self.collator([questions[i].record for i in chunk]).items()
                    }
                    texts = generate_answers(self.model, self.processor.tokenizer, batch, max_new_tokens)
                    for i, text in zip(chunk, texts):
                        answers[i] = self._finish(questions[i], text)
                    bar.advance(task, len(chunk))
        return answers

    def _question(self, request: Instance) -> Question:
        context, generation, doc_to_visual, doc_id, task, split = request.args
        where = f"task {task}, document {doc_id}"
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if len(visuals) != 1:
            raise ValueError(f"{where}: the nuwa model answers about one image per request, got {len(visuals)}")
        options = dict(generation)
        kind = options.pop(REQUEST_KIND, None)
        stops = options.pop("until", None) or []
        max_new_tokens = options.pop("max_new_tokens", None) or self.collator.box_format.max_answer_tokens
        if (
            options.pop("do_sample", False)
            or (options.pop("temperature", 0) or 0) > 0
            or (options.pop("num_beams", 1) or 1) > 1
        ):
            raise ValueError(f"{where}: the nuwa model decodes greedily (generation_kwargs asks for sampling or beams)")
        image = reduced(as_image(visuals[0], where), self.image_side)
        record = {"id": f"{task}/{doc_id}", "image": image, "prompt": context.strip(), "task": "vqa"}
        to_image_frame = False
        if kind == GROUNDING:
            record.update(task="grounding", expression=context.strip())
        elif self.collator.box_format.is_own_question(context):  # e.g. refcoco_bbox_rec asks LLaVA's question
            record["image"], to_image_frame = self.collator.native_image(image), True
        return Question(
            record, image.size, max_new_tokens, [stops] if isinstance(stops, str) else list(stops), to_image_frame
        )

    def _finish(self, question: Question, text: str) -> str:
        for stop in question.stops:
            text = text.split(stop)[0]
        if question.to_image_frame:  # e.g. LLaVA answers on its padded square; generic tasks score on the image
            text = self.collator.box_format.answer_on_image(text, ImageFrame(*question.image_size))
        return text

    def loglikelihood(self, requests):
        raise NotImplementedError("the nuwa model generates answers (output_type: generate_until)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the nuwa model answers single-round requests")
