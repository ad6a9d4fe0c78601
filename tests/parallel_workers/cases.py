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
    "dp": (DENSE, dict(data_parallel=2), True),
    "moe_tp": (MOE, dict(model_parallel=2), False),
    "moe_ep": (MOE, dict(data_parallel=2, expert_parallel=2), True),
}

SEED = 3
LR = 1e-2
BATCH, SEQ = 4, 8


def config(name):
    return Qwen2Config(**CASES[name][0])


def layout(name):
    return ParallelConfig(**CASES[name][1])


def batch(name):
    """``(input_ids, labels)`` of the whole (global) batch, int32 ``[BATCH, SEQ]``."""
    rng = np.random.default_rng(7)
    ids = rng.integers(0, CASES[name][0]["vocab_size"], (BATCH, SEQ)).astype(np.int32)
    return ids, ids.copy()


def rank_batch(name, rank, world):
    """This rank's part of the batch: its slice of rows under data parallel, else the whole batch."""
    ids, labels = batch(name)
    if CASES[name][2]:
        step = BATCH // world
        return ids[rank * step:(rank + 1) * step], labels[rank * step:(rank + 1) * step]
    return ids, labels
