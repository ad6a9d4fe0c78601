"""The CPU C++ kernels against NumPy references: fp32/fp16/bf16, odd shapes, gradients, jit, build cache."""
import os
import re
from pathlib import Path

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore import Tensor, ops  # noqa: E402

from qwen2ms.ops import cpu  # noqa: E402
from qwen2ms.ops.cpu import CpuKernels, KernelBuildError, QuantizedWeight, build_kernels, quantize_int8  # noqa: E402

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
# Tolerance relative to the output's scale: one or two roundings in the low-precision dtype.
TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}


@pytest.fixture(scope="module")
def kernels(kernel_library):
    return CpuKernels(kernel_library())


def _t(a, dt="float32"):
    return Tensor(np.ascontiguousarray(a, np.float32)).astype(DTYPES[dt])


def _np(t):
    return t.astype(ms.float32).asnumpy().astype(np.float64)


def _rounded(a, dt):
    """The values the kernel actually sees after the input is stored in dtype dt."""
    return _np(_t(a, dt))


def _close(got, want, dt):
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= TOL[dt] * scale, f"{dt}: max error {err} > {TOL[dt] * scale}"


rng = np.random.default_rng(1234)


def _rms_ref(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape", [(1, 7), (3, 33), (2, 5, 896), (1, 4864)])
def test_rms_norm_matches_numpy(kernels, dt, shape):
    x = rng.standard_normal(shape) * 3
    w = rng.standard_normal(shape[-1])
    y = kernels.rms_norm(_t(x, dt), _t(w, dt), 1e-6)
    assert y.dtype == DTYPES[dt] and y.shape == shape
    _close(_np(y), _rms_ref(_rounded(x, dt), _rounded(w, dt), 1e-6), dt)


@pytest.mark.parametrize("dt", list(DTYPES))
def test_add_rms_norm_returns_norm_and_sum(kernels, dt):
    x, r = rng.standard_normal((4, 33)), rng.standard_normal((4, 33))
    w = rng.standard_normal(33)
    y, s = kernels.add_rms_norm(_t(x, dt), _t(r, dt), _t(w, dt), 1e-5)
    want_s = _rounded(x, dt) + _rounded(r, dt)
    _close(_np(s), want_s, dt)
    _close(_np(y), _rms_ref(_rounded(want_s, dt), _rounded(w, dt), 1e-5), dt)


def _rope_ref(x, cos, sin, layout):
    """HF rotate-half convention; cos/sin broadcast as [B|1, S, D]."""
    if cos.ndim == 2:
        cos, sin = cos[None], sin[None]
    c = cos[:, None] if layout == "BNSD" else cos[:, :, None]
    s = sin[:, None] if layout == "BNSD" else sin[:, :, None]
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * c + rot * s


def _cos_sin(b, s, d, batched):
    pos = np.arange(s)[None, :] + (np.arange(b)[:, None] * 3 if batched else 0)
    inv = 1.0 / (10000 ** (np.arange(0, d, 2) / d))
    ang = pos[..., None] * inv
    emb = np.concatenate([ang, ang], -1)
    return (np.cos(emb), np.sin(emb)) if batched else (np.cos(emb[0]), np.sin(emb[0]))


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("layout", ["BNSD", "BSND"])
@pytest.mark.parametrize("batched_cos", [False, True])
def test_rope_matches_numpy(kernels, dt, layout, batched_cos):
    b, nq, nk, s, d = 2, 3, 1, 5, 16
    qs = (b, nq, s, d) if layout == "BNSD" else (b, s, nq, d)
    ks = (b, nk, s, d) if layout == "BNSD" else (b, s, nk, d)
    q, k = rng.standard_normal(qs), rng.standard_normal(ks)
    cos, sin = _cos_sin(b, s, d, batched_cos)
    qo, ko = kernels.apply_rope(_t(q, dt), _t(k, dt), _t(cos, dt), _t(sin, dt), layout=layout)
    assert qo.shape == qs and ko.shape == ks and qo.dtype == DTYPES[dt]
    c, sn = _rounded(cos, dt), _rounded(sin, dt)
    _close(_np(qo), _rope_ref(_rounded(q, dt), c, sn, layout), dt)
    _close(_np(ko), _rope_ref(_rounded(k, dt), c, sn, layout), dt)


def test_rope_rejects_unknown_layout(kernels):
    x = _t(np.zeros((1, 1, 1, 4)))
    with pytest.raises(ValueError, match="BNSD"):
        kernels.apply_rope(x, x, _t(np.zeros((1, 4))), _t(np.zeros((1, 4))), layout="SBH")


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("shape", [(7,), (3, 33), (2, 4864)])
def test_swiglu_matches_numpy(kernels, dt, shape):
    g, u = rng.standard_normal(shape) * 2, rng.standard_normal(shape)
    y = kernels.swiglu(_t(g, dt), _t(u, dt))
    gg, uu = _rounded(g, dt), _rounded(u, dt)
    _close(_np(y), gg / (1 + np.exp(-gg)) * uu, dt)


@pytest.mark.parametrize("xdt", list(DTYPES))
@pytest.mark.parametrize("wdt", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
def test_linear_matches_numpy(kernels, xdt, wdt, m):
    n, k = 45, 33
    x = rng.standard_normal((m, k))
    w = rng.standard_normal((n, k)) * 0.2
    b = rng.standard_normal(n)
    if wdt == "int8":
        qw = quantize_int8(w)
        w_eff = qw.q.astype(np.float64) * qw.scale[:, None]
        y = kernels.linear(_t(x, xdt), QuantizedWeight(Tensor(qw.q), Tensor(qw.scale)), _t(b, xdt))
        tol_dt = xdt
    else:
        w_eff = _rounded(w, wdt)
        y = kernels.linear(_t(x, xdt), _t(w, wdt), _t(b, xdt))
        tol_dt = xdt if wdt == "float32" else ("float16" if xdt == "float32" else xdt)
    assert y.shape == (m, n) and y.dtype == DTYPES[xdt]
    _close(_np(y), _rounded(x, xdt) @ w_eff.T + _rounded(b, xdt), tol_dt)


def test_linear_real_shapes_and_leading_dims(kernels):
    x = rng.standard_normal((2, 3, 896))
    w = rng.standard_normal((4864, 896)) * 0.05
    y = kernels.linear(_t(x), _t(w, "bfloat16"))
    assert y.shape == (2, 3, 4864)
    _close(_np(y), x @ _rounded(w, "bfloat16").T, "float32")
    w2 = rng.standard_normal((896, 4864)) * 0.05
    qw = quantize_int8(w2)
    y2 = kernels.linear_int8(_t(rng.standard_normal((1, 4864))), Tensor(qw.q), Tensor(qw.scale))
    assert y2.shape == (1, 896)


def test_quantize_int8_error_is_within_half_a_step():
    w = rng.standard_normal((9, 33)).astype(np.float32)
    w[3] = 0.0
    qw = quantize_int8(w)
    assert qw.q.dtype == np.int8 and qw.scale.dtype == np.float32 and qw.shape == (9, 33)
    err = np.abs(qw.q * qw.scale[:, None] - w)
    assert np.all(err <= qw.scale[:, None] / 2 + 1e-7)
    assert np.abs(qw.q).max() == 127 and qw.scale[3] == 1.0
    with pytest.raises(ValueError, match="matrix"):
        quantize_int8(np.zeros(3))


@pytest.mark.parametrize("k", [16, 40, 100])
@pytest.mark.parametrize("m", [1, 4, 8, 11])
def test_linear_vector_steps_and_tails(kernels, k, m):
    """K a whole number of 16-wide steps, or steps plus a tail (the bf16 even/odd split covers only whole
    steps); N not a multiple of the four rows walked together; 8-row blocks of x plus a remainder."""
    n = 14
    x, w, b = rng.standard_normal((m, k)), rng.standard_normal((n, k)) * 0.2, rng.standard_normal(n)
    for wdt in ("float32", "bfloat16", "float16"):
        y = kernels.linear(_t(x), _t(w, wdt), _t(b))
        _close(_np(y), x @ _rounded(w, wdt).T + b, "float32")
    qw = quantize_int8(w)
    y = kernels.linear(_t(x), QuantizedWeight(Tensor(qw.q), Tensor(qw.scale)))
    _close(_np(y), x @ (qw.q * qw.scale[:, None].astype(np.float64)).T, "float32")


@pytest.mark.parametrize("xdt", ["float32", "bfloat16"])
@pytest.mark.parametrize("m", [1, 3, 8, 9])
@pytest.mark.parametrize("k, group", [(64, 32), (96, 32), (256, 128)])
def test_int8_group_scales_match_numpy(kernels, xdt, m, k, group):
    n = 13
    x, w, b = rng.standard_normal((m, k)), rng.standard_normal((n, k)) * 0.2, rng.standard_normal(n)
    w[:, :group] *= 20.0  # one group with much larger values: its own scale keeps the rest precise
    qw = quantize_int8(w, group_size=group)
    assert qw.scale.shape == (n, k // group)
    w_eff = (qw.q.reshape(n, k // group, group) * qw.scale[:, :, None].astype(np.float64)).reshape(n, k)
    y = kernels.linear(_t(x, xdt), QuantizedWeight(Tensor(qw.q), Tensor(qw.scale)), _t(b, xdt))
    assert y.shape == (m, n) and y.dtype == DTYPES[xdt]
    _close(_np(y), _rounded(x, xdt) @ w_eff.T + _rounded(b, xdt), xdt)
    y2 = kernels.linear_int8(_t(x, xdt), Tensor(qw.q), Tensor(qw.scale))
    _close(_np(y2), _rounded(x, xdt) @ w_eff.T, xdt)


def test_quantize_int8_groups_error_and_validation():
    w = rng.standard_normal((5, 128)).astype(np.float32)
    w[:, 64:96] *= 50.0
    w[2, :32] = 0.0
    qw = quantize_int8(w, group_size=32)
    assert qw.q.dtype == np.int8 and qw.scale.dtype == np.float32 and qw.scale.shape == (5, 4)
    step = np.repeat(qw.scale, 32, axis=1)
    err = np.abs(qw.q * step - w)
    assert np.all(err <= step / 2 + 1e-6)
    assert qw.scale[2, 0] == 1.0
    # Groups beat one scale per row when the magnitudes differ along K.
    per_row = quantize_int8(w)
    assert np.abs(per_row.q * per_row.scale[:, None] - w)[:, :64].max() > 4 * err[:, :64].max()
    np.testing.assert_array_equal(quantize_int8(w, group_size=128).q, per_row.q)  # one group = per channel
    assert quantize_int8(w, group_size=128).scale.shape == (5,)
    for bad in (48, 0, -32, 256):
        with pytest.raises(ValueError, match="group_size"):
            quantize_int8(w, group_size=bad)


def test_kernel_rejects_groups_that_are_not_whole_vector_steps(kernels):
    # Scales [N, G] whose group K // G is not a multiple of 32 have no kernel path: the op fails, it does
    # not compute with the wrong groups.
    q = Tensor(np.ones((4, 48), np.int8))
    with pytest.raises(RuntimeError):
        kernels.linear_int8(_t(np.ones((1, 48))), q, Tensor(np.ones((4, 3), np.float32))).asnumpy()


def test_grouped_int8_reference_and_gradient_match(kernels):
    from qwen2ms.ops.dispatch import ReferenceOps

    x, w = rng.standard_normal((3, 64)), rng.standard_normal((10, 64))
    qw = quantize_int8(w, group_size=32)
    q, s = Tensor(qw.q), Tensor(qw.scale)
    w_eff = (qw.q.reshape(10, 2, 32) * qw.scale[:, :, None].astype(np.float64)).reshape(10, 64)
    ref = ReferenceOps()
    ref.quantize_activations = False
    _close(_np(ref.linear(_t(x), q, None, s)), x @ w_eff.T, "float32")
    np.testing.assert_allclose(_np(cpu.dequantize_int8(q, s)), w_eff, rtol=1e-6)
    p = rng.standard_normal((3, 10))
    got = ms.grad(lambda a: (kernels.linear_int8(a, q, s) * _t(p)).sum())(_t(x))
    _close(_np(got), p @ w_eff, "float32")


# ----------------------------------------------------------------------------------------------------------
# Gradients against MindSpore autodiff of a plain-ops reference.

def _ref_rms(x, w, eps):
    return x * ops.rsqrt((x * x).mean(-1, keep_dims=True) + eps) * w


def _grads(fn, args, argnums):
    return [g.asnumpy() for g in ms.grad(fn, argnums)(*args)]


def _assert_grads(a, b, tol=1e-4):
    for ga, gb in zip(a, b):
        np.testing.assert_allclose(ga, gb, rtol=tol, atol=tol)


def test_rms_norm_and_add_rms_norm_gradients(kernels):
    x, r = _t(rng.standard_normal((3, 33))), _t(rng.standard_normal((3, 33)))
    w = _t(rng.standard_normal(33))
    proj = _t(rng.standard_normal((3, 33)))
    _assert_grads(_grads(lambda x, w: (kernels.rms_norm(x, w, 1e-6) * proj).sum(), (x, w), (0, 1)),
                  _grads(lambda x, w: (_ref_rms(x, w, 1e-6) * proj).sum(), (x, w), (0, 1)))

    def ours(x, r, w):
        y, s = kernels.add_rms_norm(x, r, w, 1e-6)
        return (y * proj).sum() + (s * s * proj).sum()

    def ref(x, r, w):
        s = x + r
        return (_ref_rms(s, w, 1e-6) * proj).sum() + (s * s * proj).sum()

    _assert_grads(_grads(ours, (x, r, w), (0, 1, 2)), _grads(ref, (x, r, w), (0, 1, 2)))


@pytest.mark.parametrize("layout", ["BNSD", "BSND"])
def test_rope_gradient(kernels, layout):
    qs, ks = ((2, 3, 4, 8), (2, 1, 4, 8)) if layout == "BNSD" else ((2, 4, 3, 8), (2, 4, 1, 8))
    q, k = _t(rng.standard_normal(qs)), _t(rng.standard_normal(ks))
    cos_np, sin_np = _cos_sin(2, 4, 8, True)
    cos, sin = _t(cos_np), _t(sin_np)
    pq, pk = _t(rng.standard_normal(qs)), _t(rng.standard_normal(ks))
    c4 = ops.expand_dims(cos, 1 if layout == "BNSD" else 2)
    s4 = ops.expand_dims(sin, 1 if layout == "BNSD" else 2)

    def rot(x):
        h = x.shape[-1] // 2
        return ops.concat((-x[..., h:], x[..., :h]), -1)

    def ours(q, k):
        qo, ko = kernels.apply_rope(q, k, cos, sin, layout=layout)
        return (qo * pq).sum() + (ko * pk).sum()

    def ref(q, k):
        return ((q * c4 + rot(q) * s4) * pq).sum() + ((k * c4 + rot(k) * s4) * pk).sum()

    _assert_grads(_grads(ours, (q, k), (0, 1)), _grads(ref, (q, k), (0, 1)))


def test_swiglu_gradient(kernels):
    g, u, p = (_t(rng.standard_normal((5, 33))) for _ in range(3))
    _assert_grads(_grads(lambda g, u: (kernels.swiglu(g, u) * p).sum(), (g, u), (0, 1)),
                  _grads(lambda g, u: (ops.silu(g) * u * p).sum(), (g, u), (0, 1)))


def test_linear_gradients_fp32_and_int8(kernels):
    x = _t(rng.standard_normal((2, 3, 33)))
    w, b = _t(rng.standard_normal((7, 33))), _t(rng.standard_normal(7))
    p = _t(rng.standard_normal((2, 3, 7)))
    _assert_grads(_grads(lambda x, w, b: (kernels.linear(x, w, b) * p).sum(), (x, w, b), (0, 1, 2)),
                  _grads(lambda x, w, b: ((ops.matmul(x, w.T) + b) * p).sum(), (x, w, b), (0, 1, 2)))
    qw = quantize_int8(w.asnumpy())
    wq = Tensor(qw.q.astype(np.float32) * qw.scale[:, None])
    got = ms.grad(lambda x: (kernels.linear_int8(x, Tensor(qw.q), Tensor(qw.scale), b) * p).sum())(x)
    want = ms.grad(lambda x: ((ops.matmul(x, wq.T) + b) * p).sum())(x)
    np.testing.assert_allclose(got.asnumpy(), want.asnumpy(), rtol=1e-5, atol=1e-5)


def test_kernels_under_jit_equal_pynative(kernels):
    x = _t(rng.standard_normal((1, 4, 32)))
    w_norm = _t(rng.standard_normal(32))
    wg, wu = _t(rng.standard_normal((48, 32)), "bfloat16"), _t(rng.standard_normal((48, 32)), "bfloat16")
    qd = quantize_int8(rng.standard_normal((32, 48)))
    dq, ds = Tensor(qd.q), Tensor(qd.scale)

    def block(x):
        h = kernels.rms_norm(x, w_norm, 1e-6)
        a = kernels.swiglu(kernels.linear(h, wg), kernels.linear(h, wu))
        return kernels.add_rms_norm(kernels.linear_int8(a, dq, ds), x, w_norm, 1e-6)

    eager = block(x)
    jitted = ms.jit(block)(x)
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(a.asnumpy(), b.asnumpy(), rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Building the library.

def test_build_is_cached_by_source_hash(tmp_path):
    flags = cpu.compiler_flags() + ["-O0"]  # what is checked is the cache, not the code: the fastest build
    lib = build_kernels(cache_dir=tmp_path, flags=flags)
    assert lib.is_file() and lib.parent.parent == tmp_path.resolve()
    mtime = lib.stat().st_mtime_ns
    assert build_kernels(cache_dir=tmp_path, flags=flags) == lib
    assert lib.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert not [p for p in lib.parent.iterdir() if p.name.startswith(".build-")]


def test_cache_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("QWEN2MS_KERNEL_CACHE", str(tmp_path / "kc"))
    assert cpu.kernel_cache_dir() == tmp_path / "kc"
    monkeypatch.delenv("QWEN2MS_KERNEL_CACHE")
    assert cpu.kernel_cache_dir() == Path.home() / ".cache" / "qwen2ms" / "kernels"


def test_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "find_compiler", lambda: None)
    with pytest.raises(KernelBuildError, match="QWEN2MS_OPS_BACKEND=reference"):
        build_kernels(cache_dir=tmp_path)


def test_failing_compiler_reports_and_leaves_no_file(tmp_path):
    false = "/bin/false" if os.path.exists("/bin/false") else "/usr/bin/false"
    with pytest.raises(KernelBuildError, match="failed"):
        build_kernels(cxx=false, cache_dir=tmp_path)
    assert not list(tmp_path.rglob("*.so"))


def test_compiler_flags_follow_cpu_features():
    assert {"-mavx2", "-mfma", "-mf16c"} <= set(cpu.compiler_flags({"avx2", "fma", "f16c", "sse2"}))
    assert "-mavx512f" not in cpu.compiler_flags({"avx2", "fma", "f16c", "avx512f"})  # BW missing
    assert {"-mavx512f", "-mavx512bw"} <= set(cpu.compiler_flags({"avx2", "fma", "f16c", "avx512f", "avx512bw"}))
    portable = cpu.compiler_flags({"sse2"})
    assert "-mavx2" not in portable and "-O3" in portable and "-pthread" in portable


def test_build_without_avx512_matches(kernel_library):
    """The linear path a CPU without AVX-512 builds (256-bit on AVX2 CPUs, scalar otherwise), checked here too."""
    k = CpuKernels(kernel_library(cpu.compiler_flags(cpu._cpu_flags() - {"avx512f"})))
    x, w = rng.standard_normal((3, 96)), rng.standard_normal((11, 96))
    for dt in ("float32", "bfloat16", "float16"):
        _close(_np(k.linear(_t(x, dt), _t(w, dt))), _rounded(x, dt) @ _rounded(w, dt).T, dt)
    qw = quantize_int8(w, group_size=32)
    w_eff = (qw.q.reshape(11, 3, 32) * qw.scale[:, :, None].astype(np.float64)).reshape(11, 96)
    _close(_np(k.linear_int8(_t(x), Tensor(qw.q), Tensor(qw.scale))), x @ w_eff.T, "float32")
    got = k.linear_qkv(_t(x), [_t(w), _t(w[:5]), _t(w[5:])])
    for y, part in zip(got, (w, w[:5], w[5:])):
        _close(_np(y), x @ part.T, "float32")


def test_portable_build_without_avx_matches(kernel_library):
    """The scalar fallback (no AVX2/F16C: software fp16 conversion) computes the same values."""
    lib = kernel_library(cpu.compiler_flags({"sse2"}))
    k = CpuKernels(lib)
    x, w = rng.standard_normal((3, 37)), rng.standard_normal((11, 37))
    for dt in ("float16", "bfloat16"):
        y = k.linear(_t(x, dt), _t(w, dt))
        _close(_np(y), _rounded(x, dt) @ _rounded(w, dt).T, dt)
        n = k.rms_norm(_t(x, dt), _t(w[0], dt), 1e-6)
        _close(_np(n), _rms_ref(_rounded(x, dt), _rounded(w[0], dt), 1e-6), dt)
    qw = quantize_int8(rng.standard_normal((5, 64)), group_size=32)  # grouped int8 without SIMD
    w_eff = (qw.q.reshape(5, 2, 32) * qw.scale[:, :, None].astype(np.float64)).reshape(5, 64)
    xg = rng.standard_normal((3, 64))
    _close(_np(k.linear_int8(_t(xg), Tensor(qw.q), Tensor(qw.scale))), xg @ w_eff.T, "float32")
    tiny = np.array([[6e-8, 1e-5, 70000.0, -3.0]])  # fp16 subnormal, normal, overflow to inf
    got = _np(k.swiglu(_t(tiny, "float16"), _t(np.ones((1, 4)), "float16")))
    want = _np(ops.silu(_t(tiny, "float16")))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("tdt", ["float32", "float16", "bfloat16", "int8"])
def test_embedding_reads_rows_of_any_table(kernels, tdt):
    table = rng.standard_normal((37, 33))
    ids = np.array([[0, 36, 5], [5, 1, 2]], np.int32)
    if tdt == "int8":
        qw = quantize_int8(table)
        out = kernels.embedding(Tensor(ids), Tensor(qw.q), ms.float32, scale=Tensor(qw.scale))
        want = (qw.q.astype(np.float64) * qw.scale[:, None])[ids]
    else:
        out = kernels.embedding(Tensor(ids.astype(np.int64)), _t(table, tdt), ms.float32)
        want = _rounded(table, tdt)[ids]
    assert out.shape == (2, 3, 33) and out.dtype == ms.float32
    np.testing.assert_allclose(out.asnumpy(), want, rtol=1e-6, atol=1e-6)
    assert kernels.embedding(Tensor(ids), _t(table), ms.float16).dtype == ms.float16


def test_embedding_rejects_out_of_range_ids(kernels):
    with pytest.raises(RuntimeError):
        kernels.embedding(Tensor(np.array([[37]], np.int32)), _t(np.zeros((37, 4))), ms.float32).asnumpy()


def _attn_case(b=2, hq=6, hkv=2, t=5, s=7, d=16, seed=0):
    from qwen2ms.ops import reference

    r = np.random.default_rng(seed)
    q, k, v = r.standard_normal((b, hq, t, d)), r.standard_normal((b, hkv, s, d)), r.standard_normal((b, hkv, s, d))
    pad = np.ones((b, s), np.int32)
    pad[0, :3] = 0  # left padding: row 0's first query slots see no key at all
    mask = reference.attention_mask(Tensor(np.arange(s - t, s, dtype=np.int32)), s, Tensor(pad), sliding_window=4)
    return q, k, v, mask


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("case", [dict(), dict(t=37, s=41, d=24), dict(t=40, s=40, d=64, b=1)],
                         ids=["few-queries", "blocked-odd-head-size", "blocked-causal"])
def test_attention_matches_reference(kernels, dt, case):
    """Few query tokens take the per-query loop, more than 16 the blocked prefill path (left padding, a
    fully masked row, a head size that is not a multiple of 16)."""
    from qwen2ms.ops import reference

    q, k, v, mask = _attn_case(**case)
    got = kernels.attention(_t(q, dt), _t(k, dt), _t(v, dt), mask, 0.25)
    assert got.shape == q.shape and got.dtype == DTYPES[dt]
    ref_dt = "float32" if dt == "bfloat16" else dt  # bf16 matmuls do not run on CPU
    want = reference.attention(*(_t(_rounded(a, dt), ref_dt) for a in (q, k, v)), mask, 0.25)
    _close(_np(got), _np(want), dt)


def test_attention_decode_shape_and_batch_one_mask(kernels):
    from qwen2ms.ops import reference

    q, k, v, _ = _attn_case(b=1, hq=14, hkv=2, t=1, s=33, d=64, seed=3)
    mask = reference.attention_mask(Tensor(np.array([20], np.int32)), 33)
    got = kernels.attention(_t(q), _t(k), _t(v), mask, 0.125)
    _close(_np(got), _np(reference.attention(_t(q), _t(k), _t(v), mask, 0.125)), "float32")


def test_attention_gradient(kernels):
    from qwen2ms.ops import reference

    q, k, v, mask = _attn_case(seed=5)
    q, k, v = _t(q), _t(k), _t(v)
    p = _t(rng.standard_normal(q.shape))
    _assert_grads(_grads(lambda q, k, v: (kernels.attention(q, k, v, mask, 0.3) * p).sum(), (q, k, v), (0, 1, 2)),
                  _grads(lambda q, k, v: (reference.attention(q, k, v, mask, 0.3) * p).sum(), (q, k, v), (0, 1, 2)))


def test_compiled_gradients_with_every_linear_variant_in_one_graph(kernels):
    """Variants with different input counts in one compiled graph (MindSpore caches Custom graphs by name)."""
    x = _t(rng.standard_normal((2, 3, 8)))
    w = ms.Parameter(_t(rng.standard_normal((8, 8))), name="w")
    b = ms.Parameter(_t(rng.standard_normal(8)), name="b")
    qw = quantize_int8(rng.standard_normal((8, 8)))
    q, s = Tensor(qw.q), Tensor(qw.scale)
    ids = Tensor(np.array([[1, 2]], np.int32))

    def loss(x):
        h = kernels.linear(kernels.linear(x, w, b), w)
        h = kernels.linear_int8(kernels.linear_int8(h, q, s, b), q, s)
        e = kernels.embedding(ids, w, ms.float32).sum() + kernels.embedding(ids, q, ms.float32, scale=s).sum()
        return h.sum() + e

    def ref(x):
        wq = Tensor(qw.q.astype(np.float32) * qw.scale[:, None])
        h = ops.matmul(ops.matmul(x, w.T) + b, w.T)
        h = ops.matmul(ops.matmul(h, wq.T) + b, wq.T)
        return h.sum() + ops.gather(w, ids, 0).sum() + ops.gather(wq, ids, 0).sum()

    got = ms.jit(ms.value_and_grad(loss, 0, [w, b]))(x)
    want = ms.value_and_grad(ref, 0, [w, b])(x)
    np.testing.assert_allclose(got[0].asnumpy(), want[0].asnumpy(), rtol=1e-4, atol=1e-4)
    _assert_grads([got[1][0].asnumpy(), *[g.asnumpy() for g in got[1][1]]],
                  [want[1][0].asnumpy(), *[g.asnumpy() for g in want[1][1]]])


# ----------------------------------------------------------------------------------------------------------
# Fused projections: q/k/v in one call, gate/up + SwiGLU in one call.

def _weights(wdt, shapes, group=None):
    """Float weights as tensors of dtype wdt, or int8 codes plus scales (wdt "int8")."""
    mats = [rng.standard_normal(s) * 0.2 for s in shapes]
    if wdt != "int8":
        return [_t(m, wdt) for m in mats], None
    qs = [quantize_int8(m, group) for m in mats]
    return [Tensor(q.q) for q in qs], [Tensor(q.scale) for q in qs]


def _same(a, b):
    np.testing.assert_array_equal(_np(a), _np(b))


@pytest.mark.parametrize("wdt,group", [("float32", None), ("float16", None), ("bfloat16", None), ("int8", None),
                                       ("int8", 32)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_qkv_equals_three_linear_calls_bit_for_bit(kernels, wdt, group, bias):
    xdt = "float32" if wdt in ("float32", "int8") else wdt
    ws, scales = _weights(wdt, [(96, 64), (32, 64), (32, 64)], group)
    bs = [_t(rng.standard_normal(n), xdt) for n in (96, 32, 32)] if bias else None
    for lead in ((1, 1), (2, 3), (13,)):  # decode, a small batch, odd row count
        x = _t(rng.standard_normal(lead + (64,)), xdt)
        got = kernels.linear_qkv(x, ws, bs, scales)
        for i, y in enumerate(got):
            b = bs[i] if bias else None
            want = kernels.linear(x, ws[i], b) if scales is None else kernels.linear_int8(x, ws[i], scales[i], b)
            assert y.shape == lead + (ws[i].shape[0],) and y.dtype == x.dtype
            _same(y, want)


@pytest.mark.parametrize("wdt,group", [("float32", None), ("bfloat16", None), ("float16", None), ("int8", 32)])
def test_gate_up_swiglu_equals_separate_kernels_bit_for_bit(kernels, wdt, group):
    xdt = "float32" if wdt in ("float32", "int8") else wdt
    (wg, wu), scales = _weights(wdt, [(80, 64), (80, 64)], group)
    for lead in ((1, 1), (3, 5)):
        x = _t(rng.standard_normal(lead + (64,)) * 2, xdt)
        got = kernels.gate_up_swiglu(x, wg, wu, scales)
        if scales is None:
            gate, up = kernels.linear(x, wg), kernels.linear(x, wu)
        else:
            gate, up = kernels.linear_int8(x, wg, scales[0]), kernels.linear_int8(x, wu, scales[1])
        assert got.shape == lead + (80,)
        _same(got, kernels.swiglu(gate, up))


def test_fused_projections_reject_mismatched_weights(kernels):
    x = _t(rng.standard_normal((1, 64)))
    w, w16 = _t(rng.standard_normal((8, 64))), _t(rng.standard_normal((8, 64)), "bfloat16")
    with pytest.raises(RuntimeError, match="LinearQkv"):  # one x layout per call: one weight dtype
        kernels.linear_qkv(x, [w, w16, w])[0].asnumpy()
    with pytest.raises(RuntimeError, match="GateUpSwiGLU"):  # gate and up must have the same rows
        kernels.gate_up_swiglu(x, w, _t(rng.standard_normal((9, 64)))).asnumpy()


@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_fused_projection_gradients_in_a_compiled_graph(kernels, int8):
    """value_and_grad through linear_qkv (with biases) and gate_up_swiglu equals the plain-ops composition."""
    x = _t(rng.standard_normal((2, 3, 64)))
    shapes = [(48, 64), (16, 64), (16, 64), (40, 64), (40, 64)]
    mats = [rng.standard_normal(s) * 0.2 for s in shapes]
    bs = [ms.Parameter(_t(rng.standard_normal(n)), name=f"b{i}") for i, n in enumerate((48, 16, 16))]
    if int8:
        qs = [quantize_int8(m, 32) for m in mats]
        ws = [Tensor(q.q) for q in qs]
        scales = [Tensor(q.scale) for q in qs]
        dense = [Tensor((q.q.reshape(q.q.shape[0], 2, 32) * q.scale[:, :, None]).reshape(q.q.shape)) for q in qs]
        params = bs
    else:
        ws = [ms.Parameter(_t(m), name=f"w{i}") for i, m in enumerate(mats)]
        scales, dense = None, ws
        params = ws + bs
    proj = _t(rng.standard_normal((2, 3, 40)))

    def ours(x):
        q, k, v = kernels.linear_qkv(x, ws[:3], bs, None if scales is None else scales[:3])
        h = kernels.gate_up_swiglu(x, ws[3], ws[4], None if scales is None else scales[3:])
        return (q * q).sum() + k.sum() + (v * v).sum() * 0.5 + (h * proj).sum()

    def ref(x):
        q, k, v = (ops.matmul(x, dense[i].T) + bs[i] for i in range(3))
        h = ops.silu(ops.matmul(x, dense[3].T)) * ops.matmul(x, dense[4].T)
        return (q * q).sum() + k.sum() + (v * v).sum() * 0.5 + (h * proj).sum()

    got = ms.jit(ms.value_and_grad(ours, 0, params))(x)
    want = ms.value_and_grad(ref, 0, params)(x)
    np.testing.assert_allclose(got[0].asnumpy(), want[0].asnumpy(), rtol=1e-4, atol=1e-3)
    _assert_grads([got[1][0].asnumpy(), *[g.asnumpy() for g in got[1][1]]],
                  [want[1][0].asnumpy(), *[g.asnumpy() for g in want[1][1]]], tol=1e-3)


def _huge_pages_supported():
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
        major, minor = (int(v) for v in os.uname().release.split(".")[:2])
    except (OSError, ValueError):
        return False
    return "[never]" not in mode and (major, minor) >= (6, 1)


def _huge_kb_of_mapping(addr):
    """KiB on huge pages (anonymous, shmem or file-backed) of the memory mapping that holds address ``addr``."""
    inside, total = False, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            if inside:
                break
            inside = int(head.group(1), 16) <= addr < int(head.group(2), 16)
        elif inside and line.split(":")[0] in ("AnonHugePages", "ShmemPmdMapped", "FilePmdMapped"):
            total += int(line.split()[1])
    return total


def test_collapse_huge_pages_keeps_values_and_skips_small_tensors():
    small = Tensor(np.arange(16, dtype=np.float32))
    assert cpu.collapse_huge_pages([small]) == 0
    big = ms.Parameter(Tensor(rng.standard_normal((3 << 20) // 4 * 3).astype(np.float32)), name="big")  # 9 MiB
    before = big.asnumpy().copy()
    done = cpu.collapse_huge_pages([big])
    np.testing.assert_array_equal(big.asnumpy(), before)
    if not _huge_pages_supported():
        assert done == 0
        return
    assert done >= 6 << 20 and done % (2 << 20) == 0  # the whole 2 MiB pages inside 9 MiB
    # The tensor's pages are now huge pages. (Comparing the process's total before and after fails where
    # THP is "always": the allocation may already sit on huge pages, and the total does not grow.)
    assert _huge_kb_of_mapping(int(big.data_ptr()) + (4 << 20)) * 1024 >= done
