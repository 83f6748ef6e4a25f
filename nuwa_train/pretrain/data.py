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
from ..data.synthetic import SyntheticConfig, generate_scene, make_conversation, make_grounding, make_vqa, render
from ..lightning.data import as_synthetic_config
from .phases import Phase, Position
from .targets import TargetMaker

CURRICULUM_DECIMALS = 3  # the single-object fraction changes in steps of 0.001 (stable across float noise)
CONVERSATION_STREAM = 7919  # the random stream that picks which training images come as conversations


def conversation_turns(phase: Phase, seed: int, image: int) -> int:
    """How many turns training image `image` is asked in one conversation under `phase`; 0: it comes as its two
    single-turn records. A pure function of (seed, image), so a resumed run sees the same batches."""
    if not phase.conversation_fraction:
        return 0
    rng = np.random.default_rng([seed, CONVERSATION_STREAM, image])
    if rng.random() >= phase.conversation_fraction:
        return 0
    low, high = phase.conversation_turns
    return int(rng.integers(low, high + 1))


def conversation_row(records, image) -> dict:
    """Records about one image as one collator row: the first turn as prompt/answer, every turn in `messages`
    (the answers in the records' own text: coordinate tokens for boxes)."""
    messages = []
    for record in records:
        messages += [{"role": "user", "content": record.prompt}, {"role": "assistant", "content": record.answer}]
    first = records[0]
    return dict(
        id=f"{first.scene.split}-{first.scene.index:06d}-conversation",
        image=image,
        prompt=first.prompt,
        answer=first.answer,
        messages=messages,
    )


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
        rows, scenes, images, turns, image_of_record = [], [], [], [], []  # turns: each row's records, as asked
        for index in range(first, first + phase.images_per_step):
            scene = generate_scene(synthetic, "train", index)
            image = render(scene, synthetic)
            asked = conversation_turns(phase, synthetic.seed, index)
            if asked:
                records = make_conversation(scene, synthetic, asked, phase.conversation_grounding)
                rows.append(conversation_row(records, image))
                turns.append(records)
            else:
                for record in (make_vqa(scene, synthetic), make_grounding(scene, synthetic)):
                    rows.append(dict(id=record.id, image=image, prompt=record.prompt, answer=record.answer))
                    turns.append((record,))
            image_of_record += [len(scenes)] * (len(rows) - len(image_of_record))
            scenes.append(scene)
            images.append(image)
        out = self.collator(rows)
        # The tower runs once per image (its records share it): pixels and vision targets per image.
        out["pixel_values"] = self.pixels(images)
        out["image_of_record"] = torch.tensor(image_of_record)
        out.update(self._scene_targets(scenes))
        # One entry per supervised answer, in the order the answers appear in the batch (rows, then turns).
        out["kinds"] = [record.kind for records in turns for record in records]
        out["turn_index"] = [turn for records in turns for turn in range(len(records))]
        covers = out.pop("cover_list")
        referred = [
            self.targets.referred_patches(records, covers[index]) for records, index in zip(turns, image_of_record)
        ]
        out["referred"] = torch.as_tensor(np.stack(referred), dtype=torch.float32)
        out["answer_referred"] = torch.as_tensor(
            np.stack(
                [  # per answer: the objects its question is about
                    self.targets.referred_patches(record, covers[index])
                    for records, index in zip(turns, image_of_record)
                    for record in records
                ]
            ),
            dtype=torch.float32,
        )
        return out

    def _scene_targets(self, scenes) -> dict:
        targets = [self.targets.scene_targets(s) for s in scenes]
        out = {
            key: torch.as_tensor(np.stack([t[key] for t in targets]))
            for key in ("classes", "boxes", "counts", "presence")
        }
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
