"""What a worker does for one case: build, parallelize, forward, one training step; results into a dict of arrays."""
import mindspore as ms
from mindspore import Tensor, nn

import cases
from qwen2ms.generation.generate import generate
from qwen2ms.modeling.model import Qwen2ForCausalLM
from qwen2ms.modeling.quantize import set_activations
from qwen2ms.parallel.apply import parallelize
from qwen2ms.parallel.optimizer import make_optimizer


def _adamw(ps):
    return nn.AdamWeightDecay(ps, learning_rate=cases.LR, weight_decay=0.1)


def run_layout(name, rank, out):
    """Logits, loss, synchronised grads and norm, AdamW step, loss after it (and jit grads / generation)."""
    cfg, pc = cases.config(name), cases.layout(name)
    ids, labels = cases.rank_batch(name, rank)
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
        # the compiled path a trainer uses: value_and_grad of token_loss, gradient sync and norm inside ms.jit
        def step_loss(i, l):
            total, count, _ = pm.token_loss(i, l)
            return total / count

        grad_fn = ms.value_and_grad(step_loss, None, params)

        def compiled_step(i, l):
            _, g = grad_fn(i, l)
            g = pm.grad_sync(g)
            return g, pm.grad_norm(g)

        jit_grads, jit_norm = ms.jit(compiled_step)(ids_t, labels_t)
        out[f"{name}/jit_grad_norm"] = jit_norm.asnumpy()
        for p, g in zip(params, jit_grads):
            out[f"{name}/jit_grad/{p.name}"] = g.asnumpy()
    opt = make_optimizer(pm, _adamw)
    opt(grads)
    if pc.optimizer_shard:
        out[f"{name}/optimizer_state_bytes"] = opt.state_bytes()
    for p, g in zip(params, grads):
        out[f"{name}/grad/{p.name}"] = g.asnumpy()
        out[f"{name}/param/{p.name}"] = p.asnumpy()
    out[f"{name}/loss_after"] = pm(ids, labels=labels).loss.asnumpy()
    if name in cases.GENERATE:
        fresh = parallelize(Qwen2ForCausalLM(cfg, seed=cases.SEED), pc)
        ids_all, _ = cases.batch(name)
        out[f"{name}/generate"] = generate(fresh, ids_all[:2, :cases.PROMPT], max_new_tokens=cases.NEW_TOKENS,
                                           do_sample=False)


def run_int8_generation(name, out):
    """Logits and greedy generation of the int8 model after parallelize (codes and scales sharded together)."""
    pm = parallelize(cases.int8_model(name), cases.layout(name))
    set_activations(pm, "float32")  # as cases.int8_model, also for any cell parallelize built
    ids, _ = cases.batch(name)
    out[f"int8/{name}/logits"] = pm(ids).logits.asnumpy()
    out[f"int8/{name}/generate"] = generate(pm, ids[:2, :cases.PROMPT], max_new_tokens=cases.NEW_TOKENS,
                                            do_sample=False)


def run_pipeline(name, out):
    """GPipe step over micro-batches (every stage sees the whole batch), AdamW step, evaluation after it."""
    cfg, pc = cases.config(name), cases.layout(name)
    ids, labels = cases.batch(name)
    pm = parallelize(Qwen2ForCausalLM(cfg, seed=cases.SEED), pc)
    loss, grads = pm.forward_backward(ids, labels)
    out[f"{name}/loss"] = loss.asnumpy()
    out[f"{name}/grad_norm"] = pm.grad_norm(grads).asnumpy()
    params = pm.trainable_params()
    make_optimizer(pm, _adamw)(grads)
    for p, g in zip(params, grads):
        out[f"{name}/grad/{p.name}"] = g.asnumpy()
        out[f"{name}/param/{p.name}"] = p.asnumpy()
    loss_after, logits = pm.evaluate(ids, labels)
    out[f"{name}/loss_after"] = loss_after.asnumpy()
    if logits is not None:
        out[f"{name}/logits_after"] = logits.asnumpy()
