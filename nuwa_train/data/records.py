"""Records as torch datasets: the synthetic benchmark generated on demand, or a user's files."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .formats import load_llava_json, load_refcoco_json
from .synthetic import SyntheticConfig, generate_scene, make_grounding, make_vqa, render

class SyntheticRecords(Dataset):
    """Record i of a split, generated on demand (deterministic by seed, split and index).

    Each image yields `vqa_per_image` VQA records and `grounding_per_image` grounding records,
    consecutive and alternating while both last (vqa, grounding, vqa, ...): more supervision per
    rendered image and per vision-tower pass, or a different balance of the two tasks.
    """

    def __init__(self, config: SyntheticConfig, split: str, num_images: int, vqa_per_image: int = 1,
                 grounding_per_image: int = 1):
        self.config, self.split, self.num_images = config, split, num_images
        self.tasks = self.tasks_per_image(vqa_per_image, grounding_per_image)
        self._last_image: tuple | None = None  # (index, scene, rendered image): an image's records come in a row

    @staticmethod
    def tasks_per_image(vqa_per_image: int, grounding_per_image: int, key_prefix: str = "") -> list[tuple]:
        """(record maker, draw) for each record of an image; bad counts raise naming `key_prefix` + the key."""
        counts = {"vqa_per_image": vqa_per_image, "grounding_per_image": grounding_per_image}
        for key, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key_prefix}{key}={value!r} must be an int >= 0")
        if not any(counts.values()):
            raise ValueError(f"{key_prefix}vqa_per_image and {key_prefix}grounding_per_image are both 0: the "
                             f"images yield no records")
        return [(make, draw) for draw in range(max(vqa_per_image, grounding_per_image))
                for make, count in ((make_vqa, vqa_per_image), (make_grounding, grounding_per_image)) if draw < count]

    @property
    def records_per_image(self) -> int:
        return len(self.tasks)

    def __len__(self) -> int:
        return self.num_images * self.records_per_image

    def __getitem__(self, index: int) -> dict:
        image, position = divmod(index, self.records_per_image)
        make, draw = self.tasks[position]
        scene, pixels = self._scene(image)
        record = make(scene, self.config, draw)
        return dict(id=record.id, image=pixels, prompt=record.prompt, answer=record.answer,
                    task=record.task, box=record.box, kind=record.kind)

    def _scene(self, image: int):
        """Layout and rendering of one image, reused while its records are read one after another."""
        if self._last_image is None or self._last_image[0] != image:
            scene = generate_scene(self.config, self.split, image)
            self._last_image = (image, scene, render(scene, self.config))
        return self._last_image[1:]


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
