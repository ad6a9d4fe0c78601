"""Tiny models, data and layouts shared by the msrun worker scripts and the tests that check them."""
import numpy as np

from qwen2ms import Qwen2Config
from qwen2ms.parallel import ParallelConfig

DENSE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False)
MOE = dict(DENSE, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
           shared_expert_intermediate_size=24, decoder_sparse_step=1, norm_topk_prob=False)

#: name -> (config fields, ParallelConfig fields, whether the batch is split over data-parallel ranks)
CASES = {
    "tp": (DENSE, dict(model_parallel=2), False),
    "tp_tied_kvrep": (dict(DENSE, tie_word_embeddings=True, num_key_value_heads=1), dict(model_parallel=2), False),
    "tp_sp": (DENSE, dict(model_parallel=2, use_seq_parallel=True), False),
    "tp_sp_embdp_recompute": (dict(DENSE, tie_word_embeddings=True),
                              dict(model_parallel=2, use_seq_parallel=True, vocab_emb_dp=True, recompute=True), False),
    "dp": (DENSE, dict(data_parallel=2), True),
    "dp_zero": (DENSE, dict(data_parallel=2, optimizer_shard=True), True),
    "moe_tp": (MOE, dict(model_parallel=2), False),
    "moe_ep": (MOE, dict(data_parallel=2, expert_parallel=2, optimizer_shard=True), True),
}

#: cases whose parallel model also generates (greedy, KV cache, compiled decode step)
GENERATE = ("tp", "tp_tied_kvrep")
#: cases that also generate with int8 weights (quantize_int8_weights before parallelize): an lm_head and a tied table
INT8_GENERATE = ("tp", "tp_tied_kvrep")
#: cases whose gradients are also taken inside ms.jit (through ParallelCausalLM.token_loss)
JIT = ("tp_sp", "moe_ep")
PROMPT, NEW_TOKENS = 5, 4

#: name -> (config fields, ParallelConfig fields); every stage sees the whole batch.
PIPELINE_CASES = {
    "pp": (DENSE, dict(pipeline_stage=2, micro_batch_num=2)),
    "pp_tied": (dict(DENSE, tie_word_embeddings=True, num_hidden_layers=3), dict(pipeline_stage=2, micro_batch_num=4)),
}

#: 4-process layouts (tests/parallel_workers/four_ranks.py): sub-groups created with create_group.
FOUR_CASES = {
    "dp2_tp2_sp": (DENSE, dict(data_parallel=2, model_parallel=2, use_seq_parallel=True, optimizer_shard=True), True),
    "moe_dp2_ep2_tp2": (MOE, dict(data_parallel=2, expert_parallel=2, model_parallel=2), True),
}
FOUR_PIPELINE_CASES = {
    "pp2_tp2_tied": (dict(DENSE, tie_word_embeddings=True, num_key_value_heads=1, num_hidden_layers=3),
                     dict(pipeline_stage=2, model_parallel=2, micro_batch_num=2)),
}

SEED = 3
LR = 1e-2
BATCH, SEQ = 4, 8


def _entry(name):
    for table in (CASES, PIPELINE_CASES, FOUR_CASES, FOUR_PIPELINE_CASES):
        if name in table:
            return table[name]
    raise KeyError(name)


def split_batch(name):
    """Whether data-parallel replicas of this case see different rows of the batch."""
    entry = _entry(name)
    return len(entry) > 2 and entry[2]


def config(name):
    return Qwen2Config(**_entry(name)[0])


def layout(name):
    return ParallelConfig(**_entry(name)[1])


def batch(name):
    """``(input_ids, labels)`` of the whole (global) batch, int32 ``[BATCH, SEQ]``; a few labels ignored."""
    rng = np.random.default_rng(7)
    ids = rng.integers(0, _entry(name)[0]["vocab_size"], (BATCH, SEQ)).astype(np.int32)
    labels = ids.copy()
    if name in PIPELINE_CASES or name in FOUR_PIPELINE_CASES:
        labels[0, 1:4] = -100  # unequal token counts per micro-batch: the loss must still be the batch mean
    return ids, labels


def reference(name):
    """Single-process logits, loss, gradients, parameters after one AdamW step, and the loss after it."""
    import mindspore as ms
    from mindspore import Tensor, nn

    from qwen2ms.modeling.model import Qwen2ForCausalLM

    ids, labels = batch(name)
    model = Qwen2ForCausalLM(config(name), seed=SEED)
    res = model(ids, labels=labels)
    params = model.trainable_params()
    _, grads = ms.value_and_grad(lambda i, l: model(i, labels=l).loss, None, params)(Tensor(ids), Tensor(labels))
    opt = nn.AdamWeightDecay(params, learning_rate=LR, weight_decay=0.1)
    opt(grads)
    return dict(logits=res.logits.asnumpy(), loss=float(res.loss.asnumpy()),
                grads={p.name: g.asnumpy() for p, g in zip(params, grads)},
                params={p.name: p.asnumpy() for p in params},
                **_after(model, ids, labels))


def _after(model, ids, labels):
    out = model(ids, labels=labels)
    return dict(loss_after=float(out.loss.asnumpy()), logits_after=out.logits.asnumpy())


def int8_model(name):
    """The case's model with int8 weights (default group size: per-channel scales at this width).

    Its int8 layers read float activations: with activations rounded to int8 per block of 32 (the default), the
    last-bit differences of TP's other summation order flip roundings and move logits by ~1e-2, which would hide
    what this case checks at 2e-5: that the shards of the codes and their scales multiply like the whole weight.
    """
    from qwen2ms.modeling.model import Qwen2ForCausalLM
    from qwen2ms.modeling.quantize import quantize_int8_weights

    model = Qwen2ForCausalLM(config(name), seed=SEED)
    quantize_int8_weights(model, activations="float32")
    return model


def rank_batch(name, rank):
    """This rank's part of the batch: its data-parallel replica's rows, else the whole batch."""
    ids, labels = batch(name)
    if split_batch(name):
        pc = layout(name)
        dp_rank = pc.rank_coords(rank)[1]
        step = BATCH // pc.data_parallel
        return ids[dp_rank * step:(dp_rank + 1) * step], labels[dp_rank * step:(dp_rank + 1) * step]
    return ids, labels


def reference_names(name):
    """Names of the single-process model's trainable parameters."""
    from qwen2ms.modeling.model import Qwen2ForCausalLM

    return [p.name for p in Qwen2ForCausalLM(config(name), seed=SEED).trainable_params()]
