"""Static KV cache: cached prefill + decode equals a full recompute, and the compiled decode step is reused."""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from qwen2ms import Qwen2Config  # noqa: E402
from qwen2ms.modeling import KVCache, Qwen2ForCausalLM  # noqa: E402

TOL = 1e-4


def tiny(moe=False, dtype=None, **kw):
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    if moe:
        base.update(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                    shared_expert_intermediate_size=24)
    base.update(kw)
    return Qwen2ForCausalLM(Qwen2Config(**base), dtype=dtype, seed=7)


def left_padded(lengths, t, seed=0, vocab=128):
    ids = np.random.default_rng(seed).integers(1, vocab, (len(lengths), t))
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, t - n:] = 1
        ids[r, : t - n] = 0
    return ids, mask


def greedy_cached(model, ids, mask, new, jit):
    """Prefill then decode ``new`` tokens; returns per-step logits and the full token matrix."""
    b, t = ids.shape
    cache = model.new_cache(b, t + new)
    full_mask = np.zeros((b, t + new), np.int32)
    full_mask[:, :t] = mask
    run = model.forward_step if jit else (lambda i, m, p, c, s, k=0: model(i, m, p, cache=c, cache_position=s,
                                                                           logits_to_keep=k).logits)
    logits = run(ids, full_mask, None, cache, 0, 1).asnumpy()[:, -1]
    steps = [logits]
    tokens = ids
    for i in range(new):
        nxt = logits.argmax(-1).reshape(b, 1)
        tokens = np.concatenate([tokens, nxt], 1)
        full_mask[:, t + i] = 1
        pos = full_mask.sum(1, keepdims=True) - 1
        logits = run(nxt, full_mask, pos, cache, ms.Tensor(t + i, ms.int32)).asnumpy()[:, -1]
        steps.append(logits)
    return steps, tokens, full_mask


@pytest.mark.parametrize("moe,jit", [(False, False), (False, True), (True, True)])
def test_cached_decode_equals_full_recompute(moe, jit):
    model = tiny(moe)
    ids, mask = left_padded([6, 3], 6)
    steps, tokens, full_mask = greedy_cached(model, ids, mask, 4, jit)
    t = ids.shape[1]
    for i, logits in enumerate(steps):
        n = t + i
        ref = model(tokens[:, :n], attention_mask=full_mask[:, :n]).logits.asnumpy()[:, -1]
        assert np.abs(logits - ref).max() <= TOL, f"step {i}"


def test_float16_cache_decode():
    model = tiny(dtype="float16")
    ids, mask = left_padded([5, 2], 5, seed=3)
    steps, tokens, full_mask = greedy_cached(model, ids, mask, 2, jit=False)
    assert model.new_cache(1, 4).keys[0].dtype == ms.float16
    for i, logits in enumerate(steps):
        n = 5 + i
        ref = model(tokens[:, :n], attention_mask=full_mask[:, :n]).logits.asnumpy()[:, -1]
        assert np.isfinite(logits).all() and np.abs(logits - ref).max() <= 1e-2


def test_sliding_window_with_cache():
    model = tiny(use_sliding_window=True, sliding_window=3, max_window_layers=1)
    assert model.model.has_sliding
    ids, mask = left_padded([7, 7], 7, seed=2)
    steps, tokens, full_mask = greedy_cached(model, ids, mask, 3, jit=True)
    for i, logits in enumerate(steps):
        n = 7 + i
        ref = model(tokens[:, :n], attention_mask=full_mask[:, :n]).logits.asnumpy()[:, -1]
        assert np.abs(logits - ref).max() <= TOL


def test_decode_step_compiles_once_and_is_reused():
    from mindspore.graph import api as ms_api

    model = tiny()
    cache = model.new_cache(1, 16)
    mask = np.ones((1, 16), np.int32)
    first = model.forward_step(np.array([[5, 6, 7]]), mask, None, cache, 0, 1).asnumpy()  # prefill graph
    dec = model.forward_step(np.array([[9]]), mask, np.array([[3]]), cache, ms.Tensor(3, ms.int32)).asnumpy()
    graphs = len(ms_api.ms_compile_cache)
    steps = dict(cache.__dict__["_compiled_steps"])
    for pos in range(4, 9):
        model.forward_step(np.array([[pos]]), mask, np.array([[pos]]), cache, ms.Tensor(pos, ms.int32))
    assert len(ms_api.ms_compile_cache) == graphs  # five more tokens, no new graph
    assert cache.__dict__["_compiled_steps"] == steps
    k = cache.keys[0].asnumpy()[0]
    assert np.abs(k[:, :9]).sum(-1).min() > 0 and np.abs(k[:, 9:]).max() == 0
    # a reset cache serves a new request through the same compiled graphs
    cache.reset()
    assert np.abs(cache.keys[0].asnumpy()).max() == 0
    np.testing.assert_array_equal(model.forward_step(np.array([[5, 6, 7]]), mask, None, cache, 0, 1).asnumpy(), first)
    again = model.forward_step(np.array([[9]]), mask, np.array([[3]]), cache, ms.Tensor(3, ms.int32)).asnumpy()
    np.testing.assert_array_equal(again, dec)
    assert len(ms_api.ms_compile_cache) == graphs


def test_chunked_prefill_equals_one_prefill():
    model = tiny()
    ids, mask = left_padded([7, 4], 7, seed=5)
    one = model.new_cache(2, 10)
    full = model(ids, attention_mask=mask, cache=one, cache_position=0).logits.asnumpy()
    two = model.new_cache(2, 10)
    first = model(ids[:, :3], attention_mask=mask, cache=two, cache_position=0).logits.asnumpy()
    second = model(ids[:, 3:], attention_mask=mask, cache=two, cache_position=3).logits.asnumpy()
    keep = mask.astype(bool)
    assert np.abs(np.concatenate([first, second], 1)[keep] - full[keep]).max() <= TOL
    # real tokens' keys agree (padding slots hold padding garbage, which depends on the chunking)
    k1, k2 = one.keys[1].asnumpy()[:, :, :7], two.keys[1].asnumpy()[:, :, :7]
    np.testing.assert_allclose(k2.transpose(0, 2, 1, 3)[keep], k1.transpose(0, 2, 1, 3)[keep], atol=1e-5)


def test_cache_written_slots_and_reset():
    model = tiny()
    cache = model.new_cache(1, 8)
    model(np.array([[3, 4, 5]]), cache=cache, cache_position=0)
    k = cache.keys[1].asnumpy()
    assert np.abs(k[:, :, :3]).max() > 0 and np.abs(k[:, :, 3:]).max() == 0
    cache.reset()
    assert np.abs(cache.keys[1].asnumpy()).max() == 0
    assert cache.nbytes() == 2 * 2 * (1 * 2 * 8 * 8) * 4


def test_cache_errors():
    model = tiny()
    cfg = model.config
    with pytest.raises(ValueError, match="batch_size"):
        KVCache(cfg, 0, 8)
    with pytest.raises(ValueError, match="max_length"):
        KVCache(cfg, 1, -3)
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="exceeds the cache"):
        model(np.array([[1, 2, 3]]), cache=cache, cache_position=2)
    with pytest.raises(ValueError, match="batch_size=1"):
        model(np.array([[1], [2]]), cache=cache, cache_position=0)
    with pytest.raises(ValueError, match="segment_ids"):
        model(np.array([[1]]), segment_ids=np.array([[0]]), cache=cache, cache_position=0)
    with pytest.raises(ValueError, match="max_length"):
        model(np.array([[1]]), attention_mask=np.ones((1, 9)), cache=cache, cache_position=0)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        model.new_cache(1, 65)
    with pytest.raises(ValueError, match="bfloat16 KV cache"):
        model.new_cache(1, 8, dtype="bfloat16")
    with pytest.raises(ValueError, match="KVCache"):
        model(np.array([[1]]), cache=object(), cache_position=0)
