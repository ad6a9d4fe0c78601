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
        self.table = pool.take(-(-(len(ids) + 8) // BLOCK))  # room for the tokens these tests generate
        self.out = []
        self.logits = []  # (context token ids, logits) of every call that produced one of its tokens

    def prefill(self, runner, start=0):
        self.take(runner.prefill(self.ids[start:], start, self.table))

    def take(self, logits):
        self.logits.append((self.ids + self.out, logits))
        self.out.append(int(logits.argmax()))

    @property
    def position(self):  # of the token decode feeds next: the last sampled one
        return len(self.ids) + len(self.out) - 1


def decode_round(runner, seqs):
    logits = runner.decode([s.out[-1] for s in seqs], [s.position for s in seqs], [s.table for s in seqs])
    assert logits.dtype == np.float32 and logits.shape == (len(seqs), runner.vocab_size)
    for s, row in zip(seqs, logits):
        s.take(row)


@pytest.fixture(scope="module")
def models():
    """Built once: each model's generate() graphs then compile once for the whole module."""
    return {kind: Qwen2ForCausalLM(Qwen2Config(**dict(BASE, **(MOE if kind == "moe" else {}))), seed=5)
            for kind in ("dense", "moe")}


@pytest.fixture(scope="module", params=["dense", "moe"])
def scenario(request, models):
    """One serving-like run: sequences of different lengths (none a multiple of the block size) decoded together
    in padded and full batch buckets, joining and leaving between steps, a prefix hit on another sequence's
    blocks, all tables drawn from a shuffled pool. Compiles one prefill and one decode graph."""
    model = models[request.param]
    cache = PagedKVCache(model.config, num_blocks=40, block_size=BLOCK)
    runner = PagedModelRunner(model, cache, max_num_seqs=4, max_model_len=MAX_LEN)
    pool = Pool(40, seed=1)
    a, b, c, d = (Seq(prompt(n, seed), pool) for n, seed in ((7, 1), (3, 2), (13, 3), (5, 4)))
    for s in (a, b, c):
        s.prefill(runner)
    for _ in range(2):
        decode_round(runner, [a, b, c])  # 3 rows in the 4-row bucket
    d.prefill(runner)  # joins between decode steps
    for _ in range(2):
        decode_round(runner, [c, a, d, b])  # full bucket, another row order
    # b leaves. e shares c's first 8 tokens: its table starts with c's first two blocks and only the rest of
    # its prompt is prefilled, from position 8.
    e = Seq(c.ids[:8] + prompt(6, 5), pool)
    e.table = c.table[:2] + e.table[2:]
    e.prefill(runner, start=8)
    for _ in range(2):
        decode_round(runner, [d, e, a, c])
    decode_round(runner, [e, a, d])  # c left
    return model, runner, {"a": a, "b": b, "c": c, "d": d, "e": e}


@pytest.mark.slow
def test_each_sequence_equals_generate_alone(scenario):
    model, _, seqs = scenario
    for name, s in seqs.items():
        assert s.out == expected(model, s.ids, len(s.out)), name
    assert [len(s.out) for s in seqs.values()] == [8, 5, 7, 6, 4]
    assert len(set(seqs["a"].out + seqs["c"].out)) > 3  # varied tokens, not one id repeated


def test_logits_match_the_full_forward(scenario):
    model, _, seqs = scenario
    # e: the prefix hit's prefill and decodes; a: its prefill, a padded-bucket decode, the last decode
    for name, calls in (("e", seqs["e"].logits), ("a", [seqs["a"].logits[i] for i in (0, 1, -1)])):
        for context, logits in calls:
            ref = model(np.array([context])).logits.asnumpy()[0, -1]
            np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=0, err_msg=name)


def test_new_mixes_compile_nothing_and_tables_may_be_short(scenario):
    """A new request mix in built buckets compiles nothing; a table need only cover the positions in use."""
    model, runner, _ = scenario
    from mindspore.graph import api as ms_graph_api

    compiled = len(ms_graph_api.ms_compile_cache)
    pool = Pool(40, seed=9)
    s, t, u = Seq(prompt(6, 30), pool), Seq(prompt(11, 31), pool), Seq(prompt(2, 32), pool)
    s.table = s.table[:2]  # positions 0..7
    for q in (s, t, u):
        q.prefill(runner)
    decode_round(runner, [s, t, u])
    decode_round(runner, [u, s, t])  # position 7 of s: the last slot of its second block
    s.table = s.table + pool.take(1)  # position 8 needs a third block
    decode_round(runner, [t, s, u])
    assert len(ms_graph_api.ms_compile_cache) == compiled
    for q in (s, t, u):
        assert q.out == expected(model, q.ids, len(q.out))


@pytest.mark.slow
def test_small_batch_buckets_and_chunked_prefill(models):
    """Buckets 1 and 2 (and a non-power-of-two top bucket) give the same tokens as generate; a prompt longer than
    prefill_chunk is prefilled in chunks, the later ones attending to the earlier through the cache."""
    model = models["dense"]
    runner = PagedModelRunner(model, PagedKVCache(model.config, num_blocks=12, block_size=5), max_num_seqs=3,
                              max_model_len=20, prefill_chunk=8)
    assert runner.decode_buckets == [1, 2, 3] and runner.prefill_buckets == [8]
    assert runner.prefill_table_widths == [2, 4]  # blocks of 5 tokens: the 8-token bucket needs 2
    pool = Pool(12, seed=2)
    s, t = Seq(prompt(13, 40), pool), Seq(prompt(4, 41), pool)  # s: chunks of 8 and 5 tokens
    s.table, t.table = s.table[:4], t.table[:2]  # exactly the blocks of positions 0..19 and 0..9
    s.prefill(runner)
    decode_round(runner, [s])
    t.prefill(runner)
    decode_round(runner, [t, s])
    assert s.out == expected(model, s.ids, 3) and t.out == expected(model, t.ids, 2)
    for context, logits in s.logits[:1] + t.logits[:1]:
        np.testing.assert_allclose(logits, model(np.array([context])).logits.asnumpy()[0, -1], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_reference_ops_backend_writes_and_gathers_through_block_tables():
    """The reference ops (scatter into the pool, gather through the tables) in a compiled graph, as on GPU."""
    cfg = Qwen2Config(**BASE)
    model = Qwen2ForCausalLM(cfg, seed=8, ops_backend="reference")
    runner = PagedModelRunner(model, PagedKVCache(cfg, num_blocks=12, block_size=BLOCK), max_num_seqs=2,
                              max_model_len=16)
    pool = Pool(12, seed=6)
    s, t = Seq(prompt(5, 60), pool), Seq(prompt(2, 61), pool)
    s.prefill(runner)
    t.prefill(runner)
    decode_round(runner, [s, t])
    decode_round(runner, [t, s])
    for context, logits in s.logits + t.logits:
        np.testing.assert_allclose(logits, model(np.array([context])).logits.asnumpy()[0, -1], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_sliding_window_layers_match_the_full_forward():
    """Layers that slide (window 5) see only their last 5 positions through the block tables too."""
    cfg = Qwen2Config(**dict(BASE, use_sliding_window=True, sliding_window=5, max_window_layers=1))
    model = Qwen2ForCausalLM(cfg, seed=7)
    assert model.model.layer_sliding == [False, True]
    runner = PagedModelRunner(model, PagedKVCache(cfg, num_blocks=8, block_size=BLOCK), max_num_seqs=1,
                              max_model_len=20)
    s = Seq(prompt(9, 50), Pool(8, seed=5))
    s.prefill(runner)
    decode_round(runner, [s])
    decode_round(runner, [s])
    for context, logits in s.logits:
        np.testing.assert_allclose(logits, model(np.array([context])).logits.asnumpy()[0, -1], atol=1e-5, rtol=0)


def test_sizes():
    cfg = Qwen2Config.from_preset("qwen2-0.5b")
    assert PagedKVCache.bytes_per_block(cfg, 16, "float32") == 2 * 24 * 16 * 2 * 64 * 4
    assert PagedKVCache.bytes_per_block(cfg, 16, "float16") == 2 * 24 * 16 * 2 * 64 * 2
    tiny = Qwen2Config(**BASE)
    cache = PagedKVCache(tiny, num_blocks=10, block_size=8, dtype="float16")
    assert cache.nbytes() == 11 * PagedKVCache.bytes_per_block(tiny, 8, "float16")  # + the scratch block
    assert cache.key_pools[0].shape == (11, 8, 2, 16) and cache.key_pools[0].dtype == ms.float16
