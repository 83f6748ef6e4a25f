"""Serving a Nüwa model with vLLM: a vLLM plugin (this package's `vllm.general_plugins` entry point) and the
`nuwa-train serve` launcher.

vLLM imports `register` in each of its processes before it inspects a model. It registers the Nüwa model class
(`llava.NuwaLlavaForConditionalGeneration`, chosen by the `architectures` override `nuwa-train serve` passes) and
two things that class needs from vLLM:

- the CPU model runner never turns on `is_multimodal_pruning_enabled` (only the GPU runner's `load_model` does, and
  only for video pruning), so the per-request positions of kept image tokens would never be written: the plugin
  turns it on after `load_model` for Nüwa models only;
- transformers' Pixtral image processor imports torchvision at module level, and vLLM's LLaVA module imports it for
  Pixtral's token count. The registry's torchvision is a CUDA build that does not load next to the CPU torch, so the
  serving environment has none; the plugin then registers a stand-in for that one module whose one function raises
  a clear error if a Pixtral model ever needs it. LLaVA-1.5 never does.

Nothing here imports vLLM at module level: the training environment imports this package too (settings, launcher).
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types

PIXTRAL_PROCESSOR_MODULE = "transformers.models.pixtral.image_processing_pixtral"
NUWA_MODEL_MARK = "is_nuwa_pruned"  # class attribute of the plugin's models: the runner hook acts on these only


def register() -> None:
    """vLLM's plugin hook: register the Nüwa model classes (idempotent; vLLM calls it once per process)."""
    _stand_in_for_pixtral_processor()
    from vllm import ModelRegistry

    from .settings import SERVED_ARCHITECTURE

    if SERVED_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(SERVED_ARCHITECTURE, f"{__name__}.llava:{SERVED_ARCHITECTURE}")
    _enable_pruning_after_load()


def _stand_in_for_pixtral_processor() -> None:
    if importlib.util.find_spec("torchvision") is not None or PIXTRAL_PROCESSOR_MODULE in sys.modules:
        return
    module = types.ModuleType(
        PIXTRAL_PROCESSOR_MODULE,
        "Stand-in (nuwa_train.serving): the real module needs "
        "torchvision, which the serving environment does not have.",
    )

    def _num_image_tokens(*args, **kwargs):
        raise ImportError(
            "Pixtral image processing needs torchvision, which the serving environment (.venv-serve) "
            "leaves out; nuwa-train serves LLaVA-1.5-family models"
        )

    module._num_image_tokens = _num_image_tokens
    sys.modules[PIXTRAL_PROCESSOR_MODULE] = module


def _enable_pruning_after_load() -> None:
    """Wrap the model runners' `load_model` so that a Nüwa model gets its kept tokens' positions recomputed."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner as runner
    else:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner as runner
    original = runner.load_model
    if getattr(original, NUWA_MODEL_MARK, False):
        return

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if getattr(self.get_model(), NUWA_MODEL_MARK, False):
            self.is_multimodal_pruning_enabled = True

    setattr(load_model, NUWA_MODEL_MARK, True)
    runner.load_model = load_model
