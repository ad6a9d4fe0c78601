"""RoPE inverse frequencies and attention scaling for the default, linear, dynamic (NTK) and YaRN rope types.

The formulas are those of transformers' ``modeling_rope_utils`` (the parity reference): the scaling
dict may name its kind under ``rope_type`` or the older ``type`` key. Static kinds are computed once
with NumPy in float32; "dynamic" depends on the longest position in the current call and is computed
inside the forward (:func:`dynamic_inv_freq`), which keeps the decode step compilable.

Dynamic NTK here is stateless: the base is stretched for ``max(position_ids) + 1`` of the current
call. The reference keeps the largest length seen so far across calls; the two agree for a single
call and for generation (lengths only grow), which are the cases that matter.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

from ..config import ConfigError, Qwen2Config

__all__ = ["RopeSpec", "rope_spec", "default_inv_freq", "dynamic_inv_freq"]


@dataclass(frozen=True)
class RopeSpec:
    """What the model needs to build cos/sin tables.

    Attributes:
        kind: "default", "linear", "dynamic" or "yarn".
        inv_freq: ``[head_dim/2]`` float32 inverse frequencies (for "dynamic": the unscaled ones,
            used while positions stay within ``max_position_embeddings``).
        attention_scaling: multiplies cos and sin (YaRN's attention factor, 1.0 for the others).
        base, factor, max_position_embeddings, dim: the dynamic kind's inputs.
    """

    kind: str
    inv_freq: np.ndarray
    attention_scaling: float
    base: float
    factor: float
    max_position_embeddings: int
    dim: int


def default_inv_freq(base: float, dim: int) -> np.ndarray:
    """``1 / base ** (arange(0, dim, 2) / dim)`` in float32, as the reference computes it."""
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / np.power(np.float32(base), exponent, dtype=np.float32)).astype(np.float32)


def _yarn(base: float, dim: int, params: Dict[str, Any], max_pos: int) -> "tuple[np.ndarray, float]":
    factor = params.get("factor")
    original = params.get("original_max_position_embeddings") or max_pos
    if factor is None:
        factor = max_pos / original
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_factor = (np.float32(1.0) - ramp).astype(np.float32)
    pos_freqs = np.power(np.float32(base), np.arange(0, dim, 2).astype(np.float32) / np.float32(dim),
                         dtype=np.float32)
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation_factor) + inv_extra * extrapolation_factor
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_spec(config: Qwen2Config) -> RopeSpec:
    """The :class:`RopeSpec` of ``config`` (theta, head size and ``rope_scaling``).

    Raises:
        ConfigError: an unsupported rope type or a missing ``factor``.

    Example:
        >>> spec = rope_spec(Qwen2Config.from_preset("qwen2-0.5b"))
        >>> spec.kind, spec.inv_freq.shape
        ('default', (32,))
    """
    dim = config.head_dim
    base = float(config.rope_theta)
    params = dict(config.rope_scaling or {})
    kind = config.rope_type
    max_pos = int(config.max_position_embeddings)
    factor = params.get("factor")
    inv = default_inv_freq(base, dim)
    scaling = 1.0
    if kind == "default":
        pass
    elif kind == "linear":
        inv = (inv / np.float32(factor)).astype(np.float32)
    elif kind == "dynamic":
        pass  # scaled per call by dynamic_inv_freq
    elif kind == "yarn":
        inv, scaling = _yarn(base, dim, params, max_pos)
    else:
        raise ConfigError(f"rope_scaling type {kind!r} is not supported; use default, linear, dynamic or yarn")
    return RopeSpec(kind=kind, inv_freq=inv, attention_scaling=float(scaling), base=base,
                    factor=float(factor) if factor is not None else 1.0, max_position_embeddings=max_pos, dim=dim)


def dynamic_inv_freq(spec: RopeSpec, seq_len: Optional[Any]) -> Any:
    """Dynamic-NTK inverse frequencies for a call whose longest position is ``seq_len - 1``.

    Args:
        spec: a "dynamic" :class:`RopeSpec`.
        seq_len: a MindSpore scalar tensor (inside the forward) or a Python int.

    Returns:
        ``[dim/2]`` float32 (a MindSpore tensor for tensor input, else NumPy). Lengths up to
        ``max_position_embeddings`` give the unscaled frequencies.
    """
    dim, mpe, factor = spec.dim, spec.max_position_embeddings, spec.factor
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    if isinstance(seq_len, (int, np.integer)):
        s = max(int(seq_len), mpe)
        base = spec.base * ((factor * s / mpe) - (factor - 1)) ** (dim / (dim - 2))
        return default_inv_freq(base, dim)
    import mindspore as ms
    from mindspore import Tensor, ops

    s = ops.maximum(seq_len.astype(ms.float32), Tensor(float(mpe), ms.float32))
    base = spec.base * ops.pow((factor * s / mpe) - (factor - 1), dim / (dim - 2))
    return ops.exp(-ops.log(base) * Tensor(exponent))
