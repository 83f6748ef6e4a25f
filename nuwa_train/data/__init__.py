"""Data for nuwa-train: a deterministic synthetic grounding benchmark and LLaVA/RefCOCO loaders."""

from .formats import (
    FEATURES,
    DatasetFormatError,
    LoadReport,
    export_records,
    export_split,
    load_llava_json,
    load_refcoco_json,
    parse_llava_json,
    parse_refcoco_json,
    write_sample,
)
from .geometry import iou, normalise_box
from .synthetic import (
    SPLITS,
    Record,
    Scene,
    SceneObject,
    SyntheticConfig,
    box_to_tokens,
    coordinate_tokens,
    generate_records,
    generate_scene,
    make_grounding,
    make_vqa,
    render,
    tokens_to_box,
    vocabulary,
)

__all__ = [
    "FEATURES", "DatasetFormatError", "LoadReport", "export_records", "export_split", "load_llava_json",
    "load_refcoco_json", "parse_llava_json", "parse_refcoco_json", "write_sample", "SPLITS", "Record", "Scene",
    "SceneObject", "SyntheticConfig", "box_to_tokens", "coordinate_tokens", "generate_records", "generate_scene",
    "iou", "make_grounding", "make_vqa", "normalise_box", "render", "tokens_to_box", "vocabulary",
]
