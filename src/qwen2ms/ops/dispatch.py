"""Backend selection for the model's ops: one object per model, chosen once from the device target or an override.

Three backends share one method set (the signatures of :mod:`qwen2ms.ops.reference`):

* ``"reference"``: plain ``mindspore.ops`` (:class:`ReferenceOps`), runs on every device.
* ``"cpu"``: our C++ kernels through ``ops.Custom`` (:class:`qwen2ms.ops.cpu.CpuOps`) for RMSNorm(+residual),
  RoPE, SwiGLU, attention, embedding lookup and linear layers over fp32/fp16/bf16/int8 weights; everything else
  is the reference.
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

__all__ = ["BACKENDS", "ENV_VAR", "ReferenceOps", "resolve_backend", "get_ops"]

BACKENDS = ("reference", "cpu", "ascend")
ENV_VAR = "QWEN2MS_OPS_BACKEND"
#: Activation names the fused SwiGLU kernels serve (the CPU and Ascend backends).
SILU_NAMES = ("silu", "swish")


class ReferenceOps:
    """The reference implementations as one object; fused backends subclass it and override what they fuse.

    Every method has the signature of the same-named function in :mod:`qwen2ms.ops.reference`, plus:
    ``linear``/``embedding`` take an optional ``weight_scale`` (float32 scales of an int8 weight-only
    matrix: per output channel ``[out]`` or per group ``[out, G]`` for linear, per row for embedding; a
    linear ``weight`` of dtype uint8 is int4 codes ``[out, in / 2]`` with group scales, see
    :func:`qwen2ms.ops.reference.dequantize_int4`)
    and ``add_rms_norm`` fuses the residual add.

    Example:
        >>> r = ReferenceOps()
        >>> y = r.rms_norm(Tensor(np.ones((2, 4), np.float32)), Tensor(np.ones(4, np.float32)), 1e-6)
    """

    name = "reference"
    MASK_VALUE = reference.MASK_VALUE
    #: Linear layers with int8/int4 weights (a ``weight_scale``) read their input rounded to int8 per block of 32
    #: inputs (:func:`qwen2ms.ops.reference.quantize_activations`, llama.cpp's Q8_0 activations), on every backend
    #: and row count, so a model computes the same values wherever it runs. False: fp32 activations. Set per model
    #: by :func:`qwen2ms.modeling.quantize.quantize_weights` (``activations=``) before its first forward: compiled
    #: graphs keep the value they were built with.
    quantize_activations = True

    def linear(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
               weight_scale: Optional[Tensor] = None) -> Tensor:
        """``x @ (weight * weight_scale).T + bias`` (scales ``[out]`` or per group ``[out, G]``); see
        :func:`qwen2ms.ops.reference.linear`."""
        if weight_scale is not None and self.quantize_activations:
            x = reference.quantize_activations(x)
        return self.dequantized_linear(x, weight, bias, weight_scale)

    def dequantized_linear(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                           weight_scale: Optional[Tensor] = None) -> Tensor:
        """``x @ (weight * weight_scale).T + bias`` with ``x`` as given (never rounded): :meth:`linear`'s matmul."""
        if weight_scale is not None and weight.dtype == ms.uint8:  # int4 codes packed two per byte
            return reference.linear_int4(x, weight, weight_scale, bias)
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
        """Rows of ``weight`` (int8 tables times ``weight_scale`` ``[V]`` per row, or ``[V, G]`` per group of
        ``H / G`` columns); see :func:`reference.embedding`."""
        if weight_scale is None:
            return reference.embedding(input_ids, weight, dtype)
        rows = ops.gather(weight, input_ids, 0).astype(dtype)
        scale = ops.gather(weight_scale, input_ids, 0).astype(dtype)
        if len(weight_scale.shape) == 1:
            return rows * scale.expand_dims(-1)
        g, h = weight_scale.shape[1], weight.shape[1]
        grouped = rows.reshape(tuple(rows.shape[:-1]) + (g, h // g)) * scale.expand_dims(-1)
        return grouped.reshape(rows.shape)

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

    def paged_cache_write(self, key_pool: Tensor, value_pool: Tensor, key: Tensor, value: Tensor,
                          slot_mapping: Tensor) -> Tuple[Tensor, Tensor]:
        """See :func:`qwen2ms.ops.reference.paged_cache_write`."""
        return reference.paged_cache_write(key_pool, value_pool, key, value, slot_mapping)

    def paged_attention(self, q: Tensor, key_pool: Tensor, value_pool: Tensor, block_tables: Tensor,
                        mask: Tensor, scale: float) -> Tensor:
        """:func:`qwen2ms.ops.reference.paged_attention`, with this backend's :meth:`attention` over the
        gathered keys and values."""
        return self.attention(q, reference.paged_gather(key_pool, block_tables),
                              reference.paged_gather(value_pool, block_tables), mask, scale)

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
        :class:`ReferenceOps`, :class:`qwen2ms.ops.cpu.CpuOps` or :class:`qwen2ms.ops.ascend.AscendOps`.

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
        from .cpu import CpuOps

        return CpuOps()
    target = device_target or _device_target()
    if target.lower() != "ascend":
        raise ValueError(f"the 'ascend' ops backend needs device_target 'Ascend' (its fused primitives do not "
                         f"run on {target}); use backend 'cpu' or 'reference' here")
    from .ascend import AscendOps

    return AscendOps()
