"""Backend selection (device target, argument, environment) and CPU-backend parity with the reference ops."""
import contextlib
import warnings

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore import Tensor  # noqa: E402

from qwen2ms.ops import cpu as cpu_mod  # noqa: E402
from qwen2ms.ops import dispatch, reference  # noqa: E402
from qwen2ms.ops.ascend import AscendOps  # noqa: E402
from qwen2ms.ops.cpu import CpuOps, quantize_int8  # noqa: E402
from qwen2ms.ops.dispatch import ReferenceOps, get_ops, resolve_backend  # noqa: E402

rng = np.random.default_rng(7)


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


# ----------------------------------------------------------------------------------------------------------
# Selection

@pytest.mark.parametrize("target,want", [("CPU", "cpu"), ("Ascend", "ascend"), ("GPU", "reference")])
def test_backend_follows_device_target(target, want):
    assert resolve_backend(device_target=target) == want


def test_default_device_is_read_from_mindspore_context():
    assert ms.get_context("device_target") == "CPU"
    assert resolve_backend() == "cpu"


def test_cpu_without_compiler_resolves_to_reference_with_warning(monkeypatch):
    monkeypatch.setattr(cpu_mod, "find_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert resolve_backend(device_target="CPU") == "reference"


def test_env_var_overrides_device_and_argument_overrides_env(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert resolve_backend(device_target="CPU") == "reference"
    assert resolve_backend("cpu", device_target="CPU") == "cpu"
    assert resolve_backend("auto", device_target="CPU") == "reference"  # "auto" defers to the env var
    monkeypatch.setenv(dispatch.ENV_VAR, " Ascend ")
    assert resolve_backend(device_target="CPU") == "ascend"
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    assert resolve_backend(device_target="Ascend") == "ascend"


def test_unknown_names_are_rejected_with_their_source(monkeypatch):
    with pytest.raises(ValueError, match="backend argument is 'cuda'.*reference, cpu, ascend"):
        resolve_backend("cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="QWEN2MS_OPS_BACKEND is 'fast'"):
        resolve_backend()


def test_get_ops_builds_the_chosen_implementation(monkeypatch):
    assert type(get_ops("reference")) is ReferenceOps
    cpu_ops = get_ops(device_target="CPU")
    assert type(cpu_ops) is CpuOps and cpu_ops.name == "cpu"
    assert type(get_ops(device_target="Ascend")) is AscendOps
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert get_ops().name == "reference"
    with pytest.raises(ValueError, match="needs device_target 'Ascend'"):
        get_ops("ascend", device_target="CPU")


def test_explicit_cpu_without_compiler_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_mod, "find_compiler", lambda: None)
    monkeypatch.setattr(cpu_mod, "_shared", {})
    monkeypatch.setenv("QWEN2MS_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(cpu_mod.KernelBuildError, match="no C\\+\\+ compiler"):
        get_ops("cpu")


# ----------------------------------------------------------------------------------------------------------
# CPU backend == reference backend

REF = ReferenceOps()


@pytest.fixture(scope="module")
def cpu_ops():
    return CpuOps()


def _t(a, dt=ms.float32):
    return Tensor(np.asarray(a, np.float32)).astype(dt)


def _f(t):
    return t.astype(ms.float32).asnumpy()


def _ref_in_fp32(fn, *args):
    """Reference result for low-precision inputs: compute in fp32 from the rounded values, round once."""
    dt = args[0].dtype
    outs = fn(*[a.astype(ms.float32) if isinstance(a, Tensor) and a.dtype == dt else a for a in args])
    if isinstance(outs, tuple):
        return tuple(o.astype(dt) for o in outs)
    return outs.astype(dt)


TOL = {ms.float32: 1e-5, ms.float16: 5e-3, ms.bfloat16: 4e-2}


@pytest.mark.parametrize("dt", [ms.float32, ms.float16, ms.bfloat16])
def test_cpu_norm_rope_swiglu_match_reference(cpu_ops, dt):
    x, r, w = _t(rng.standard_normal((2, 3, 33)), dt), _t(rng.standard_normal((2, 3, 33)), dt), _t(
        rng.standard_normal(33), dt)
    ref = REF if dt != ms.bfloat16 else None

    def check(got, ref_fn, *args):
        want = ref_fn(*args) if ref is not None else _ref_in_fp32(ref_fn, *args)
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_allclose(_f(a), _f(b), rtol=TOL[dt], atol=TOL[dt])

    check(cpu_ops.rms_norm(x, w, 1e-6), REF.rms_norm, x, w, 1e-6)
    check(cpu_ops.add_rms_norm(x, r, w, 1e-6), REF.add_rms_norm, x, r, w, 1e-6)
    q, k = _t(rng.standard_normal((2, 4, 5, 8)), dt), _t(rng.standard_normal((2, 2, 5, 8)), dt)
    cos, sin = REF.rope_cos_sin(Tensor(np.arange(10, dtype=np.int32).reshape(2, 5)),
                                Tensor(1.0 / 10000 ** (np.arange(0, 8, 2) / 8.0), ms.float32))
    check(cpu_ops.apply_rope(q, k, cos, sin), REF.apply_rope, q, k, cos, sin)
    check(cpu_ops.act_mul(x, r), REF.act_mul, x, r)


@pytest.mark.parametrize("dt", [ms.float32, ms.float16])
def test_cpu_attention_matches_reference(cpu_ops, dt):
    q = _t(rng.standard_normal((2, 4, 3, 8)), dt)
    k, v = _t(rng.standard_normal((2, 2, 6, 8)), dt), _t(rng.standard_normal((2, 2, 6, 8)), dt)
    pad = Tensor(np.array([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], np.int32))
    mask = REF.attention_mask(Tensor(np.arange(3, 6, dtype=np.int32)), 6, pad)
    got, want = cpu_ops.attention(q, k, v, mask, 0.35), REF.attention(q, k, v, mask, 0.35)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_allclose(_f(got), _f(want), rtol=TOL[dt], atol=TOL[dt])


def test_cpu_act_mul_other_activation_uses_reference(cpu_ops):
    g, u = _t(rng.standard_normal((3, 7))), _t(rng.standard_normal((3, 7)))
    np.testing.assert_allclose(_f(cpu_ops.act_mul(g, u, "gelu")), _f(reference.act_mul(g, u, "gelu")), rtol=1e-6)


@pytest.mark.parametrize("wdt", [ms.float32, ms.float16, ms.bfloat16])
def test_cpu_linear_matches_reference(cpu_ops, wdt):
    x = _t(rng.standard_normal((2, 3, 33)))
    w, b = _t(rng.standard_normal((45, 33)) * 0.1, wdt), _t(rng.standard_normal(45))
    got, want = cpu_ops.linear(x, w, b), REF.linear(x, w, b)
    assert got.dtype == want.dtype == ms.float32 and got.shape == want.shape == (2, 3, 45)
    np.testing.assert_allclose(_f(got), _f(want), rtol=1e-5, atol=1e-5)


def test_int8_linear_and_embedding_match_reference(cpu_ops):
    x = _t(rng.standard_normal((1, 2, 33)))
    qw = quantize_int8(rng.standard_normal((45, 33)))
    q, s, b = Tensor(qw.q), Tensor(qw.scale), _t(rng.standard_normal(45))
    # int8 weights read x rounded to int8 per block of 32 by default (ReferenceOps.quantize_activations).
    want = reference.quantize_activations(x).asnumpy() @ (qw.q * qw.scale[:, None]).T + b.asnumpy()
    for impl in (cpu_ops, REF):
        np.testing.assert_allclose(impl.linear(x, q, b, weight_scale=s).asnumpy(), want, rtol=1e-5, atol=1e-5)
    ids = Tensor(np.array([[3, 44, 0]], np.int32))
    want_rows = (qw.q * qw.scale[:, None])[ids.asnumpy()]
    for impl in (cpu_ops, REF):
        got = impl.embedding(ids, q, ms.float32, weight_scale=s)
        np.testing.assert_allclose(got.asnumpy(), want_rows, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tdt", [ms.float32, ms.bfloat16, ms.float16])
def test_cpu_embedding_matches_reference(cpu_ops, tdt):
    table = _t(rng.standard_normal((37, 16)), tdt)
    ids = Tensor(np.array([[1, 36], [0, 5]], np.int32))
    got, want = cpu_ops.embedding(ids, table, ms.float32), REF.embedding(ids, table, ms.float32)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.asnumpy(), want.asnumpy())


def test_backends_work_inside_jit(cpu_ops):
    x, w = _t(rng.standard_normal((1, 2, 32))), _t(rng.standard_normal(32))
    lw = _t(rng.standard_normal((64, 32)), ms.bfloat16)

    def f(impl):
        return lambda x: impl.linear(impl.rms_norm(x, w, 1e-6), lw)

    for impl in (cpu_ops, REF):
        np.testing.assert_allclose(ms.jit(f(impl))(x).asnumpy(), f(impl)(x).asnumpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ms.jit(f(cpu_ops))(x).asnumpy(), f(REF)(x).asnumpy(), rtol=1e-4, atol=1e-4)


def test_repr_names_backend():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "reference" in repr(ReferenceOps())


@contextlib.contextmanager
def _kernel_calls(cpu_ops, name, record):
    """Swap in kernels whose ``name`` op appends ``record(*args)`` to the yielded list, then restore."""
    calls, real = [], cpu_ops.kernels
    kernel = getattr(real, name)

    class Spy:
        def __getattr__(self, attr):
            return getattr(real, attr)

    def spied(*a):
        calls.append(record(*a))
        return kernel(*a)

    spy = Spy()
    setattr(spy, name, spied)
    cpu_ops.kernels = spy
    try:
        yield calls
    finally:
        cpu_ops.kernels = real


def test_cpu_linear_uses_the_kernel_only_for_few_rows():
    import mindspore as ms
    from mindspore import Tensor

    cpu_ops = get_ops("cpu")
    with _kernel_calls(cpu_ops, "linear", lambda x, *rest: x.shape) as calls:
        rng = np.random.default_rng(0)
        w32 = rng.standard_normal((40, 24)).astype(np.float32)
        w16 = Tensor(w32).astype(ms.bfloat16)
        ref = get_ops("reference")
        for rows, w in [(3, w16), (40, w16), (3, Tensor(w32))]:
            x = Tensor(rng.standard_normal((1, rows, 24)).astype(np.float32))
            got = cpu_ops.linear(x, w).asnumpy()
            want = ref.linear(x, w).asnumpy()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert calls == [(1, 3, 24), (1, 3, 24)]  # few rows take the kernel (bf16 and fp32 weights), 40 rows do not


def test_cpu_attention_uses_the_kernel_for_decode_and_prefill_query_counts():
    from mindspore import Tensor

    cpu_ops = get_ops("cpu")
    with _kernel_calls(cpu_ops, "attention", lambda q, *rest: q.shape[2]) as calls:
        rng = np.random.default_rng(1)
        ref = get_ops("reference")
        for t in (1, 16, 17, 40):
            s = t + 3
            q = Tensor(rng.standard_normal((1, 4, t, 8)).astype(np.float32))
            k, v = (Tensor(rng.standard_normal((1, 2, s, 8)).astype(np.float32)) for _ in range(2))
            mask = ref.attention_mask(Tensor(np.arange(3, s, dtype=np.int32)), s)
            np.testing.assert_allclose(cpu_ops.attention(q, k, v, mask, 0.3).asnumpy(),
                                       ref.attention(q, k, v, mask, 0.3).asnumpy(), rtol=1e-5, atol=1e-5)
    assert calls == [1, 16, 17, 40]  # the per-query loop up to 16 tokens, the blocked path above


def test_cpu_fused_projections_take_one_kernel_call_only_when_every_part_fits():
    """q/k/v and gate/up+SwiGLU: one kernel call for few rows and uniform weights, else the separate ops."""
    from mindspore import Tensor

    cpu_ops, ref = get_ops("cpu"), get_ops("reference")
    rng = np.random.default_rng(2)

    def w(n, dt=ms.float32):
        return Tensor(rng.standard_normal((n, 24)).astype(np.float32)).astype(dt)

    def b(n):
        return Tensor(rng.standard_normal(n).astype(np.float32))

    uniform = ((w(16), b(16), None), (w(8), b(8), None), (w(8), b(8), None))
    mixed_dtype = ((w(16), None, None), (w(8, ms.bfloat16), None, None), (w(8), None, None))
    mixed_bias = ((w(16), b(16), None), (w(8), None, None), (w(8), b(8), None))
    with _kernel_calls(cpu_ops, "linear_qkv", lambda x, *rest: x.shape[1]) as calls:
        for rows, projs in [(3, uniform), (17, uniform), (3, mixed_dtype), (3, mixed_bias)]:
            x = Tensor(rng.standard_normal((1, rows, 24)).astype(np.float32))
            for got, want in zip(cpu_ops.linear_qkv(x, *projs), ref.linear_qkv(x, *projs)):
                np.testing.assert_allclose(got.asnumpy(), want.asnumpy(), rtol=1e-5, atol=1e-5)
    assert calls == [3]

    gate, up = (w(32), None, None), (w(32), None, None)
    with _kernel_calls(cpu_ops, "gate_up_swiglu", lambda x, *rest: x.shape[1]) as calls:
        for rows, act, g in [(2, "silu", gate), (20, "silu", gate), (2, "gelu", gate), (2, "silu", (w(32), b(32), None))]:
            x = Tensor(rng.standard_normal((1, rows, 24)).astype(np.float32))
            np.testing.assert_allclose(cpu_ops.gate_up_act(x, g, up, act).asnumpy(),
                                       ref.gate_up_act(x, g, up, act).asnumpy(), rtol=1e-5, atol=1e-5)
    assert calls == [2]


class _TracedCpuOps(CpuOps):
    """A user subclass (module level: MindSpore parses its methods from source)."""

    def rms_norm(self, x, weight, eps):
        return CpuOps.rms_norm(self, x, weight, eps)


def test_cpu_ops_subclass_falls_back_to_the_reference_inside_a_compiled_graph():
    """CpuOps' fallbacks name ReferenceOps: MindSpore's graph parser resolved super() from the instance's
    class, so a subclass recursed until the call-depth limit."""
    sub, ref = _TracedCpuOps(), get_ops("reference")
    rng = np.random.default_rng(4)
    x = Tensor(rng.standard_normal((1, 20, 24)).astype(np.float32))  # 20 rows: every fused op falls back
    w = [Tensor(rng.standard_normal((n, 24)).astype(np.float32)) for n in (16, 8, 8, 32, 32)]
    projs = [(wi, None, None) for wi in w]

    def run(o, x):
        q, k, v = o.linear_qkv(x, projs[0], projs[1], projs[2])
        h = o.gate_up_act(x, projs[3], projs[4], "silu")
        return o.linear(x, w[0]).sum() + q.sum() + k.sum() + v.sum() + h.sum()

    got = ms.jit(_bind(run, sub))(x)
    np.testing.assert_allclose(got.asnumpy(), _bind(run, ref)(x).asnumpy(), rtol=1e-5, atol=1e-4)


def _bind(fn, o):
    def bound(x):
        return fn(o, x)

    return bound


def test_reference_int8_linear_passes_gradients_straight_through_the_activation_rounding():
    """The reference backend rounds x to int8 per block of 32 before an int8 layer; x must still get the gradient
    of the unrounded product (as the CPU kernels' bprops give), else nothing below a quantised layer trains."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((24, 64)).astype(np.float32)
    qw = quantize_int8(w)
    q, scale = np.asarray(qw.q), np.asarray(qw.scale)
    x = Tensor(rng.standard_normal((3, 64)).astype(np.float32))
    ops_ref = ReferenceOps()
    assert ops_ref.quantize_activations
    up = Tensor(rng.standard_normal((3, 24)).astype(np.float32))
    grad = ms.grad(lambda t: (ops_ref.linear(t, Tensor(q), None, Tensor(scale)) * up).sum())(x)
    want = up.asnumpy() @ (q.astype(np.float32) * scale[:, None])
    np.testing.assert_allclose(grad.asnumpy(), want, rtol=1e-5, atol=1e-5)
    # the forward value is still exactly the rounded activations' product
    rounded = reference.quantize_activations(x)
    np.testing.assert_array_equal(ops_ref.linear(x, Tensor(q), None, Tensor(scale)).asnumpy(),
                                  ops_ref.dequantized_linear(rounded, Tensor(q), None, Tensor(scale)).asnumpy())
