"""`nuwa-train bench`: prefill, decode and training cost of Nüwa pruning, on the CPU or a CUDA GPU.

Rooms: shapes.py (what is timed and how its random weights and inputs are built), prefill.py (full vs
pruned prefill per selector, and stage-1 aggregation), decode.py (per-token latency and KV cache),
training.py (a training step per selection mode vs plain LoRA), startup.py (data start-up), suite.py
(the command: runs the parts, writes bench.md / bench.json / PNGs, and the GPU suite preset).
"""

from .decode import DecodeTiming, time_decode
from .prefill import llm_flops, time_aggregation, time_prefill
from .shapes import SHAPES, BenchShape
from .startup import time_data_startup, write_startup_dataset
from .suite import GPU_SUITE, BenchSuite, run_bench
from .training import time_shape_training, time_training, training_markdown

__all__ = [
    "BenchShape",
    "BenchSuite",
    "DecodeTiming",
    "GPU_SUITE",
    "SHAPES",
    "llm_flops",
    "run_bench",
    "time_aggregation",
    "time_data_startup",
    "time_decode",
    "time_prefill",
    "time_shape_training",
    "time_training",
    "training_markdown",
    "write_startup_dataset",
]
