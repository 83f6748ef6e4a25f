"""The LightningDataModule: the synthetic benchmark or a user's LLaVA / RefCOCO files, batched for a VLM.

The training stream is indexed by a global sample counter that the module saves in its checkpoints,
so `fit --ckpt_path last` continues with exactly the batch an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import lightning as L
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.boxes import BOX_FORMATS
from ..data.collate import VisionLanguageCollator
from ..data.records import FileRecords, SyntheticRecords
from ..data.synthetic import SyntheticConfig
from ..errors import UsageError
from ..io import write_atomically
from ..models.families import box_format_for, image_side
from ..models.loading import load_processor, local_model_dir

PASS_SEED_STRIDE = 1_000_003  # seeds of successive passes over the data never collide across run seeds
DATA_REPORT_NAME = "data_report.json"
OnError = Literal["raise", "skip"]
BoxFormatName = Literal[tuple(BOX_FORMATS)]  # data.box_format: answer boxes in this format (None: the model's)
TextOnly = Literal["keep", "skip"]  # data.text_only: train on records without an image, or leave them out
logger = logging.getLogger(__name__)


def model_type(model_dir: str) -> str | None:
    """The HF `model_type` of the directory's config.json (its family), if stated (a processor-only folder has none)."""
    config = local_model_dir(model_dir, needs="tokenizer_config.json") / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.is_file() else None


def model_context_length(model_dir: str) -> int | None:
    """The language model's context (max_position_embeddings) from the directory's config.json, if stated."""
    config = json.loads((local_model_dir(model_dir) / "config.json").read_text())
    for section in (config.get("text_config") or {}, config):
        if section.get("max_position_embeddings"):
            return int(section["max_position_embeddings"])
    return None


def as_synthetic_config(value: SyntheticConfig | dict) -> SyntheticConfig:
    """LightningCLI hands over nested-tuple dataclasses as plain dicts; rebuild the config."""
    if isinstance(value, SyntheticConfig):
        return value
    return SyntheticConfig.from_dict(value)


class ResumableSampler(Sampler[int]):
    """Global sample k -> dataset index via a per-pass permutation; rank r takes its share of each step.

    Yields samples `start` (already seen by all ranks) to `total`, so a resumed run sees the same batches. Its
    length adds `counted`, the samples of this rank that Lightning counts as drawn in the resumed epoch: Lightning
    counts the batches of a resumed epoch from the restored batch index, so a loader that reported only the
    remaining batches would end the epoch early and replay the stream from `start` (seen: steps 35-59 re-trained
    on 25-49 after a resume from step 25 of 60).
    `group` > 1 permutes blocks of that many consecutive indices and keeps each block together (the
    records of one image, so that they share the vision tower's pass).
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        start: int,
        total: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        group: int = 1,
        counted: int = 0,
    ):
        if size % group:
            raise ValueError(f"a dataset of {size} records does not split into groups of {group}")
        self.size, self.batch_size, self.start, self.total = size, batch_size, start, total
        self.seed, self.rank, self.world, self.group, self.counted = seed, rank, world, group, counted

    def __iter__(self):
        step = self.batch_size * self.world
        permutation, current_pass = None, -1
        for first in range(self.start, self.total, step):
            for k in range(first + self.rank * self.batch_size, first + (self.rank + 1) * self.batch_size):
                if k // self.size != current_pass:
                    current_pass = k // self.size
                    generator = torch.Generator().manual_seed(self.seed * PASS_SEED_STRIDE + current_pass)
                    permutation = torch.randperm(self.size // self.group, generator=generator).tolist()
                block, member = divmod(k % self.size, self.group)
                yield permutation[block] * self.group + member

    def __len__(self) -> int:
        return self.counted + (self.total - self.start) // self.world


@dataclass(frozen=True)
class TrainingStream:
    """The part of the global sample stream that the remaining steps of a fit take (`plan_training_stream`)."""

    start: int  # samples all ranks have seen (the checkpoint's samples_seen)
    total: int  # where the stream ends: after the last sample of step max_steps
    counted_batches: int  # batches of this rank that Lightning counts as drawn in the epoch it resumes
    first_step_batches: int  # batches the first step accumulates (fewer than accumulation: see below)


def plan_training_stream(
    samples_seen: int,
    global_step: int,
    max_steps: int,
    batch_size: int,
    accumulation: int,
    world_size: int,
    counted_batches: int,
) -> TrainingStream:
    """A fit resumes by step (Lightning trains steps global_step + 1 ... max_steps) and by sample (the stream goes on
    at samples_seen): each remaining step takes the next batch_size x accumulation x world_size samples, whatever
    they were before. A resume with a smaller batch, fewer ranks or another accumulation therefore trains exactly
    the steps left, on samples no step has seen, instead of an empty or replayed stream.

    Lightning goes on counting the batches of its epoch from `counted_batches` and steps the optimizer whenever
    that count is a multiple of the accumulation: if the accumulation changed and it is not, the first step takes
    only the batches up to the next multiple, and the stream ends with the last step.
    """
    remaining_steps = max(0, max_steps - global_step)
    first_step_batches = accumulation - counted_batches % accumulation
    batches = max(0, remaining_steps * accumulation - (accumulation - first_step_batches))
    return TrainingStream(
        samples_seen,
        samples_seen + batches * batch_size * world_size,
        counted_batches,
        first_step_batches if remaining_steps else 0,
    )


@dataclass(frozen=True)
class FileSources:
    """A user's data, files (or `save_to_disk` folders) per format (see README: Real data).

    `sharegpt` entries are ms-swift / LLaMA-Factory records, or `PATH/dataset_info.json:NAME` for a registered
    LLaMA-Factory dataset (its file and column names).
    """

    llava: list[str] = field(default_factory=list)
    refcoco: list[str] = field(default_factory=list)
    sharegpt: list[str] = field(default_factory=list)


def as_file_sources(value: FileSources | dict | None) -> FileSources | None:
    """LightningCLI hands over `data.*_files` from a recipe as a plain dict; rebuild the dataclass."""
    return FileSources(**value) if isinstance(value, dict) else value


class NuwaDataModule(L.LightningDataModule):
    """Synthetic splits by default; set `train_files`/`val_files`/`test_files` to use real data.

    `train_vqa_per_image` / `train_grounding_per_image`: the records each synthetic training image
    yields (more questions per image, or another balance of the tasks). `group_by_image`: a training
    batch holds an image's records together, and the vision tower runs once per distinct image (on
    the tiny model the tower is half of a training step). `train_conversations`: each synthetic training image
    yields one multi-turn conversation of those questions instead (every answer trained, the image pruned once,
    grounding turns in the model's box format). `text_only`: records of a file without an image
    (a large share of LLaVA-665K) train as text ("keep"), or are left out and counted ("skip").
    """

    def __init__(
        self,
        processor_path: str = "data/tiny_base",
        synthetic: SyntheticConfig = SyntheticConfig(),
        train_images: int = 20000,
        val_images: int = 64,
        test_images: int = 250,
        train_files: FileSources | None = None,
        val_files: FileSources | None = None,
        test_files: FileSources | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        max_length: int | None = None,
        on_error: OnError = "raise",
        seed: int = 0,
        train_vqa_per_image: int = 1,
        train_grounding_per_image: int = 1,
        group_by_image: bool = False,
        allow_outside_root: bool = False,
        text_only: TextOnly = "keep",
        box_format: BoxFormatName | None = None,
        train_conversations: bool = False,
    ):
        super().__init__()
        if on_error not in get_args(OnError):
            raise ValueError(f"data.on_error={on_error!r} must be one of {', '.join(get_args(OnError))}")
        self.save_hyperparameters()
        SyntheticRecords.tasks_per_image(train_vqa_per_image, train_grounding_per_image, key_prefix="data.train_")
        if train_files is not None and (
            group_by_image or train_conversations or (train_vqa_per_image, train_grounding_per_image) != (1, 1)
        ):
            # A recipe tuned on the synthetic data (recipes/default.yaml) must take a user's files as they are.
            logger.info(
                "data.train_files is set: data.group_by_image, data.train_conversations and "
                "data.train_*_per_image shape the synthetic training data only and do not apply (a file's "
                "record is its own; put its questions about one image in one conversation)"
            )
        self.synthetic = as_synthetic_config(synthetic)
        self.files = {
            split: as_file_sources(sources)
            for split, sources in (("train", train_files), ("val", val_files), ("test", test_files))
        }
        self.processor = None
        self.box_codec = None  # the resolved data.box_format, once the processor is loaded
        self.max_length = max_length  # data.max_length, or the model's context once the processor is loaded
        self._datasets: dict[str, Dataset] = {}
        self.batch_counts: Counter = Counter()  # what every collator of this module truncated or refused

    def setup(self, stage: str | None = None) -> None:
        if self.processor is None:
            self.processor = load_processor(self.hparams.processor_path)
            if self.max_length is None:  # never train past the model's context silently
                self.max_length = model_context_length(self.hparams.processor_path)
            self.box_codec = box_format_for(
                model_type(self.hparams.processor_path),
                self.processor.tokenizer,
                self.hparams.box_format,
                self.synthetic.grounding_template,
            )

    def dataset(self, split: str) -> Dataset:
        if split not in self._datasets:
            files = self.files[split]
            if files is not None:
                self.setup()
                self._datasets[split] = FileRecords(
                    files.llava,
                    files.refcoco,
                    self.hparams.on_error,
                    self.hparams.allow_outside_root,
                    image_side(self.processor, model_type(self.hparams.processor_path)),
                    self.hparams.text_only,
                    files.sharegpt,
                )
            else:
                per_image = (
                    (self.hparams.train_vqa_per_image, self.hparams.train_grounding_per_image)
                    if split == "train"
                    else (1, 1)
                )
                self._datasets[split] = SyntheticRecords(
                    self.synthetic,
                    split,
                    self.hparams[f"{split}_images"],
                    *per_image,
                    conversation=self.hparams.train_conversations and split == "train",
                )
        return self._datasets[split]

    def evaluation_records(self, split: str, limit: int | None = None) -> list[dict]:
        """The first `limit` records of a split (for generate-based metrics)."""
        data = self.dataset(split)
        return [data[i] for i in range(len(data) if limit is None else min(limit, len(data)))]

    def collator(self, with_answer: bool = True, padding_side: str = "right") -> VisionLanguageCollator:
        self.setup()
        return VisionLanguageCollator(
            self.processor,
            padding_side=padding_side,
            max_length=self.max_length,
            with_answer=with_answer,
            on_error=self.hparams.on_error,
            counts=self.batch_counts,
            box_format=self.box_codec,
        )

    # ------------------------------------------------------------------------------- what was left out
    def data_report(self) -> dict:
        """Per file: records loaded and skipped (per reason, first ids), at start-up and when read; plus what the
        collators truncated or refused (counted in this process; with workers, their log lines say more)."""
        files = {}
        for split, data in self._datasets.items():
            if isinstance(data, FileRecords):
                for load, access in zip(data.load_reports, data.access_reports.values()):
                    files[load.path] = {"split": split, "at_start": load.to_dict(), "when_read": access.to_dict()}
        return {
            "files": files,
            "batches": dict(self.batch_counts),
            "max_length": self.max_length,
            "on_error": self.hparams.on_error,
        }

    def write_data_report(self, stage: str = "at_start") -> Path | None:
        """`data_report.json` in the run directory (global rank 0); the skips of `stage` are summarised on the log."""
        trainer = self.trainer
        if trainer is None or not trainer.is_global_zero:
            return None
        report = self.data_report()
        for path, entry in report["files"].items():
            if entry[stage]["skipped"]:
                logger.warning(
                    "%s: %d records skipped %s (data.on_error: skip): %s",
                    path,
                    entry[stage]["skipped"],
                    stage.replace("_", " "),
                    entry[stage]["skipped_by_reason"],
                )
        if report["batches"]:
            logger.warning("records truncated or refused in batches so far: %s", report["batches"])
        target = Path(trainer.default_root_dir) / DATA_REPORT_NAME
        return write_atomically(target, lambda staging: staging.write_text(json.dumps(report, indent=2) + "\n"))

    def teardown(self, stage: str) -> None:
        self.write_data_report("when_read")  # with what was skipped or truncated while the run read its data

    def train_dataloader(self) -> DataLoader:
        trainer, module = self.trainer, self.trainer.lightning_module
        batch = self.hparams.batch_size
        if trainer.max_steps <= 0:
            raise UsageError(
                f"trainer.max_steps={trainer.max_steps}: fine-tuning needs a step count (the training "
                f"stream is sized by it); set --trainer.max_steps"
            )
        # The batches Lightning counts as drawn in the epoch it resumes (it goes on from the restored batch index).
        counted_batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        stream = plan_training_stream(
            module.samples_seen,
            trainer.global_step,
            trainer.max_steps,
            batch,
            trainer.accumulate_grad_batches,
            trainer.world_size,
            counted_batches,
        )
        if trainer.global_step:
            self._report_resume(stream)
        data = self.dataset("train")
        group = data.records_per_image if self.hparams.group_by_image else 1
        sampler = ResumableSampler(
            len(data),
            batch,
            stream.start,
            stream.total,
            self.hparams.seed,
            trainer.global_rank,
            trainer.world_size,
            group,
            counted_batches * batch,
        )
        self.write_data_report()
        # The sampler resumes mid-epoch by itself (module.samples_seen); Lightning cannot know and warns.
        warnings.filterwarnings(
            "ignore",
            message="You're resuming from a checkpoint that ended before the epoch",
            category=PossibleUserWarning,
        )
        # Its own generator: creating the iterator must not draw from the global RNG (exact resume).
        return DataLoader(
            data,
            batch_size=batch,
            sampler=sampler,
            collate_fn=self.collator(),
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            generator=torch.Generator().manual_seed(self.hparams.seed),
        )

    def _report_resume(self, stream: TrainingStream) -> None:
        """Says where a resumed fit goes on, in steps and in samples (the batch settings may have changed)."""
        trainer = self.trainer
        per_step = self.hparams.batch_size * trainer.accumulate_grad_batches * trainer.world_size
        rank_zero_info(
            f"resuming at step {trainer.global_step} with {stream.start} samples seen: steps "
            f"{trainer.global_step + 1}-{trainer.max_steps} take samples {stream.start}-{stream.total} "
            f"of the stream ({per_step} per step: data.batch_size {self.hparams.batch_size} x "
            f"accumulate_grad_batches {trainer.accumulate_grad_batches} x {trainer.world_size} ranks)"
        )
        if stream.first_step_batches not in (0, trainer.accumulate_grad_batches):
            rank_zero_warn(
                f"the checkpoint ends {stream.counted_batches} batches into Lightning's epoch, not a "
                f"multiple of accumulate_grad_batches={trainer.accumulate_grad_batches}: step "
                f"{trainer.global_step + 1} accumulates {stream.first_step_batches} batches, the later "
                f"steps {trainer.accumulate_grad_batches}"
            )

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.dataset(split),
            batch_size=self.hparams.eval_batch_size,
            shuffle=False,
            collate_fn=self.collator(),
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
