"""Bad arguments to the paged KV cache and its runner: each is a ValueError naming the argument, before any compile."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

ms = pytest.importorskip("mindspore")

from qwen2ms import Qwen2Config  # noqa: E402
from qwen2ms.modeling import Qwen2ForCausalLM  # noqa: E402
from qwen2ms.modeling.paged import PagedKVCache, PagedModelRunner  # noqa: E402

CFG = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def runner():
    cfg = Qwen2Config(**CFG)
    # max_model_len 30 with blocks of 4: tables hold up to 8 blocks; ids 0..9 are valid.
    return PagedModelRunner(Qwen2ForCausalLM(cfg), PagedKVCache(cfg, num_blocks=10, block_size=4), max_num_seqs=4,
                            max_model_len=30)


@pytest.mark.parametrize("call, match", [
    (lambda r: r.decode([5], [30], [[0] * 8]), r"positions\[0\] = 30 is outside \[0, max_model_len=30\)"),
    (lambda r: r.decode([5, 6], [3, -1], [[0], [1]]), r"positions\[1\] = -1"),
    (lambda r: r.decode([5, 6], [3, 9], [[0], [1, 2]]), r"block_tables\[1\] has 2 blocks but position 9 needs 3"),
    (lambda r: r.decode([5], [3], [[10]]), r"block_tables\[0\] holds block id 10, outside \[0, num_blocks=10\)"),
    (lambda r: r.decode([5], [3], [[-1]]), r"block_tables\[0\] holds block id -1"),
    (lambda r: r.decode([5], [3], [[0] * 9]), r"block_tables\[0\] has 9 blocks, more than max_model_len"),
    (lambda r: r.decode([5], [3], [[0.5]]), r"block_tables\[0\] must be a flat list of integer block ids"),
    (lambda r: r.decode([128], [3], [[0]]), r"tokens must lie in \[0, vocab_size=128\)"),
    (lambda r: r.decode([], [], []), r"decode takes 1 to max_num_seqs=4 tokens, got 0"),
    (lambda r: r.decode([1] * 5, [0] * 5, [[i] for i in range(5)]), r"max_num_seqs=4 tokens, got 5"),
    (lambda r: r.decode([1, 2], [0], [[0], [1]]), r"one entry per sequence, got lengths 2, 1, 2"),
    (lambda r: r.decode([1, 2], [5, 5], [[3, 4], [0, 4]]), r"write the same KV slot"),
    (lambda r: r.decode([1], ["3"], [[0]]), r"positions must be a list of integers"),
    (lambda r: r.prefill([], 0, [0]), r"token_ids must hold at least one token"),
    (lambda r: r.prefill([1, 2], -1, [0]), r"start must be an integer >= 0, got -1"),
    (lambda r: r.prefill([1] * 5, 26, [0] * 8), r"start 26 \+ 5 token_ids reaches position 30, beyond max_model_len 30"),
    (lambda r: r.prefill([1] * 5, 0, [0]), r"block_table has 1 blocks but position 4 needs 2"),
    (lambda r: r.prefill([1] * 3, 0, [99]), r"block_table holds block id 99"),
    (lambda r: r.prefill([[1, 2]], 0, [0]), r"token_ids must be a flat list of integer token ids"),
    (lambda r: r.prefill([1, -2], 0, [0]), r"token_ids must lie in \[0, vocab_size=128\)"),
])
def test_bad_runner_arguments(runner, call, match):
    with pytest.raises(ValueError, match=match):
        call(runner)
    assert runner._step is None  # refused before anything was compiled or written


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-3, 40), min_size=1, max_size=4), st.integers(0, 29))
def test_fuzzed_tables_are_refused_or_valid(runner, table, position):
    """Any table either passes validation (enough blocks, ids in range) or raises a ValueError naming it."""
    need = position // 4 + 1
    ok = len(table) >= need and len(table) <= 8 and all(0 <= b < 10 for b in table)
    if ok:
        assert runner._table(table, position, "block_tables[0]").tolist() == table
    else:
        with pytest.raises(ValueError, match=r"block_tables\[0\]"):
            runner._table(table, position, "block_tables[0]")


def test_bad_construction():
    cfg = Qwen2Config(**CFG)
    model = Qwen2ForCausalLM(cfg)
    cache = PagedKVCache(cfg, num_blocks=4, block_size=4)
    for kwargs, match in (
            (dict(num_blocks=0), "num_blocks must be a positive integer, got 0"),
            (dict(num_blocks=4, block_size=2.5), "block_size must be a positive integer"),
            (dict(num_blocks=True), "num_blocks must be a positive integer, got True"),
            (dict(num_blocks=4, dtype="bfloat16"), "bfloat16 paged KV cache cannot be written on CPU")):
        with pytest.raises(ValueError, match=match):
            PagedKVCache(cfg, **kwargs)
    with pytest.raises(ValueError, match="max_model_len 65 exceeds the model's max_position_embeddings 64"):
        PagedModelRunner(model, cache, max_num_seqs=2, max_model_len=65)
    with pytest.raises(ValueError, match="max_num_seqs must be a positive integer, got 0"):
        PagedModelRunner(model, cache, max_num_seqs=0, max_model_len=16)
    with pytest.raises(ValueError, match="cache must be a qwen2ms PagedKVCache, got KVCache"):
        PagedModelRunner(model, model.new_cache(1, 8), max_num_seqs=2, max_model_len=16)
    other = PagedKVCache(Qwen2Config(**dict(CFG, num_hidden_layers=3)), num_blocks=4)
    with pytest.raises(ValueError, match="cache was built for 3 layers"):
        PagedModelRunner(model, other, max_num_seqs=2, max_model_len=16)
    dyn = Qwen2ForCausalLM(Qwen2Config(**dict(CFG, rope_scaling={"rope_type": "dynamic", "factor": 2.0})))
    with pytest.raises(ValueError, match="dynamic-NTK RoPE"):
        PagedModelRunner(dyn, cache, max_num_seqs=2, max_model_len=16)
    assert np.all(np.asarray(cache.key_pools[0].asnumpy()) == 0)


def test_sliding_window_model_on_the_ascend_backend_is_refused():
    from qwen2ms.ops.ascend import AscendOps

    cfg = Qwen2Config(**dict(CFG, use_sliding_window=True, sliding_window=8, max_window_layers=1))
    model = Qwen2ForCausalLM(cfg)
    assert model.model.has_sliding
    model.ops_impl = AscendOps(prims=object())  # only its name is read: nothing runs
    with pytest.raises(ValueError, match="sliding-window attention layers cannot be served .* 'ascend'"):
        PagedModelRunner(model, PagedKVCache(cfg, num_blocks=4), max_num_seqs=2, max_model_len=16)
