"""Backend selection for the model's ops: one object per model, chosen once from the device target or an override.

Three backends share one method set (the signatures of :mod:`qwen2ms.ops.reference`):

* ``"reference"``: plain ``mindspore.ops`` (:class:`ReferenceOps`), runs on every device.
* ``"cpu"``: our C++ kernels through ``ops.Custom`` (:class:`CpuOps`) for RMSNorm(+residual), RoPE, SwiGLU,
  attention, embedding lookup and linear layers over fp32/fp16/bf16/int8 weights; everything else is the
  reference.
* ``"ascend"``: MindSpore's fused Ascend primitives (:class:`qwen2ms.ops.ascend.AscendOps`).

The choice is made up front, never by trying an op and falling back after it fails (on CPU a failed
fused op can poison the next ones). Precedence: the ``backend`` argument, then the
``QWEN2MS_OPS_BACKEND`` environment variable, then the device target (Ascend -> ``"ascend"``,
CPU -> ``"cpu"`` when a C++ compiler is found, else ``"reference"`` with a warning; GPU -> ``"reference"``).

Example:
    >>> ops_impl = get_ops("reference")
    >>> ops_impl.name
    'reference'
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Tuple

import mindspore as ms
from mindspore import Tensor, ops

from . import reference

__all__ = ["BACKENDS", "ENV_VAR", "ReferenceOps", "CpuOps", "resolve_backend", "get_ops", "quantize_int8_weights"]

BACKENDS = ("reference", "cpu", "ascend")
ENV_VAR = "QWEN2MS_OPS_BACKEND"
_SILU = ("silu", "swish")


#: Above this many rows a linear layer is compute-bound: CpuOps hands it to MindSpore's matmul (the fused
#: projections likewise fall back to separate matmuls).
_KERNEL_MAX_ROWS = 16


def _rows(x: Tensor) -> int:
    """Rows of ``x`` as a linear layer sees them (all but the last dimension), from its static shape."""
    rows = 1
    for n in x.shape[:-1]:  # a plain loop: this also runs while MindSpore parses a graph
        rows *= n
    return rows


class ReferenceOps:
    """The reference implementations as one object; fused backends subclass it and override what they fuse.

    Every method has the signature of the same-named function in :mod:`qwen2ms.ops.reference`, plus:
    ``linear``/``embedding`` take an optional ``weight_scale`` (float32 scales of an int8 weight-only
    matrix: per output channel ``[out]`` or per group ``[out, G]`` for linear, per row for embedding)
    and ``add_rms_norm`` fuses the residual add.

    Example:
        >>> r = ReferenceOps()
        >>> y = r.rms_norm(Tensor(np.ones((2, 4), np.float32)), Tensor(np.ones(4, np.float32)), 1e-6)
    """

    name = "reference"
    MASK_VALUE = reference.MASK_VALUE

    def linear(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
               weight_scale: Optional[Tensor] = None) -> Tensor:
        """``x @ (weight * weight_scale).T + bias`` (scales ``[out]`` or per group ``[out, G]``); see
        :func:`qwen2ms.ops.reference.linear`."""
        if weight_scale is not None:
            # Scales broadcast explicitly: see qwen2ms.ops.reference._full (implicit broadcasts kept every
            # layer's dequantised [out, in] temporary alive in a compiled prefill).
            n, k = weight.shape
            if weight_scale.ndim == 2:
                g = weight_scale.shape[1]
                scale = ops.broadcast_to(weight_scale.astype(x.dtype).expand_dims(-1), (n, g, k // g))
                weight = (weight.astype(x.dtype).reshape(n, g, k // g) * scale).reshape(n, k)
            else:
                weight = weight.astype(x.dtype) * ops.broadcast_to(weight_scale.reshape(-1, 1).astype(x.dtype), (n, k))
        return reference.linear(x, weight, bias)

    def linear_qkv(self, x: Tensor, q: Tuple, k: Tuple, v: Tuple) -> Tuple[Tensor, Tensor, Tensor]:
        """Attention's three input projections of one ``x``, each given as ``(weight, bias, weight_scale)``
        (``bias``/``weight_scale`` may be None) as for :meth:`linear`; backends may run them as one op.

        Returns:
            ``(linear(x, *q), linear(x, *k), linear(x, *v))``.
        """
        return self.linear(x, *q), self.linear(x, *k), self.linear(x, *v)

    def gate_up_act(self, x: Tensor, gate: Tuple, up: Tuple, act: str = "silu") -> Tensor:
        """The gated MLP's first half, ``act(gate(x)) * up(x)``, with ``gate``/``up`` given as
        ``(weight, bias, weight_scale)`` as for :meth:`linear`; backends may run it as one op.

        Returns:
            ``act_mul(linear(x, *gate), linear(x, *up), act)``.
        """
        return self.act_mul(self.linear(x, *gate), self.linear(x, *up), act)

    def embedding(self, input_ids: Tensor, weight: Tensor, dtype, weight_scale: Optional[Tensor] = None) -> Tensor:
        """Rows of ``weight`` (times ``weight_scale[id]`` for int8 tables); see :func:`reference.embedding`."""
        if weight_scale is None:
            return reference.embedding(input_ids, weight, dtype)
        rows = ops.gather(weight, input_ids, 0).astype(dtype)
        return rows * ops.gather(weight_scale, input_ids, 0).astype(dtype).expand_dims(-1)

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        """See :func:`qwen2ms.ops.reference.rms_norm`."""
        return reference.rms_norm(x, weight, eps)

    def add_rms_norm(self, x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
        """``s = x + residual``; returns ``(rms_norm(s), s)``."""
        s = x + residual
        return reference.rms_norm(s, weight, eps), s

    def rope_cos_sin(self, position_ids: Tensor, inv_freq: Tensor, attention_scaling: float = 1.0):
        """See :func:`qwen2ms.ops.reference.rope_cos_sin`."""
        return reference.rope_cos_sin(position_ids, inv_freq, attention_scaling)

    def apply_rope(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor]:
        """See :func:`qwen2ms.ops.reference.apply_rope` (q/k ``[B, H, T, D]``, cos/sin ``[B, T, D]``)."""
        return reference.apply_rope(q, k, cos, sin)

    def attention_mask(self, query_slots: Tensor, key_len: int, key_padding: Optional[Tensor] = None,
                       sliding_window: Optional[int] = None, segment_ids: Optional[Tensor] = None) -> Tensor:
        """See :func:`qwen2ms.ops.reference.attention_mask`."""
        return reference.attention_mask(query_slots, key_len, key_padding, sliding_window, segment_ids)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
        """See :func:`qwen2ms.ops.reference.attention`."""
        return reference.attention(q, k, v, mask, scale)

    def cache_update(self, k_cache: Tensor, v_cache: Tensor, key: Tensor, value: Tensor,
                     start: Tensor) -> Tuple[Tensor, Tensor]:
        """See :func:`qwen2ms.ops.reference.cache_update`."""
        return reference.cache_update(k_cache, v_cache, key, value, start)

    def act_mul(self, gate: Tensor, up: Tensor, act: str = "silu") -> Tensor:
        """See :func:`qwen2ms.ops.reference.act_mul`."""
        return reference.act_mul(gate, up, act)

    def moe_router(self, x: Tensor, weight: Tensor, top_k: int, norm_topk_prob: bool):
        """See :func:`qwen2ms.ops.reference.moe_router`."""
        return reference.moe_router(x, weight, top_k, norm_topk_prob)

    def moe_experts(self, x: Tensor, gate_up: Tensor, down: Tensor, top_index: Tensor, top_weights: Tensor,
                    act: str = "silu") -> Tensor:
        """See :func:`qwen2ms.ops.reference.moe_experts`."""
        return reference.moe_experts(x, gate_up, down, top_index, top_weights, act)

    def cross_entropy(self, logits: Tensor, labels: Tensor, ignore_index: int = -100):
        """See :func:`qwen2ms.ops.reference.cross_entropy`."""
        return reference.cross_entropy(logits, labels, ignore_index)

    def load_balancing_loss(self, router_logits, num_experts: int, top_k: int, token_mask: Optional[Tensor] = None):
        """See :func:`qwen2ms.ops.reference.load_balancing_loss`."""
        return reference.load_balancing_loss(router_logits, num_experts, top_k, token_mask)

    def __repr__(self) -> str:
        return f"<qwen2ms ops backend {self.name!r}>"


class CpuOps(ReferenceOps):
    """CPU backend: fused C++ kernels for norms, RoPE, SwiGLU, attention, embedding and linear layers.

    Linear layers read fp32/fp16/bf16 weights directly (no cast of the weight per call) and int8
    weights with per-channel or per-group scales, accumulating in fp32; this halves (bf16) or quarters (int8) the
    bytes read per decoded token compared with fp32 weights. Masks, MoE routing and the loss are the
    reference implementations.

    Args:
        kernels: a :class:`qwen2ms.ops.cpu.CpuKernels` (default: the process-wide one, compiled on first use).

    Example:
        >>> cpu_ops = CpuOps()
        >>> y = cpu_ops.act_mul(Tensor(np.ones((1, 4), np.float32)), Tensor(np.ones((1, 4), np.float32)))
    """

    name = "cpu"

    def __init__(self, kernels=None) -> None:
        from .cpu import shared_kernels

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
            # ReferenceOps named, not super(): MindSpore's graph parser resolves super() from the
            # instance's class, which recurses forever in a subclass of CpuOps.
            return ReferenceOps.linear(self, x, weight, bias, weight_scale)
        if weight_scale is not None:
            return self.kernels.linear_int8(x, weight, weight_scale, bias)
        return self.kernels.linear(x, weight, bias)

    def linear_qkv(self, x, q, k, v):
        """q/k/v in one kernel call when the kernel linear would serve each of them (up to 16 rows), the
        three weights share a dtype and all or none have biases and int8 scales; else three :meth:`linear`.

        One call instead of three saves two runtime launches and two thread wake-ups per layer in decoding;
        the values equal the separate calls bit for bit.
        """
        projs = (q, k, v)
        if not self._fusable(x, projs):
            return ReferenceOps.linear_qkv(self, x, q, k, v)
        biases = None if q[1] is None else [p[1] for p in projs]
        scales = None if q[2] is None else [p[2] for p in projs]
        return self.kernels.linear_qkv(x, [p[0] for p in projs], biases, scales)

    def gate_up_act(self, x, gate, up, act="silu"):
        """``silu(gate(x)) * up(x)`` in one kernel call under :meth:`linear_qkv`'s conditions (without
        biases); else the separate ops. Equal to the separate kernels bit for bit."""
        if act not in _SILU or gate[1] is not None or not self._fusable(x, (gate, up)):
            return ReferenceOps.gate_up_act(self, x, gate, up, act)
        scales = None if gate[2] is None else (gate[2], up[2])
        return self.kernels.gate_up_swiglu(x, gate[0], up[0], scales)

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
        if act in _SILU:
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

    def cache_update(self, k_cache, v_cache, key, value, start):
        """In-place kernel write of the new rows only (the reference copies the whole cache per token)."""
        token = self.kernels.kv_cache_write(k_cache, v_cache, key, value, start)
        return ops.depend(k_cache, token), ops.depend(v_cache, token)


def _device_target() -> str:
    return str(ms.get_context("device_target"))


def resolve_backend(backend: Optional[str] = None, device_target: Optional[str] = None) -> str:
    """The backend name to build a model with.

    Args:
        backend: "reference", "cpu", "ascend" or "auto"/None (then ``$QWEN2MS_OPS_BACKEND``, then the device).
        device_target: "CPU", "GPU" or "Ascend" (default: ``mindspore.get_context("device_target")``).

    Returns:
        One of :data:`BACKENDS`.

    Raises:
        ValueError: an unknown backend name (from the argument or the environment variable).

    Example:
        >>> resolve_backend(device_target="Ascend")
        'ascend'
    """
    source = "backend argument"
    name = backend
    if name is None or str(name).strip().lower() in ("", "auto"):
        name = os.environ.get(ENV_VAR, "")
        source = f"${ENV_VAR}"
    name = str(name).strip().lower()
    if name in BACKENDS:
        return name
    if name not in ("", "auto"):
        raise ValueError(f"{source} is {name!r}; expected one of {', '.join(BACKENDS)} or 'auto'")
    target = (device_target or _device_target()).strip()
    if target.lower() == "ascend":
        return "ascend"
    if target.upper() == "CPU":
        from .cpu import find_compiler

        if find_compiler() is None:
            warnings.warn("no C++ compiler found: the qwen2ms CPU kernels cannot be built, using the reference "
                          f"ops (install g++ for the fused kernels, or set {ENV_VAR}=reference to silence this)",
                          RuntimeWarning, stacklevel=2)
            return "reference"
        return "cpu"
    return "reference"


def get_ops(backend: Optional[str] = None, device_target: Optional[str] = None) -> ReferenceOps:
    """Build the ops object a model stores and calls (``self.ops.linear(...)`` etc.).

    Args:
        backend: see :func:`resolve_backend`.
        device_target: see :func:`resolve_backend`.

    Returns:
        :class:`ReferenceOps`, :class:`CpuOps` or :class:`qwen2ms.ops.ascend.AscendOps`.

    Raises:
        ValueError: unknown backend, or "ascend" requested while the device target is not Ascend.
        qwen2ms.ops.cpu.KernelBuildError: "cpu" requested and the kernels cannot be compiled.

    Example:
        >>> get_ops("cpu").name
        'cpu'
    """
    name = resolve_backend(backend, device_target)
    if name == "reference":
        return ReferenceOps()
    if name == "cpu":
        return CpuOps()
    target = device_target or _device_target()
    if target.lower() != "ascend":
        raise ValueError(f"the 'ascend' ops backend needs device_target 'Ascend' (its fused primitives do not "
                         f"run on {target}); use backend 'cpu' or 'reference' here")
    from .ascend import AscendOps

    return AscendOps()


#: Default int8 group size: on the random 0.5B shape, groups of 128 inputs cut the logit error against the bf16
#: model from 0.17 to 0.14 (max) and 0.145 to 0.11 (median per step) for ~2% more bytes read per token.
INT8_GROUP_SIZE = 128


def quantize_int8_weights(model, skip: Tuple[str, ...] = (), group_size: Optional[int] = INT8_GROUP_SIZE) -> int:
    """Replace each 2-D weight that accepts a ``weight_scale`` (the model's linear layers and embedding)
    by int8 codes plus float32 scales, in place, for inference.

    The cells keep their parameter names (``...q_proj.weight``); the scales are added as
    ``...q_proj.weight_scale``. A tied lm_head shares the embedding's codes and scales. Quantised weights
    are frozen (``requires_grad=False``). Both the CPU kernels and the reference ops run them.

    Args:
        model: a ``mindspore.nn.Cell`` whose linear/embedding cells have ``weight`` and ``weight_scale``
            attributes (``weight_scale`` None until quantised), such as ``Qwen2ForCausalLM``.
        skip: cell names (as in ``model.cells_and_names()``) to leave untouched.
        group_size: one scale per ``group_size`` inputs (a multiple of 32; default 128) for every linear
            weight whose input size it divides; None for one scale per output channel everywhere. Embedding
            tables (and a tied lm_head, which shares them) and the other weights keep per-row scales.

    Returns:
        The number of weights quantised.

    Raises:
        ValueError: ``group_size`` is not a positive multiple of 32.

    Example:
        >>> n = quantize_int8_weights(model)   # doctest: +SKIP
    """
    from mindspore import Parameter

    from ..modeling.model import Embedding
    from .cpu import INT8_GROUP_MULTIPLE, quantize_int8

    if group_size is not None and (group_size <= 0 or group_size % INT8_GROUP_MULTIPLE):
        raise ValueError(f"group_size must be a positive multiple of {INT8_GROUP_MULTIPLE} or None, got {group_size}")
    count = 0
    for cell_name, cell in model.cells_and_names():
        if cell_name in skip or not hasattr(cell, "weight_scale") or getattr(cell, "weight_scale") is not None:
            continue
        weight = getattr(cell, "weight", None)
        if not isinstance(weight, Parameter) or weight.ndim != 2:
            continue
        grouped = group_size is not None and not isinstance(cell, Embedding) and weight.shape[1] % group_size == 0
        qw = quantize_int8(weight, group_size if grouped else None)
        name = weight.name
        cell.weight = Parameter(Tensor(qw.q), name=name, requires_grad=False)
        cell.weight_scale = Parameter(Tensor(qw.scale), name=name + "_scale", requires_grad=False)
        count += 1
    return count
