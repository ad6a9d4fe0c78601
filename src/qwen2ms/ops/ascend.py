"""Ascend backend: the model's ops mapped onto MindSpore's fused Ascend primitives (layouts, masks, scale, heads).

What is fused, and how:

* ``rms_norm`` -> ``ops.rms_norm(x, gamma, eps)`` (first output); ``add_rms_norm`` -> ``ops.add_rms_norm``
  (outputs 0 and 2). gamma is cast to the dtype of x (the primitive requires equal dtypes).
* ``apply_rope`` -> ``ops.rotary_position_embedding(x, cos, sin, mode=0)`` (rotate-half) for q and k, with
  cos/sin ``[B, T, D]`` given the ``B1SD`` layout the primitive accepts for ``BNSD`` inputs.
* ``act_mul`` (silu) -> ``ops.swiglu(cat(gate, up), -1)`` (swiglu splits its input into gate | up halves).
* ``attention`` for float16/bfloat16 q: decode (one query token) -> ``ops.incre_flash_attention`` with
  key/value as one-element lists, ``BNSD`` layout, ``num_heads``/``num_key_value_heads`` for GQA and the
  mask as bool ``[B, 1, 1, S]`` (True = masked out: the inverse of our mask); prefill/training ->
  ``ops.flash_attention_score`` (has a gradient) with ``head_num``, ``scalar_value`` = scale,
  ``input_layout="BNSD"``, ``sparse_mode=0`` and a uint8 ``[B, 1, T, S]`` mask (1 = masked out).
  float32 q uses the reference (the fused kernels take float16/bfloat16 only).
* ``moe_experts`` (silu) -> ``ops.moe_token_permute`` (tokens sorted by expert), two
  ``ops.grouped_matmul`` calls (``split_item=3, group_type=0``, cumulative ``group_list`` int64,
  ``transpose_b=True`` on the HF ``[E, out, in]`` stacks) around ``ops.swiglu``, then
  ``ops.moe_token_unpermute`` weighted by the router probabilities.

* ``paged_cache_write`` (float16/bfloat16 pools) -> ``ops.reshape_and_cache(key, value, key_cache, value_cache,
  slot_mapping)`` (in place) with the new tokens as ``[B * T, Hkv, D]`` in the pool dtype, pools
  ``[num_blocks, block_size, Hkv, D]`` and int32 slots ``block * block_size + offset``.
* ``paged_attention`` for one query token (decoding) with float16/bfloat16 q -> ``ops.PagedAttention(head_num,
  scale_value, kv_head_num)(query [B, Hq, D], key_cache, value_cache, block_tables, context_lens)`` with
  ``context_lens`` = 1 + the last key the row's mask shows (at least 1). It attends to keys ``[0, context_len)``,
  so a mask with holes (a sliding window) cannot be mapped: :class:`qwen2ms.modeling.paged.PagedModelRunner`
  refuses sliding-window models on this backend. More query tokens (prefill) gather the blocks and use
  ``attention`` above. MindSpore 2.10 documents both primitives as "no backend implementation in MindSpore, only
  use to export MindIR and run in MindSpore Lite"; vLLM-MindSpore serves them through its own custom-op package.

Everything else (linear, embedding, masks, router, loss) is the reference, which runs on Ascend.

Not run on Ascend hardware: none of the fused calls above has executed on an NPU. Tests replace the
primitives with recording fakes that implement each primitive's documented semantics in NumPy, and
check the argument mapping and that the composed result equals the reference implementation. Open
points only hardware can settle: numerical agreement of the kernels, their behaviour on fully masked
rows (the reference returns a uniform average there), and dtype/shape limits (e.g. head dim a
multiple of 16 for flash attention, grouped_matmul's float16-only inputs).

Example:
    >>> ascend_ops = AscendOps()          # on an Ascend device; or AscendOps(prims=fake) in tests
    >>> ascend_ops.name
    'ascend'
"""
from __future__ import annotations

from typing import Any

import mindspore as ms
from mindspore import Tensor, ops

from . import reference
from .dispatch import SILU_NAMES, ReferenceOps

__all__ = ["AscendOps"]

_FUSED_ATTN_DTYPES = (ms.float16, ms.bfloat16)


class AscendOps(ReferenceOps):
    """The Ascend fused-primitive backend.

    Args:
        prims: namespace providing the fused primitives (``rms_norm``, ``add_rms_norm``,
            ``rotary_position_embedding``, ``swiglu``, ``flash_attention_score``, ``incre_flash_attention``,
            ``moe_token_permute``, ``grouped_matmul``, ``moe_token_unpermute``). Default: ``mindspore.ops``.
            Tests pass a recording fake.

    Example:
        >>> AscendOps().name
        'ascend'
    """

    name = "ascend"

    def __init__(self, prims: Any = None) -> None:
        self.p = prims if prims is not None else ops

    def rms_norm(self, x, weight, eps):
        """Fused RMSNorm; returns only the normalised tensor (the primitive also returns rstd)."""
        return self.p.rms_norm(x, weight.astype(x.dtype), eps)[0]

    def add_rms_norm(self, x, residual, weight, eps):
        """Fused residual add + RMSNorm: ``(rms_norm(x + residual), x + residual)``."""
        out = self.p.add_rms_norm(x, residual, weight.astype(x.dtype), eps)
        return out[0], out[2]

    def apply_rope(self, q, k, cos, sin):
        """Fused rotate-half RoPE; q/k ``[B, H, T, D]``, cos/sin ``[B, T, D]`` -> ``[B, 1, T, D]``."""
        c = cos.expand_dims(1).astype(q.dtype)
        s = sin.expand_dims(1).astype(q.dtype)
        return self.p.rotary_position_embedding(q, c, s, 0), self.p.rotary_position_embedding(k, c, s, 0)

    def act_mul(self, gate, up, act="silu"):
        """Fused SwiGLU for silu/swish (other activations: the reference)."""
        if act in SILU_NAMES:
            return self.p.swiglu(ops.cat((gate, up), -1), -1)
        return reference.act_mul(gate, up, act)

    def attention(self, q, k, v, mask, scale):
        """Fused GQA attention (see the module docstring for the mapping); float32 q uses the reference."""
        if q.dtype not in _FUSED_ATTN_DTYPES:
            return reference.attention(q, k, v, mask, scale)
        b, hq, t, _ = q.shape
        hkv, s = k.shape[1], k.shape[2]
        k = k.astype(q.dtype)
        v = v.astype(q.dtype)
        if t == 1:
            # IFA: bool mask [B, 1, 1, S], True = do not attend.
            masked_out = ops.logical_not(ops.broadcast_to(mask, (b, 1, 1, s)))
            return self.p.incre_flash_attention(q, [k], [v], attn_mask=masked_out, num_heads=hq,
                                                input_layout="BNSD", scale_value=float(scale),
                                                num_key_value_heads=hkv)
        masked_out = ops.logical_not(ops.broadcast_to(mask, (b, 1, t, s))).astype(ms.uint8)
        return self.p.flash_attention_score(q, k, v, hq, attn_mask=masked_out, scalar_value=float(scale),
                                            input_layout="BNSD", sparse_mode=0)

    def paged_cache_write(self, key_pool, value_pool, key, value, slot_mapping):
        """ReshapeAndCache into float16/bfloat16 pools, in place (see the module docstring); float32 pools use the
        reference."""
        if key_pool.dtype not in _FUSED_ATTN_DTYPES:
            return ReferenceOps.paged_cache_write(self, key_pool, value_pool, key, value, slot_mapping)
        b, h, t, d = key.shape
        k = key.transpose(0, 2, 1, 3).reshape(b * t, h, d).astype(key_pool.dtype)  # [B*T, Hkv, D]
        v = value.transpose(0, 2, 1, 3).reshape(b * t, h, d).astype(value_pool.dtype)
        token = self.p.reshape_and_cache(k, v, key_pool, value_pool, slot_mapping.astype(ms.int32))
        return ops.depend(key_pool, token), ops.depend(value_pool, token)

    def paged_attention(self, q, key_pool, value_pool, block_tables, mask, scale):
        """PagedAttention for one query token in float16/bfloat16 (see the module docstring); otherwise the
        reference's gather followed by :meth:`attention`."""
        if q.shape[2] != 1 or q.dtype not in _FUSED_ATTN_DTYPES:
            return ReferenceOps.paged_attention(self, q, key_pool, value_pool, block_tables, mask, scale)
        b, hq, _, d = q.shape
        hkv = key_pool.shape[2]
        s = mask.shape[-1]
        # Keys [0, context_len): one past the last key the mask shows; padding rows (nothing shown) read one key.
        last = ops.amax(mask.reshape(b, s).astype(ms.int32) * ops.arange(1, s + 1, dtype=ms.int32).reshape(1, s), -1)
        context_lens = ops.maximum(last, ops.ones_like(last))
        attend = self.p.PagedAttention(hq, float(scale), hkv)
        out = attend(q.reshape(b, hq, d), key_pool.astype(q.dtype), value_pool.astype(q.dtype),
                     block_tables.astype(ms.int32), context_lens)
        return out.reshape(b, hq, 1, d)

    def moe_experts(self, x, gate_up, down, top_index, top_weights, act="silu"):
        """Permute tokens by expert, two grouped matmuls around SwiGLU, unpermute with the router weights."""
        if act not in SILU_NAMES:
            return reference.moe_experts(x, gate_up, down, top_index, top_weights, act)
        e = gate_up.shape[0]
        idx = top_index.astype(ms.int32)
        permuted, sorted_indices = self.p.moe_token_permute(x, idx)  # [N*K, H] grouped by expert
        counts = ops.one_hot(idx.reshape(-1), e, Tensor(1, ms.int32), Tensor(0, ms.int32)).sum(0)
        group_list = ops.cumsum(counts, 0).astype(ms.int64)  # [E] cumulative rows per expert
        hid = self.p.grouped_matmul([permuted], [gate_up.astype(x.dtype)], group_list=group_list,
                                    split_item=3, group_type=0, transpose_b=True)[0]  # [N*K, 2I]
        act_out = self.p.swiglu(hid, -1)  # [N*K, I]
        out = self.p.grouped_matmul([act_out], [down.astype(x.dtype)], group_list=group_list,
                                    split_item=3, group_type=0, transpose_b=True)[0]  # [N*K, H]
        return self.p.moe_token_unpermute(out, sorted_indices, probs=top_weights.astype(out.dtype))
