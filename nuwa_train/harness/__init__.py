"""lmms-eval integration: `--model nuwa` (any supported family, pruned with `attach_nuwa`) and local tasks.

lmms-eval finds the model through this package's `lmms_eval.models` entry point (`manifests`); the tasks
are YAML files under `TASKS_DIR`, found with `--include_path` (`./launch.sh lmms-eval` adds it). Importing
this module stays light: lmms-eval loads every entry point at start-up.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
MODEL_NAME = "nuwa"


def manifests():
    """The entry point's value: lmms-eval's registry (v2) reads a ModelManifest from it."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path="nuwa_train.harness.model.NuwaLMM")
