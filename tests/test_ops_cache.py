"""KV-cache writes: the CPU backend's in-place kernel against the reference select-and-assign update."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Parameter, Tensor, nn

from qwen2ms.ops.dispatch import get_ops

rng = np.random.default_rng(7)


def _caches(dtype, b=2, h=2, length=9, d=5, tag="", base=None):
    if base is None:
        base = rng.standard_normal((b, h, length, d)).astype(np.float32)
    mk = lambda name: Parameter(Tensor(base).astype(dtype), name=f"{name}{tag}", requires_grad=False)  # noqa: E731
    return (mk("k"), mk("v")), base


class _Step(nn.Cell):
    def __init__(self, impl, k_cache, v_cache):
        super().__init__()
        self.impl, self.k_cache, self.v_cache = impl, k_cache, v_cache

    def construct(self, key, value, start):
        k, v = self.impl.cache_update(self.k_cache, self.v_cache, key, value, start)
        return k * 1, v * 1  # read after the write, inside the same graph


@pytest.mark.parametrize("compiled", [False, True], ids=["pynative", "jit"])
@pytest.mark.parametrize("cache_dt,new_dt", [(ms.float32, ms.float32), (ms.float16, ms.float16),
                                             (ms.float32, ms.float16)])
@pytest.mark.parametrize("t,start", [(1, 0), (1, 8), (3, 4), (4, 7)])  # (4, 7): two rows fall past the end
def test_cpu_cache_update_equals_reference(compiled, cache_dt, new_dt, t, start):
    tag = f"{compiled}{cache_dt}{new_dt}{t}{start}"
    results = []
    start_base = rng.standard_normal((2, 2, 9, 5)).astype(np.float32)
    key = rng.standard_normal((2, 2, t, 5)).astype(np.float32)
    value = rng.standard_normal((2, 2, t, 5)).astype(np.float32)
    for backend in ("cpu", "reference"):
        (kc, vc), base = _caches(cache_dt, tag=backend + tag, base=start_base)
        step = _Step(get_ops(backend), kc, vc)
        if compiled:
            step = ms.jit(step)
        k_out, v_out = step(Tensor(key).astype(new_dt), Tensor(value).astype(new_dt), Tensor(start, ms.int32))
        results.append((k_out.asnumpy(), v_out.asnumpy(), kc.asnumpy(), vc.asnumpy(), base))
    (ck, cv, cpk, cpv, base), (rk, rv, rpk, rpv, _) = results
    want_k = Tensor(base).astype(cache_dt).astype(ms.float32).asnumpy()
    for i in range(t):
        if start + i < want_k.shape[2]:
            want_k[:, :, start + i] = key[:, :, i]
    tol = 1e-3 if ms.float16 in (cache_dt, new_dt) else 0
    np.testing.assert_allclose(rk.astype(np.float32), want_k, atol=tol)
    for got, want in ((ck, rk), (cv, rv), (cpk, rpk), (cpv, rpv)):
        np.testing.assert_array_equal(got, want)  # same bits as the reference, returned and stored


def test_cpu_cache_update_in_a_reused_graph_accumulates_tokens():
    (kc, vc), _ = _caches(ms.float32, b=1, h=1, length=6, d=3, tag="reuse")
    kc.set_data(Tensor(np.zeros((1, 1, 6, 3), np.float32)))
    step = ms.jit(_Step(get_ops("cpu"), kc, vc))
    for pos in range(4):
        new = Tensor(np.full((1, 1, 1, 3), pos + 1, np.float32))
        k_out, _ = step(new, new, Tensor(pos, ms.int32))
    np.testing.assert_array_equal(k_out.asnumpy()[0, 0, :, 0], [1, 2, 3, 4, 0, 0])
    np.testing.assert_array_equal(kc.asnumpy()[0, 0, :, 0], [1, 2, 3, 4, 0, 0])
