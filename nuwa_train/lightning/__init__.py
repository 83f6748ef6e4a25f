"""The Lightning layer: fine-tuning module, data module and the LightningCLI entry point."""

import torch

from ..data.records import SyntheticRecords
from ..data.synthetic import SyntheticConfig
from ..pruning import NuwaConfig
from .data import FileSources, NuwaDataModule, ResumableSampler
from .module import LoraSettings, NuwaFineTuner, OptimizerSettings, SelectionSettings

# Checkpoints keep these settings as hyper-parameters; allow them under torch.load(weights_only=True).
torch.serialization.add_safe_globals(
    [NuwaConfig, SyntheticConfig, FileSources, LoraSettings, OptimizerSettings, SelectionSettings]
)

__all__ = [
    "FileSources",
    "NuwaDataModule",
    "ResumableSampler",
    "SyntheticRecords",
    "LoraSettings",
    "NuwaFineTuner",
    "OptimizerSettings",
    "SelectionSettings",
]
