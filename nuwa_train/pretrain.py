"""Pre-train the tiny base VLM ("the pretrained VLM" of this project) from scratch, with all vision tokens.

Plain PyTorch rather than Lightning: the loop has two phases with different trainable parts, a data
position that is a pure function of the step (records are generated on the fly, deterministically),
and time-based checkpoints/exports with an evaluation in the middle; a 300-line loop states all of that
directly and resumes exactly (tests check that interrupted + resumed == uninterrupted).

Recipe (recipes/tiny_base.yaml holds every number):
- Phase "vision" (CLIP-like): the vision tower alone learns linear auxiliary heads on the feature-layer
  tokens: per-patch (size, colour, shape) class or background, per-patch box of the covering object
  (4 x bins classes), per-patch global counts (all / per colour / per shape), and a multi-label
  "which objects are present" head on the CLS token. The CLS head is what makes CLS attention a saliency
  map, as the pruners assume (real CLIP gets this from its contrastive objective).
- Phase "all": everything trains on the answer loss (mean per sample, so 1-token VQA answers weigh as
  much as 5-token boxes) plus the auxiliary losses, plus a "referred object" head on the LLM's hidden
  states of the vision tokens at one layer (which patches belong to the object(s) the prompt is about),
  teaching the LLM to bind the question's words to patches.
- Vision position embeddings start from a 2-D sin-cos table (scaled), then are learned.

Outputs: `<run_dir>/last.safetensors` (model, heads, optimizer, position in the
schedule and data, RNG) every
`checkpoint_minutes` and on SIGTERM/SIGINT; `<run_dir>/log.csv`; exports to `export_dir` every
`export_minutes` and at the end (model + processor, training log, eval report JSON/Markdown, README).
Re-running the same command resumes from `last.safetensors`.

    python -m nuwa_train.pretrain recipes/tiny_base.yaml [--set key.path=value ...] [--export-only]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import shutil
import signal
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import nn

from .data.collate import VisionLanguageCollator
from .data.synthetic import (
    COORD_RANGE,
    Record,
    SyntheticConfig,
    coordinate_tokens,
    generate_records,
    normalise_box,
    render,
    vocabulary,
)
from .io import (
    load_checkpoint_file,
    load_tensor_tree,
    replace_directory,
    save_tensor_tree,
    staging_directory,
    write_atomically,
)
from .models.tiny import TinyLlavaSpec, build_tiny_llava, save_tiny_llava
from .schedules import warmup_cosine

IGNORE = -100
COVER_THRESHOLD = 0.25  # a patch belongs to an object when the object covers >= 25% of its pixels


# =============================================================================================== config
@dataclass
class PhaseConfig:
    name: str
    steps: int  # length in steps; with `minutes`, the maximum number of steps
    batch_size: int  # records per step ("all": two records per image; "vision": images per step)
    lr: float
    minutes: float | None = None  # time-budgeted phase: schedule and end follow training seconds (shared CPUs)
    train: str = "all"  # "vision" (tower + vision heads only) or "all"
    warmup: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the end of the phase
    lm_weight: float = 1.0
    aux_weight: float = 1.0  # vision auxiliary heads
    referred_weight: float = 0.0  # LLM referred-object head
    single_object_fraction: tuple[float, float] | None = None  # curriculum: linear from first to second value
    data: dict = field(default_factory=dict)  # SyntheticConfig fields this phase changes (e.g. vqa_mix)

    def __post_init__(self):
        if self.train not in ("vision", "all"):
            raise ValueError(f"phase {self.name!r}: train must be 'vision' or 'all', got {self.train!r}")
        if self.steps < 0 or self.batch_size < 2 or self.batch_size % 2:
            raise ValueError(f"phase {self.name!r}: steps must be >= 0 and batch_size even and >= 2")
        if self.single_object_fraction is not None:
            self.single_object_fraction = tuple(self.single_object_fraction)


@dataclass
class PretrainConfig:
    model: dict = field(default_factory=dict)  # TinyLlavaSpec fields
    data: dict = field(default_factory=dict)  # SyntheticConfig fields of the training data
    eval_data: dict = field(default_factory=dict)  # SyntheticConfig fields of the test data (default: defaults)
    phases: list = field(default_factory=list)  # PhaseConfig dicts
    seed: int = 0
    threads: int = 2
    adaptive_threads: bool = False  # periodically time 1 thread vs `threads` and keep the faster (shared CPUs)
    position_init_scale: float = 0.5  # 2-D sin-cos init of vision position embeddings; 0 keeps the default init
    presence_from: str = "cls"  # "cls": CLS output; "cls_attention": the feature layer's CLS attention read-out
    referred_layer: int = 2  # LLM hidden state (after this many decoder layers) the referred head reads
    referred_pos_weight: float = 4.0  # BCE weight of the referred object's patches (they are few of the grid)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    autocast_bf16: bool = False
    log_every: int = 20
    checkpoint_minutes: float = 3.0
    export_minutes: float = 15.0
    snapshot_eval_images: int = 150
    final_eval_images: int = 1000
    eval_batch_size: int = 64
    saliency_images: int = 200
    run_dir: str = "runs/tiny_base"
    export_dir: str = "data/tiny_base"

    def __post_init__(self):
        self.phases = [p if isinstance(p, PhaseConfig) else PhaseConfig(**p) for p in self.phases]
        if not self.phases:
            raise ValueError("a recipe needs at least one phase")
        if self.presence_from not in ("cls", "cls_attention"):
            raise ValueError(f"presence_from must be 'cls' or 'cls_attention', got {self.presence_from!r}")
        for phase in self.phases:  # fail at load time, not when a later phase starts hours into a run
            try:
                self.phase_synthetic(phase)
            except (TypeError, ValueError) as error:
                raise ValueError(f"phase {phase.name!r}: bad data override {phase.data}: {error}") from None
        known = {f.name for f in fields(TinyLlavaSpec)}
        unknown = set(self.model) - known
        if unknown:
            raise ValueError(f"unknown model key(s) {sorted(unknown)}; TinyLlavaSpec has {sorted(known)}")

    @property
    def spec(self) -> TinyLlavaSpec:
        return TinyLlavaSpec(**self.model)

    def synthetic(self, which: str = "data") -> SyntheticConfig:
        return SyntheticConfig.from_dict(getattr(self, which))

    def phase_synthetic(self, phase: PhaseConfig) -> SyntheticConfig:
        """The training data of `phase`: the recipe's `data` with the phase's own overrides."""
        return SyntheticConfig.from_dict({**self.data, **phase.data})

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["phases"] = [asdict(p) for p in self.phases]
        return data


def _set_path(data: dict, dotted: str, value: object) -> None:
    keys = dotted.split(".")
    target = data
    for key in keys[:-1]:
        target = target[int(key)] if isinstance(target, list) else target.setdefault(key, {})
    last = keys[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value


def load_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> PretrainConfig:
    """Read a YAML recipe; `overrides` are `dotted.key=yaml_value` (e.g. `phases.1.steps=10`)."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like key.path=value")
        _set_path(data, key.strip(), yaml.safe_load(value))
    unknown = set(data) - {f.name for f in fields(PretrainConfig)}
    if unknown:
        raise ValueError(f"{path}: unknown recipe key(s) {sorted(unknown)}")
    return PretrainConfig(**data)


# =============================================================================================== targets
def _label_map(record_scene, config: SyntheticConfig) -> np.ndarray:
    """(H, W) uint8: 0 background, i + 1 where object i is drawn (same geometry as `render`)."""
    from .data.synthetic import (
        _DRAWERS,  # the renderer's own shape drawers: the masks match the pixels
    )

    image = Image.new("L", (record_scene.width, record_scene.height), 0)
    draw = ImageDraw.Draw(image)
    for index, obj in enumerate(record_scene.objects):
        x1, y1, x2, y2 = obj.box
        _DRAWERS[obj.shape](draw, (x1, y1, x2 - 1, y2 - 1), index + 1)
    return np.asarray(image)


class TargetMaker:
    """Auxiliary targets of a scene / record, on the model's patch grid."""

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

    def coverage(self, scene) -> np.ndarray:
        """(objects, N) share of each patch's pixels covered by each object."""
        labels = _label_map(scene, self.config)
        p = self.spec.patch_size
        gh, gw = self.spec.grid
        if labels.shape != (gh * p, gw * p):  # images are fed at model size: resample the mask the same way
            labels = np.asarray(Image.fromarray(labels).resize((gw * p, gh * p), Image.NEAREST))
        blocks = labels.reshape(gh, p, gw, p).transpose(0, 2, 1, 3).reshape(gh * gw, p * p)
        return np.stack([(blocks == i + 1).mean(1) for i in range(len(scene.objects))])

    def scene_targets(self, scene) -> dict[str, np.ndarray]:
        cover = self.coverage(scene)
        best = cover.argmax(0)
        owned = cover.max(0) >= COVER_THRESHOLD
        classes = np.zeros(cover.shape[1], dtype=np.int64)
        boxes = np.full((cover.shape[1], 4), IGNORE, dtype=np.int64)
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
        return dict(cover=cover, classes=classes, boxes=boxes, presence=presence,
                    counts=np.minimum(np.array(counts, dtype=np.int64), self.count_values - 1))

    def referred(self, record: Record) -> list[int]:
        """Indices of the objects a prompt is about (the answer's evidence)."""
        objects = record.scene.objects
        if record.task == "grounding":
            return [i for i, o in enumerate(objects) if normalise_box(o.box, record.scene.width,
                                                                      record.scene.height) == tuple(record.box)]
        words = record.prompt.replace("?", " ").split()
        if record.kind == "count":
            things = record.prompt.split("how many", 1)[1].split("are there")[0].split()
            wanted = {w for w in things if w in self.colours} | {w.rstrip("s") for w in things
                                                                 if w.rstrip("s") in self.shapes}
            return [i for i, o in enumerate(objects) if wanted <= {o.colour, o.shape}]
        if record.kind == "spatial":
            colour, shape = record.answer.split()
            return [i for i, o in enumerate(objects) if (o.colour, o.shape) == (colour, shape)]
        wanted = {w for w in words if w in self.sizes or w in self.colours or w in self.shapes}
        return [i for i, o in enumerate(objects) if wanted <= {o.size, o.colour, o.shape}]


# =============================================================================================== model parts
def sincos_2d(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(H*W, dim) 2-D sine-cosine position table: half the channels encode rows, half columns."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1)))
    rows, cols = torch.meshgrid(torch.arange(grid[0], dtype=torch.float32),
                                torch.arange(grid[1], dtype=torch.float32), indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angles = coord[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)
    return F.pad(table, (0, dim - table.shape[1]))


def init_vision_positions(model, spec: TinyLlavaSpec, scale: float) -> None:
    """Vision position embeddings <- scale x 2-D sin-cos for the patches, zero for CLS."""
    if scale <= 0:
        return
    embedding = model.model.vision_tower.embeddings.position_embedding
    with torch.no_grad():
        embedding.weight.zero_()
        embedding.weight[1:] = scale * sincos_2d(spec.grid, embedding.weight.shape[1])


def cls_attention_pool(layer: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """What the CLS query of one CLIP encoder layer reads, through that layer's own attention: (B, D).

    Attention-pooling as in CLIP's pooled output, minus the residual stream: a head reading this can
    only see what the layer's CLS attention selects, so the "which objects are present" loss on it
    pushes the feature layer's CLS attention (the pruners' stage-1 score) onto the objects.
    """
    attn = layer.self_attn
    normed = layer.layer_norm1(layer_input)
    batch, length, _ = normed.shape
    heads, dim = attn.num_heads, attn.head_dim
    query = attn.q_proj(normed[:, :1]).view(batch, 1, heads, dim).transpose(1, 2)
    keys = attn.k_proj(normed).view(batch, length, heads, dim).transpose(1, 2)
    values = attn.v_proj(normed).view(batch, length, heads, dim).transpose(1, 2)
    probs = ((query @ keys.transpose(-1, -2)) * attn.scale).softmax(dim=-1)
    return attn.out_proj((probs @ values).transpose(1, 2).reshape(batch, heads * dim))


class AuxHeads(nn.Module):
    """Linear read-outs whose losses shape the representations (dropped at export)."""

    def __init__(self, vision_dim: int, text_dim: int, targets: TargetMaker, referred_pos_weight: float):
        super().__init__()
        self.referred_pos_weight = referred_pos_weight
        self.count_slots, self.count_values, self.bins = targets.count_slots, targets.count_values, targets.bins
        self.patch_norm = nn.LayerNorm(vision_dim)
        self.cls_norm = nn.LayerNorm(vision_dim)
        self.patch_class = nn.Linear(vision_dim, targets.num_classes)
        self.patch_box = nn.Linear(vision_dim, 4 * targets.bins)
        self.patch_count = nn.Linear(vision_dim, self.count_slots * self.count_values)
        self.presence = nn.Linear(vision_dim, len(targets.triples))
        self.referred = nn.Linear(text_dim, 1)

    def vision_losses(self, features: torch.Tensor, batch: dict, pooled: torch.Tensor | None = None
                      ) -> dict[str, torch.Tensor]:
        """features (B, 1 + N, D) of the feature layer, CLS first; `pooled` (B, D) replaces the CLS output
        as the input of the presence head (see `cls_attention_pool`)."""
        patches = self.patch_norm(features[:, 1:].float())
        cls = self.cls_norm((features[:, 0] if pooled is None else pooled).float())
        b, n, _ = patches.shape
        losses = {
            "class": F.cross_entropy(self.patch_class(patches).reshape(b * n, -1), batch["classes"].reshape(-1)),
            "count": F.cross_entropy(self.patch_count(patches).reshape(b * n * self.count_slots, self.count_values),
                                     batch["counts"][:, None, :].expand(b, n, -1).reshape(-1)),
            "presence": F.binary_cross_entropy_with_logits(self.presence(cls), batch["presence"]),
        }
        boxes = batch["boxes"].reshape(-1)
        if (boxes != IGNORE).any():
            losses["box"] = F.cross_entropy(self.patch_box(patches).reshape(b * n * 4, self.bins), boxes,
                                            ignore_index=IGNORE)
        return losses

    def referred_loss(self, hidden: torch.Tensor, is_image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """BCE of 'this vision token is part of the referred object' on the LLM's vision tokens."""
        logits = self.referred(hidden[is_image].float()).squeeze(-1)
        return F.binary_cross_entropy_with_logits(logits, target.reshape(-1), pos_weight=torch.tensor(self.referred_pos_weight))


# =============================================================================================== data
class Stream:
    """Deterministic batches: step -> records of fixed image indices (resuming needs only the step)."""

    def __init__(self, config: PretrainConfig, processor, targets: TargetMaker):
        self.config, self.processor, self.targets = config, processor, targets
        self.phase_data = [config.phase_synthetic(phase) for phase in config.phases]  # once, not per batch
        self.collator = VisionLanguageCollator(processor, padding_side="right")
        self.mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
        self.std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
        self.size = config.spec.image_size

    def synthetic_at(self, phase: PhaseConfig, progress: float) -> SyntheticConfig:
        base = self.phase_data[self.config.phases.index(phase)]
        if phase.single_object_fraction is None:
            return base
        a, b = phase.single_object_fraction
        fraction = a + (b - a) * min(1.0, progress)
        return replace(base, single_object_fraction=round(fraction, 3))

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """Same numbers as the CLIP image processor for images already at model size (tested)."""
        arrays = []
        for image in images:
            if image.size != (self.size, self.size):
                return torch.as_tensor(np.asarray(self.processor.image_processor(images)["pixel_values"]))
            arrays.append(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1))
        return (torch.stack(arrays) / 255.0 - self.mean) / self.std

    def images_per_step(self, phase: PhaseConfig) -> int:
        return phase.batch_size if phase.train == "vision" else phase.batch_size // 2

    def batch(self, position: Position) -> dict:
        phase = self.config.phases[position.phase]
        first = position.next_image
        synthetic = self.synthetic_at(phase, position.progress(phase))
        if phase.train == "vision":
            from .data.synthetic import generate_scene

            scenes = [generate_scene(synthetic, "train", first + i) for i in range(phase.batch_size)]
            out = self._scene_targets(scenes)
            out["pixel_values"] = self.pixels([render(s, synthetic) for s in scenes])
            return out
        records = list(generate_records(synthetic, "train", phase.batch_size // 2, start=first))
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
        referred = []
        for record, index in zip(records, image_of_record):
            cover = covers[index]
            chosen = self.targets.referred(record)
            referred.append(np.clip(cover[chosen].sum(0), 0, 1) if chosen else np.zeros(cover.shape[1]))
        out["referred"] = torch.as_tensor(np.stack(referred), dtype=torch.float32)
        return out

    def _scene_targets(self, scenes) -> dict:
        targets = [self.targets.scene_targets(s) for s in scenes]
        out = {key: torch.as_tensor(np.stack([t[key] for t in targets])) for key in ("classes", "boxes", "counts",
                                                                                      "presence")}
        out["cover_list"] = [t["cover"] for t in targets]
        return out


# =============================================================================================== training
class ThreadTuner:
    """On a shared machine, a second busy process makes 2 OpenMP threads on 2 cores up to 10x slower.

    Every `period` steps, run `trial` steps with the other thread count and keep whichever had the lower
    mean step time over the adjacent windows. Thread counts do not change the maths, only the speed.
    """

    def __init__(self, threads: int, period: int = 30, trial: int = 3):
        self.options, self.period, self.trial = sorted({1, threads}), period, trial
        self.current = threads
        self.recent: list[float] = []
        self.trial_times: list[float] | None = None
        self.count = 0
        torch.set_num_threads(self.current)

    def record(self, seconds: float) -> None:
        if len(self.options) == 1:
            return
        self.count += 1
        if self.trial_times is not None:
            self.trial_times.append(seconds)
            if len(self.trial_times) >= self.trial:
                if sum(self.trial_times) / len(self.trial_times) >= sum(self.recent) / max(len(self.recent), 1):
                    torch.set_num_threads(self.current)  # the trial was slower: go back
                else:
                    self.current = torch.get_num_threads()
                self.trial_times, self.recent = None, []
            return
        self.recent = (self.recent + [seconds])[-self.trial:]
        if self.count % self.period == 0 and len(self.recent) == self.trial:
            torch.set_num_threads(self.options[0] if self.current == self.options[1] else self.options[1])
            self.trial_times = []


@dataclass
class Position:
    """Where training is: everything the data stream and the schedule depend on (saved in checkpoints)."""

    step: int = 0  # global optimizer steps
    phase: int = 0  # index into config.phases
    inner: int = 0  # steps done in the current phase
    phase_seconds: float = 0.0  # training seconds spent in the current phase
    next_image: int = 0  # index of the next training image (the data position)
    done_steps: list = field(default_factory=list)  # steps taken by each finished phase

    def progress(self, phase: PhaseConfig) -> float:
        """Fraction of the phase done: by steps, or by time for a time-budgeted phase."""
        by_steps = self.inner / max(1, phase.steps)
        if phase.minutes:
            return max(by_steps, self.phase_seconds / (60 * phase.minutes))
        return by_steps

    def phase_done(self, phase: PhaseConfig) -> bool:
        return self.inner >= phase.steps or (phase.minutes is not None and self.phase_seconds >= 60 * phase.minutes)


def lr_at(phase: PhaseConfig, position: Position) -> float:
    """Linear warm-up over `warmup` steps, then cosine to lr * min_lr_ratio at the end of the phase."""
    start = phase.warmup / max(1, phase.steps) if not phase.minutes else 0.0
    decayed = (position.progress(phase) - start) / max(1e-9, 1 - start)
    return phase.lr * warmup_cosine(position.inner, phase.warmup, decayed, phase.min_lr_ratio)


def answer_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean cross-entropy over each sample's answer tokens."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    token = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                            ignore_index=IGNORE, reduction="none").view(shift_labels.shape)
    valid = (shift_labels != IGNORE).float()
    return (token * valid).sum(1) / valid.sum(1).clamp(min=1)


class Trainer:
    def __init__(self, config: PretrainConfig):
        self.config = config
        torch.manual_seed(config.seed)
        self.synthetic = config.synthetic("data")
        self.model, self.processor = build_tiny_llava(config.spec, vocabulary(self.synthetic),
                                                      coordinate_tokens(self.synthetic))
        init_vision_positions(self.model, config.spec, config.position_init_scale)
        self.targets = TargetMaker(self.synthetic, config.spec)
        self.heads = AuxHeads(config.spec.vision_hidden, config.spec.text_hidden, self.targets,
                              config.referred_pos_weight)
        self.stream = Stream(config, self.processor, self.targets)
        decay, no_decay = [], []
        for name, param in itertools.chain(self.model.named_parameters(), self.heads.named_parameters()):
            (no_decay if param.ndim < 2 or "embed" in name else decay).append(param)
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=0.0, betas=(0.9, 0.98))
        self.position = Position()
        self.elapsed = 0.0  # training seconds over all sessions
        self.run_dir = Path(config.run_dir)
        self.vision_params = set(self.model.model.vision_tower.parameters()) | {
            p for n, p in self.heads.named_parameters() if not n.startswith("referred")}

    # ------------------------------------------------------------------------------- state
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "heads": self.heads.state_dict(),
                "optimizer": self.optimizer.state_dict(), "position": asdict(self.position),
                "step": self.step, "elapsed": self.elapsed, "torch_rng": torch.get_rng_state(),
                "recipe": self.config.to_dict()}

    def phase_steps(self) -> dict[str, int]:
        """Steps realised per phase so far (time-budgeted phases: re-run with these steps to reproduce)."""
        done = dict(zip([p.name for p in self.config.phases], self.position.done_steps))
        if not self.finished:
            done[self.config.phases[self.position.phase].name] = self.position.inner
        return done

    def save_checkpoint(self) -> Path:
        """safetensors + JSON metadata: no pickle, so resuming can never run code from the file."""
        return save_tensor_tree(self.run_dir / STATE_NAME, self.state())

    def load_checkpoint(self, path: Path) -> None:
        """Resume from `last.safetensors`, or from a `last.ckpt` of an older version (weights-only)."""
        state = load_tensor_tree(path) if path.suffix == ".safetensors" else load_checkpoint_file(path)
        self.model.load_state_dict(state["model"])
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.position = Position(**state["position"])
        self.elapsed = state["elapsed"]
        torch.set_rng_state(state["torch_rng"])

    # ------------------------------------------------------------------------------- one step
    @property
    def step(self) -> int:
        return self.position.step

    @property
    def finished(self) -> bool:
        return self.position.phase >= len(self.config.phases)

    def _skip_empty_phases(self) -> None:
        while not self.finished and self.position.phase_done(self.config.phases[self.position.phase]):
            self.position = replace(self.position, phase=self.position.phase + 1, inner=0, phase_seconds=0.0,
                                    done_steps=[*self.position.done_steps, self.position.inner])

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimizer step on `batch` (made for the current position); advances the position."""
        phase = self.config.phases[self.position.phase]
        lr = lr_at(phase, self.position)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        vision_only = phase.train == "vision"
        for param in itertools.chain(self.model.parameters(), self.heads.parameters()):
            param.requires_grad_(not vision_only or param in self.vision_params)
        self.model.train()
        feature_layer = self.config.spec.vision_feature_layer
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.autocast_bf16):
            tower = self.model.model.vision_tower
            hidden = tower(batch["pixel_values"], output_hidden_states=True).hidden_states
            features = hidden[feature_layer]
            pooled = None
            if self.config.presence_from == "cls_attention":
                index = feature_layer % len(hidden)
                pooled = cls_attention_pool(tower.encoder.layers[index - 1], hidden[index - 1])
            parts = {f"aux_{k}": v for k, v in self.heads.vision_losses(features, batch, pooled).items()}
            total = phase.aux_weight * sum(parts.values())
            per_sample = None
            if not vision_only:
                ids = batch["input_ids"]
                is_image = ids == self.model.config.image_token_index
                image_features = self.model.model.multi_modal_projector(features[batch["image_of_record"], 1:])
                embeds = self.model.get_input_embeddings()(ids.masked_fill(is_image, 0))
                embeds = embeds.masked_scatter(is_image.unsqueeze(-1), image_features.to(embeds.dtype))
                out = self.model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                                      output_hidden_states=phase.referred_weight > 0)
                logits = self.model.lm_head(out.last_hidden_state)
                per_sample = answer_losses(logits, batch["labels"])
                parts["lm"] = per_sample.mean()
                total = total + phase.lm_weight * parts["lm"]
                if phase.referred_weight > 0:
                    parts["referred"] = self.heads.referred_loss(out.hidden_states[self.config.referred_layer],
                                                                 is_image, batch["referred"])
                    total = total + phase.referred_weight * parts["referred"]
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        params = [p for p in itertools.chain(self.model.parameters(), self.heads.parameters()) if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        self.optimizer.step()
        metrics = {k: float(v.detach()) for k, v in parts.items()}
        metrics["lr"] = lr
        metrics["loss"] = float(total.detach())
        if per_sample is not None:
            for kind, value in zip(batch["kinds"], per_sample.tolist()):
                metrics.setdefault(f"lm_{kind}", []).append(value)
        return metrics

    # ------------------------------------------------------------------------------- loop
    def fit(self, stop_after: int | None = None, progress: bool = True) -> None:
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log = CsvLog(self.run_dir / "log.csv", self.step)
        stop = {"flag": False}

        def request_stop(signum, frame):
            stop["flag"] = True

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
        last_checkpoint = last_export = time.monotonic()
        window: dict[str, list[float]] = defaultdict(list)
        steps_this_session = 0
        tuner = ThreadTuner(config.threads) if config.adaptive_threads else None
        try:
            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                          disable=not progress) as bar:
                task = bar.add_task("pretrain", total=config.total_steps, completed=self.step, info="")
                self._skip_empty_phases()
                while not self.finished and not stop["flag"]:
                    if stop_after is not None and steps_this_session >= stop_after:
                        break
                    phase = config.phases[self.position.phase]
                    started = time.perf_counter()
                    metrics = self.train_step(self.stream.batch(self.position))
                    seconds = time.perf_counter() - started
                    self.elapsed += seconds
                    self.position = replace(self.position, step=self.position.step + 1, inner=self.position.inner + 1,
                                            phase_seconds=self.position.phase_seconds + seconds,
                                            next_image=self.position.next_image + self.stream.images_per_step(phase))
                    self._skip_empty_phases()
                    if tuner is not None:
                        tuner.record(seconds)
                        metrics["threads"] = torch.get_num_threads()
                    steps_this_session += 1
                    for key, value in metrics.items():
                        window[key] += value if isinstance(value, list) else [value]
                    if self.step % config.log_every == 0 or self.finished:
                        row = {"step": self.step, "phase": phase.name, "elapsed_s": round(self.elapsed, 1)}
                        row.update({k: round(sum(v) / len(v), 5) for k, v in sorted(window.items())})
                        log.write(row)
                        window.clear()
                        bar.update(task, info=f"loss {row['loss']:.3f}")
                        if not progress:
                            print(json.dumps(row), flush=True)
                    bar.update(task, completed=self.step)
                    now = time.monotonic()
                    if now - last_checkpoint >= 60 * config.checkpoint_minutes:
                        self.save_checkpoint()
                        last_checkpoint = now
                    if now - last_export >= 60 * config.export_minutes and not self.finished:
                        try:
                            self.export(final=False)
                        except Exception:  # a failed snapshot must not cost the training run
                            import traceback

                            traceback.print_exc()
                        last_export = time.monotonic()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            log.close()
            self.save_checkpoint()
        if self.finished:
            self.export(final=True)

    # ------------------------------------------------------------------------------- export
    def export(self, final: bool) -> Path:
        """Model + processor + log + eval report (+ README) to export_dir, swapped in atomically."""
        from .evaluation import evaluate

        config = self.config
        images = config.final_eval_images if final else config.snapshot_eval_images
        test = config.synthetic("eval_data")
        records = list(generate_records(test, "test", images))
        result = evaluate(self.model, self.processor, records, synthetic_config=test,
                          batch_size=config.eval_batch_size, max_new_tokens=8, progress=False)
        saliency = measure_saliency(self.model, self.processor, test, config.spec, min(images, config.saliency_images))
        report = {"final": final, "step": self.step, "total_steps": config.total_steps,
                  "phase_steps": self.phase_steps(),
                  "train_seconds": round(self.elapsed, 1), "test_images": images, "test_records": len(records),
                  "eval": result.to_dict(), "saliency": saliency, "recipe": config.to_dict()}
        target = Path(config.export_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = staging_directory(target)
        try:
            self.model.eval()
            save_tiny_llava(self.model, self.processor, staging)
            shutil.copyfile(self.run_dir / "log.csv", staging / "training_log.csv")
            (staging / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            (staging / "eval_report.md").write_text(report_markdown(report), encoding="utf-8")
            (staging / "recipe.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
            (staging / "README.md").write_text(readme_text(report), encoding="utf-8")
            staging.chmod(0o755)  # mkdtemp (and safetensors) create private files; the export is for everyone
            for item in staging.iterdir():
                item.chmod(0o644)
            replace_directory(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        print(f"exported step {self.step} to {target}: vqa {result.vqa_exact_match:.3f} "
              f"grounding {result.grounding_acc50:.3f} miou {result.grounding_miou:.3f}", flush=True)
        return target


# =============================================================================================== saliency
@torch.no_grad()
def measure_saliency(model, processor, config: SyntheticConfig, spec: TinyLlavaSpec, images: int,
                     top: int = 16) -> dict:
    """Is CLS attention (the pruners' stage-1 score) a saliency map? Measured on test images.

    mass_on_objects: share of the CLS-attention mass on object patches (>= 25% covered);
    area_on_objects: share of patches that are object patches (what uniform attention would give);
    objects_in_top: share of objects owning at least one patch among the top-`top` scores.
    """
    from .models.llava import LlavaAdapter
    from .pruning import NuwaConfig

    adapter = LlavaAdapter(model)
    targets = TargetMaker(config, spec)
    stream_mean = torch.tensor(processor.image_processor.image_mean).view(3, 1, 1)
    stream_std = torch.tensor(processor.image_processor.image_std).view(3, 1, 1)
    mass, area, found, total = 0.0, 0.0, 0, 0
    was_training = model.training
    model.eval()
    for first in range(0, images, 64):
        from .data.synthetic import generate_scene

        scenes = [generate_scene(config, "test", i) for i in range(first, min(images, first + 64))]
        pixels = torch.stack([torch.from_numpy(np.asarray(render(s, config), dtype=np.float32)).permute(2, 0, 1)
                              for s in scenes]) / 255.0
        pixels = (pixels - stream_mean) / stream_std
        scores = adapter.encode(pixels, NuwaConfig()).segments[0].scores
        scores = scores / scores.sum(1, keepdim=True)
        for scene, score in zip(scenes, scores):
            cover = targets.coverage(scene)
            owned = cover >= COVER_THRESHOLD
            on_object = owned.any(0)
            mass += float(score[torch.from_numpy(on_object)].sum())
            area += float(on_object.mean())
            best = set(torch.topk(score, top).indices.tolist())
            found += sum(bool(set(np.flatnonzero(row)) & best) for row in owned)
            total += len(scene.objects)
    model.train(was_training)
    count = images
    return {"images": count, "mass_on_objects": mass / count, "area_on_objects": area / count,
            "mass_over_area": (mass / count) / max(area / count, 1e-9), f"objects_in_top{top}": found / max(total, 1)}


# =============================================================================================== files
class CsvLog:
    """Append-only CSV of losses; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        rows = []
        if path.exists() and resume_step > 0:
            with open(path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.rows = rows
        self._rewrite()

    @staticmethod
    def read(path: Path) -> list[dict]:
        if not path.exists():
            return []
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def _rewrite(self):
        columns = _columns(self.rows)

        def write(staging: Path) -> None:
            with open(staging, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(self.rows)

        write_atomically(self.path, write)
        self.columns = columns

    def write(self, row: dict):
        self.rows.append(row)
        if set(row) - set(self.columns):
            self._rewrite()  # a new loss column appeared (e.g. phase 2): rewrite with the full header
            return
        with open(self.path, "a", newline="", encoding="utf-8") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(row)

    def close(self):
        pass


def _columns(rows: list[dict]) -> list[str]:
    columns = ["step", "phase", "lr", "elapsed_s"]
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def report_markdown(report: dict) -> str:
    ev, sal = report["eval"], report["saliency"]
    status = "final" if report["final"] else f"snapshot, training in progress at step {report['step']}"
    lines = [f"# Tiny base VLM: evaluation ({status})", "",
             f"Test split of the synthetic benchmark, {report['test_images']} images ({report['test_records']} "
             f"records), full vision tokens ({ev['vision_tokens_total']} per image), greedy decoding.", "",
             "| metric | value |", "|---|---|",
             f"| VQA exact match | {ev['vqa_exact_match']:.3f} ({ev['num_vqa']} questions) |",
             f"| grounding Acc@IoU>=0.5 | {ev['grounding_acc50']:.3f} ({ev['num_grounding']} expressions) |",
             f"| grounding mean IoU | {ev['grounding_miou']:.3f} |",
             f"| unparseable boxes | {ev['unparseable']} |", "",
             "| question kind | accuracy | records |", "|---|---|---|"]
    lines += [f"| {k} | {v:.3f} | {ev['per_kind_count'][k]} |" for k, v in ev["per_kind"].items()]
    lines += ["", "CLS attention of the vision feature layer (the stage-1 pruning score), on "
              f"{sal['images']} test images:", "",
              f"- mass on object patches: {sal['mass_on_objects']:.3f} (object patches are "
              f"{sal['area_on_objects']:.3f} of the image: {sal['mass_over_area']:.2f}x uniform)",
              f"- objects with a patch in the CLS top-16: {sal['objects_in_top16']:.3f}", "",
              f"Training: {report['step']} steps ({', '.join(f'{k} {v}' for k, v in report.get('phase_steps', {}).items())})"
              f", {report['train_seconds'] / 60:.1f} minutes of training time.", ""]
    return "\n".join(lines)


def readme_text(report: dict) -> str:
    return f"""# Tiny base VLM (nuwa-train's stand-in for a pretrained VLM)

A tiny `LlavaForConditionalGeneration` (CLIP vision tower + Llama LM, word-level tokenizer with
`<loc_k>` coordinate tokens) trained from scratch on the synthetic shapes benchmark with all vision
tokens (no pruning). Load it with

```python
from nuwa_train.models.tiny import load_tiny_llava
model, processor = load_tiny_llava("data/tiny_base")
```

Files: `model.safetensors` + `config.json` (weights), processor/tokenizer files, `recipe.yaml` (the
exact recipe), `training_log.csv` (losses), `eval_report.json` / `eval_report.md` (test-split metrics,
per question kind, and whether CLS attention is a saliency map). This export is
{"final" if report["final"] else f"a snapshot at step {report['step']} (training in progress)"}.

## Reproduce

From the repository root (2 CPU cores, about {report['train_seconds'] / 60:.0f} minutes of training here):

```
OMP_NUM_THREADS=2 python -m nuwa_train.pretrain recipes/tiny_base.yaml    # or: nuwa-train pretrain-base recipes/tiny_base.yaml
```

The phases are time-budgeted (`minutes` in the recipe: the schedule follows training seconds, so a
slower or shared machine takes fewer steps). For a machine-independent re-run, pin the phase
lengths realised here (`phase_steps` in `eval_report.json`) and drop the budgets (the schedule then
follows steps, which matches this run up to the speed variations of a shared CPU), e.g.
`--set phases.1.steps=N --set phases.1.minutes=null`.

It writes checkpoints (`last.safetensors`) and `log.csv` to `runs/tiny_base/` and exports here every
15 minutes and at the end; re-running the same command resumes from `runs/tiny_base/last.safetensors`.
`python -m nuwa_train.pretrain recipes/tiny_base.yaml --export-only` re-exports from the checkpoint.
"""


# =============================================================================================== entry
STATE_NAME = "last.safetensors"
LEGACY_STATE_NAME = "last.ckpt"  # torch.save files of earlier versions, read weights-only


def resume_state(run_dir: Path) -> Path | None:
    """The run's resume state, if any: `last.safetensors`, else an older version's `last.ckpt`."""
    for name in (STATE_NAME, LEGACY_STATE_NAME):
        if (run_dir / name).is_file():
            return run_dir / name
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nuwa_train.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/tiny_base.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set phases.1.steps=100 (repeatable)")
    parser.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after N steps")
    parser.add_argument("--export-only", action="store_true", help=f"export from {STATE_NAME} and exit")
    parser.add_argument("--fresh", action="store_true", help=f"ignore an existing {STATE_NAME} (it is overwritten)")
    parser.add_argument("--no-progress", action="store_true", help="log JSON lines instead of a progress bar")
    args = parser.parse_args(argv)
    config = load_recipe(args.recipe, args.overrides)
    torch.set_num_threads(config.threads)
    torch.set_flush_denormal(True)  # measured: denormal weights/grads made steps 10x slower after a few updates
    trainer = Trainer(config)
    checkpoint = resume_state(Path(config.run_dir))
    if checkpoint is not None and not args.fresh:
        trainer.load_checkpoint(checkpoint)
        print(f"resumed from {checkpoint} at step {trainer.step}", flush=True)
    if args.export_only:
        trainer.export(final=trainer.finished)
        return 0
    trainer.fit(stop_after=args.stop_after, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
