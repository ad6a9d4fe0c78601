"""The model's compute ops: one backend object per model, picked once by :func:`qwen2ms.ops.dispatch.get_ops`.

A model stores the object :func:`~qwen2ms.ops.dispatch.get_ops` returns as ``self.ops_impl`` and calls
``self.ops_impl.<name>(...)`` only. The backends share the method set of
:class:`~qwen2ms.ops.dispatch.ReferenceOps`: :mod:`qwen2ms.ops.reference` (plain MindSpore ops, every device),
:class:`qwen2ms.ops.cpu.CpuOps` (our C++ kernels) and :class:`qwen2ms.ops.ascend.AscendOps` (fused Ascend
primitives). The functions re-exported here are the reference implementations, for code that wants them
without a backend object. This package imports nothing from :mod:`qwen2ms.modeling`: the model depends on
the ops, never the reverse.

Example:
    >>> from qwen2ms.ops.dispatch import get_ops
    >>> get_ops("reference").rms_norm
    <bound method ReferenceOps.rms_norm of <qwen2ms ops backend 'reference'>>
"""
from .reference import (
    MASK_VALUE,
    act_mul,
    apply_rope,
    attention,
    attention_mask,
    cross_entropy,
    embedding,
    linear,
    load_balancing_loss,
    moe_experts,
    moe_router,
    rms_norm,
    rope_cos_sin,
)

__all__ = [
    "MASK_VALUE",
    "act_mul",
    "apply_rope",
    "attention",
    "attention_mask",
    "cross_entropy",
    "embedding",
    "linear",
    "load_balancing_loss",
    "moe_experts",
    "moe_router",
    "rms_norm",
    "rope_cos_sin",
]
