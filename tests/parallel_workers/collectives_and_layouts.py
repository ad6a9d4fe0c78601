"""msrun worker (2 processes): every collective of qwen2ms.parallel.comm, then TP/SP/DP(+ZeRO-1)/EP/PP forward + one
training step, and TP greedy generation (float and int8 weights).

Writes ``<out_dir>/rank<r>.npz``; tests/test_parallel_msrun.py compares it with the definitions and
with single-process runs. Usage: msrun --worker_num=2 --local_worker_num=2 ... this.py OUT_DIR
"""
import os
import sys

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import mindspore as ms
from mindspore import Tensor
from mindspore.communication import GlobalComm, get_group_size, get_rank, init

import cases
import runners
from qwen2ms.parallel import comm

ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
init()
rank, world = get_rank(), get_group_size()
print(f"worker {rank} of {world} initialised", flush=True)  # the test retries only jobs that never got here
out = {}

# ---- collectives: native world-group ops and the sub-group compositions (forced via a non-world Group)
x = Tensor(np.arange(24, dtype=np.float32).reshape(4, 6) + 100 * rank)
world_g = comm.world_group()
composite = comm.Group(ranks=(0, 1), name=GlobalComm.WORLD_COMM_GROUP, rank=rank, is_world=False)
for tag, g in (("world", world_g), ("composite", composite)):
    out[f"{tag}/all_reduce_sum"] = comm.all_reduce(x, "sum", g).asnumpy()
    out[f"{tag}/all_reduce_max"] = comm.all_reduce(x, "max", g).asnumpy()
    out[f"{tag}/all_reduce_min"] = comm.all_reduce(x, "min", g).asnumpy()
    out[f"{tag}/all_gather0"] = comm.all_gather(x, 0, g).asnumpy()
    out[f"{tag}/all_gather1"] = comm.all_gather(x, 1, g).asnumpy()
    out[f"{tag}/reduce_scatter0"] = comm.reduce_scatter(x, 0, g).asnumpy()
    out[f"{tag}/reduce_scatter1"] = comm.reduce_scatter(x, 1, g).asnumpy()
    out[f"{tag}/all_to_all_1_0"] = comm.all_to_all(x, 1, 0, g).asnumpy()
    out[f"{tag}/broadcast1"] = comm.broadcast(x, 1, g).asnumpy()
    if rank == 0:
        comm.send(x * 2, 1, g)
    else:
        out[f"{tag}/recv"] = comm.recv((4, 6), ms.float32, 0, g).asnumpy()

# ---- layouts (forward, loss, synchronised gradients, one AdamW step) and pipeline stages
for name in cases.CASES:
    runners.run_layout(name, rank, out)
for name in cases.PIPELINE_CASES:
    runners.run_pipeline(name, out)
for name in cases.INT8_GENERATE:
    runners.run_int8_generation(name, out)

np.savez(os.path.join(sys.argv[1], f"rank{rank}.npz"), **out)
print(f"rank {rank}: wrote {len(out)} arrays", flush=True)
