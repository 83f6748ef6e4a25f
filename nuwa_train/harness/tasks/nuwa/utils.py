"""lmms-eval resolves `!function utils.NAME` next to the task YAML: the hooks live in nuwa_train.harness.documents."""

from nuwa_train.harness.documents import (  # noqa: F401
    REFCOCO_REC_FILE,
    SYNTHETIC_GROUNDING_FILE,
    SYNTHETIC_VQA_FILE,
    USER_REFCOCO_FILE,
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
