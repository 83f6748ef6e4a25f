"""The record schema's shared words: values that the readers, the collator, evaluation and training must agree on.

Kept apart from the modules that use them so that a reader (formats.py, sharegpt.py) or the loss needs no collator
to know them.
"""

from __future__ import annotations

IGNORE_INDEX = -100  # a label position that is not trained on (torch's cross_entropy default)
TEXT_TASK = "text"  # the task of a record without an image (it trains; evaluation does not score it)
PADDING_SIDES = ("left", "right")
ON_ERROR = ("raise", "skip")  # what a reader or the collator does with a bad record
REF_PLACEHOLDER, BOX_PLACEHOLDER = "<ref-object>", "<bbox>"  # ms-swift's grounding placeholders (data/sharegpt.py)

# What the collator counts (and warns about once each): truncation and text the tokenizer cannot represent.
ANSWER_TRUNCATED = "answer truncated to max_length"
PROMPT_TOO_LONG = "prompt longer than max_length (record refused)"
PROMPT_UNKNOWN_TOKENS = "prompt has text the tokenizer maps to <unk>"
ANSWER_UNKNOWN_TOKENS = "answer has text the tokenizer maps to <unk> (record refused)"
TURNS_DROPPED = "conversation cut to whole turns within max_length (later turns dropped)"
BOX_BELOW_GRID = "box smaller than one cell of its answer's grid (trains a box with no area; kept)"
