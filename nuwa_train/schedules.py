"""The learning-rate shape both training loops use: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup: int, progress: float, floor: float) -> float:
    """Factor on the peak learning rate: (step + 1) / warmup during warm-up, then a cosine from 1 at
    `progress` 0 to `floor` at `progress` 1 (the share of the decay done; clamped to [0, 1])."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max(0.0, progress))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
