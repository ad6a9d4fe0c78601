"""CPU backend: our C++ kernels (RMSNorm, RoPE, SwiGLU, attention, embedding, low-precision linear) via ``ops.Custom``.

The kernels in ``ops/csrc/*.cpp`` are compiled with the system C++ compiler on first use into a cache
folder keyed by a hash of the sources, the flags and the compiler version
(``~/.cache/qwen2ms/kernels/<hash>/``, or ``$QWEN2MS_KERNEL_CACHE/<hash>/``). The build writes to a
temporary file and renames it into place, so concurrent processes never load a half-written library.
Each kernel has a bprop where training uses it.

Threads: the kernels share one small pool (``csrc/pool.h``) with ``$QWEN2MS_KERNEL_THREADS`` threads
(default: the CPUs this process may run on). An idle worker spins up to ``$QWEN2MS_KERNEL_SPIN_US``
microseconds (default 300) when its previous job followed within that time (decoding), else 50, and then
sleeps, so it does not starve MindSpore's own threads between kernels.

Profiling: with ``$QWEN2MS_KERNEL_PROFILE=1`` every kernel call is timed; :func:`kernel_profile` reads the totals.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from . import reference
from .reference import INT4_BLOCK, dequantize_int4
from .dispatch import SILU_NAMES, ReferenceOps
from ..errors import Qwen2msError

__all__ = [
    "KernelBuildError",
    "CpuKernels",
    "CpuOps",
    "QuantizedWeight",
    "build_kernels",
    "collapse_huge_pages",
    "compiler_flags",
    "dequantize_int8",
    "find_compiler",
    "kernel_cache_dir",
    "kernel_profile",
    "quantize_int4",
    "quantize_int8",
]

CSRC_DIR = Path(__file__).resolve().parent / "csrc"
LIB_NAME = "libqwen2ms_kernels.so"
_SOURCES = ("common.h", "pool.h", "linear.h", "attention.h", "norm.cpp", "rope.cpp", "swiglu.cpp", "linear.cpp",
            "embedding.cpp", "attention.cpp", "kvcache.cpp", "decode_layer.cpp", "paged_attention.cpp",
            "dequant.cpp")
_build_lock = threading.Lock()


class KernelBuildError(Qwen2msError, RuntimeError):
    """The CPU kernels could not be compiled (no compiler, or the compiler failed)."""


def kernel_cache_dir() -> Path:
    """Folder holding compiled kernel libraries, one sub-folder per source hash.

    Returns:
        ``$QWEN2MS_KERNEL_CACHE`` if set, else ``~/.cache/qwen2ms/kernels``.

    Example:
        >>> kernel_cache_dir().name
        'kernels'
    """
    env = os.environ.get("QWEN2MS_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "qwen2ms" / "kernels"


def find_compiler() -> Optional[str]:
    """The C++ compiler used for the kernels: ``$CXX`` if set, else the first of g++, c++, clang++ on PATH.

    Returns:
        Absolute path of the compiler, or None when none is found.

    Example:
        >>> find_compiler() is None or os.path.isabs(find_compiler())
        True
    """
    env = os.environ.get("CXX")
    if env:
        return shutil.which(env)
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_flags() -> set:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def compiler_flags(cpu_flags: Optional[set] = None) -> List[str]:
    """Compiler flags for this CPU: AVX2+FMA+F16C code when ``/proc/cpuinfo`` lists all three, else portable -O3.

    With AVX-512 (F and BW) too, the linear kernel uses 512-bit vectors: widening int8/bf16 weights to fp32
    then takes half the instructions (+9-10% GEMV throughput with int8/bf16 weights on the development
    machine); the other kernels keep their AVX2 code. With ``avx512_vnni`` (and ``avx512vl``) or ``avx_vnni``,
    the integer dot products of int8/int4 weights against quantised activations use ``vpdpbusd`` (one
    instruction for AVX2's ``vpmaddubsw`` + ``vpmaddwd``, same values).

    Args:
        cpu_flags: CPU feature flags to decide from (default: read ``/proc/cpuinfo``).

    Returns:
        The flag list passed to the compiler (always with ``-O3 -shared -fPIC -pthread``).

    Example:
        >>> "-mavx2" in compiler_flags({"avx2", "fma", "f16c"})
        True
        >>> "-mavx512bw" in compiler_flags({"avx2", "fma", "f16c", "avx512f", "avx512bw"})
        True
        >>> "-mavxvnni" in compiler_flags({"avx2", "fma", "f16c", "avx_vnni"})
        True
    """
    flags = _cpu_flags() if cpu_flags is None else set(cpu_flags)
    # Threads come from our own pool (csrc/pool.h), not OpenMP; -fopenmp-simd only enables `omp simd`.
    out = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fopenmp-simd"]
    if {"avx2", "fma", "f16c"} <= flags:
        out += ["-mavx2", "-mfma", "-mf16c"]
        if {"avx512f", "avx512bw"} <= flags:
            out += ["-mavx512f", "-mavx512bw"]
            if {"avx512_vnni", "avx512vl"} <= flags:
                out += ["-mavx512vnni", "-mavx512vl"]
        if "avx_vnni" in flags and "-mavx512vnni" not in out:
            out += ["-mavxvnni"]
    return out


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def build_kernels(cxx: Optional[str] = None, cache_dir: Optional[Path] = None, force: bool = False,
                  flags: Optional[Sequence[str]] = None) -> Path:
    """Compile the kernel library if it is not cached yet, and return its absolute path.

    Args:
        cxx: compiler to use (default: :func:`find_compiler`).
        cache_dir: cache root (default: :func:`kernel_cache_dir`).
        force: rebuild even when a cached library exists.
        flags: compiler flags (default: :func:`compiler_flags` for this CPU).

    Returns:
        Absolute path of ``libqwen2ms_kernels.so`` inside ``<cache_dir>/<hash>/``.

    Raises:
        KernelBuildError: no compiler was found, or compilation failed (the message has its output).

    Example:
        >>> lib = build_kernels()
        >>> lib.name
        'libqwen2ms_kernels.so'
    """
    cxx = cxx or find_compiler()
    if not cxx:
        raise KernelBuildError(
            "no C++ compiler found for the qwen2ms CPU kernels (looked for $CXX, g++, c++, clang++): "
            "install g++ (e.g. `apt-get install g++`) or use the reference ops with "
            "QWEN2MS_OPS_BACKEND=reference"
        )
    flags = list(flags) if flags is not None else compiler_flags()
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update(name.encode())
        digest.update((CSRC_DIR / name).read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(_compiler_version(cxx).encode())
    folder = Path(cache_dir or kernel_cache_dir()) / digest.hexdigest()[:20]
    lib = folder / LIB_NAME
    with _build_lock:
        if lib.is_file() and not force:
            return lib.resolve()
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=folder)
        os.close(fd)
        cpp = [str(CSRC_DIR / n) for n in _SOURCES if n.endswith(".cpp")]
        cmd = [cxx, *flags, "-I", str(CSRC_DIR), "-o", tmp, *cpp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise KernelBuildError(
                    f"compiling the qwen2ms CPU kernels failed (exit {proc.returncode}):\n"
                    f"$ {' '.join(cmd)}\n{proc.stderr.strip()[-4000:]}\n"
                    "Use QWEN2MS_OPS_BACKEND=reference to run without them."
                )
            os.replace(tmp, lib)
        except (OSError, subprocess.SubprocessError) as exc:
            raise KernelBuildError(f"running the compiler {cxx!r} failed: {exc}") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib.resolve()


class QuantizedWeight:
    """A weight-only quantised matrix: ``W ~= q * scale`` with per-output-channel or per-group scales.

    Args:
        q: int8 tensor [N, K], or uint8 [N, K / 2] holding int4 values packed two per byte
            (:func:`quantize_int4`; the layout is :func:`qwen2ms.ops.reference.dequantize_int4`'s).
        scale: float32 tensor [N] (one scale per output channel), or [N, G] (one per group of ``K // G``
            consecutive inputs of a channel).

    Example:
        >>> qw = quantize_int8(np.ones((4, 8), np.float32))
        >>> qw.q.shape, qw.scale.shape
        ((4, 8), (4,))
    """

    def __init__(self, q, scale):
        self.q = q
        self.scale = scale

    @property
    def shape(self) -> Tuple[int, int]:
        """``[N, K]`` of the matrix the codes stand for (int4 codes hold two inputs per byte)."""
        n, k = tuple(self.q.shape)
        return (n, 2 * k) if str(self.q.dtype).lower() in ("uint8", "uint8_t") else (n, k)


#: Group sizes along K must be multiples of this (whole vector steps of the kernel).
INT8_GROUP_MULTIPLE = 32


def quantize_int8(weight, group_size: Optional[int] = None) -> QuantizedWeight:
    """Symmetric int8 quantisation of a [N, K] weight (round to nearest), per output channel or per group.

    Args:
        weight: numpy array or MindSpore tensor [N, K], any float dtype.
        group_size: None for one scale per output channel; else one scale per ``group_size`` consecutive
            inputs of a channel (a multiple of 32 dividing K; K itself means per channel).

    Returns:
        :class:`QuantizedWeight` with numpy ``q`` (int8) and ``scale`` (float32, max|values|/127, 1 for all-zero
        rows/groups): ``[N]`` per channel, ``[N, K // group_size]`` per group.

    Raises:
        ValueError: not a matrix, or a group size that is not a multiple of 32 dividing K.

    Example:
        >>> qw = quantize_int8(np.array([[0.5, -1.0]], np.float32))
        >>> qw.q.tolist(), float(qw.scale[0]) == 1.0 / 127
        ([[64, -127]], True)
        >>> quantize_int8(np.ones((4, 64), np.float32), group_size=32).scale.shape
        (4, 2)
    """
    w = weight.astype("float32").asnumpy() if hasattr(weight, "asnumpy") else np.asarray(weight, np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_int8 expects a [out, in] weight matrix, got shape {w.shape}")
    n, k = w.shape
    if group_size is not None and group_size != k:
        if group_size <= 0 or group_size % INT8_GROUP_MULTIPLE or k % group_size:
            raise ValueError(f"quantize_int8 group_size={group_size} must be a multiple of {INT8_GROUP_MULTIPLE} "
                             f"that divides the input size {k} (or None for per-channel scales)")
        wg = w.reshape(n, k // group_size, group_size)
        amax = np.abs(wg).max(axis=2)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(wg / scale[:, :, None]), -127, 127).astype(np.int8).reshape(n, k)
        return QuantizedWeight(q, scale)
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8)
    return QuantizedWeight(q, scale)


def quantize_int4(weight, group_size: int = 32) -> QuantizedWeight:
    """Symmetric int4 quantisation of a [N, K] weight, one scale per group of ``group_size`` inputs, packed.

    GGUF Q4_0's rule, so that a Q4_0 file and this give the same codes: per group, ``d = m / -8`` where ``m`` is
    the value of largest magnitude (so ``m`` itself is exactly -8 steps), and ``q = min(15, floor(w / d + 8.5))``
    stored as the nibble ``q`` (value ``q - 8``). Every element is within ``|d|`` of its value (within ``|d| / 2``
    except the clamped ones on ``m``'s far side).

    Args:
        weight: numpy array or MindSpore tensor [N, K], any float dtype; K a multiple of 32.
        group_size: inputs per scale, a multiple of 32 dividing K (32 is Q4_0's; 128 reads 6% fewer bytes).

    Returns:
        :class:`QuantizedWeight` with numpy ``q`` (uint8 [N, K / 2], see
        :func:`qwen2ms.ops.reference.dequantize_int4` for the layout) and ``scale`` (float32 [N, K / group_size]).

    Raises:
        ValueError: not a matrix, or a group size that is not a multiple of 32 dividing K.

    Example:
        >>> qw = quantize_int4(np.arange(-16, 16, dtype=np.float32).reshape(1, 32))
        >>> qw.q.shape, qw.scale.tolist()
        ((1, 16), [[2.0]])
    """
    w = weight.astype("float32").asnumpy() if hasattr(weight, "asnumpy") else np.asarray(weight, np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize_int4 expects a [out, in] weight matrix, got shape {w.shape}")
    n, k = w.shape
    if group_size is None or group_size <= 0 or group_size % INT4_BLOCK or k % group_size:
        raise ValueError(f"quantize_int4 group_size={group_size} must be a multiple of {INT4_BLOCK} that divides "
                         f"the input size {k}")
    wg = w.reshape(n, k // group_size, group_size)
    m = np.take_along_axis(wg, np.abs(wg).argmax(axis=2)[:, :, None], axis=2)[:, :, 0]
    d = (m / np.float32(-8.0)).astype(np.float32)
    inv = np.divide(np.float32(1.0), d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.floor(wg * inv[:, :, None] + np.float32(8.5)), 0, 15).astype(np.uint8).reshape(n, k)
    blocks = q.reshape(n, k // INT4_BLOCK, 2, INT4_BLOCK // 2)
    packed = (blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)).reshape(n, k // 2)
    return QuantizedWeight(np.ascontiguousarray(packed), d)


def dequantize_int8(q, scale):
    """``q * scale`` as a float32 [N, K] MindSpore tensor, for per-channel ``[N]`` or per-group ``[N, G]`` scales.

    Args:
        q: int8 tensor [N, K].
        scale: float32 tensor [N] or [N, G].

    Returns:
        float32 tensor [N, K].

    Example:
        >>> qw = quantize_int8(np.ones((2, 64), np.float32), group_size=32)
        >>> dequantize_int8(ms.Tensor(qw.q), ms.Tensor(qw.scale)).shape
        (2, 64)
    """
    w = ops.cast(q, ms.float32)
    if scale.ndim == 1:
        return w * ops.expand_dims(scale, 1)
    n, k = q.shape
    g = scale.shape[1]
    return ops.reshape(ops.reshape(w, (n, g, k // g)) * ops.expand_dims(scale, 2), (n, k))


class CpuKernels:
    """The compiled kernels as MindSpore ``Custom`` primitives, with bprops; usable in PyNative, jit and graph mode.

    Args:
        lib_path: the compiled library (default: :func:`build_kernels`).

    Example:
        >>> k = CpuKernels()
        >>> y = k.swiglu(ms.Tensor(np.ones((2, 3), np.float32)), ms.Tensor(np.ones((2, 3), np.float32)))
    """

    def __init__(self, lib_path: Optional[Path] = None):
        self.lib_path = Path(lib_path or build_kernels()).resolve()
        lib = str(self.lib_path)

        def custom(name, out_shape, out_dtype, bprop=None):
            return ops.Custom(f"{lib}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot",
                              bprop=bprop)

        def first_dtype(*dts):
            return dts[0]

        # --- RMSNorm -------------------------------------------------------------------------------------
        self._rms_norm_grad = custom(
            "RmsNormGrad", lambda dy, x, w, e: (x, w), lambda dy, x, w, e: (x, w))

        def rms_norm_bprop(x, w, eps, out, dout):
            dx, dw = self._rms_norm_grad(dout, x, w, eps)
            return dx, dw, ops.zeros_like(eps)

        self._rms_norm = custom("RmsNorm", lambda x, w, e: x, lambda x, w, e: x, rms_norm_bprop)

        def add_rms_norm_bprop(x, res, w, eps, out, dout):
            dy, ds = dout
            dsum, dw = self._rms_norm_grad(dy, out[1], w, eps)
            total = ops.cast(dsum, ms.float32) + ops.cast(ds, ms.float32)
            return ops.cast(total, x.dtype), ops.cast(total, res.dtype), dw, ops.zeros_like(eps)

        self._add_rms_norm = custom(
            "AddRmsNorm", lambda x, r, w, e: (x, x), lambda x, r, w, e: (x, x), add_rms_norm_bprop)

        # --- RoPE ----------------------------------------------------------------------------------------
        def rope_pair(fwd: str, grad: str):
            grad_op = custom(grad, lambda q, k, c, s: (q, k), lambda q, k, c, s: (q, k))

            def bprop(q, k, cos, sin, out, dout):
                dq, dk = grad_op(dout[0], dout[1], cos, sin)
                return dq, dk, ops.zeros_like(cos), ops.zeros_like(sin)

            return custom(fwd, lambda q, k, c, s: (q, k), lambda q, k, c, s: (q, k), bprop)

        self._rope = {"BNSD": rope_pair("RopeBNSD", "RopeBNSDGrad"), "BSND": rope_pair("RopeBSND", "RopeBSNDGrad")}

        # --- SwiGLU --------------------------------------------------------------------------------------
        self._swiglu_grad = custom("SwiGLUGrad", lambda d, g, u: (g, u), lambda d, g, u: (g, u))

        def swiglu_bprop(gate, up, out, dout):
            return self._swiglu_grad(dout, gate, up)

        self._swiglu = custom("SwiGLU", lambda g, u: g, first_dtype, swiglu_bprop)

        # --- Linear --------------------------------------------------------------------------------------
        def linear_shape(x, w, *rest):
            return list(x[:-1]) + [w[0]]

        def dx_of(dout, w_f32, x):
            # dx = dy @ W; dW = dy^T @ x, both in fp32 (bf16 matmul does not run on CPU).
            k = w_f32.shape[1]
            dy2 = ops.reshape(ops.cast(dout, ms.float32), (-1, w_f32.shape[0]))
            dx = ops.reshape(ops.matmul(dy2, w_f32), x.shape)
            dw = ops.matmul(ops.transpose(dy2, (1, 0)), ops.reshape(ops.cast(x, ms.float32), (-1, k)))
            return ops.cast(dx, x.dtype), dw, dy2

        def linear_bprop(x, w, out, dout):
            dx, dw, _ = dx_of(dout, ops.cast(w, ms.float32), x)
            return dx, ops.cast(dw, w.dtype)

        def linear_bias_bprop(x, w, b, out, dout):
            dx, dw, dy2 = dx_of(dout, ops.cast(w, ms.float32), x)
            return dx, ops.cast(dw, w.dtype), ops.cast(ops.reduce_sum(dy2, 0), b.dtype)

        def linear_q_bprop(x, q, scale, out, dout):
            w = dequantize_int8(q, scale)
            dx, _, _ = dx_of(dout, w, x)
            # int8 weights are frozen: no gradient flows into them or their scales.
            return dx, ops.zeros_like(q), ops.zeros_like(scale)

        def linear_q_bias_bprop(x, q, scale, b, out, dout):
            w = dequantize_int8(q, scale)
            dx, _, dy2 = dx_of(dout, w, x)
            return dx, ops.zeros_like(q), ops.zeros_like(scale), ops.cast(ops.reduce_sum(dy2, 0), b.dtype)

        # int4 weights are frozen like int8 ones; x still gets its gradient (adapters on an int4 base).
        def linear_q4_bprop(x, q, scale, out, dout):
            dx, _, _ = dx_of(dout, dequantize_int4(q, scale), x)
            return dx, ops.zeros_like(q), ops.zeros_like(scale)

        def linear_q4_bias_bprop(x, q, scale, b, out, dout):
            dx, _, dy2 = dx_of(dout, dequantize_int4(q, scale), x)
            return dx, ops.zeros_like(q), ops.zeros_like(scale), ops.cast(ops.reduce_sum(dy2, 0), b.dtype)

        # --- Attention -----------------------------------------------------------------------------------
        bmm_tb = ops.BatchMatMul(transpose_b=True)
        bmm_ta = ops.BatchMatMul(transpose_a=True)
        bmm = ops.BatchMatMul()

        def attention_bprop(q, k, v, mask, scale, out, dout):
            # Recompute the probabilities in fp32 and apply the softmax-attention backward; masked scores
            # get no gradient (the reference selects them away with `where`).
            b, hq, t, d = q.shape
            hkv, s = k.shape[1], k.shape[2]
            g = hq // hkv
            qf = ops.reshape(ops.cast(q, ms.float32), (b, hkv, g * t, d))
            kf, vf = ops.cast(k, ms.float32), ops.cast(v, ms.float32)
            keep = ops.broadcast_to(ops.expand_dims(mask, 1), (b, 1, g, t, s))
            keep = ops.reshape(ops.broadcast_to(keep, (b, hkv, g, t, s)), (b, hkv, g * t, s))
            scores = bmm_tb(qf, kf) * scale
            scores = ops.select(keep, scores, ops.full_like(scores, -1.0e30))
            p = ops.softmax(scores, -1)
            do = ops.reshape(ops.cast(dout, ms.float32), (b, hkv, g * t, d))
            dv = bmm_ta(p, do)
            dp = bmm_tb(do, vf)
            ds = p * (dp - (dp * p).sum(-1, keepdims=True))
            ds = ops.select(keep, ds, ops.zeros_like(ds)) * scale
            dq = ops.reshape(bmm(ds, kf), (b, hq, t, d))
            dk = bmm_ta(ds, qf)
            return (ops.cast(dq, q.dtype), ops.cast(dk, k.dtype), ops.cast(dv, v.dtype),
                    ops.zeros_like(mask), ops.zeros_like(scale))

        self._attention = custom("Attention", lambda q, k, v, m, s: q, first_dtype, attention_bprop)

        # --- KV cache write (in place) ------------------------------------------------------------------
        # side_effect_mem: MindSpore then hands the kernel the cache Parameters' own memory (without it,
        # graph mode passes copies and the write is lost) and keeps the op although its output is unused.
        self._kv_write = custom("KvCacheWrite", lambda kc, vc, k, v, p: [1], lambda kc, vc, k, v, p: ms.int32)
        self._kv_write.add_prim_attr("side_effect_mem", True)

        # --- Paged KV cache (serving): in-place slot write, attention through block tables (inference only) ---
        self._paged_write = custom("PagedCacheWrite", lambda kp, vp, k, v, s: [1], lambda kp, vp, k, v, s: ms.int32)
        self._paged_write.add_prim_attr("side_effect_mem", True)
        self._paged_attention = custom("PagedAttention", lambda q, kp, vp, bt, m, s: q, first_dtype)

        # --- Embedding -----------------------------------------------------------------------------------
        def embedding_shape(ids, table, *rest):
            return list(ids) + [table[1]]

        def embedding_dtype(*dts):
            return ms.float32

        def embedding_bprop(ids, table, out, dout):
            # Rows of the table receive the sum of the gradients of every position that read them.
            h = table.shape[1]
            rows = ops.reshape(ops.cast(dout, ms.float32), (-1, h))
            grad = ops.unsorted_segment_sum(rows, ops.reshape(ids, (-1,)), table.shape[0])
            return ops.zeros_like(ids), ops.cast(grad, table.dtype)

        def embedding_q_bprop(ids, table, scale, out, dout):
            return ops.zeros_like(ids), ops.zeros_like(table), ops.zeros_like(scale)  # int8 tables are frozen

        self._embedding = custom("Embedding", embedding_shape, embedding_dtype, embedding_bprop)
        self._embedding_q = custom("EmbeddingInt8", embedding_shape, embedding_dtype, embedding_q_bprop)
        # --- Several projections of one x (q/k/v) and gate/up + SwiGLU, one kernel call each ----------------
        def qkv_shape(x, *rest):
            return tuple(list(x[:-1]) + [w[0]] for w in rest[:3])

        def qkv_dtype(x, *rest):
            return (x, x, x)

        def qkv_grads(x, ws, scales, biases, dout, int4=False):
            # dx sums the three projections' input gradients; int8/int4 weights and their scales get none.
            # (Plain loops and list concatenation: MindSpore parses this as a graph.)
            dx, dws, dss, dbs = None, [], [], []
            for i in range(3):
                if scales is None:
                    w32 = ops.cast(ws[i], ms.float32)
                elif int4:
                    w32 = dequantize_int4(ws[i], scales[i])
                else:
                    w32 = dequantize_int8(ws[i], scales[i])
                dxi, dwi, dy2 = dx_of(dout[i], w32, x)
                dx = dxi if dx is None else dx + dxi
                if scales is None:
                    dws.append(ops.cast(dwi, ws[i].dtype))
                else:
                    dws.append(ops.zeros_like(ws[i]))
                    dss.append(ops.zeros_like(scales[i]))
                if biases is not None:
                    dbs.append(ops.cast(ops.reduce_sum(dy2, 0), biases[i].dtype))
            return tuple([dx] + dws + dss + dbs)

        # MindSpore parses bprops as graphs: explicit parameters, one function per input signature.
        def qkv_bprop(x, w1, w2, w3, out, dout):
            return qkv_grads(x, (w1, w2, w3), None, None, dout)

        def qkv_bias_bprop(x, w1, w2, w3, b1, b2, b3, out, dout):
            return qkv_grads(x, (w1, w2, w3), None, (b1, b2, b3), dout)

        def qkv_q_bprop(x, w1, w2, w3, s1, s2, s3, out, dout):
            return qkv_grads(x, (w1, w2, w3), (s1, s2, s3), None, dout)

        def qkv_q_bias_bprop(x, w1, w2, w3, s1, s2, s3, b1, b2, b3, out, dout):
            return qkv_grads(x, (w1, w2, w3), (s1, s2, s3), (b1, b2, b3), dout)

        def qkv_q4_bprop(x, w1, w2, w3, s1, s2, s3, out, dout):
            return qkv_grads(x, (w1, w2, w3), (s1, s2, s3), None, dout, True)

        def qkv_q4_bias_bprop(x, w1, w2, w3, s1, s2, s3, b1, b2, b3, out, dout):
            return qkv_grads(x, (w1, w2, w3), (s1, s2, s3), (b1, b2, b3), dout, True)

        def gate_up_shape(x, wg, *rest):
            return list(x[:-1]) + [wg[0]]

        def gate_up_grads(x, wg, wu, sg, su, dout, int4=False):
            # Recompute gate and up (as the separate kernels would store them), then SwiGLU's backward.
            if sg is None:
                gate, up = self._linear(x, wg), self._linear(x, wu)
                wg32, wu32 = ops.cast(wg, ms.float32), ops.cast(wu, ms.float32)
            elif int4:
                gate, up = self._linear_q4(x, wg, sg), self._linear_q4(x, wu, su)
                wg32, wu32 = dequantize_int4(wg, sg), dequantize_int4(wu, su)
            else:
                gate, up = self._linear_q(x, wg, sg), self._linear_q(x, wu, su)
                wg32, wu32 = dequantize_int8(wg, sg), dequantize_int8(wu, su)
            dg, du = self._swiglu_grad(dout, gate, up)
            dxg, dwg, _ = dx_of(dg, wg32, x)
            dxu, dwu, _ = dx_of(du, wu32, x)
            if sg is None:
                return dxg + dxu, ops.cast(dwg, wg.dtype), ops.cast(dwu, wu.dtype)
            return dxg + dxu, ops.zeros_like(wg), ops.zeros_like(wu), ops.zeros_like(sg), ops.zeros_like(su)

        def gate_up_bprop(x, wg, wu, out, dout):
            return gate_up_grads(x, wg, wu, None, None, dout)

        def gate_up_q_bprop(x, wg, wu, sg, su, out, dout):
            return gate_up_grads(x, wg, wu, sg, su, dout)

        def gate_up_q4_bprop(x, wg, wu, sg, su, out, dout):
            return gate_up_grads(x, wg, wu, sg, su, dout, True)

        self._qkv = {
            (False, False): custom("LinearQkv", qkv_shape, qkv_dtype, qkv_bprop),
            (False, True): custom("LinearQkvBias", qkv_shape, qkv_dtype, qkv_bias_bprop),
            (True, False): custom("LinearQkvInt8", qkv_shape, qkv_dtype, qkv_q_bprop),
            (True, True): custom("LinearQkvInt8Bias", qkv_shape, qkv_dtype, qkv_q_bias_bprop),
        }
        self._gate_up = {False: custom("GateUpSwiGLU", gate_up_shape, first_dtype, gate_up_bprop),
                         True: custom("GateUpSwiGLUInt8", gate_up_shape, first_dtype, gate_up_q_bprop)}
        # int4 weights (uint8 packed codes): the same kernels under their own names (their bprops differ).
        self._qkv4 = {False: custom("LinearQkvInt4", qkv_shape, qkv_dtype, qkv_q4_bprop),
                      True: custom("LinearQkvInt4Bias", qkv_shape, qkv_dtype, qkv_q4_bias_bprop)}
        self._gate_up4 = custom("GateUpSwiGLUInt4", gate_up_shape, first_dtype, gate_up_q4_bprop)
        self._linear_q4 = custom("LinearInt4", linear_shape, first_dtype, linear_q4_bprop)
        self._linear_q4_bias = custom("LinearInt4Bias", linear_shape, first_dtype, linear_q4_bias_bprop)

        def dequant_shape(q, scale):
            return [q[0], 2 * q[1]]

        def dequant_bprop(q, scale, out, dout):
            # The codes and scales are frozen inference weights: no gradient reaches them.
            return ops.zeros_like(q), ops.zeros_like(scale)

        def as_f32(q, scale):
            return ms.float32

        def as_f16(q, scale):
            return ms.float16

        def as_bf16(q, scale):
            return ms.bfloat16

        self._dequant_q4_f32 = custom("DequantInt4F32", dequant_shape, as_f32, dequant_bprop)
        self._dequant_q4_f16 = custom("DequantInt4F16", dequant_shape, as_f16, dequant_bprop)
        self._dequant_q4_bf16 = custom("DequantInt4BF16", dequant_shape, as_bf16, dequant_bprop)

        # --- One dense decoder layer of a one-token step (inference: no bprop), cache written in place ----------
        self._decode_layer = {
            (quant, bias): custom("DecodeLayer" + ("Quant" if quant else "") + ("Bias" if bias else ""),
                                  lambda x, *rest: x, first_dtype)
            for quant in (False, True) for bias in (False, True)}
        for op in self._decode_layer.values():
            op.add_prim_attr("side_effect_mem", True)  # as KvCacheWrite: the cache Parameters' own memory

        self._linear = custom("Linear", linear_shape, first_dtype, linear_bprop)
        self._linear_bias = custom("LinearBias", linear_shape, first_dtype, linear_bias_bprop)
        self._linear_q = custom("LinearInt8", linear_shape, first_dtype, linear_q_bprop)
        self._linear_q_bias = custom("LinearInt8Bias", linear_shape, first_dtype, linear_q_bias_bprop)

        # --- int8/int4 weights against quantised activations (x rounded to int8 per block of 32) ------------------
        # Own kernel names (MindSpore caches a Custom op by name). The backward treats the rounding of x as the
        # identity (straight-through): the same bprops as the fp32-activation kernels.
        self._q8a = {
            "linear_q": custom("LinearInt8Q8A", linear_shape, first_dtype, linear_q_bprop),
            "linear_q_bias": custom("LinearInt8BiasQ8A", linear_shape, first_dtype, linear_q_bias_bprop),
            "linear_q4": custom("LinearInt4Q8A", linear_shape, first_dtype, linear_q4_bprop),
            "linear_q4_bias": custom("LinearInt4BiasQ8A", linear_shape, first_dtype, linear_q4_bias_bprop),
            "qkv_q": custom("LinearQkvInt8Q8A", qkv_shape, qkv_dtype, qkv_q_bprop),
            "qkv_q_bias": custom("LinearQkvInt8BiasQ8A", qkv_shape, qkv_dtype, qkv_q_bias_bprop),
            "qkv_q4": custom("LinearQkvInt4Q8A", qkv_shape, qkv_dtype, qkv_q4_bprop),
            "qkv_q4_bias": custom("LinearQkvInt4BiasQ8A", qkv_shape, qkv_dtype, qkv_q4_bias_bprop),
            "gate_up_q": custom("GateUpSwiGLUInt8Q8A", gate_up_shape, first_dtype, gate_up_q_bprop),
            "gate_up_q4": custom("GateUpSwiGLUInt4Q8A", gate_up_shape, first_dtype, gate_up_q4_bprop),
        }

        def quantize_q8_bprop(x, out, dout):
            return (dout,)  # straight-through: the rounding counts as the identity for gradients

        self._quantize_q8 = custom("QuantizeQ8", lambda x: x, first_dtype, quantize_q8_bprop)
        self._decode_layer_q8a = {
            bias: custom("DecodeLayerQuant" + ("Bias" if bias else "") + "Q8A", lambda x, *rest: x, first_dtype)
            for bias in (False, True)}
        for op in self._decode_layer_q8a.values():
            op.add_prim_attr("side_effect_mem", True)

    def rms_norm(self, x, weight, eps: float):
        """RMSNorm over the last axis: ``weight * cast(x * rsqrt(mean(x^2) + eps), x.dtype)``.

        Args:
            x: [..., H] fp32/fp16/bf16.
            weight: [H].
            eps: variance epsilon.

        Returns:
            [..., H] in the dtype of x.
        """
        return self._rms_norm(x, weight, ms.Tensor([eps], ms.float32))

    def add_rms_norm(self, x, residual, weight, eps: float):
        """Residual add then RMSNorm: returns ``(rms_norm(x + residual), x + residual)``.

        Args:
            x: [..., H]; residual: [..., H]; weight: [H]; eps: variance epsilon.

        Returns:
            Tuple (normed, summed), both [..., H] in the dtype of x.
        """
        return self._add_rms_norm(x, residual, weight, ms.Tensor([eps], ms.float32))

    def apply_rope(self, q, k, cos, sin, layout: str = "BNSD"):
        """Rotary embedding (rotate-half convention) applied to q and k in one kernel.

        Args:
            q: [B, Nq, S, D] (layout "BNSD") or [B, S, Nq, D] ("BSND").
            k: same layout with Nkv heads.
            cos, sin: [S, D], [1, S, D] or [B, S, D] (also [B, 1, S, D]), one dtype.
            layout: "BNSD" or "BSND".

        Returns:
            Tuple (q_rot, k_rot) with the shapes and dtypes of q and k.
        """
        op = self._rope.get(layout)
        if op is None:
            raise ValueError(f"apply_rope layout must be 'BNSD' or 'BSND', got {layout!r}")
        return op(q, k, cos, sin)

    def attention(self, q, k, v, mask, scale: float):
        """Grouped-query attention with a boolean mask, softmax in fp32 (the reference's semantics).

        Args:
            q: [B, Hq, T, D]; k, v: [B, Hkv, S, D] (Hq a multiple of Hkv).
            mask: bool [B or 1, 1, T, S], True = may attend.
            scale: score multiplier.

        Returns:
            [B, Hq, T, D] in the dtype of q; a fully masked row averages all values uniformly.
        """
        return self._attention(q, k, v, mask, ms.Tensor([scale], ms.float32))

    def kv_cache_write(self, k_cache, v_cache, key, value, start):
        """Write ``key``/``value`` ``[B, H, T, D]`` into cache slots ``[start, start + T)`` in place.

        Args:
            k_cache, v_cache: the cache Parameters ``[B, H, L, D]`` (one float dtype).
            key, value: the new rows (any float dtype; converted to the cache's).
            start: int32 scalar Tensor, the first slot; slots outside ``[0, L)`` are skipped.

        Returns:
            An int32 ``[1]`` token: read the caches through ``ops.depend(cache, token)`` so that reads are
            ordered after the write.
        """
        return self._kv_write(k_cache, v_cache, key, value, start)

    def decode_layer(self, x, cos, sin, mask, k_cache, v_cache, position, ln1, ln2, eps, scale, weights,
                     scales=None, biases=None, quantize_x=False):
        """One dense decoder layer for one new token per row, in one kernel call; equal to the separate kernels.

        ``y = s + down(silu(gate(n2)) * up(n2))`` with ``n2 = rms_norm(s)``, ``s = x + o_proj(attention)``, where
        attention reads q/k/v of ``rms_norm(x)`` (RoPE applied) against the cache after writing k/v at ``position``.

        Args:
            x: float32 ``[B, 1, H]``, the residual stream.
            cos, sin: RoPE tables ``[B or 1, 1, D]``.
            mask: bool ``[B or 1, 1, 1, L]`` over cache slots.
            k_cache, v_cache: the layer's cache Parameters ``[B, Hkv, L, D]`` (float dtype), written in place.
            position: int32 scalar Tensor, the slot of the new token.
            ln1, ln2: ``input_layernorm`` and ``post_attention_layernorm`` weights ``[H]``.
            eps: the norms' epsilon; scale: the attention score scale.
            weights: q, k, v, o, gate, up, down weights ``[N, K]`` (float, int8, or uint8 int4 codes ``[N, K / 2]``).
            scales: None, or the seven float32 scales of int8/int4 weights (``[N]`` or ``[N, G]``).
            biases: None, or the q, k, v biases.
            quantize_x: int8/int4 weights read ``x`` rounded to int8 codes per block of 32 inputs (scale
                max|x| / 127; :func:`qwen2ms.ops.reference.quantize_activations`) with integer dot products.

        Returns:
            float32 ``[B, 1, H]``, the layer's output.
        """
        args = (x, cos, sin, mask, k_cache, v_cache, position, ln1, ln2, ms.Tensor([eps, scale], ms.float32)) + weights
        if scales is not None:
            args = args + scales
        if biases is not None:
            args = args + biases
        if quantize_x and scales is not None:
            return self._decode_layer_q8a[biases is not None](*args)
        return self._decode_layer[(scales is not None, biases is not None)](*args)

    def paged_cache_write(self, key_pool, value_pool, key, value, slot_mapping):
        """Write ``key``/``value`` ``[B, H, T, D]`` into pools ``[N, block_size, H, D]`` at ``slot_mapping``
        (int32 ``[B * T]``, ``block * block_size + offset``) in place; slots outside the pool are skipped.

        Returns:
            An int32 ``[1]`` token: read the pools through ``ops.depend(pool, token)``.
        """
        return self._paged_write(key_pool, value_pool, key, value, slot_mapping)

    def paged_attention(self, q, key_pool, value_pool, block_tables, mask, scale: float):
        """GQA attention of ``q`` ``[B, Hq, T, D]`` over pools ``[N, block_size, Hkv, D]`` read through
        ``block_tables`` (int32 ``[B, M]``) with a bool ``mask`` ``[B, 1, T, M * block_size]``; the reference's
        semantics (:func:`qwen2ms.ops.reference.paged_attention`). A block id outside the pool fails the call."""
        return self._paged_attention(q, key_pool, value_pool, block_tables, mask, ms.Tensor([scale], ms.float32))

    def swiglu(self, gate, up):
        """``silu(gate) * up`` elementwise (gate and up of one shape).

        Args:
            gate, up: same shape, fp32/fp16/bf16.

        Returns:
            Tensor of that shape in the dtype of gate.
        """
        return self._swiglu(gate, up)

    def linear(self, x, weight, bias=None):
        """``x @ weight.T (+ bias)`` with fp32 accumulation, for fp32/fp16/bf16, int8 or int4 weights.

        Args:
            x: [..., K] fp32/fp16/bf16.
            weight: [N, K] tensor, or a :class:`QuantizedWeight` whose ``q``/``scale`` are MindSpore tensors.
            bias: optional [N].

        Returns:
            [..., N] in the dtype of x.
        """
        if isinstance(weight, QuantizedWeight):
            if weight.q.dtype == ms.uint8:
                return self.linear_int4(x, weight.q, weight.scale, bias)
            if bias is None:
                return self._linear_q(x, weight.q, weight.scale)
            return self._linear_q_bias(x, weight.q, weight.scale, bias)
        if bias is None:
            return self._linear(x, weight)
        return self._linear_bias(x, weight, bias)

    def linear_qkv(self, x, weights, biases=None, scales=None, quantize_x=False):
        """Three projections of one input in one kernel call: ``x @ w.T (+ b)`` for each of ``weights``.

        The weight rows of all three are handed out to the threads as one range, so attention's q/k/v cost
        one call and one thread wake-up; the values equal three :meth:`linear` calls bit for bit.

        Args:
            x: [..., K] fp32/fp16/bf16.
            weights: three [N_i, K] tensors of one dtype (int8, or uint8 int4 codes [N_i, K / 2], with ``scales``).
            biases: None, or three [N_i] tensors.
            scales: None, or the three float32 scales of int8/int4 weights ([N_i] or [N_i, G_i]).
            quantize_x: int8/int4 weights read ``x`` rounded to int8 codes per block of 32 inputs (scale
                max|x| / 127; :func:`qwen2ms.ops.reference.quantize_activations`) with integer dot products.

        Returns:
            Tuple of three [..., N_i] tensors in the dtype of x.
        """
        args = list(weights)
        if scales is not None:
            args += list(scales)
        if biases is not None:
            args += list(biases)
        if scales is not None and quantize_x:
            name = ("qkv_q4" if weights[0].dtype == ms.uint8 else "qkv_q") + ("_bias" if biases is not None else "")
            return self._q8a[name](x, *args)
        if scales is not None and weights[0].dtype == ms.uint8:
            return self._qkv4[biases is not None](x, *args)
        return self._qkv[(scales is not None, biases is not None)](x, *args)

    def gate_up_swiglu(self, x, gate, up, scales=None, quantize_x=False):
        """``silu(x @ gate.T) * (x @ up.T)`` in one kernel call, equal to two :meth:`linear` calls and
        :meth:`swiglu` bit for bit.

        Args:
            x: [..., K] fp32/fp16/bf16.
            gate, up: [N, K] tensors of one dtype (int8, or uint8 int4 codes [N, K / 2], with ``scales``).
            scales: None, or the float32 scales ``(gate_scale, up_scale)`` of int8/int4 weights.
            quantize_x: int8/int4 weights read ``x`` rounded to int8 codes per block of 32 inputs (scale
                max|x| / 127; :func:`qwen2ms.ops.reference.quantize_activations`) with integer dot products.

        Returns:
            [..., N] in the dtype of x.
        """
        if scales is not None and quantize_x:
            return self._q8a["gate_up_q4" if gate.dtype == ms.uint8 else "gate_up_q"](x, gate, up, scales[0], scales[1])
        if scales is not None and gate.dtype == ms.uint8:
            return self._gate_up4(x, gate, up, scales[0], scales[1])
        if scales is not None:
            return self._gate_up[True](x, gate, up, scales[0], scales[1])
        return self._gate_up[False](x, gate, up)

    def embedding(self, input_ids, table, dtype, scale=None):
        """Rows of ``table`` for ``input_ids``, read row by row (no cast of the whole table).

        Args:
            input_ids: int32/int64 ids [...]; every id must lie in [0, V).
            table: [V, H] fp32/fp16/bf16, or int8 with ``scale``.
            dtype: the dtype of the result.
            scale: float32 [V] per-row scales of an int8 table.

        Returns:
            [..., H] in ``dtype``.
        """
        out = self._embedding(input_ids, table) if scale is None else self._embedding_q(input_ids, table, scale)
        return out if dtype == ms.float32 else ops.cast(out, dtype)

    def linear_int8(self, x, q, scale, bias=None, quantize_x=False):
        """Int8 weight-only linear: ``x @ (q * scale).T (+ bias)``.

        Args:
            x: [..., K]; q: int8 [N, K]; scale: float32 [N] per channel or [N, G] per group (``K // G`` a
                multiple of 32); bias: optional [N].
            quantize_x: int8/int4 weights read ``x`` rounded to int8 codes per block of 32 inputs (scale
                max|x| / 127; :func:`qwen2ms.ops.reference.quantize_activations`) with integer dot products.

        Returns:
            [..., N] in the dtype of x.
        """
        if quantize_x:
            return self._q8a["linear_q"](x, q, scale) if bias is None else self._q8a["linear_q_bias"](x, q, scale, bias)
        if bias is None:
            return self._linear_q(x, q, scale)
        return self._linear_q_bias(x, q, scale, bias)

    def linear_int4(self, x, q, scale, bias=None, quantize_x=False):
        """Int4 weight-only linear: ``x @ dequantize_int4(q, scale).T (+ bias)``, fp32 accumulation.

        Args:
            x: [..., K] (K a multiple of 32); q: uint8 [N, K / 2] packed codes (layout of
                :func:`qwen2ms.ops.reference.dequantize_int4`); scale: float32 [N, G] (``K // G`` a multiple of
                32) or [N]; bias: optional [N].
            quantize_x: int8/int4 weights read ``x`` rounded to int8 codes per block of 32 inputs (scale
                max|x| / 127; :func:`qwen2ms.ops.reference.quantize_activations`) with integer dot products.

        Returns:
            [..., N] in the dtype of x.
        """
        if quantize_x:
            return self._q8a["linear_q4"](x, q, scale) if bias is None else self._q8a["linear_q4_bias"](x, q, scale, bias)
        if bias is None:
            return self._linear_q4(x, q, scale)
        return self._linear_q4_bias(x, q, scale, bias)

    def quantize_activations(self, x):
        """:func:`qwen2ms.ops.reference.quantize_activations` in one kernel pass, with the codes and scales the
        int8/int4 kernels with ``quantize_x`` compute (the same function). Gradients pass straight through.

        Args:
            x: [..., K] fp32/fp16/bf16.

        Returns:
            [..., K] in the dtype of x.
        """
        return self._quantize_q8(x)

    def dequantize_int4(self, q, scale, dtype=ms.float32):
        """:func:`qwen2ms.ops.reference.dequantize_int4` in one kernel pass: the ``[N, K]`` matrix, no temporaries.

        Args:
            q: uint8 [N, K / 2] packed codes; scale: float32 [N, G] or [N]; dtype: float32, float16 or bfloat16.
        """
        if dtype == ms.float16:
            return self._dequant_q4_f16(q, scale)
        if dtype == ms.bfloat16:
            return self._dequant_q4_bf16(q, scale)
        return self._dequant_q4_f32(q, scale)


#: Linux madvise advice that makes the kernel back a range by 2 MiB pages now (Linux 6.1+).
_MADV_COLLAPSE = 25
_HUGE_PAGE = 2 << 20


def collapse_huge_pages(tensors, min_bytes: int = 4 << 20) -> int:
    """Ask Linux to back the memory of large tensors by 2 MiB transparent huge pages, in place.

    Decoding streams every weight once per token. With 4 KiB pages the hardware prefetchers stop at each
    page boundary and the TLB misses every 4 KiB; on the development machine the 136 MB int8 lm_head took
    8.6 ms per token on 4 KiB pages and 7.8 ms on huge pages. MindSpore allocates tensors without
    huge-page advice, so this collapses the existing pages (``MADV_COLLAPSE``); values do not change.
    Where that is unavailable (not Linux, a kernel before 6.1, THP disabled) nothing happens.

    Args:
        tensors: MindSpore tensors/Parameters (CPU memory).
        min_bytes: smaller tensors are left alone (they hold less than a few huge pages).

    Returns:
        Bytes now backed by huge pages (0 when the system does not support it).

    Example:
        >>> collapse_huge_pages([ms.Tensor(np.zeros(16, np.float32))])
        0
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return 0
    done = 0
    for t in tensors:
        nbytes = int(t.nbytes)
        if nbytes < min_bytes:
            continue
        addr = int(t.data_ptr())
        start = (addr + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)  # whole huge pages inside the tensor
        end = (addr + nbytes) & ~(_HUGE_PAGE - 1)
        if end <= start:
            continue
        # Failures (unsupported kernel, or a range Linux will not collapse) leave that tensor as it was.
        if madvise(start, end - start, _MADV_COLLAPSE) == 0:
            done += end - start
    return done


def kernel_profile(lib_path: Optional[Path] = None, reset: bool = False,
                   enable: Optional[bool] = None) -> Dict[str, Tuple[int, float]]:
    """Calls and seconds spent in each kernel of the loaded library, counted while profiling is on.

    Profiling starts on when ``$QWEN2MS_KERNEL_PROFILE=1`` at the first kernel call of the process, and ``enable``
    switches it later. The counters are the library's own (the one MindSpore loaded, as ``dlopen`` of one path
    gives one copy).

    Args:
        lib_path: the kernel library (default: the process-wide one, :func:`shared_kernels`).
        reset: zero the counters after reading them.
        enable: True/False switches counting on/off after the read (None leaves it as it is).

    Returns:
        ``{kernel name: (calls, seconds)}`` for every kernel called since the last reset (empty when off).

    Example:
        >>> isinstance(kernel_profile(), dict)
        True
    """
    import ctypes

    lib = ctypes.CDLL(str(lib_path or shared_kernels().lib_path))
    lib.QkProfileRead.restype = ctypes.c_int
    lib.QkProfileRead.argtypes = [ctypes.c_char_p, ctypes.c_int]
    need = lib.QkProfileRead(None, 0)
    buf = ctypes.create_string_buffer(need)
    lib.QkProfileRead(buf, need)
    if reset:
        lib.QkProfileReset()
    if enable is not None:
        lib.QkProfileEnable(int(bool(enable)))
    out: Dict[str, Tuple[int, float]] = {}
    for line in buf.value.decode().splitlines():
        name, calls, ns = line.split()
        if int(calls):
            out[name] = (int(calls), int(ns) * 1e-9)
    return out


_shared: Dict[str, CpuKernels] = {}


def shared_kernels() -> CpuKernels:
    """One :class:`CpuKernels` per process (building the primitives is cheap, compiling is not).

    Returns:
        The process-wide :class:`CpuKernels`.

    Example:
        >>> shared_kernels() is shared_kernels()
        True
    """
    k = _shared.get("k")
    if k is None:
        k = CpuKernels()
        _shared["k"] = k
    return k


#: Above this many rows a linear layer is compute-bound: CpuOps hands it to MindSpore's matmul (the fused
#: projections likewise fall back to separate matmuls).
_KERNEL_MAX_ROWS = 16


def _rows(x: Tensor) -> int:
    """Rows of ``x`` as a linear layer sees them (all but the last dimension), from its static shape."""
    rows = 1
    for n in x.shape[:-1]:  # a plain loop: this also runs while MindSpore parses a graph
        rows *= n
    return rows


class CpuOps(ReferenceOps):
    """CPU backend: fused C++ kernels for norms, RoPE, SwiGLU, attention, embedding and linear layers.

    Linear layers read fp32/fp16/bf16 weights directly (no cast of the weight per call), int8
    weights with per-channel or per-group scales and int4 weights (uint8 codes, two per byte) with group
    scales, accumulating in fp32; this halves (bf16), quarters (int8) or cuts to ~1/7 (int4, groups of 32)
    the bytes read per decoded token compared with fp32 weights. With :attr:`quantize_activations` (the default)
    int8/int4 weights meet activations rounded to int8 per block of 32 and the kernels take integer dot products
    (llama.cpp's Q8_0 scheme); prefill and training (more than 16 rows) apply the same rounding before the
    matmul. Masks, MoE routing and the loss are the reference implementations.

    Args:
        kernels: a :class:`CpuKernels` (default: the process-wide one, compiled on first use).

    Example:
        >>> cpu_ops = CpuOps()
        >>> y = cpu_ops.act_mul(Tensor(np.ones((1, 4), np.float32)), Tensor(np.ones((1, 4), np.float32)))
    """

    name = "cpu"

    def __init__(self, kernels=None) -> None:
        self.kernels = kernels if kernels is not None else shared_kernels()

    def linear(self, x, weight, bias=None, weight_scale=None):
        """Kernel linear for up to 16 rows; int8 ``weight`` needs ``weight_scale`` (``[out]`` or ``[out, G]``).

        Decoding (few rows) is memory-bound and the kernel streams each weight once in its stored dtype:
        in a compiled 24-layer 0.5B-shape graph of fp32 GEMVs it ran 1.0-1.2x MindSpore's matmul at one
        row and 1.3-1.5x at 2-8 rows (bf16/int8 weights: no matmul reads them directly). Above
        16 rows the work is compute-bound and MindSpore's matmul is several times faster, so prefill and
        training go to the reference (int8 weights dequantised per call). The choice depends only on
        static shapes, fixed when a graph is built.
        """
        if _rows(x) > _KERNEL_MAX_ROWS:
            if weight_scale is not None and self.quantize_activations:
                x = self.kernels.quantize_activations(x)
            return self._matmul_linear(x, weight, bias, weight_scale)
        if weight_scale is not None:
            if weight.dtype == ms.uint8:  # int4 codes, two per byte
                return self.kernels.linear_int4(x, weight, weight_scale, bias, self.quantize_activations)
            return self.kernels.linear_int8(x, weight, weight_scale, bias, self.quantize_activations)
        return self.kernels.linear(x, weight, bias)

    def _matmul_linear(self, x, weight, bias, weight_scale):
        """MindSpore's matmul on the dequantised weight, for x already rounded where the weight is int8/int4."""
        if weight_scale is not None and weight.dtype == ms.uint8:
            # Int4 codes unpacked in one kernel pass: the reference's op-by-op unpacking keeps about seven
            # weight-sized temporaries per layer alive in a compiled graph (a 0.5B-shape prefill grew past 14 GB).
            return reference.linear(x, self.kernels.dequantize_int4(weight, weight_scale, x.dtype), bias)
        # ReferenceOps named, not super(): MindSpore's graph parser resolves super() from the
        # instance's class, which recurses forever in a subclass of CpuOps.
        return ReferenceOps.dequantized_linear(self, x, weight, bias, weight_scale)

    def _rounded_once(self, x, projs) -> bool:
        """Many rows, every projection int8/int4 and quantised activations: round x once for all of them."""
        if _rows(x) <= _KERNEL_MAX_ROWS or not self.quantize_activations:
            return False
        for p in projs:  # a plain loop: this also runs while MindSpore parses a graph
            if p[2] is None:
                return False
        return True

    def linear_qkv(self, x, q, k, v):
        """q/k/v in one kernel call when the kernel linear would serve each of them (up to 16 rows), the
        three weights share a dtype and all or none have biases and int8 scales; else three :meth:`linear`.

        One call instead of three saves two runtime launches and two thread wake-ups per layer in decoding;
        the values equal the separate calls bit for bit.
        """
        projs = (q, k, v)
        if self._rounded_once(x, projs):
            xq = self.kernels.quantize_activations(x)
            return self._matmul_linear(xq, *q), self._matmul_linear(xq, *k), self._matmul_linear(xq, *v)
        if not self._fusable(x, projs):
            return ReferenceOps.linear_qkv(self, x, q, k, v)
        biases = None if q[1] is None else [p[1] for p in projs]
        scales = None if q[2] is None else [p[2] for p in projs]
        return self.kernels.linear_qkv(x, [p[0] for p in projs], biases, scales, self.quantize_activations)

    def gate_up_act(self, x, gate, up, act="silu"):
        """``silu(gate(x)) * up(x)`` in one kernel call under :meth:`linear_qkv`'s conditions (without
        biases); else the separate ops. Equal to the separate kernels bit for bit."""
        if self._rounded_once(x, (gate, up)):
            xq = self.kernels.quantize_activations(x)
            return self.act_mul(self._matmul_linear(xq, *gate), self._matmul_linear(xq, *up), act)
        if act not in SILU_NAMES or gate[1] is not None or not self._fusable(x, (gate, up)):
            return ReferenceOps.gate_up_act(self, x, gate, up, act)
        scales = None if gate[2] is None else (gate[2], up[2])
        return self.kernels.gate_up_swiglu(x, gate[0], up[0], scales, self.quantize_activations)

    @staticmethod
    def _fusable(x, projs) -> bool:
        if _rows(x) > _KERNEL_MAX_ROWS:
            return False
        first = projs[0]
        for p in projs:  # a plain loop: this also runs while MindSpore parses a graph
            if p[0].dtype != first[0].dtype or (p[1] is None) != (first[1] is None) or (
                    (p[2] is None) != (first[2] is None)):
                return False
        return True

    def embedding(self, input_ids, weight, dtype, weight_scale=None):
        """Kernel lookup reading only the requested rows (also for bf16/int8 tables)."""
        return self.kernels.embedding(input_ids, weight, dtype, weight_scale)

    def rms_norm(self, x, weight, eps):
        """Fused kernel RMSNorm (same rounding as the reference)."""
        return self.kernels.rms_norm(x, weight, eps)

    def add_rms_norm(self, x, residual, weight, eps):
        """Fused residual add + RMSNorm: ``(rms_norm(x + residual), x + residual)``."""
        return self.kernels.add_rms_norm(x, residual, weight, eps)

    def apply_rope(self, q, k, cos, sin):
        """Fused RoPE on q and k (``[B, H, T, D]``) in one kernel."""
        return self.kernels.apply_rope(q, k, cos, sin, "BNSD")

    def act_mul(self, gate, up, act="silu"):
        """Fused SwiGLU for silu/swish; other activations use the reference."""
        if act in SILU_NAMES:
            return self.kernels.swiglu(gate, up)
        return reference.act_mul(gate, up, act)

    def attention(self, q, k, v, mask, scale):
        """One-kernel GQA attention (scores, mask, fp32 softmax, values) with the reference's semantics.

        Decoding (up to 16 query tokens) runs a loop per query that skips masked cache slots and replaces
        ~12 small ops. More query tokens (prefill, training) run a blocked path: four query rows per pass
        against K stored transposed, causal-future key blocks skipped. At 512 tokens with the 0.5B shape's
        heads it took ~8.5 ms per layer against 15-19 ms for the reference's batched matmuls, select and
        softmax in a compiled graph.
        """
        return self.kernels.attention(q, k, v, mask, scale)

    #: :class:`qwen2ms.modeling.model.DecoderLayer` runs a one-token step of up to this many rows through
    #: :meth:`decode_layer` (one kernel call per layer).
    decode_layer_max_rows = _KERNEL_MAX_ROWS

    def decode_layer(self, x, cos, sin, mask, k_cache, v_cache, position, ln1, ln2, eps, scale, weights,
                     scales=None, biases=None):
        """A whole dense decoder layer for a one-token step in one kernel call (see
        :meth:`CpuKernels.decode_layer`): norms, q/k/v, RoPE, cache write at ``position``, attention, o_proj,
        residual adds and the SwiGLU MLP, with the values of the separate kernels. Decoding then launches one
        op per layer instead of ~9 kernels and MindSpore's ops between them."""
        if isinstance(position, int):
            position = Tensor(position, ms.int32)
        return self.kernels.decode_layer(x, cos, sin, mask, k_cache, v_cache, position, ln1, ln2, eps, scale, weights,
                                         scales, biases, self.quantize_activations)

    def cache_update(self, k_cache, v_cache, key, value, start):
        """In-place kernel write of the new rows only (the reference copies the whole cache per token)."""
        token = self.kernels.kv_cache_write(k_cache, v_cache, key, value, start)
        return ops.depend(k_cache, token), ops.depend(v_cache, token)

    def paged_cache_write(self, key_pool, value_pool, key, value, slot_mapping):
        """In-place kernel write of the new tokens' rows only (the reference scatters through a copy)."""
        token = self.kernels.paged_cache_write(key_pool, value_pool, key, value, slot_mapping)
        return ops.depend(key_pool, token), ops.depend(value_pool, token)

    def paged_attention(self, q, key_pool, value_pool, block_tables, mask, scale):
        """Up to 16 query tokens (decoding): one kernel reading K/V through the block tables in place, each
        cached row loaded once per kv head group. More (prefill): the blocks are gathered once and the
        blocked attention kernel runs, its cost amortised over the query rows. The choice depends only on
        static shapes."""
        if q.shape[2] > _KERNEL_MAX_ROWS:
            return ReferenceOps.paged_attention(self, q, key_pool, value_pool, block_tables, mask, scale)
        return self.kernels.paged_attention(q, key_pool, value_pool, block_tables, mask, scale)
