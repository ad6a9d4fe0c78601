"""Paged KV-cache ops: the CPU kernels (slot write, attention through block tables) against the reference."""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore import Parameter, Tensor, nn  # noqa: E402

from qwen2ms.ops import reference  # noqa: E402
from qwen2ms.ops.dispatch import get_ops  # noqa: E402

rng = np.random.default_rng(11)
TOL = {"float32": 2e-5, "float16": 4e-3}
BS = 4


def _t(a, dt="float32"):
    return Tensor(np.ascontiguousarray(a, np.float32)).astype(getattr(ms, dt))


def _np(t):
    return t.astype(ms.float32).asnumpy().astype(np.float64)


def _case(b, hq, hkv, t, d, positions, num_blocks=24, max_blocks=5, window=None, empty_rows=(), seed=0):
    """q, pools, shuffled block tables and the positions' mask; row i's queries sit at positions[i] - t + 1 .. [i]."""
    r = np.random.default_rng(seed)
    q = r.standard_normal((b, hq, t, d))
    k_pool = r.standard_normal((num_blocks, BS, hkv, d))
    v_pool = r.standard_normal((num_blocks, BS, hkv, d))
    tables = r.permutation(num_blocks)[:b * max_blocks].reshape(b, max_blocks).astype(np.int32)
    keys = np.arange(max_blocks * BS)
    q_pos = np.asarray(positions).reshape(b, 1) - (t - 1) + np.arange(t).reshape(1, t)  # [B, T]
    mask = keys.reshape(1, 1, -1) <= q_pos[..., None]
    if window is not None:
        mask &= keys.reshape(1, 1, -1) > q_pos[..., None] - window
    for i in empty_rows:
        mask[i] = False  # a padding row: the reference averages every key uniformly
    return q, k_pool, v_pool, tables, Tensor(mask.reshape(b, 1, t, -1))


CASES = {
    "decode-gqa-ragged": dict(b=4, hq=4, hkv=2, t=1, d=16, positions=[0, 6, 13, 19]),
    "decode-mha-padding-row": dict(b=3, hq=2, hkv=2, t=1, d=8, positions=[3, 9, 0], empty_rows=(2,)),
    "decode-group7": dict(b=2, hq=14, hkv=2, t=1, d=64, positions=[17, 2], seed=1),
    "decode-one-kv-head": dict(b=2, hq=6, hkv=1, t=1, d=12, positions=[11, 5], seed=2),
    "few-queries-window": dict(b=2, hq=4, hkv=2, t=3, d=16, positions=[10, 19], window=5, seed=3),
}


@pytest.mark.parametrize("dt", ["float32", "float16"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_paged_attention_kernel_equals_reference(dt, case):
    q, kp, vp, tables, mask = _case(**CASES[case])
    args = (_t(q, dt), _t(kp, dt), _t(vp, dt), Tensor(tables), mask, 0.3)
    got = get_ops("cpu").kernels.paged_attention(*args)
    assert got.shape == q.shape and got.dtype == getattr(ms, dt)
    want = reference.paged_attention(*args)
    np.testing.assert_allclose(_np(got), _np(want), atol=TOL[dt] * max(1.0, float(np.abs(_np(want)).max())))


def test_paged_attention_equals_attention_on_a_contiguous_cache():
    """Ground truth without the gather: each row's blocks copied out by hand into a contiguous cache."""
    q, kp, vp, tables, mask = _case(b=3, hq=4, hkv=2, t=1, d=16, positions=[5, 12, 19], seed=4)
    got = _np(get_ops("cpu").kernels.paged_attention(_t(q), _t(kp), _t(vp), Tensor(tables), mask, 0.25))
    k = np.stack([np.concatenate([kp[blk] for blk in row], 0) for row in tables]).transpose(0, 2, 1, 3)
    v = np.stack([np.concatenate([vp[blk] for blk in row], 0) for row in tables]).transpose(0, 2, 1, 3)
    want = _np(reference.attention(_t(q), _t(k), _t(v), mask, 0.25))
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_cpu_backend_prefill_takes_the_gather_path():
    """More than 16 query tokens: CpuOps gathers once and runs the blocked attention kernel; same result."""
    q, kp, vp, tables, mask = _case(b=1, hq=4, hkv=2, t=18, d=16, positions=[19], seed=5)
    args = (_t(q), _t(kp), _t(vp), Tensor(tables), mask, 0.25)
    got = get_ops("cpu").paged_attention(*args)
    np.testing.assert_allclose(_np(got), _np(reference.paged_attention(*args)), atol=2e-5)


def test_paged_attention_kernel_refuses_block_ids_outside_the_pool():
    q, kp, vp, tables, mask = _case(b=1, hq=2, hkv=1, t=1, d=8, positions=[3], num_blocks=6)
    tables[0, 0] = 6
    with pytest.raises(RuntimeError):
        get_ops("cpu").kernels.paged_attention(_t(q), _t(kp), _t(vp), Tensor(tables), mask, 0.25).asnumpy()


class _Write(nn.Cell):
    def __init__(self, impl, k_pool, v_pool):
        super().__init__()
        self.impl, self.k_pool, self.v_pool = impl, k_pool, v_pool

    def construct(self, key, value, slots):
        k, v = self.impl.paged_cache_write(self.k_pool, self.v_pool, key, value, slots)
        return k * 1, v * 1  # read after the write, inside the same graph


@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
@pytest.mark.parametrize("pool_dt,new_dt", [("float32", "float32"), ("float16", "float16"), ("float16", "float32")])
def test_paged_cache_write_kernel_equals_reference(compiled, pool_dt, new_dt):
    n, hkv, d, b, t = 7, 2, 8, 2, 3
    base = rng.standard_normal((n, BS, hkv, d))
    key, value = rng.standard_normal((b, hkv, t, d)), rng.standard_normal((b, hkv, t, d))
    slots = np.array([5, 6, 7, 25, 0, 13], np.int32)  # row 0 crosses a block boundary; blocks out of order
    results = []
    for backend in ("cpu", "reference"):
        tag = f"{backend}{compiled}{pool_dt}{new_dt}"
        pools = [Parameter(_t(base, pool_dt), name=f"{w}{tag}", requires_grad=False) for w in "kv"]
        step = _Write(get_ops(backend), *pools)
        if compiled:
            step = ms.jit(step)
        out = step(_t(key, new_dt), _t(value, new_dt), Tensor(slots))
        results.append([_np(x) for x in out] + [_np(p) for p in pools])
    want = _np(_t(base, pool_dt))
    for i, s in enumerate(slots):
        want[s // BS, s % BS] = _np(_t(key, new_dt)[i // t, :, i % t].astype(getattr(ms, pool_dt)))
    for got_cpu, got_ref in zip(*results):
        np.testing.assert_array_equal(got_cpu, got_ref)
    np.testing.assert_array_equal(results[0][0], want)  # the returned pool
    np.testing.assert_array_equal(results[0][2], want)  # the Parameter itself, written in place


# --- Ascend mapping (no Ascend hardware here: recording fakes implement the primitives' documented semantics) ---
class PagedFakePrims:
    """``ops.reshape_and_cache`` and ``ops.PagedAttention`` as documented for MindSpore 2.10, recording their calls,
    on top of test_ops_ascend's fakes (flash/incremental attention for the prefill path)."""

    def __init__(self):
        from test_ops_ascend import FakePrims

        self.base = FakePrims()
        self.calls = self.base.calls

    def __getattr__(self, name):
        return getattr(self.base, name)

    def reshape_and_cache(self, key, value, key_cache, value_cache, slot_mapping):
        self.calls.append(("reshape_and_cache", (key, value, key_cache, value_cache, slot_mapping), {}))
        n, h, d = key.shape
        assert key_cache.ndim == 4 and key_cache.shape[2:] == (h, d) and slot_mapping.shape == (n,)
        assert key.dtype == key_cache.dtype == value.dtype == value_cache.dtype and slot_mapping.dtype == ms.int32
        bs = key_cache.shape[1]
        for new, cache in ((key, key_cache), (value, value_cache)):
            arr = cache.asnumpy().copy()
            for i, slot in enumerate(slot_mapping.asnumpy()):
                arr[slot // bs, slot % bs] = new.asnumpy()[i]
            cache.set_data(Tensor(arr))  # in place, as the primitive writes the cache Parameters
        return key

    def PagedAttention(self, head_num, scale_value, kv_head_num, kv_cache_quant_mode="DEFAULT",
                       mask_mode="MASK_DEFAULT", mla_v_dim=0):
        calls = self.calls

        def run(query, key_cache, value_cache, block_tables, context_lens):
            calls.append(("PagedAttention", (query, key_cache, value_cache, block_tables, context_lens),
                          dict(head_num=head_num, scale_value=scale_value, kv_head_num=kv_head_num)))
            n, nh, d = query.shape
            assert nh == head_num and key_cache.shape[2] == kv_head_num and block_tables.dtype == ms.int32
            assert context_lens.dtype == ms.int32 and context_lens.shape == (n,)
            kc, vc, bt, lens = _np(key_cache), _np(value_cache), block_tables.asnumpy(), context_lens.asnumpy()
            bs, rep = kc.shape[1], head_num // kv_head_num
            out = np.zeros((n, nh, d))
            for i in range(n):  # token i attends to its sequence's keys [0, context_lens[i])
                pos = np.arange(lens[i])
                k = kc[bt[i, pos // bs], pos % bs]  # [L, Hkv, D]
                v = vc[bt[i, pos // bs], pos % bs]
                for h in range(nh):
                    s = _np(query)[i, h] @ k[:, h // rep].T * scale_value
                    p = np.exp(s - s.max())
                    out[i, h] = (p / p.sum()) @ v[:, h // rep]
            return Tensor(out.astype(np.float32)).astype(query.dtype)

        return run


def _pools(tag, base, dt):
    return [Parameter(_t(base, dt), name=f"{w}{tag}", requires_grad=False) for w in "kv"]


@pytest.mark.parametrize("dt", ["float16", "bfloat16"])
def test_ascend_decode_maps_to_reshape_and_cache_and_paged_attention(dt):
    from qwen2ms.ops.ascend import AscendOps

    fake = PagedFakePrims()
    impl = AscendOps(fake)
    b, hq, hkv, d, num_blocks = 3, 6, 2, 16, 12
    base = rng.standard_normal((num_blocks, BS, hkv, d))
    key, value, q = (rng.standard_normal((b, h, 1, d)) for h in (hkv, hkv, hq))
    tables = np.random.default_rng(4).permutation(num_blocks)[:b * 3].reshape(b, 3).astype(np.int32)
    positions = np.array([9, 0, 5])
    slots = (tables[np.arange(b), positions // BS] * BS + positions % BS).astype(np.int32)
    mask = Tensor((np.arange(3 * BS).reshape(1, -1) <= positions.reshape(-1, 1)).reshape(b, 1, 1, -1))
    ref_dt = "float32" if dt == "bfloat16" else dt  # bf16 matmuls do not run on CPU
    results = []
    for backend, run_dt in (("ascend", dt), ("reference", ref_dt)):
        kp, vp = _pools(backend + dt, base, dt)
        if backend == "reference":
            kp, vp = _pools("ref" + dt, _np(kp), ref_dt)
            ops_impl = get_ops("reference")
        else:
            ops_impl = impl
        k_pool, v_pool = ops_impl.paged_cache_write(kp, vp, _t(key, run_dt), _t(value, run_dt), Tensor(slots))
        results.append(ops_impl.paged_attention(_t(_np(_t(q, dt)), run_dt), k_pool, v_pool, Tensor(tables), mask,
                                                d ** -0.5))
    got, want = results
    assert got.shape == (b, hq, 1, d) and got.dtype == getattr(ms, dt)
    np.testing.assert_allclose(_np(got), _np(want), atol=3e-2 if dt == "bfloat16" else 3e-3)
    assert [c[0] for c in fake.calls] == ["reshape_and_cache", "PagedAttention"]
    k_new, _, _, _, slot_arg = fake.calls[0][1]
    assert k_new.shape == (b, hkv, d) and k_new.dtype == getattr(ms, dt)  # [B*T, Hkv, D] in the pool dtype
    assert slot_arg.asnumpy().tolist() == slots.tolist()
    query, _, _, table_arg, lens, = fake.calls[1][1]
    assert fake.calls[1][2] == dict(head_num=hq, scale_value=pytest.approx(d ** -0.5), kv_head_num=hkv)
    assert query.shape == (b, hq, d) and table_arg.asnumpy().tolist() == tables.tolist()
    assert lens.asnumpy().tolist() == (positions + 1).tolist()


def test_ascend_paged_prefill_and_float32_use_the_gather_path():
    from qwen2ms.ops.ascend import AscendOps

    fake = PagedFakePrims()
    impl = AscendOps(fake)
    q, kp, vp, tables, mask = _case(b=1, hq=4, hkv=2, t=3, d=16, positions=[9], seed=8)
    args = (_t(q, "float16"), _t(kp, "float16"), _t(vp, "float16"), Tensor(tables), mask, 0.25)
    np.testing.assert_allclose(_np(impl.paged_attention(*args)), _np(reference.paged_attention(*args)), atol=3e-3)
    assert [c[0] for c in fake.calls] == ["flash_attention_score"]  # gathered K/V through the fused attention
    fake.calls.clear()
    q, kp, vp, tables, mask = _case(b=2, hq=4, hkv=2, t=1, d=16, positions=[3, 7], seed=9)
    args = (_t(q), _t(kp), _t(vp), Tensor(tables), mask, 0.25)
    np.testing.assert_allclose(_np(impl.paged_attention(*args)), _np(reference.paged_attention(*args)), atol=1e-6)
    pools = _pools("f32asc", kp, "float32")
    impl.paged_cache_write(*pools, _t(q[:, :2]), _t(q[:, :2]), Tensor(np.array([0, 5], np.int32)))
    assert fake.calls == []  # float32 stays on the reference
