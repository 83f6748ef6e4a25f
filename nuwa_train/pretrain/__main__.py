"""`python -m nuwa_train.pretrain RECIPE ...`: the same as `nuwa-train pretrain-base RECIPE ...` (and its errors:
one line, the traceback with NUWA_DEBUG=1)."""

import sys

from ..cli import main

main(["pretrain-base", *sys.argv[1:]])  # flushes subnormals first: denormal weights made steps 10x slower
