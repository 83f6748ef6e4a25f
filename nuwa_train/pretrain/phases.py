"""The phases of a pre-training run and where a run is in them (the state that exact resume restores)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from ..schedules import warmup_cosine

SECONDS_PER_MINUTE = 60
TrainedPart = Literal["vision", "all"]  # "vision": the tower and its heads only; "all": everything


@dataclass
class Phase:
    """One stretch of training with its own trainable part, schedule, loss weights and data."""

    name: str
    steps: int  # length in steps; with `minutes`, the maximum number of steps
    batch_size: int  # records per step ("all": two records per image; "vision": images per step)
    lr: float
    minutes: float | None = None  # time-budgeted phase: schedule and end follow training seconds (shared CPUs)
    train: TrainedPart = "all"
    warmup: int = 100
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the end of the phase
    lm_weight: float = 1.0
    aux_weight: float = 1.0  # vision auxiliary heads
    referred_weight: float = 0.0  # LLM referred-object head
    retrieval_weight: float = 0.0  # LLM retrieval: one head's attention from each answer's query onto its objects
    single_object_fraction: tuple[float, float] | None = None  # curriculum: linear from first to second value
    data: dict = field(default_factory=dict)  # SyntheticConfig fields this phase changes (e.g. vqa_mix)
    # Multi-turn: this share of a step's images comes as ONE conversation (every answer supervised) of
    # `conversation_turns` [min, max] turns, each a referring expression with probability `conversation_grounding`,
    # instead of its two single-turn records (a question and an expression).
    conversation_fraction: float = 0.0
    conversation_turns: tuple[int, int] = (2, 5)
    conversation_grounding: float = 0.3

    def __post_init__(self):
        where = f"model.phases ({self.name!r})"
        if self.train not in get_args(TrainedPart):
            raise ValueError(f"{where}: train={self.train!r} must be one of {', '.join(get_args(TrainedPart))}")
        if self.steps < 0:
            raise ValueError(f"{where}: steps={self.steps} must be >= 0")
        if self.batch_size < 2 or self.batch_size % 2:
            raise ValueError(
                f"{where}: batch_size={self.batch_size} must be even and >= 2 (a VQA and a grounding record per image)"
            )
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"{where}: minutes={self.minutes} must be > 0 (or null for a phase measured in steps)")
        if self.single_object_fraction is not None:
            self.single_object_fraction = tuple(self.single_object_fraction)
            if len(self.single_object_fraction) != 2:
                raise ValueError(f"{where}: single_object_fraction must be [start, end]")
        self.conversation_turns = tuple(self.conversation_turns)
        if len(self.conversation_turns) != 2 or not 1 <= self.conversation_turns[0] <= self.conversation_turns[1]:
            raise ValueError(
                f"{where}: conversation_turns={list(self.conversation_turns)} must be [min, max] with 1 <= min <= max"
            )
        for key in ("conversation_fraction", "conversation_grounding"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{where}: {key}={getattr(self, key)} must be in [0, 1]")
        if self.conversation_fraction and self.train == "vision":
            raise ValueError(f"{where}: conversation_fraction needs train: all (a vision phase has no text)")

    @property
    def images_per_step(self) -> int:
        return self.batch_size if self.train == "vision" else self.batch_size // 2


def as_phase(value: Phase | dict) -> Phase:
    """LightningCLI may hand over a phase as a plain dict; rebuild it (and check it)."""
    return value if isinstance(value, Phase) else Phase(**value)


@dataclass
class Position:
    """Where training is: everything the data stream and the schedule depend on (saved in checkpoints)."""

    step: int = 0  # global optimizer steps
    phase: int = 0  # index into the phases
    inner: int = 0  # steps done in the current phase
    phase_seconds: float = 0.0  # training seconds spent in the current phase
    next_image: int = 0  # index of the next training image (the data position)
    done_steps: list = field(default_factory=list)  # steps taken by each finished phase

    def progress(self, phase: Phase) -> float:
        """Fraction of the phase done: by steps, or by time for a time-budgeted phase."""
        by_steps = self.inner / max(1, phase.steps)
        if phase.minutes:
            return max(by_steps, self.phase_seconds / (SECONDS_PER_MINUTE * phase.minutes))
        return by_steps

    def phase_done(self, phase: Phase) -> bool:
        return self.inner >= phase.steps or (
            phase.minutes is not None and self.phase_seconds >= SECONDS_PER_MINUTE * phase.minutes
        )

    def after_step(self, phase: Phase, seconds: float) -> Position:
        return Position(
            self.step + 1,
            self.phase,
            self.inner + 1,
            self.phase_seconds + seconds,
            self.next_image + phase.images_per_step,
            list(self.done_steps),
        )

    def next_phase(self) -> Position:
        return Position(self.step, self.phase + 1, 0, 0.0, self.next_image, [*self.done_steps, self.inner])


def lr_at(phase: Phase, position: Position) -> float:
    """Linear warm-up over `warmup` steps, then cosine to lr * min_lr_ratio at the end of the phase."""
    start = phase.warmup / max(1, phase.steps) if not phase.minutes else 0.0
    decayed = (position.progress(phase) - start) / max(1e-9, 1 - start)
    return phase.lr * warmup_cosine(position.inner, phase.warmup, decayed, phase.min_lr_ratio)
