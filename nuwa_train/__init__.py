"""nuwa-train: pruning-aware fine-tuning of vision-language models with Nüwa spatial anchors."""

from .pruning import NuwaConfig, NuwaConfigError, nuwa_stage1

__version__ = "0.1.0"
__all__ = ["NuwaConfig", "NuwaConfigError", "nuwa_stage1", "attach_nuwa", "detach_nuwa", "load_pruned", "__version__"]


def __getattr__(name: str):
    # The model adapters import transformers; load them only when asked for.
    if name in ("attach_nuwa", "detach_nuwa"):
        from . import models

        return getattr(models, name)
    if name == "load_pruned":
        from .export import load_pruned

        return load_pruned
    raise AttributeError(f"module 'nuwa_train' has no attribute {name!r}")
