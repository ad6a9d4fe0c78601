"""msrun worker (4 processes): layouts that combine two kinds of parallelism, so their groups are real sub-groups
(created with create_group): DP x TP with sequence parallel and ZeRO-1, MoE DP x EP x TP, and PP x TP.

Writes ``<out_dir>/rank<r>.npz``; tests/test_parallel_msrun.py compares it with single-process runs.
Usage: msrun --worker_num=4 --local_worker_num=4 ... this.py OUT_DIR
"""
import os
import sys

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import mindspore as ms
from mindspore.communication import get_group_size, get_rank, init

import cases
import runners

ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
init()
rank, world = get_rank(), get_group_size()
print(f"worker {rank} of {world} initialised", flush=True)  # the test retries only jobs that never got here
out = {}
for name in cases.FOUR_CASES:
    runners.run_layout(name, rank, out)
for name in cases.FOUR_PIPELINE_CASES:
    runners.run_pipeline(name, out)
np.savez(os.path.join(sys.argv[1], f"rank{rank}.npz"), **out)
print(f"rank {rank}: wrote {len(out)} arrays", flush=True)
