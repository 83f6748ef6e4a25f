"""lmms-eval resolves `!function utils.NAME` next to the task YAML: the hooks live in nuwa_train.harness.documents.

lmms-eval executes this file again for every `!function`, so the data paths follow the environment variables
in effect when a task loads.
"""

from nuwa_train.harness.documents import (
    data_file,
    doc_to_target,
    doc_to_text,
    doc_to_visual,
    process_grounding,
    process_vqa,
    refcoco_docs,
    refcoco_rec_docs,
    synthetic_grounding_docs,
    synthetic_vqa_docs,
    total,
)

SYNTHETIC_VQA_FILE = data_file("synthetic_vqa")
SYNTHETIC_GROUNDING_FILE = data_file("synthetic_grounding")
USER_REFCOCO_FILE = data_file("refcoco")
REFCOCO_REC_FILE = data_file("refcoco_rec")

__all__ = [
    "doc_to_target",
    "doc_to_text",
    "doc_to_visual",
    "process_grounding",
    "process_vqa",
    "refcoco_docs",
    "refcoco_rec_docs",
    "synthetic_grounding_docs",
    "synthetic_vqa_docs",
    "total",
    "SYNTHETIC_VQA_FILE",
    "SYNTHETIC_GROUNDING_FILE",
    "USER_REFCOCO_FILE",
    "REFCOCO_REC_FILE",
]
