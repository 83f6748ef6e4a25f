"""The pre-training data: batches generated on the fly from where the run is (phase, data position, progress).

A batch is a pure function of the module's `Position`, so resuming needs nothing but the saved position. It is
made when the training step asks for it (`training_step(dataloader_iter)`), never prefetched: the batch after a
step depends on that step's time (phase ends and the curriculum of time-budgeted phases).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, replace

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from ..data.collate import VisionLanguageCollator
from ..data.synthetic import SyntheticConfig, generate_records, generate_scene, render
from ..lightning.data import as_synthetic_config
from .phases import Phase, Position
from .targets import TargetMaker

CURRICULUM_DECIMALS = 3  # the single-object fraction changes in steps of 0.001 (stable across float noise)


def phase_synthetic(base: SyntheticConfig, phase: Phase) -> SyntheticConfig:
    """The training data of `phase`: the recipe's data with the phase's own overrides."""
    return SyntheticConfig.from_dict({**asdict(base), **phase.data})


class BatchMaker:
    """Position -> batch: records of fixed image indices with their pixels and auxiliary targets."""

    def __init__(self, phases: list[Phase], synthetic: SyntheticConfig, processor, targets: TargetMaker):
        self.phases, self.processor, self.targets = phases, processor, targets
        self.phase_data = [phase_synthetic(synthetic, phase) for phase in phases]  # once, not per batch
        self.collator = VisionLanguageCollator(processor, padding_side="right")
        self.mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
        self.std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
        self.size = targets.spec.image_size

    def synthetic_at(self, position: Position) -> SyntheticConfig:
        phase = self.phases[position.phase]
        base = self.phase_data[position.phase]
        if phase.single_object_fraction is None:
            return base
        first, last = phase.single_object_fraction
        fraction = first + (last - first) * min(1.0, position.progress(phase))
        return replace(base, single_object_fraction=round(fraction, CURRICULUM_DECIMALS))

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """Same numbers as the CLIP image processor for images already at model size (tested)."""
        arrays = []
        for image in images:
            if image.size != (self.size, self.size):
                return torch.as_tensor(np.asarray(self.processor.image_processor(images)["pixel_values"]))
            arrays.append(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1))
        return (torch.stack(arrays) / 255.0 - self.mean) / self.std

    def __call__(self, position: Position) -> dict:
        phase = self.phases[position.phase]
        first = position.next_image
        synthetic = self.synthetic_at(position)
        if phase.train == "vision":
            scenes = [generate_scene(synthetic, "train", first + i) for i in range(phase.batch_size)]
            out = self._scene_targets(scenes)
            out["pixel_values"] = self.pixels([render(s, synthetic) for s in scenes])
            return out
        records = list(generate_records(synthetic, "train", phase.images_per_step, start=first))
        images, scenes, image_of_record, rows = {}, [], [], []
        for record in records:
            key = record.scene.index
            if key not in images:
                images[key] = render(record.scene, synthetic)
                scenes.append(record.scene)
            image_of_record.append(list(images).index(key))
            rows.append(dict(id=record.id, image=images[key], prompt=record.prompt, answer=record.answer))
        out = self.collator(rows)
        # The tower runs once per image (two records share one): pixels and vision targets per unique image.
        out["pixel_values"] = self.pixels(list(images.values()))
        out["image_of_record"] = torch.tensor(image_of_record)
        out.update(self._scene_targets(scenes))
        out["kinds"] = [r.kind for r in records]
        covers = out.pop("cover_list")
        referred = [self.targets.referred_patches(record, covers[index])
                    for record, index in zip(records, image_of_record)]
        out["referred"] = torch.as_tensor(np.stack(referred), dtype=torch.float32)
        return out

    def _scene_targets(self, scenes) -> dict:
        targets = [self.targets.scene_targets(s) for s in scenes]
        out = {key: torch.as_tensor(np.stack([t[key] for t in targets]))
               for key in ("classes", "boxes", "counts", "presence")}
        out["cover_list"] = [t["cover"] for t in targets]
        return out


class PositionBatches(IterableDataset):
    """The batch of the module's current position each time one is asked for, until the last phase ends."""

    def __init__(self, module, make_batch: BatchMaker):
        self.module, self.make_batch = module, make_batch

    def __iter__(self):
        while not self.module.finished:
            yield self.make_batch(self.module.position)


class TinyBaseData(L.LightningDataModule):
    """The synthetic training split the phases draw from (`synthetic`: SyntheticConfig fields; phases override)."""

    def __init__(self, synthetic: SyntheticConfig = SyntheticConfig()):
        super().__init__()
        self.synthetic = as_synthetic_config(synthetic)

    def train_dataloader(self) -> DataLoader:
        module = self.trainer.lightning_module
        make_batch = BatchMaker(module.phases, self.synthetic, module.processor, module.targets)
        # Batches are made in the main process when the step asks (see the module docstring): no workers.
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        return DataLoader(PositionBatches(module, make_batch), batch_size=None)
