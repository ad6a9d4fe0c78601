"""The single dispatch point for the model's compute ops: the model calls ``qwen2ms.ops.<name>`` only.

Today every name is bound to its plain-MindSpore reference implementation
(:mod:`qwen2ms.ops.reference`), which runs on CPU, GPU and Ascend, in PyNative and compiled.
Fused backends add functions with the same signatures and are bound here, chosen once from the
device target when the model is built, so the model code never changes.

Example:
    >>> from qwen2ms import ops as qops
    >>> qops.rms_norm  # doctest: +ELLIPSIS
    <function rms_norm at ...>
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
