"""msrun worker (2 processes): every collective of qwen2ms.parallel.comm, then TP/SP/DP(+ZeRO-1)/EP/PP forward + one
training step, and TP greedy generation.

Writes ``<out_dir>/rank<r>.npz``; tests/test_parallel_msrun.py compares it with the definitions and
with single-process runs. Usage: msrun --worker_num=2 --local_worker_num=2 ... this.py OUT_DIR
"""
import os
import sys

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn
from mindspore.communication import GlobalComm, get_group_size, get_rank, init

import cases
from qwen2ms.modeling.model import Qwen2ForCausalLM
from qwen2ms.parallel import comm
from qwen2ms.generation.generate import generate
from qwen2ms.parallel.apply import parallelize
from qwen2ms.parallel.optimizer import make_optimizer

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

# ---- layouts: forward, loss, synchronised gradients, parameters after one AdamW step
for name in cases.CASES:
    cfg, pc = cases.config(name), cases.layout(name)
    ids, labels = cases.rank_batch(name, rank, world)
    pm = parallelize(Qwen2ForCausalLM(cfg, seed=cases.SEED), pc)
    res = pm(ids, labels=labels)
    out[f"{name}/logits"] = res.logits.asnumpy()
    out[f"{name}/loss"] = res.loss.asnumpy()
    params = pm.trainable_params()
    ids_t, labels_t = Tensor(ids), Tensor(labels)
    _, grads = ms.value_and_grad(lambda i, l: pm(i, labels=l).loss, None, params)(ids_t, labels_t)
    grads = pm.grad_sync(grads)
    out[f"{name}/grad_norm"] = pm.grad_norm(grads).asnumpy()
    if name in cases.JIT:
        # the compiled path a trainer uses: value_and_grad of token_loss inside ms.jit
        def step_loss(i, l):
            total, count, _ = pm.token_loss(i, l)
            return total / count

        jit_grads = ms.jit(ms.value_and_grad(step_loss, None, params))(ids_t, labels_t)[1]
        for p, g in zip(params, pm.grad_sync(jit_grads)):
            out[f"{name}/jit_grad/{p.name}"] = g.asnumpy()
    opt = make_optimizer(pm, lambda ps: nn.AdamWeightDecay(ps, learning_rate=cases.LR, weight_decay=0.1))
    opt(grads)
    if pc.optimizer_shard:
        out[f"{name}/optimizer_state_bytes"] = np.array(opt.state_bytes())
    for p, g in zip(params, grads):
        out[f"{name}/grad/{p.name}"] = g.asnumpy()
        out[f"{name}/param/{p.name}"] = p.asnumpy()
    out[f"{name}/loss_after"] = pm(ids, labels=labels).loss.asnumpy()
    if name in cases.GENERATE:
        fresh = parallelize(Qwen2ForCausalLM(cfg, seed=cases.SEED), pc)
        ids_all, _ = cases.batch(name)
        out[f"{name}/generate"] = generate(fresh, ids_all[:2, :cases.PROMPT], max_new_tokens=cases.NEW_TOKENS,
                                           do_sample=False)

# ---- pipeline stages (GPipe over micro-batches): every stage sees the whole batch
for name in cases.PIPELINE_CASES:
    cfg, pc = cases.config(name), cases.layout(name)
    ids, labels = cases.batch(name)
    pm = parallelize(Qwen2ForCausalLM(cfg, seed=cases.SEED), pc)
    loss, grads = pm.forward_backward(ids, labels)
    out[f"{name}/loss"] = loss.asnumpy()
    out[f"{name}/grad_norm"] = pm.grad_norm(grads).asnumpy()
    params = pm.trainable_params()
    opt = nn.AdamWeightDecay(params, learning_rate=cases.LR, weight_decay=0.1)
    opt(grads)
    for p, g in zip(params, grads):
        out[f"{name}/grad/{p.name}"] = g.asnumpy()
        out[f"{name}/param/{p.name}"] = p.asnumpy()
    loss_after, logits = pm.evaluate(ids, labels)
    out[f"{name}/loss_after"] = loss_after.asnumpy()
    if logits is not None:
        out[f"{name}/logits_after"] = logits.asnumpy()

np.savez(os.path.join(sys.argv[1], f"rank{rank}.npz"), **out)
print(f"rank {rank}: wrote {len(out)} arrays", flush=True)
