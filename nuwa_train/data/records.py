"""Records as torch datasets: the synthetic benchmark generated on demand, or a user's files."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .formats import load_llava_json, load_refcoco_json
from .synthetic import SyntheticConfig, generate_scene, make_grounding, make_vqa, render

TASKS_PER_IMAGE = 2  # every synthetic image yields VQA and grounding records, alternating


class SyntheticRecords(Dataset):
    """Record i of a split, generated on demand (deterministic by seed, split and index).

    Each image yields `questions_per_image` VQA records and as many grounding records, consecutive
    (vqa, grounding, vqa, ...): more supervision per rendered image and per vision-tower pass.
    """

    def __init__(self, config: SyntheticConfig, split: str, num_images: int, questions_per_image: int = 1):
        if isinstance(questions_per_image, bool) or not isinstance(questions_per_image, int) or questions_per_image < 1:
            raise ValueError(f"questions_per_image={questions_per_image!r} must be a positive int")
        self.config, self.split, self.num_images = config, split, num_images
        self.records_per_image = TASKS_PER_IMAGE * questions_per_image

    def __len__(self) -> int:
        return self.num_images * self.records_per_image

    def __getitem__(self, index: int) -> dict:
        image, position = divmod(index, self.records_per_image)
        draw, task = divmod(position, TASKS_PER_IMAGE)
        scene = generate_scene(self.config, self.split, image)
        record = (make_vqa if task == 0 else make_grounding)(scene, self.config, draw)
        return dict(id=record.id, image=render(scene, self.config), prompt=record.prompt, answer=record.answer,
                    task=record.task, box=record.box, kind=record.kind)


class FileRecords(Dataset):
    """LLaVA-conversation and RefCOCO-style JSON files, concatenated (rows as dicts)."""

    def __init__(self, llava_files: list[str], refcoco_files: list[str], on_error: str):
        self.parts = [load_llava_json(path, on_error=on_error) for path in llava_files]
        self.parts += [load_refcoco_json(path, on_error=on_error) for path in refcoco_files]
        self.offsets = torch.tensor([0] + [len(p) for p in self.parts]).cumsum(0).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict:
        part = next(i for i in range(len(self.parts)) if index < self.offsets[i + 1])
        return dict(self.parts[part][index - self.offsets[part]])
