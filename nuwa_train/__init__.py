"""nuwa-train: pruning-aware fine-tuning of vision-language models with Nüwa spatial anchors."""

from .pruning import NuwaConfig, NuwaConfigError, nuwa_stage1

__version__ = "0.1.0"
__all__ = ["NuwaConfig", "NuwaConfigError", "nuwa_stage1", "__version__"]
