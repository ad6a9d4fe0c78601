"""Int4 weight-only linear layers: quantisation, packed layout, kernel == reference (all builds), model decode."""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore import Tensor, ops  # noqa: E402

from qwen2ms import Qwen2Config  # noqa: E402
from qwen2ms.modeling import Qwen2ForCausalLM  # noqa: E402
from qwen2ms.modeling.quantize import quantize_weights  # noqa: E402
from qwen2ms.ops import cpu, reference  # noqa: E402
from qwen2ms.ops.cpu import CpuKernels, CpuOps, QuantizedWeight, quantize_int4  # noqa: E402
from qwen2ms.ops.dispatch import ReferenceOps  # noqa: E402
from test_ops_model import IDS, MASK, _greedy  # noqa: E402  (the int8 model tests' prompts, greedy loop)

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
# Kernel against the reference, relative to the output's scale: fp32 summation order, or one rounding of
# the output in fp16/bf16.
TOL = {"float32": 2e-5, "float16": 2e-3, "bfloat16": 1e-2}
rng = np.random.default_rng(4)


@pytest.fixture(scope="module")
def kernels(kernel_library):
    return CpuKernels(kernel_library())


def _t(a, dt="float32"):
    return Tensor(np.ascontiguousarray(a, np.float32)).astype(DTYPES[dt])


def _np(t):
    return t.astype(ms.float32).asnumpy().astype(np.float64)


def _unpack(qw):
    """The int4 values [N, K] of packed codes, decoded here independently of the library's reference."""
    n, half = qw.q.shape
    blocks = qw.q.reshape(n, half // 16, 16).astype(np.int64)
    vals = np.concatenate([blocks & 15, blocks >> 4], axis=2) - 8  # low nibbles: inputs 0-15, high: 16-31
    return vals.reshape(n, 2 * half)


def _dense(qw):
    vals = _unpack(qw)
    n, k = vals.shape
    g = qw.scale.shape[1]
    return (vals.reshape(n, g, k // g) * qw.scale[:, :, None].astype(np.float64)).reshape(n, k)


def _close(got, want, dt):
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    assert err <= TOL[dt] * scale, f"{dt}: max error {err} > {TOL[dt] * scale}"


# --------------------------------------------------------------------------------------------------------
# Quantisation and layout

def test_quantize_int4_follows_q4_0_and_packs_two_per_byte():
    w = np.arange(-16, 16, dtype=np.float32).reshape(1, 32)
    qw = quantize_int4(w)
    assert qw.q.dtype == np.uint8 and qw.q.shape == (1, 16) and qw.shape == (1, 32)
    assert qw.scale.tolist() == [[2.0]]  # d = (largest-magnitude value -16) / -8
    vals = _unpack(qw)[0]
    np.testing.assert_array_equal(vals, np.clip(np.floor(w[0] / 2.0 + 0.5), -8, 7))
    # Byte j: input j in the low nibble, input j + 16 in the high nibble, each as value + 8.
    assert qw.q[0, 0] == 0 | (8 << 4) and qw.q[0, 15] == 8 | (15 << 4)  # inputs -16, 0 and -1, 15 (clamped to 7)
    assert int(qw.q[0, 0]) & 15 == vals[0] + 8 and int(qw.q[0, 0]) >> 4 == vals[16] + 8
    assert int(qw.q[0, 15]) & 15 == vals[15] + 8 and int(qw.q[0, 15]) >> 4 == vals[31] + 8


@pytest.mark.parametrize("group", [32, 128])
def test_quantize_int4_error_bound_and_zero_groups(group):
    w = rng.standard_normal((7, 256)).astype(np.float32)
    w[2, :group] = 0.0
    qw = quantize_int4(w, group)
    assert qw.scale.shape == (7, 256 // group) and qw.scale.dtype == np.float32
    err = np.abs(_dense(qw) - w).reshape(7, 256 // group, group)
    step = np.abs(qw.scale)[:, :, None]
    assert np.all(err <= step + 1e-6)  # clamped values on the far side of the extreme: one step
    assert np.mean(err <= step / 2 + 1e-6) > 0.99  # all the others: half a step
    assert np.all(_dense(qw)[2, :group] == 0.0)
    np.testing.assert_allclose(_np(reference.dequantize_int4(Tensor(qw.q), Tensor(qw.scale))), _dense(qw), rtol=1e-6)


def test_quantize_int4_refuses_bad_shapes():
    with pytest.raises(ValueError, match="matrix"):
        quantize_int4(np.zeros(32))
    with pytest.raises(ValueError, match="group_size=32 must be a multiple of 32 that divides the input size 48"):
        quantize_int4(np.zeros((2, 48)))
    with pytest.raises(ValueError, match="group_size=48"):
        quantize_int4(np.zeros((2, 96)), 48)


# --------------------------------------------------------------------------------------------------------
# Kernel against the reference

@pytest.mark.parametrize("xdt", list(DTYPES))
@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16])
def test_int4_kernel_matches_reference(kernels, xdt, group, m):
    n, k = 13, 384  # N not a multiple of the 4 rows walked together; K: 12 blocks, 3 groups of 128
    x, w, b = rng.standard_normal((m, k)), rng.standard_normal((n, k)) * 0.2, rng.standard_normal(n)
    w[:, :group] *= 20.0  # one group much larger: its own scale keeps the others precise
    qw = quantize_int4(w, group)
    q, s = Tensor(qw.q), Tensor(qw.scale)
    y = kernels.linear_int4(_t(x, xdt), q, s, _t(b, xdt))
    assert y.shape == (m, n) and y.dtype == DTYPES[xdt]
    xr = _np(_t(x, xdt))
    want = xr @ _dense(qw).T + _np(_t(b, xdt))
    _close(_np(y), want, xdt)
    # The library's reference op (MindSpore ops, computed in fp32 here) gives the same values.
    _close(_np(reference.linear_int4(_t(xr), q, s, _t(_np(_t(b, xdt))))), want, "float32")
    _close(_np(kernels.linear(_t(x, xdt), QuantizedWeight(q, s))), xr @ _dense(qw).T, xdt)


def test_int4_per_channel_scale_and_leading_dims(kernels):
    w = rng.standard_normal((896, 4864)) * 0.05
    qw = quantize_int4(w, 4864)  # one group per row: scale [N, 1]
    x = rng.standard_normal((2, 1, 4864))
    y = kernels.linear_int4(_t(x), Tensor(qw.q), Tensor(qw.scale))
    assert y.shape == (2, 1, 896)
    _close(_np(y), x @ _dense(qw).T, "float32")
    y1 = kernels.linear_int4(_t(x), Tensor(qw.q), Tensor(qw.scale[:, 0]))  # [N] scales are per channel too
    _close(_np(y1), x @ _dense(qw).T, "float32")


def test_int4_kernel_rejects_inputs_that_are_not_whole_blocks(kernels):
    # K = 2 * 24 = 48 is not a whole number of 32-input blocks: no layout to read, the op fails.
    with pytest.raises(RuntimeError, match="LinearInt4"):
        kernels.linear_int4(_t(np.ones((1, 48))), Tensor(np.zeros((4, 24), np.uint8)),
                            Tensor(np.ones((4, 1), np.float32))).asnumpy()
    # x's K must be twice the packed width.
    with pytest.raises(RuntimeError, match="LinearInt4"):
        kernels.linear_int4(_t(np.ones((1, 32))), Tensor(np.zeros((4, 32), np.uint8)),
                            Tensor(np.ones((4, 2), np.float32))).asnumpy()
    # A uint8 table is not an embedding the lookup kernel reads (int4 is for linear layers only).
    with pytest.raises(RuntimeError, match="Embedding"):
        kernels.embedding(Tensor(np.array([[1]], np.int32)), Tensor(np.zeros((4, 16), np.uint8)), ms.float32,
                          Tensor(np.ones(4, np.float32))).asnumpy()


def _int4_weights(shapes, group):
    qs = [quantize_int4(rng.standard_normal(s) * 0.2, group) for s in shapes]
    return [Tensor(q.q) for q in qs], [Tensor(q.scale) for q in qs], [_dense(q) for q in qs]


@pytest.mark.parametrize("group", [32, 128])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_qkv_and_gate_up_equal_separate_calls_bit_for_bit(kernels, group, bias):
    ws, scales, _ = _int4_weights([(96, 128), (32, 128), (32, 128)], group)
    bs = [_t(rng.standard_normal(n)) for n in (96, 32, 32)] if bias else None
    for lead in ((1, 1), (13,)):
        x = _t(rng.standard_normal(lead + (128,)))
        got = kernels.linear_qkv(x, ws, bs, scales)
        for i, y in enumerate(got):
            want = kernels.linear_int4(x, ws[i], scales[i], bs[i] if bias else None)
            np.testing.assert_array_equal(y.asnumpy(), want.asnumpy())
    (wg, wu), (sg, su), _ = _int4_weights([(80, 128), (80, 128)], group)
    x = _t(rng.standard_normal((3, 128)) * 2)
    got = kernels.gate_up_swiglu(x, wg, wu, (sg, su))
    want = kernels.swiglu(kernels.linear_int4(x, wg, sg), kernels.linear_int4(x, wu, su))
    np.testing.assert_array_equal(got.asnumpy(), want.asnumpy())


def test_int4_gradients_reach_x_in_a_compiled_graph(kernels):
    """Frozen int4 weights still pass gradients to x (adapters on an int4 base): equal to the dense matmul's."""
    ws, scales, dense = _int4_weights([(48, 64), (16, 64), (16, 64), (40, 64), (40, 64), (24, 64)], 32)
    d = [Tensor(a.astype(np.float32)) for a in dense]
    proj = _t(rng.standard_normal((2, 3, 40)))

    def ours(x):
        q, k, v = kernels.linear_qkv(x, ws[:3], None, scales[:3])
        h = kernels.gate_up_swiglu(x, ws[3], ws[4], scales[3:5])
        return (q * q).sum() + k.sum() + (v * v).sum() + (h * proj).sum() + kernels.linear_int4(x, ws[5], scales[5]).sum()

    def ref(x):
        q, k, v = (ops.matmul(x, d[i].T) for i in range(3))
        h = ops.silu(ops.matmul(x, d[3].T)) * ops.matmul(x, d[4].T)
        return (q * q).sum() + k.sum() + (v * v).sum() + (h * proj).sum() + ops.matmul(x, d[5].T).sum()

    x = _t(rng.standard_normal((2, 3, 64)))
    got = ms.jit(ms.value_and_grad(ours, 0))(x)
    want = ms.value_and_grad(ref, 0)(x)
    np.testing.assert_allclose(got[0].asnumpy(), want[0].asnumpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got[1].asnumpy(), want[1].asnumpy(), rtol=1e-3, atol=1e-3)


def test_cpu_ops_route_int4_by_weight_dtype_and_rows():
    """Up to 16 rows: the int4 kernel; above (prefill): the reference's dequantise + matmul. Both agree, with fp32
    activations and with activations rounded to int8 per block of 32 (the default)."""
    cpu_ops, ref_ops = CpuOps(), ReferenceOps()
    cpu_ops.quantize_activations = ref_ops.quantize_activations = False
    q8_cpu, q8_ref = CpuOps(), ReferenceOps()
    assert q8_cpu.quantize_activations and q8_ref.quantize_activations
    qw = quantize_int4(rng.standard_normal((24, 64)), 32)
    q, s = Tensor(qw.q), Tensor(qw.scale)
    for rows in (1, 16, 17, 40):
        x = _t(rng.standard_normal((1, rows, 64)))
        want = _np(x) @ _dense(qw).T
        _close(_np(cpu_ops.linear(x, q, None, s)), want, "float32")
        _close(_np(ref_ops.linear(x, q, None, s)), want, "float32")
        want = _np(reference.quantize_activations(x)) @ _dense(qw).T
        _close(_np(q8_cpu.linear(x, q, None, s)), want, "float32")
        _close(_np(q8_ref.linear(x, q, None, s)), want, "float32")


@pytest.mark.parametrize("dt", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("group", [32, 128, None])
def test_dequantize_kernel_equals_reference(kernels, dt, group):
    """The one-pass unpacking kernel gives the reference's matrix bit for bit (grouped and per-channel scales)."""
    qw = quantize_int4(rng.standard_normal((12, 256)), 32 if group is None else group)
    scale = qw.scale[:, 0].copy() if group is None else qw.scale
    q, s = Tensor(qw.q), Tensor(scale)
    got = kernels.dequantize_int4(q, s, DTYPES[dt])
    want = reference.dequantize_int4(q, s, DTYPES[dt])
    assert got.dtype == DTYPES[dt] and tuple(got.shape) == (12, 256)
    np.testing.assert_array_equal(got.astype(ms.float32).asnumpy(), want.astype(ms.float32).asnumpy())


def test_many_row_int4_linear_unpacks_in_the_kernel_and_passes_gradients(kernels):
    """Above 16 rows CpuOps multiplies by the kernel-unpacked matrix: the reference's result, and in a compiled
    graph gradients reach x (the codes and scales get none)."""
    cpu_ops = CpuOps(kernels)
    cpu_ops.quantize_activations = False  # the gradient below is the fp32 product's (rounded x: test_ops_q8_activations)
    qw = quantize_int4(rng.standard_normal((24, 64)), 32)
    q, s, b = Tensor(qw.q), Tensor(qw.scale), _t(rng.standard_normal(24))
    x = _t(rng.standard_normal((2, 20, 64)))
    ref_ops = ReferenceOps()
    ref_ops.quantize_activations = False
    np.testing.assert_allclose(cpu_ops.linear(x, q, b, s).asnumpy(), ref_ops.linear(x, q, b, s).asnumpy(),
                               rtol=1e-5, atol=1e-5)
    dense = Tensor(_dense(qw).astype(np.float32))

    def ours(t):
        return (cpu_ops.linear(t, q, b, s) ** 2).sum()

    def ref(t):
        return ((ops.matmul(t, dense.T) + b) ** 2).sum()

    grad = ms.jit(ms.grad(ours))(x)
    want = ms.grad(ref)(x)
    np.testing.assert_allclose(grad.asnumpy(), want.asnumpy(), rtol=1e-4, atol=1e-3)


# --------------------------------------------------------------------------------------------------------
# Other builds: 256-bit (no AVX-512), scalar (no AVX2), and the 512-bit build compiled where it cannot run

def _check_build(k):
    for group, m in ((32, 1), (32, 5), (128, 9)):
        qw = quantize_int4(rng.standard_normal((11, 256)) * 0.3, group)
        x = rng.standard_normal((m, 256))
        for xdt in ("float32", "bfloat16"):
            xr = _np(_t(x, xdt))
            _close(_np(k.linear_int4(_t(x, xdt), Tensor(qw.q), Tensor(qw.scale))), xr @ _dense(qw).T, xdt)
    ws, scales, dense = _int4_weights([(20, 64), (8, 64), (8, 64)], 32)
    x = rng.standard_normal((2, 64))
    for y, dn in zip(k.linear_qkv(_t(x), ws, None, scales), dense):
        _close(_np(y), x @ dn.T, "float32")


def test_int4_build_without_avx512_matches(kernel_library):
    _check_build(CpuKernels(kernel_library(cpu.compiler_flags(cpu._cpu_flags() - {"avx512f"}))))


def test_int4_portable_build_without_avx_matches(kernel_library):
    _check_build(CpuKernels(kernel_library(cpu.compiler_flags({"sse2"}))))


def test_int4_avx512_build_compiles(kernel_library):
    """The 512-bit path runs only where the CPU has AVX-512 (then the default build above tested it); here it
    must at least compile, so an AVX-512 machine never meets a build error first."""
    flags = cpu.compiler_flags({"avx2", "fma", "f16c", "avx512f", "avx512bw"})
    if {"avx512f", "avx512bw"} <= cpu._cpu_flags():
        _check_build(CpuKernels(kernel_library(flags)))
    else:  # a compile check only: -O0 compiles ~3x faster and still emits the AVX-512 intrinsics
        assert kernel_library(flags + ["-O0"]).is_file()


# --------------------------------------------------------------------------------------------------------
# The model with int4 weights

def tiny_config(**kw):
    base = dict(vocab_size=160, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, tie_word_embeddings=True)
    base.update(kw)
    return Qwen2Config(**base)


# Measured on this tiny random model (logits std 1.09), int4 against the bf16 model it came from: max |logit
# difference| 1.08 (groups of 32) and 1.43 (128), mean 0.23 and 0.26 -- 11-14x int8's 0.10 max / 0.02 mean on
# the same model, as expected of 16x coarser steps. Kernels against the reference ops on the same int4 weights
# differ by fp32 summation order only with fp32 activations; with activations rounded to int8 (the default) that
# order moves an activation across a rounding boundary now and then (one step of max|x| / 127 in one input).
INT4_VS_BF16_TOL = 1.6
INT4_VS_BF16_MEAN_TOL = 0.3  # of the bf16 logits' std
SAME_WEIGHTS_TOL = {"float32": 1e-4, "int8": 0.08}  # measured 1e-5 and 0.037


@pytest.mark.parametrize("activations", ["float32", "int8"])
@pytest.mark.parametrize("group", [32, 128])
def test_int4_model_matches_reference_ops_and_stays_close_to_bf16(group, activations):
    cfg = tiny_config()
    ours = Qwen2ForCausalLM(cfg, dtype="bfloat16", seed=3, ops_backend="cpu")
    ref = Qwen2ForCausalLM(cfg, dtype="bfloat16", seed=3, ops_backend="reference")
    before = ours(IDS, attention_mask=MASK).logits.asnumpy()
    n = 2 * 7 + 1  # 7 linear weights per layer (int4) + the tied embedding (int8 rows)
    kw = dict(bits=4, group_size=group, activations=activations)
    assert quantize_weights(ours, **kw) == n == quantize_weights(ref, **kw)
    layer = ours.model.layers[0]
    assert layer.mlp.down_proj.weight.dtype == ms.uint8 and layer.mlp.down_proj.weight.shape == (128, 128)
    assert layer.mlp.down_proj.weight_scale.shape == (128, 256 // group)
    assert not layer.self_attn.q_proj.weight.requires_grad
    assert ours.model.embed_tokens.weight.dtype == ms.int8  # the lookup (and the tied head) read int8 rows
    got = ours(IDS, attention_mask=MASK).logits.asnumpy()
    same = np.abs(got - ref(IDS, attention_mask=MASK).logits.asnumpy()).max()
    assert same <= SAME_WEIGHTS_TOL[activations]
    assert np.abs(got - before).max() <= INT4_VS_BF16_TOL
    assert np.abs(got - before).mean() <= INT4_VS_BF16_MEAN_TOL * before.std()
    if activations == "int8":
        # A rounding flip can decide a near-tie argmax, after which free-running greedy decodes part ways (seen:
        # logits 5 apart at a later step); the kernel path's rounding is checked exactly in test_ops_q8_activations.
        return
    # Greedy decoding through the compiled cached step: kernels and reference ops pick the same tokens.
    a, b = _greedy(ours, new=6), _greedy(ref, new=6)
    assert np.abs(a - b).max() <= SAME_WEIGHTS_TOL[activations]
    np.testing.assert_array_equal(a.argmax(-1), b.argmax(-1))


def test_quantize_weights_validates_and_falls_back_to_int8():
    model = Qwen2ForCausalLM(tiny_config(intermediate_size=96), dtype="bfloat16", seed=3, ops_backend="reference")
    with pytest.raises(ValueError, match="bits must be 8"):
        quantize_weights(model, bits=3)
    with pytest.raises(ValueError, match="multiple of 32, got 48"):
        quantize_weights(model, bits=4, group_size=48)
    assert quantize_weights(model, bits=4, group_size=128) == 15
    layer = model.model.layers[1]
    assert layer.mlp.up_proj.weight.dtype == ms.uint8  # K = 128: int4
    assert layer.mlp.down_proj.weight.dtype == ms.int8  # K = 96 is no multiple of 128: int8, per channel
    assert quantize_weights(model, bits=4) == 0  # already quantised: untouched


def test_kernel_profile_counts_calls_and_time_when_enabled(tmp_path):
    """$QWEN2MS_KERNEL_PROFILE=1 times every kernel call (read at the first call, so in a fresh process)."""
    import os
    import subprocess
    import sys

    code = (
        "import numpy as np, mindspore as ms\n"
        "from qwen2ms.ops.cpu import shared_kernels, kernel_profile, quantize_int4\n"
        "k = shared_kernels()\n"
        "qw = quantize_int4(np.ones((64, 64), np.float32))\n"
        "x = ms.Tensor(np.ones((1, 64), np.float32))\n"
        "for _ in range(3): k.linear_int4(x, ms.Tensor(qw.q), ms.Tensor(qw.scale)).asnumpy()\n"
        "k.swiglu(x, x).asnumpy()\n"
        "p = kernel_profile(reset=True)\n"
        "print(sorted((n, c) for n, (c, s) in p.items()), all(s > 0 for _, s in p.values()), kernel_profile())\n")
    env = dict(os.environ, QWEN2MS_KERNEL_PROFILE="1", GLOG_v="3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[('LinearInt4', 3), ('SwiGLU', 1)] True {}"


def test_q4_0_gguf_linear_weights_load_as_int4_without_dequantising(tmp_path):
    """GGUF Q4_0 blocks are this module's int4 layout: they load as they are, both backends give the logits of
    transformers on the dequantised weights, and the codes re-encode exactly with quantize_int4's rule."""
    pytest.importorskip("torch")
    gguf = pytest.importorskip("gguf")
    from test_gguf import TOL as GGUF_TOL
    from test_gguf import make_hf, max_diff, reference_logits, write_gguf

    hf, _ = make_hf(tmp_path / "hf", vocab_size=264)
    path = tmp_path / "q4.gguf"
    deq = write_gguf(path, hf, qtype=lambda name, arr: gguf.GGMLQuantizationType.Q4_0)
    model = Qwen2ForCausalLM.from_gguf(path, dtype="float32")
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == ms.uint8 and tuple(q.weight.shape) == (64, 32) and tuple(q.weight_scale.shape) == (64, 2)
    exact = deq["model.layers.0.self_attn.q_proj.weight"]
    got = QuantizedWeight(q.weight.asnumpy(), q.weight_scale.asnumpy())
    np.testing.assert_array_equal(_dense(got).astype(np.float32), exact)
    np.testing.assert_array_equal(quantize_int4(exact).q, got.q)  # same rounding rule as ggml's Q4_0
    assert model.model.embed_tokens.weight.dtype == ms.float32  # the lookup reads no int4: dequantised
    ref = reference_logits(hf, deq)
    assert max_diff(model, ref) <= GGUF_TOL
    assert max_diff(Qwen2ForCausalLM.from_gguf(path, dtype="float32", ops_backend="reference"), ref) <= GGUF_TOL
