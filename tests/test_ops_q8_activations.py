"""Int8/int4 linear layers on quantised activations (x rounded to int8 per block of 32): kernels == reference."""
import shutil
import subprocess

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore import Tensor  # noqa: E402

from qwen2ms.modeling.quantize import quantize_weights  # noqa: E402
from qwen2ms.ops import cpu, reference  # noqa: E402
from qwen2ms.ops.cpu import CpuKernels, CpuOps, quantize_int4, quantize_int8  # noqa: E402
from qwen2ms.ops.dispatch import ReferenceOps  # noqa: E402

rng = np.random.default_rng(16)
# Kernel against the float64 product of the rounded x and the weights, relative to the output's scale: only the
# float summation order (and the per-block scale products) differ.
TOL = 3e-6


@pytest.fixture(scope="module")
def kernels(kernel_library):
    return CpuKernels(kernel_library())


def fake_quant(x):
    """Rows of x rounded to int8 codes per block of 32 (written here from the rule, not from the library)."""
    x = np.asarray(x, np.float32)
    m, k = x.shape
    pad = (-k) % 32
    xp = np.concatenate([x, np.zeros((m, pad), np.float32)], 1).reshape(m, -1, 32)
    amax = np.abs(xp).max(-1, keepdims=True)
    keep = amax >= np.float32(127 * 1.17549435e-38)
    d = np.where(keep, amax / np.float32(127), np.float32(0)).astype(np.float32)
    inv = np.where(keep, np.float32(127) / np.where(keep, amax, np.float32(1)), np.float32(0)).astype(np.float32)
    codes = np.rint(xp * inv)
    assert np.abs(codes).max() <= 127
    return (codes * d).reshape(m, -1)[:, :k].astype(np.float64)


def int8_dense(qw, k):
    s = qw.scale.astype(np.float64)
    return qw.q * (s[:, None] if s.ndim == 1 else np.repeat(s, k // s.shape[1], 1))


def int4_dense(qw):
    n, half = qw.q.shape
    blocks = qw.q.reshape(n, half // 16, 16).astype(np.int64)
    vals = (np.concatenate([blocks & 15, blocks >> 4], axis=2) - 8).reshape(n, 2 * half)
    s = qw.scale.astype(np.float64)
    return vals * (s[:, None] if s.ndim == 1 else np.repeat(s, 2 * half // s.shape[1], 1))


def close(got, want, tol=TOL):
    got = got.astype(np.float64)
    assert np.isfinite(got).all()
    scale = max(1e-30, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= tol * scale, f"max error {err} > {tol * scale}"


def weights(kind, n, k):
    """(QuantizedWeight, dense float64 [n, k]) for int8 per channel / grouped, int4 grouped / per channel."""
    w = rng.standard_normal((n, k)).astype(np.float32)
    if kind.startswith("int8"):
        qw = quantize_int8(w, None if kind == "int8-channel" else int(kind.split("-g")[1]))
        return qw, int8_dense(qw, k)
    if kind == "int4-channel":
        qw = quantize_int4(w, k)
        qw = cpu.QuantizedWeight(qw.q, qw.scale[:, 0].copy())  # scale [N]: per channel
        return qw, int4_dense(qw)
    qw = quantize_int4(w, int(kind.split("-g")[1]))
    return qw, int4_dense(qw)


def run(k, kind, x, qw, bias=None, quantize_x=True):
    f = k.linear_int4 if qw.q.dtype == np.uint8 else k.linear_int8
    b = None if bias is None else Tensor(bias.astype(np.float32))
    return f(Tensor(np.asarray(x, np.float32)), Tensor(qw.q), Tensor(qw.scale), b, quantize_x=quantize_x).asnumpy()


# --------------------------------------------------------------------------------------------------------
# The reference rounding

def test_reference_rounding_follows_the_rule():
    x = rng.standard_normal((5, 100)).astype(np.float32) * np.float32(3)
    x[1] = 0.0  # a zero row: scale 0, no NaN
    x[2, :32] = 1e-37  # below the smallest block maximum: zeros
    x[3, 32:64] = 1e30 * rng.standard_normal(32).astype(np.float32)
    got = reference.quantize_activations(Tensor(x)).asnumpy()
    np.testing.assert_array_equal(got, fake_quant(x).astype(np.float32))
    assert (got[1] == 0).all() and (got[2, :32] == 0).all() and np.isfinite(got).all()
    # Each block's largest magnitude is kept exactly as +-127 steps; ties round to even (0.5 -> 0, 1.5 -> 2).
    ties = np.zeros((1, 32), np.float32)
    ties[0, :4] = [127.0, 0.5, 1.5, -2.5]
    np.testing.assert_array_equal(reference.quantize_activations(Tensor(ties)).asnumpy()[0, :4], [127, 0, 2, -2])
    # Leading dimensions and half-precision inputs keep their shape and dtype.
    y = reference.quantize_activations(Tensor(x.reshape(5, 2, 50)).astype(ms.bfloat16))
    assert y.shape == (5, 2, 50) and y.dtype == ms.bfloat16


# --------------------------------------------------------------------------------------------------------
# Kernels against the reference

KINDS = ["int8-channel", "int8-g32", "int8-g128", "int4-g32", "int4-g128", "int4-channel"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", list(range(1, 10)))
def test_kernel_matches_rounded_x_times_weights(kernels, kind, m):
    """Every row count 1..9 (the 8-, 4-, 3-, 2- and 1-row blocks of rows_all_m); K = 384 and 640 are not multiples
    of 256, and 13 output rows leave a partial block of four weight rows."""
    k = 384 if "g128" in kind or m % 2 else 640
    qw, dense = weights(kind, 13, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(13)
    got = run(kernels, kind, x, qw, bias)
    want = fake_quant(x) @ dense.T + bias
    close(got, want)
    # The reference op (what prefill and the reference backend run) gives the same values.
    ref = ReferenceOps()
    close(ref.linear(Tensor(x), Tensor(qw.q), Tensor(bias.astype(np.float32)), Tensor(qw.scale)).asnumpy(), want)
    # And it is not the fp32-activation kernel: rounding x moves the output by far more than the tolerance.
    assert np.abs(run(kernels, kind, x, qw, bias, quantize_x=False) - want).max() > 100 * TOL * np.abs(want).max()


def test_int8_per_channel_k_not_a_multiple_of_32(kernels):
    """The last, partial block of 4 inputs has its own scale (its codes past K count as zero)."""
    for k in (100, 4, 37):
        qw, dense = weights("int8-channel", 9, k)
        x = rng.standard_normal((3, k)).astype(np.float32)
        x[:, -1] *= 50  # the tail block's scale differs from the others'
        close(run(kernels, "int8-channel", x, qw), fake_quant(x) @ dense.T)


@pytest.mark.parametrize("kind", ["int8-g32", "int4-g32", "int8-channel"])
def test_zero_huge_and_tiny_rows(kernels, kind):
    k = 256
    qw, dense = weights(kind, 8, k)
    x = rng.standard_normal((5, k)).astype(np.float32)
    x[0] = 0.0  # scale 0 for every block: output 0, no NaN
    x[1] *= np.float32(1e30)
    x[2] *= np.float32(1e-30)
    x[3] = np.float32(1e-37)  # below the smallest block maximum: rounds to zero
    x[4, :64] = 0.0
    got = run(kernels, kind, x, qw)
    want = fake_quant(x) @ dense.T
    assert (got[0] == 0).all() and (got[3] == 0).all()
    for r in (1, 2, 4):
        close(got[r:r + 1], want[r:r + 1])


def test_non_finite_input_gives_nan_not_a_number(kernels):
    qw, _ = weights("int4-g32", 4, 64)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    x[1, 40] = np.inf
    got = run(kernels, "int4-g32", x, qw)
    assert np.isfinite(got[0]).all() and np.isnan(got[1]).all()


@pytest.mark.parametrize("kind", ["int8-g32", "int4-g32", "int4-g128"])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_and_gate_up_equal_separate_calls_bit_for_bit(kernels, kind, bias):
    k = 256
    parts = [weights(kind, n, k)[0] for n in (12, 4, 4)]
    x = Tensor(rng.standard_normal((3, k)).astype(np.float32))
    biases = [Tensor(rng.standard_normal(n).astype(np.float32)) for n in (12, 4, 4)] if bias else None
    f = kernels.linear_int4 if kind.startswith("int4") else kernels.linear_int8
    got = kernels.linear_qkv(x, [Tensor(p.q) for p in parts], biases, [Tensor(p.scale) for p in parts], True)
    for i, p in enumerate(parts):
        want = f(x, Tensor(p.q), Tensor(p.scale), None if biases is None else biases[i], quantize_x=True)
        np.testing.assert_array_equal(got[i].asnumpy(), want.asnumpy())
    g, u = weights(kind, 8, k)[0], weights(kind, 8, k)[0]
    fused = kernels.gate_up_swiglu(x, Tensor(g.q), Tensor(u.q), (Tensor(g.scale), Tensor(u.scale)), True)
    sep = kernels.swiglu(f(x, Tensor(g.q), Tensor(g.scale), quantize_x=True),
                         f(x, Tensor(u.q), Tensor(u.scale), quantize_x=True))
    np.testing.assert_array_equal(fused.asnumpy(), sep.asnumpy())


# --------------------------------------------------------------------------------------------------------
# Other builds of the same kernels

@pytest.mark.parametrize("build", ["avx2", "portable"])
def test_other_builds_compute_the_same_values(kernel_library, build):
    """The 256-bit path of a CPU without AVX-512 and the scalar fallback (no AVX2): the same rounding of x and the
    same integer block sums, so the same values up to float summation order."""
    flags = cpu.compiler_flags(cpu._cpu_flags() - {"avx512f"}) if build == "avx2" else cpu.compiler_flags({"sse2"})
    k = CpuKernels(kernel_library(flags))
    for kind, kk in (("int8-channel", 100), ("int8-g32", 256), ("int4-g32", 256), ("int4-g128", 256)):
        qw, dense = weights(kind, 9, kk)
        for m in (1, 3, 9):
            x = rng.standard_normal((m, kk)).astype(np.float32)
            x[0, :32] *= 40
            close(run(k, kind, x, qw), fake_quant(x) @ dense.T)


@pytest.mark.slow  # one more build of the library each (~20 s at -O0 on 2 busy cores)
@pytest.mark.parametrize("isa", ["avx512_vnni", "avx_vnni"])
def test_vnni_builds_compile_with_dpbusd(kernel_library, isa):
    """The VNNI variants cannot run on a CPU without VNNI; they must at least compile and use vpdpbusd."""
    have = {"avx2", "fma", "f16c"} | ({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} if isa == "avx512_vnni"
                                      else {"avx_vnni"})
    flags = cpu.compiler_flags(have)
    assert ("-mavx512vnni" if isa == "avx512_vnni" else "-mavxvnni") in flags
    try:
        # A compile check (these kernels cannot run here): -O0 compiles ~3x faster and still emits the intrinsics.
        lib = kernel_library(flags + ["-O0"])
    except cpu.KernelBuildError as exc:
        if "unrecognized" in str(exc) or "unknown" in str(exc):
            pytest.skip(f"the C++ compiler does not know the {isa} flags: {exc}")
        raise
    assert lib.is_file()
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("compiled; objdump not found, so the use of vpdpbusd is not checked")
    text = subprocess.run([objdump, "-d", str(lib)], capture_output=True, text=True, timeout=300).stdout
    assert "vpdpbusd" in text


# --------------------------------------------------------------------------------------------------------
# The switch: model -> ops backend -> kernels

def test_cpu_ops_follow_the_backend_setting(kernels):
    qw, dense = weights("int4-g32", 8, 128)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    ops_q, ops_f = CpuOps(kernels), CpuOps(kernels)
    ops_f.quantize_activations = False
    assert ops_q.quantize_activations and ReferenceOps.quantize_activations
    got_q = ops_q.linear(Tensor(x), Tensor(qw.q), None, Tensor(qw.scale)).asnumpy()
    got_f = ops_f.linear(Tensor(x), Tensor(qw.q), None, Tensor(qw.scale)).asnumpy()
    close(got_q, fake_quant(x) @ dense.T)
    close(got_f, x.astype(np.float64) @ dense.T, 2e-5)
    # More than 16 rows (prefill) takes the matmul path with the same rounding of x.
    xl = rng.standard_normal((20, 128)).astype(np.float32)
    close(ops_q.linear(Tensor(xl), Tensor(qw.q), None, Tensor(qw.scale)).asnumpy(), fake_quant(xl) @ dense.T, 2e-5)
    close(ops_f.linear(Tensor(xl), Tensor(qw.q), None, Tensor(qw.scale)).asnumpy(), xl @ dense.T, 2e-5)


def _tiny_model(backend="cpu"):
    from qwen2ms import Qwen2Config
    from qwen2ms.modeling import Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.1, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg, dtype="bfloat16", seed=5, ops_backend=backend)


def test_quantize_weights_sets_the_activations_of_this_model_only():
    a, b = _tiny_model(), _tiny_model()
    quantize_weights(a, bits=4)
    quantize_weights(b, bits=4, activations="float32")
    assert a.ops_impl.quantize_activations and not b.ops_impl.quantize_activations
    assert not b.model.layers[0].self_attn.q_proj.ops_impl.quantize_activations
    with pytest.raises(ValueError, match="activations must be 'int8'.*got 'fp16'"):
        quantize_weights(_tiny_model(), bits=8, activations="fp16")
    ids = np.array([[3, 9, 27, 81, 4]])
    la, lb = a(ids).logits.asnumpy(), b(ids).logits.asnumpy()
    assert 0 < np.abs(la - lb).max() < 0.25 * lb.std()  # the rounding of x shows, a little


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_decode_layer_on_quantised_activations_equals_separate_kernels(bits):
    from qwen2ms.ops.cpu import kernel_profile

    models = []
    for fused in (True, False):
        model = _tiny_model()
        quantize_weights(model, bits=bits, group_size=32)
        if not fused:
            model.ops_impl.decode_layer_max_rows = 0
        model.set_train(False)
        models.append(model)
    out = []
    kernel_profile(reset=True, enable=True)
    try:
        for model in models:
            cache = model.new_cache(2, 8)
            ids = np.array([[5, 17, 33, 2], [1, 44, 8, 99]])
            steps = [model(ids, cache=cache, cache_position=0).logits.asnumpy()[:, -1]]
            for i in range(3):
                nxt = np.array([[7 + i], [11 + i]], np.int32)
                steps.append(model(nxt, cache=cache, cache_position=4 + i).logits.asnumpy()[:, -1])
            out.append((np.stack(steps), kernel_profile(reset=True)))
    finally:
        kernel_profile(reset=True, enable=False)
    np.testing.assert_array_equal(out[0][0], out[1][0])
    # Qwen2's q/k/v biases: the "Bias" kernels; two layers, three steps (the prefill runs the separate kernels).
    assert out[0][1]["DecodeLayerQuantBiasQ8A"][0] == 2 * 3
    suffix = ("Int4" if bits == 4 else "Int8") + "BiasQ8A"
    assert out[1][1]["LinearQkv" + suffix][0] == 2 * 4 and "DecodeLayerQuantBiasQ8A" not in out[1][1]


@pytest.mark.parametrize("rows", [3, 20])
def test_gradients_pass_straight_through_the_rounding(kernels, rows):
    """In a compiled graph, x gets the gradient of the unrounded product (the rounding counts as the identity), on
    the kernel path (up to 16 rows) and the matmul path (prefill, training)."""
    cpu_ops = CpuOps(kernels)
    qw, dense = weights("int4-g32", 24, 64)
    q, s = Tensor(qw.q), Tensor(qw.scale)
    x = Tensor(rng.standard_normal((2, rows, 64)).astype(np.float32))
    p = rng.standard_normal((2, rows, 24))
    pt = Tensor(p.astype(np.float32))

    def f(t):
        return (cpu_ops.linear(t, q, None, s) * pt).sum()

    grad = ms.jit(ms.grad(f))(x).asnumpy()
    close(grad.reshape(-1, 64), p.reshape(-1, 24) @ dense, 1e-5)
