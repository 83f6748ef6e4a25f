"""Auxiliary targets of a scene on the model's patch grid: what each patch shows, and what a record is about."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..data.geometry import COORD_RANGE, normalise_box
from ..data.schema import IGNORE_INDEX
from ..data.synthetic import Record, Scene, SyntheticConfig, draw_object
from ..models.tiny import TinyLlavaSpec

COVER_THRESHOLD = 0.25  # a patch belongs to an object when the object covers >= 25% of its pixels


def label_map(scene: Scene) -> np.ndarray:
    """(H, W) uint8: 0 background, i + 1 where object i is drawn (the renderer's own geometry)."""
    image = Image.new("L", (scene.width, scene.height), 0)
    draw = ImageDraw.Draw(image)
    for index, obj in enumerate(scene.objects):
        draw_object(draw, obj, index + 1)
    return np.asarray(image)


class TargetMaker:
    """Per-patch class / box / count targets and the image's presence labels, on the model's patch grid."""

    def __init__(self, config: SyntheticConfig, spec: TinyLlavaSpec):
        self.config, self.spec = config, spec
        self.sizes = [name for name, _, _ in config.sizes]
        self.colours = [name for name, _ in config.colours]
        self.shapes = list(config.shapes)
        self.triples = list(itertools.product(self.sizes, self.colours, self.shapes))
        self.count_slots = 1 + len(self.colours) + len(self.shapes)
        self.count_values = config.object_count[1] + 1
        self.bins = config.coordinate_bins

    @property
    def num_classes(self) -> int:
        return len(self.triples) + 1

    def coverage(self, scene: Scene) -> np.ndarray:
        """(objects, N) share of each patch's pixels covered by each object."""
        labels = label_map(scene)
        p = self.spec.patch_size
        gh, gw = self.spec.grid
        if labels.shape != (gh * p, gw * p):  # images are fed at model size: resample the mask the same way
            labels = np.asarray(Image.fromarray(labels).resize((gw * p, gh * p), Image.NEAREST))
        blocks = labels.reshape(gh, p, gw, p).transpose(0, 2, 1, 3).reshape(gh * gw, p * p)
        return np.stack([(blocks == i + 1).mean(1) for i in range(len(scene.objects))])

    def scene_targets(self, scene: Scene) -> dict[str, np.ndarray]:
        cover = self.coverage(scene)
        best = cover.argmax(0)
        owned = cover.max(0) >= COVER_THRESHOLD
        classes = np.zeros(cover.shape[1], dtype=np.int64)
        boxes = np.full((cover.shape[1], 4), IGNORE_INDEX, dtype=np.int64)
        presence = np.zeros(len(self.triples), dtype=np.float32)
        for index, obj in enumerate(scene.objects):
            triple = self.triples.index((obj.size, obj.colour, obj.shape))
            presence[triple] = 1.0
            mine = owned & (best == index)
            classes[mine] = triple + 1
            box = normalise_box(obj.box, scene.width, scene.height)
            boxes[mine] = [v * self.bins // COORD_RANGE for v in box]
        counts = [len(scene.objects)]
        counts += [sum(o.colour == c for o in scene.objects) for c in self.colours]
        counts += [sum(o.shape == s for o in scene.objects) for s in self.shapes]
        return dict(
            cover=cover,
            classes=classes,
            boxes=boxes,
            presence=presence,
            counts=np.minimum(np.array(counts, dtype=np.int64), self.count_values - 1),
        )

    @staticmethod
    def referred_patches(records: Record | Sequence[Record], cover: np.ndarray) -> np.ndarray:
        """(N,) share of each patch covered by the objects the record is about (`Record.referred`), at most 1;
        for the records of one conversation, the objects any of its turns is about."""
        records = (records,) if isinstance(records, Record) else records
        referred = sorted({index for record in records for index in record.referred})
        if not referred:
            return np.zeros(cover.shape[1])
        return np.clip(cover[referred].sum(0), 0, 1)
