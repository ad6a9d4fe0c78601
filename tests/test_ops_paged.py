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
