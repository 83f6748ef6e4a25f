"""`python -m nuwa_train.pretrain RECIPE ...`: the same as `nuwa-train pretrain-base RECIPE ...`."""

import sys

import torch

from .cli import main

torch.set_flush_denormal(True)  # measured: denormal weights/grads made steps 10x slower after a few updates
sys.exit(main())
