"""The paged KV cache and its runner: greedy tokens equal model.generate on each sequence alone, whatever the batch."""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from qwen2ms import Qwen2Config  # noqa: E402
from qwen2ms.modeling import Qwen2ForCausalLM  # noqa: E402
from qwen2ms.modeling.paged import PagedKVCache, PagedModelRunner  # noqa: E402

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=1,
            initializer_range=0.15)  # O(1) activations: greedy choices well separated, tokens not all alike
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
BLOCK = 4  # divides none of the prompt lengths below
MAX_LEN = 64


@pytest.fixture(scope="module", params=["dense", "moe"])
def setup(request):
    cfg = Qwen2Config(**dict(BASE, **(MOE if request.param == "moe" else {})))
    model = Qwen2ForCausalLM(cfg, seed=5)
    cache = PagedKVCache(cfg, num_blocks=64, block_size=BLOCK)
    runner = PagedModelRunner(model, cache, max_num_seqs=4, max_model_len=MAX_LEN)
    return model, runner


def prompt(n, seed):
    return np.random.default_rng(seed).integers(2, 256, n).tolist()


def expected(model, ids, n):
    out = model.generate(np.array([ids]), max_new_tokens=n, do_sample=False, eos_token_id=[])
    return out[0, len(ids):].tolist()


class Pool:
    """Hands out block ids in a shuffled order, so tables are non-contiguous and out of order."""

    def __init__(self, num_blocks, seed=0):
        self.free = np.random.default_rng(seed).permutation(num_blocks).tolist()

    def take(self, n):
        out, self.free = self.free[:n], self.free[n:]
        return out


class Seq:
    def __init__(self, ids, pool):
        self.ids = list(ids)
        self.table = pool.take(-(-(len(ids) + 10) // BLOCK))  # room for the tokens these tests generate
        self.out = []

    def prefill(self, runner, start=0):
        self.out.append(int(runner.prefill(self.ids[start:], start, self.table).argmax()))

    @property
    def position(self):  # of the token decode feeds next: the last sampled one
        return len(self.ids) + len(self.out) - 1


def decode_round(runner, seqs):
    logits = runner.decode([s.out[-1] for s in seqs], [s.position for s in seqs], [s.table for s in seqs])
    for s, row in zip(seqs, logits):
        s.out.append(int(row.argmax()))


def test_joining_and_leaving_batch_equals_generate_alone(setup):
    model, runner = setup
    pool = Pool(64, seed=1)
    a, b, c, d = (Seq(prompt(n, seed), pool) for n, seed in ((7, 1), (3, 2), (13, 3), (5, 4)))
    a.prefill(runner)
    b.prefill(runner)
    for _ in range(2):
        decode_round(runner, [a, b])  # bucket 2
    c.prefill(runner)  # joins between decode steps
    for _ in range(2):
        decode_round(runner, [c, a, b])  # 3 rows padded to bucket 4, in another order
    d.prefill(runner)
    decode_round(runner, [a, b, c, d])
    for _ in range(3):
        decode_round(runner, [d, a])  # b and c left
    decode_round(runner, [d])
    for s in (a, b, c, d):
        assert s.out == expected(model, s.ids, len(s.out)), s.ids
    assert len(a.out) == 9 and len(b.out) == 6 and len(c.out) == 4 and len(d.out) == 6
    assert len(set(a.out + c.out)) > 2  # the comparison is between varied tokens, not one repeated id


def test_prefix_hit_reuses_blocks(setup):
    model, runner = setup
    pool = Pool(64, seed=7)
    first = Seq(prompt(10, 11), pool)
    first.prefill(runner)
    for _ in range(2):
        decode_round(runner, [first])
    # A second prompt sharing the first 8 tokens (two full blocks): its table starts with those blocks,
    # and only the rest is prefilled, from position 8.
    second = Seq(first.ids[:8] + prompt(6, 12), pool)
    shared = first.table[:2]
    second.table = shared + second.table[2:]
    logits = runner.prefill(second.ids[8:], 8, second.table)
    second.out.append(int(logits.argmax()))
    for _ in range(4):
        decode_round(runner, [second, first])
    assert second.out == expected(model, second.ids, 5)
    assert first.out == expected(model, first.ids, 7)  # its shared blocks were read, never overwritten
    full = model(np.array([second.ids])).logits.asnumpy()[0, -1]
    np.testing.assert_allclose(logits, full, atol=1e-5, rtol=0)


def test_logits_match_the_full_forward(setup):
    model, runner = setup
    pool = Pool(64, seed=3)
    seqs = [Seq(prompt(n, 20 + n), pool) for n in (9, 17, 2)]  # 17 tokens: the 32-token prefill bucket
    for s in seqs:
        logits = runner.prefill(s.ids, 0, s.table)
        ref = model(np.array([s.ids])).logits.asnumpy()[0, -1]
        np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0)
        s.out.append(int(logits.argmax()))
    for _ in range(3):
        logits = runner.decode([s.out[-1] for s in seqs], [s.position for s in seqs], [s.table for s in seqs])
        for s, row in zip(seqs, logits):
            ref = model(np.array([s.ids + s.out])).logits.asnumpy()[0, -1]
            np.testing.assert_allclose(row, ref, atol=1e-5, rtol=0)
            s.out.append(int(row.argmax()))
    assert logits.dtype == np.float32 and logits.shape == (3, 256)


def test_short_tables_and_graph_reuse(setup):
    """Tables need only cover the positions in use; a new request mix of the same buckets compiles nothing."""
    model, runner = setup
    from mindspore.graph import api as ms_graph_api

    pool = Pool(64, seed=9)
    s, t = Seq(prompt(6, 30), pool), Seq(prompt(11, 31), pool)
    s.table = s.table[:2]  # positions 0..7
    s.prefill(runner)
    decode_round(runner, [s])
    decode_round(runner, [s])  # position 7: the last slot of block 2
    compiled = len(ms_graph_api.ms_compile_cache)  # buckets 1 (decode) and 16 (prefill) are built now
    t.prefill(runner)
    decode_round(runner, [t])
    s.table = s.table + pool.take(1)  # position 8 needs a third block
    decode_round(runner, [s])
    assert len(ms_graph_api.ms_compile_cache) == compiled
    assert s.out == expected(model, s.ids, 4) and t.out == expected(model, t.ids, 2)


def test_sizes():
    cfg = Qwen2Config.from_preset("qwen2-0.5b")
    assert PagedKVCache.bytes_per_block(cfg, 16, "float32") == 2 * 24 * 16 * 2 * 64 * 4
    assert PagedKVCache.bytes_per_block(cfg, 16, "float16") == 2 * 24 * 16 * 2 * 64 * 2
    tiny = Qwen2Config(**BASE)
    cache = PagedKVCache(tiny, num_blocks=10, block_size=8, dtype="float16")
    assert cache.nbytes() == 11 * PagedKVCache.bytes_per_block(tiny, 8, "float16")  # + the scratch block
    assert cache.key_pools[0].shape == (11, 8, 2, 16) and cache.key_pools[0].dtype == ms.float16
