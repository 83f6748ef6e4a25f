"""Pure-tensor pruning core: no Lightning, no transformers. Adapters call into this."""

from .config import (
    METHODS,
    PAPER_PRESETS,
    NuwaConfig,
    NuwaConfigError,
    PruningPlan,
    Stage1Plan,
    Stage2Plan,
)
from .selectors import SELECTORS, SOFT_METHODS, Selector, run_stage1, run_stage1_soft
from .stage1 import Stage1Output, nuwa_stage1, regional_candidates, select_anchors
from .stage2 import last_token_attention, select_top

__all__ = [
    "METHODS",
    "SELECTORS",
    "SOFT_METHODS",
    "Selector",
    "run_stage1_soft",
    "PAPER_PRESETS",
    "NuwaConfig",
    "NuwaConfigError",
    "PruningPlan",
    "Stage1Plan",
    "Stage2Plan",
    "Stage1Output",
    "nuwa_stage1",
    "regional_candidates",
    "select_anchors",
    "run_stage1",
    "last_token_attention",
    "select_top",
]
