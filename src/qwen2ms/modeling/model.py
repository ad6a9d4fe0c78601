"""Qwen2 and Qwen2-MoE as MindSpore Cells whose parameter names are exactly the Hugging Face keys.

Reads top to bottom: the compute dtype, the output tuple, building blocks (Linear, Embedding, RMSNorm),
attention, the dense MLP, the MoE block, the decoder layer, :class:`Qwen2Model` and
:class:`Qwen2ForCausalLM`. All arithmetic goes through the model's ops backend (``self.ops_impl``,
chosen once by :func:`qwen2ms.ops.dispatch.get_ops`: reference, CPU kernels or Ascend fused ops).

Weights keep the HF layout (linear weights ``[out, in]``) so loading a checkpoint is an identity
mapping, plus one sanitize step for MoE experts: the model holds each sparse layer's experts stacked
as transformers 5 does in memory, ``model.layers.{i}.mlp.experts.gate_up_proj`` ``[E, 2I, H]``
(gate rows first, then up rows) and ``model.layers.{i}.mlp.experts.down_proj`` ``[E, H, I]``;
released checkpoints store ``mlp.experts.{e}.{gate,up,down}_proj.weight`` and
:mod:`qwen2ms.checkpoint.hf` stacks/unstacks them. A tied model has no ``lm_head.weight``.

Forward API (``model(...)`` accepts NumPy arrays or MindSpore tensors)::

    out = model(input_ids,               # [B, T] int
                attention_mask=None,     # [B, T] 1 = real token, 0 = padding (with a cache: [B, <= max_length])
                position_ids=None,       # [B, T]; default: per segment with segment_ids, else
                                         #   cumsum(mask) - 1 with a mask (left padding), else the slot index
                labels=None,             # [B, T]; -100 = ignored; shifted inside (HF semantics)
                segment_ids=None,        # [B, T] packed sequences (contiguous runs of one id): attention
                                         #   stays within a segment; combine with attention_mask for padding
                cache=None,              # KVCache (see qwen2ms.modeling.cache)
                cache_position=None,     # first cache slot written by this call (int or int32 Tensor)
                output_router_logits=None,  # MoE: also return aux_loss (default: config.output_router_logits)
                logits_to_keep=0)        # > 0: logits only for the last k positions
    out.logits      # [B, T, V] float32
    out.loss        # mean token cross-entropy (+ router_aux_loss_coef * aux_loss for MoE when asked)
    out.aux_loss    # MoE load-balancing loss, when output_router_logits

Generation uses a preallocated cache and a compiled step::

    cache = model.new_cache(batch_size=B, max_length=T + new_tokens)
    logits = model.forward_step(prompt, mask, None, cache, 0)          # prefill: slots [0, T)
    logits = model.forward_step(next_ids, mask, pos, cache, Tensor(T, ms.int32))  # one token, slot T

``forward_step`` compiles (``ms.jit``) once per cache and input shape and reuses the graph for every
token (the slot is a Tensor, not a constant).

Inside compiled code (a function under ``ms.jit``, e.g. a train step) ``model(...)`` runs
``construct``, which returns the plain tuple ``(logits, loss, aux_loss, router_logits)`` in
:class:`CausalLMOutput`'s field order: index it (``model(ids, None, None, labels)[1]`` is the loss).
It is not a named tuple there on purpose: MindSpore 2.10 builds named tuples inside graphs through
its Python fallback and the gradients through them silently become zero. Called from Python
(PyNative, or the whole model in graph mode) the result is a :class:`CausalLMOutput`.

Dtypes: parameters are stored in float32, float16 or bfloat16 (``dtype=``). The compute dtype is
float32 for float32 and (on CPU, which cannot multiply bfloat16) bfloat16 storage, float16 for
float16 storage; bf16 weights are cast per matmul, so no second float32 copy is held. Norms,
softmax, router probabilities and the loss are always float32; logits are returned as float32.

Note: wrapping the model in another Cell with ``auto_prefix=True`` renames its parameters
(MindSpore prefixes the attribute name); wrap with ``auto_prefix=False`` to keep the HF keys.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from ..config import Qwen2Config
from ..dtypes import resolve_dtype
from ..ops.dispatch import SILU_NAMES, ReferenceOps, get_ops
from .cache import KVCache
from .rope import dynamic_inv_freq, rope_spec

__all__ = ["Qwen2Model", "Qwen2ForCausalLM", "CausalLMOutput", "compute_dtype_for"]

ArrayLike = Union[np.ndarray, Tensor]


def compute_dtype_for(storage_dtype: Any) -> Any:
    """The dtype activations are computed in for weights stored in ``storage_dtype`` (see module doc)."""
    if storage_dtype == ms.bfloat16 and ms.get_context("device_target") == "CPU":
        return ms.float32
    return storage_dtype


class CausalLMOutput(NamedTuple):
    """What :class:`Qwen2ForCausalLM` returns when called from Python.

    Inside a compiled function the model returns the same four values as a plain tuple, in this
    order (see the module docstring for why).

    Attributes:
        logits: ``[B, T, V]`` float32 (``T`` = ``logits_to_keep`` when that is set).
        loss: mean cross-entropy over non-ignored shifted labels (plus the weighted MoE aux loss when
            ``output_router_logits``), or None without labels.
        aux_loss: MoE load-balancing loss when ``output_router_logits``, else None.
        router_logits: tuple of ``[B*T, E]`` per sparse layer when ``output_router_logits``, else None.
    """

    logits: Tensor
    loss: Optional[Tensor] = None
    aux_loss: Optional[Tensor] = None
    router_logits: Optional[Tuple[Tensor, ...]] = None


# ---------------------------------------------------------------------------------------------
# Parameters and building blocks
# ---------------------------------------------------------------------------------------------
class _Init:
    """How new parameters are filled: N(0, std) from a seeded generator, or lazy zeros for loading."""

    def __init__(self, dtype: Any, std: float, seed: Optional[int], empty: bool, ops_impl: Any = None) -> None:
        self.dtype, self.std, self.empty = dtype, std, empty
        # The ops backend every block calls (qwen2ms.ops.dispatch); chosen once per model.
        self.ops = ops_impl if ops_impl is not None else ReferenceOps()
        self.rng = np.random.default_rng(seed)

    def param(self, shape: Tuple[int, ...], kind: str = "normal") -> Parameter:
        if self.empty or kind == "zeros":
            # Zero-filled lazily (untouched pages): from_hf replaces each one with the file's tensor.
            return Parameter(initializer("zeros", shape, self.dtype))
        if kind == "ones":
            data = np.ones(shape, np.float32)
        else:
            data = self.rng.standard_normal(shape, dtype=np.float32)
            data *= np.float32(self.std)
        t = Tensor.from_numpy(data)
        return Parameter(t if self.dtype == ms.float32 else t.astype(self.dtype))


class Linear(nn.Cell):
    """``y = x @ weight.T (+ bias)``, weight ``[out, in]`` as in HF."""

    def __init__(self, init: _Init, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = init.param((out_features, in_features))
        self.bias = init.param((out_features,), "zeros") if bias else None
        # float32 [out] (per channel) or [out, G] (per group) once the weight is int8 (quantize_int8_weights).
        self.weight_scale = None
        self.ops_impl = init.ops

    def construct(self, x: Tensor) -> Tensor:
        return self.ops_impl.linear(x, self.weight, self.bias, self.weight_scale)

    @property
    def parts(self) -> Tuple[Parameter, Optional[Parameter], Optional[Parameter]]:
        """``(weight, bias, weight_scale)``: how the ops backend's fused projections take this layer."""
        return self.weight, self.bias, self.weight_scale


def _plain(*cells: nn.Cell) -> bool:
    """True when every cell is exactly :class:`Linear` (not a LoRA or other wrapper), so its projection may be
    fused with its siblings'. A property of the caller evaluates it when a graph is built."""
    return all(type(c) is Linear for c in cells)


class Embedding(nn.Cell):
    """Token embedding table ``weight`` ``[V, H]``."""

    def __init__(self, init: _Init, vocab_size: int, hidden_size: int, compute_dtype: Any) -> None:
        super().__init__()
        self.weight = init.param((vocab_size, hidden_size))
        self.compute_dtype = compute_dtype
        self.weight_scale = None  # float32 [V] (or [V, H / 32] from a GGUF's Q8_0 blocks) once the table is int8
        self.ops_impl = init.ops

    def construct(self, input_ids: Tensor) -> Tensor:
        return self.ops_impl.embedding(input_ids, self.weight, self.compute_dtype, self.weight_scale)  # [B, T, H]


class RMSNorm(nn.Cell):
    """RMSNorm with a learned scale ``weight`` ``[H]``; statistics in float32."""

    def __init__(self, init: _Init, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = init.param((hidden_size,), "ones")
        self.eps = eps
        self.ops_impl = init.ops

    def construct(self, x: Tensor) -> Tensor:
        return self.ops_impl.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: Tensor, residual: Tensor) -> Tuple[Tensor, Tensor]:
        """``s = x + residual`` and ``norm(s)`` in one fused op: returns ``(norm(s), s)``."""
        return self.ops_impl.add_rms_norm(x, residual, self.weight, self.eps)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------
class Attention(nn.Cell):
    """GQA self-attention with bias on q/k/v, RoPE, an optional static KV cache."""

    def __init__(self, init: _Init, config: Qwen2Config, layer_idx: int) -> None:
        super().__init__()
        h, d = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d
        self.scale = d ** -0.5
        self.q_proj = Linear(init, h, self.num_heads * d, bias=config.qkv_bias)
        self.k_proj = Linear(init, h, self.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = Linear(init, h, self.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = Linear(init, self.num_heads * d, h, bias=False)
        self.ops_impl = init.ops

    def _heads(self, y, b, t, heads):
        """``[B, T, heads * D]`` -> ``[B, heads, T, D]`` (a reshape alone when ``T == 1``, as in decoding)."""
        if t == 1:
            return y.reshape(b, heads, 1, self.head_dim)
        return y.reshape(b, t, heads, self.head_dim).transpose(0, 2, 1, 3)

    @property
    def fused_qkv(self) -> bool:
        """Whether q/k/v go to the ops backend as one projection (all three are plain :class:`Linear`)."""
        return _plain(self.q_proj, self.k_proj, self.v_proj)

    def construct(self, x, cos, sin, mask, cache=None, cache_position=0):
        b, t, _ = x.shape
        if self.fused_qkv:
            q, k, v = self.ops_impl.linear_qkv(x, self.q_proj.parts, self.k_proj.parts, self.v_proj.parts)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self._heads(q, b, t, self.num_heads)  # [B, Hq, T, D]
        k = self._heads(k, b, t, self.num_kv_heads)  # [B, Hkv, T, D]
        v = self._heads(v, b, t, self.num_kv_heads)
        q, k = self.ops_impl.apply_rope(q, k, cos, sin)
        if (False if cache is None else cache.paged):
            # A paged cache (qwen2ms.modeling.paged) writes the new K/V and attends through block tables.
            out = cache.attend(self.layer_idx, q, k, v, cache_position, mask, self.scale, self.ops_impl)
        else:
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v, cache_position, self.ops_impl)  # [B, Hkv, L, D]
            out = self.ops_impl.attention(q, k, v, mask, self.scale)  # [B, Hq, T, D]
        if t == 1:  # one token: [B, Hq, 1, D] and [B, 1, Hq, D] share a memory order, no transpose op
            out = out.reshape(b, t, self.num_heads * self.head_dim)
        else:
            out = out.transpose(0, 2, 1, 3).reshape(b, t, self.num_heads * self.head_dim)
        return self.o_proj(out)


# ---------------------------------------------------------------------------------------------
# Feed-forward: dense MLP and the sparse MoE block
# ---------------------------------------------------------------------------------------------
class MLP(nn.Cell):
    """SwiGLU feed-forward: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, init: _Init, hidden_size: int, intermediate_size: int, act: str) -> None:
        super().__init__()
        self.gate_proj = Linear(init, hidden_size, intermediate_size)
        self.up_proj = Linear(init, hidden_size, intermediate_size)
        self.down_proj = Linear(init, intermediate_size, hidden_size)
        self.act = act
        self.ops_impl = init.ops

    @property
    def fused_gate_up(self) -> bool:
        """Whether gate/up and the activation go to the ops backend as one op (both plain :class:`Linear`)."""
        return _plain(self.gate_proj, self.up_proj)

    def construct(self, x: Tensor) -> Tensor:
        if self.fused_gate_up:
            h = self.ops_impl.gate_up_act(x, self.gate_proj.parts, self.up_proj.parts, self.act)
        else:
            h = self.ops_impl.act_mul(self.gate_proj(x), self.up_proj(x), self.act)
        return self.down_proj(h)


class Router(nn.Cell):
    """The MoE gate: ``weight`` ``[E, H]``; softmax in float32, top-k, optional renormalisation."""

    def __init__(self, init: _Init, config: Qwen2Config) -> None:
        super().__init__()
        self.weight = init.param((config.num_experts, config.hidden_size))
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = bool(config.norm_topk_prob)
        self.ops_impl = init.ops

    def construct(self, x: Tensor):
        return self.ops_impl.moe_router(x, self.weight, self.top_k, self.norm_topk_prob)


class Experts(nn.Cell):
    """All experts of one sparse layer, stacked: ``gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``."""

    def __init__(self, init: _Init, config: Qwen2Config) -> None:
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = init.param((e, 2 * i, h))
        self.down_proj = init.param((e, h, i))
        self.act = config.hidden_act
        self.ops_impl = init.ops

    def construct(self, x: Tensor, top_index: Tensor, top_weights: Tensor) -> Tensor:
        return self.ops_impl.moe_experts(x, self.gate_up_proj, self.down_proj, top_index, top_weights, self.act)


class SparseMoeBlock(nn.Cell):
    """Routed experts plus a shared expert scaled by ``sigmoid(shared_expert_gate(x))``."""

    def __init__(self, init: _Init, config: Qwen2Config) -> None:
        super().__init__()
        self.gate = Router(init, config)
        self.experts = Experts(init, config)
        self.has_shared = config.shared_expert_intermediate_size > 0
        if self.has_shared:
            self.shared_expert = MLP(init, config.hidden_size, config.shared_expert_intermediate_size,
                                     config.hidden_act)
            self.shared_expert_gate = Linear(init, config.hidden_size, 1)

    def construct(self, x: Tensor):
        b, t, h = x.shape
        flat = x.reshape(b * t, h)  # [N, H]
        router_logits, top_w, top_i = self.gate(flat)  # [N, E], [N, K], [N, K]
        out = self.experts(flat, top_i, top_w)
        if self.has_shared:
            out = out + ops.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        return out.reshape(b, t, h), router_logits


# ---------------------------------------------------------------------------------------------
# Decoder layer and the models
# ---------------------------------------------------------------------------------------------
class DecoderLayer(nn.Cell):
    """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, init: _Init, config: Qwen2Config, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(init, config, layer_idx)
        self.is_sparse = config.is_sparse_layer(layer_idx)
        if self.is_sparse:
            self.mlp = SparseMoeBlock(init, config)
        else:
            self.mlp = MLP(init, config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = RMSNorm(init, config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(init, config.hidden_size, config.rms_norm_eps)
        #: Up to how many rows a one-token cached step runs as one backend op for the whole layer (0: never).
        #: Set from Python (:meth:`Qwen2Model.plan_fused_decode`, before every cached forward) rather than
        #: worked out in ``construct``: MindSpore would run those checks at run time, not fold them.
        self.fused_decode_rows = 0

    def construct(self, x, cos, sin, mask, cache=None, cache_position=0):
        b, t, _ = x.shape
        if (False if cache is None else not cache.paged) and t == 1 and b <= self.fused_decode_rows and (
                x.dtype == ms.float32):
            # Decoding one token: the whole layer (both norms, q/k/v, RoPE, cache write, attention, o_proj,
            # MLP, residual adds) in one backend op, equal to the separate ops; the cache is written in place.
            attn, mlp = self.self_attn, self.mlp
            weights = (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
                       mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
            scales = None
            if attn.q_proj.weight_scale is not None:
                scales = (attn.q_proj.weight_scale, attn.k_proj.weight_scale, attn.v_proj.weight_scale,
                          attn.o_proj.weight_scale, mlp.gate_proj.weight_scale, mlp.up_proj.weight_scale,
                          mlp.down_proj.weight_scale)
            biases = None
            if attn.q_proj.bias is not None:
                biases = (attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias)
            x = attn.ops_impl.decode_layer(
                x, cos, sin, mask, cache.keys[attn.layer_idx], cache.values[attn.layer_idx], cache_position,
                self.input_layernorm.weight, self.post_attention_layernorm.weight, self.input_layernorm.eps,
                attn.scale, weights, scales, biases)
            return x, None
        attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_position)
        h, x = self.post_attention_layernorm.add_and_norm(attn, x)  # x + attn, and its norm, fused
        router_logits = None
        if self.is_sparse:
            y, router_logits = self.mlp(h)
        else:
            y = self.mlp(h)
        return x + y, router_logits


def _decode_rows(layer: nn.Cell) -> int:
    """Rows up to which ``layer`` runs a one-token cached step as the backend's one-op decoder layer, else 0.

    That needs a :class:`DecoderLayer` on a backend offering it (``decode_layer_max_rows``), dense, with plain
    :class:`Attention` and :class:`MLP` and plain :class:`Linear` projections (not LoRA-wrapped, not a parallel
    region), a SiLU MLP, one norm epsilon, q/k/v biases on all three or none (none elsewhere), and all seven
    weights quantised or none.
    """
    impl = getattr(getattr(layer, "self_attn", None), "ops_impl", None)
    rows = getattr(impl, "decode_layer_max_rows", 0)
    if not rows or not isinstance(layer, DecoderLayer) or layer.is_sparse:
        return 0
    if type(layer.self_attn) is not Attention or type(layer.mlp) is not MLP:
        return 0
    attn, mlp = layer.self_attn, layer.mlp
    projs = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if not _plain(*projs) or mlp.act not in SILU_NAMES:
        return 0
    if layer.input_layernorm.eps != layer.post_attention_layernorm.eps:
        return 0
    if any(p.bias is not None for p in projs[3:]) or len({p.bias is None for p in projs[:3]}) != 1:
        return 0
    return rows if len({p.weight_scale is None for p in projs}) == 1 else 0


def _to_tensor(value: Optional[ArrayLike], name: str, dtype=ms.int32, allow_float: bool = False) -> Optional[Tensor]:
    if value is None:
        return None
    if isinstance(value, Tensor):
        if allow_float and value.dtype in (ms.float32, ms.float16, ms.float64):
            value = value != 0
        return value if value.dtype == dtype else value.astype(dtype)
    arr = np.asarray(value)
    if allow_float and np.issubdtype(arr.dtype, np.floating):
        arr = arr != 0  # a 1.0/0.0 mask, as HF accepts
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.bool_)):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return Tensor(arr.astype(np.int32))


def _shape_of(value: ArrayLike) -> Tuple[int, ...]:
    return tuple(value.shape)


class Qwen2Model(nn.Cell):
    """The decoder stack: ``embed_tokens``, ``layers``, ``norm`` (HF ``model.*`` keys under Qwen2ForCausalLM).

    Args:
        config: the architecture.
        dtype: parameter storage dtype ("float32" default, "float16", "bfloat16").
        init_weights: draw N(0, initializer_range) weights (seeded by ``seed``); False leaves
            zero-valued parameters for a loader to fill (no memory is touched until then).
        seed: NumPy seed for the initial weights.
        ops_backend: "reference", "cpu", "ascend" or None/"auto": see :func:`qwen2ms.ops.dispatch.resolve_backend`
            (default: from the device target, overridable by ``$QWEN2MS_OPS_BACKEND``). Resolved once here;
            the backend object is ``self.ops_impl``.

    ``construct`` returns ``(hidden_states [B, T, H], router_logits tuple)``; the arguments are those
    of :class:`Qwen2ForCausalLM` (without labels).

    Example:
        >>> m = Qwen2Model(Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128,
        ...                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
        >>> hidden, _ = m(np.array([[1, 2, 3]]))
    """

    def __init__(self, config: Qwen2Config, dtype: Any = None, init_weights: bool = True, seed: int = 0,
                 ops_backend: Optional[str] = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        storage = resolve_dtype(dtype) if dtype is not None else ms.float32
        init = _Init(storage, config.initializer_range, seed, empty=not init_weights, ops_impl=get_ops(ops_backend))
        self.ops_impl = init.ops
        self.storage_dtype = storage
        self.compute_dtype = compute_dtype_for(storage)
        self.embed_tokens = Embedding(init, config.vocab_size, config.hidden_size, self.compute_dtype)
        self.layers = nn.CellList([DecoderLayer(init, config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(init, config.hidden_size, config.rms_norm_eps)
        self.layer_sliding = [kind == "sliding_attention" for kind in config.layer_attention_types()]
        self.has_sliding = any(self.layer_sliding)
        self.sliding_window = int(config.sliding_window) if self.has_sliding else None
        self.rope = rope_spec(config)
        self.rope_dynamic = self.rope.kind == "dynamic"
        self.inv_freq = Tensor(self.rope.inv_freq)
        self.rope_scaling_factor = float(self.rope.attention_scaling)

    def construct(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None,
                  cache=None, cache_position=None):
        b, t = input_ids.shape
        if (False if cache is None else cache.paged):
            # qwen2ms.modeling.paged: every row at its own given positions; cache_position is
            # (slot_mapping, block_tables) and the masks follow from the positions.
            full_mask, slide_mask = cache.attention_masks(position_ids, cache_position, self.sliding_window)
            return self._stack(input_ids, position_ids, full_mask, slide_mask, cache, cache_position)
        start = 0 if cache_position is None else cache_position
        q_slots = ops.arange(t, dtype=ms.int32) + start  # [T] cache slots of this call's tokens
        key_len = t if cache is None else cache.max_length
        if position_ids is None:
            if segment_ids is not None:
                # Packed sequences: each segment counts its own positions from 0.
                seg = segment_ids.astype(ms.int32)
                same = ops.logical_and(ops.equal(seg.expand_dims(2), seg.expand_dims(1)),
                                       ops.tril(ops.ones((t, t), ms.bool_)).expand_dims(0))  # [B, T, T]
                position_ids = same.astype(ms.int32).sum(-1) - 1
            elif attention_mask is None:
                position_ids = q_slots.reshape(1, t)
            else:
                # Left padding: a row's positions count its real tokens (the HF generate convention).
                m = attention_mask.astype(ms.int32)
                pos = ops.cumsum(m, 1) - 1
                pos = ops.where(m == 0, ops.ones_like(pos), pos)
                position_ids = ops.gather(pos, q_slots, 1)  # [B, T]
        full_mask = self.ops_impl.attention_mask(q_slots, key_len, attention_mask, None, segment_ids)
        slide_mask = full_mask
        if self.has_sliding:
            slide_mask = self.ops_impl.attention_mask(q_slots, key_len, attention_mask, self.sliding_window,
                                                      segment_ids)
        return self._stack(input_ids, position_ids, full_mask, slide_mask, cache, start)

    def _stack(self, input_ids, position_ids, full_mask, slide_mask, cache, start):
        """RoPE tables, embedding, the layers and the final norm: ``(hidden [B, T, H], router_logits)``."""
        if self.rope_dynamic:
            inv_freq = dynamic_inv_freq(self.rope, position_ids.max() + 1)
        else:
            inv_freq = self.inv_freq
        cos, sin = self.ops_impl.rope_cos_sin(position_ids, inv_freq, self.rope_scaling_factor)  # [B, T, D]

        x = self.embed_tokens(input_ids)  # [B, T, H]
        router_logits = ()
        for i, layer in enumerate(self.layers):
            mask = slide_mask if self.layer_sliding[i] else full_mask
            x, layer_router = layer(x, cos, sin, mask, cache, start)
            if layer_router is not None:
                router_logits = router_logits + (layer_router,)
        return self.norm(x), router_logits

    def plan_fused_decode(self) -> int:
        """Decide for every layer whether one-token cached steps run it as one backend op (see
        :func:`_decode_rows`); cached forwards call this first, so quantising or wrapping layers later counts.

        Returns:
            The number of layers that will.
        """
        n = 0
        for layer in self.layers:
            rows = _decode_rows(layer)
            if isinstance(layer, DecoderLayer):
                layer.fused_decode_rows = rows
            n += rows > 0
        return n

    def __call__(self, input_ids: ArrayLike, attention_mask: Optional[ArrayLike] = None,
                 position_ids: Optional[ArrayLike] = None, segment_ids: Optional[ArrayLike] = None,
                 cache: Optional[KVCache] = None, cache_position: Union[int, Tensor, None] = None):
        """Run on NumPy arrays or MindSpore tensors; returns ``(hidden [B, T, H], router_logits)``."""
        if cache is not None:
            self.plan_fused_decode()
        if isinstance(cache_position, (int, np.integer)):
            cache_position = Tensor(int(cache_position), ms.int32)
        mask = _to_tensor(attention_mask, "attention_mask", allow_float=True)
        return super().__call__(_to_tensor(input_ids, "input_ids"), mask, _to_tensor(position_ids, "position_ids"),
                                _to_tensor(segment_ids, "segment_ids"), cache, cache_position)


class Qwen2ForCausalLM(nn.Cell):
    """Qwen2 / Qwen2-MoE language model: :class:`Qwen2Model` under ``model`` plus ``lm_head``.

    Args:
        config: the architecture (``config.is_moe`` selects the sparse blocks).
        dtype: parameter storage dtype: "float32" (default), "float16" or "bfloat16" (or MindSpore dtype).
        init_weights: draw random weights (N(0, initializer_range), norms 1, biases 0); False leaves
            lazily allocated zero parameters (what :meth:`from_hf` fills).
        seed: seed of the random weights.
        ops_backend: the ops backend ("reference", "cpu", "ascend"; default from the device target or
            ``$QWEN2MS_OPS_BACKEND``), see :mod:`qwen2ms.ops.dispatch`. Stored as ``self.ops_impl``.

    Example:
        >>> cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
        >>> model = Qwen2ForCausalLM(cfg)
        >>> out = model(np.array([[1, 2, 3]]), labels=np.array([[1, 2, 3]]))
        >>> out.logits.shape, float(out.loss) > 0
        ((1, 3, 256), True)
    """

    def __init__(self, config: Qwen2Config, dtype: Any = None, init_weights: bool = True, seed: int = 0,
                 ops_backend: Optional[str] = None) -> None:
        super().__init__()
        model = Qwen2Model(config, dtype=dtype, init_weights=init_weights, seed=seed, ops_backend=ops_backend)
        lm_head = None
        if not config.tie_word_embeddings:
            init = _Init(model.storage_dtype, config.initializer_range, seed + 1, empty=not init_weights,
                         ops_impl=model.ops_impl)
            lm_head = Linear(init, config.hidden_size, config.vocab_size)
        self._hold(config, model, lm_head)
        #: generation_config.json as read by from_hf (raw dict), for the generation module.
        self.generation_config_dict: Optional[Dict[str, Any]] = None
        #: the tokenizer found next to the weights by from_hf, if any.
        self.tokenizer = None

    def _hold(self, config: Qwen2Config, model: "Qwen2Model", lm_head: Optional[Linear]) -> None:
        """Take ``model`` and ``lm_head`` (None when tied) as children, and the settings the head and loss read.

        :class:`qwen2ms.parallel.ParallelCausalLM` calls it too, with the sharded children of a built model.
        """
        self.model = model
        if lm_head is not None:
            self.lm_head = lm_head
        self.ops_impl = model.ops_impl
        self.config = config
        self.storage_dtype = model.storage_dtype
        self.compute_dtype = model.compute_dtype
        self.tied = bool(config.tie_word_embeddings)
        self.is_moe = config.is_moe
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.router_aux_loss_coef = float(config.router_aux_loss_coef)
        self.default_router_logits = bool(config.output_router_logits)

    # ------------------------------------------------------------------ compute
    def construct(self, input_ids, attention_mask=None, position_ids=None, labels=None, segment_ids=None,
                  cache=None, cache_position=None, output_router_logits=None, logits_to_keep=0):
        hidden, router_logits = self.model(input_ids, attention_mask, position_ids, segment_ids,
                                           cache, cache_position)
        hidden = self._head_input(hidden)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.head_logits(hidden)  # [B, T, V]

        loss = None
        if labels is not None:
            total, count = self.loss_from_logits(logits, labels)
            loss = total / ops.maximum(count, ops.ones_like(count))
        logits = self._full_logits(logits)

        want_router = self.default_router_logits if output_router_logits is None else output_router_logits
        aux_loss = None
        if want_router and self.is_moe:
            token_mask = attention_mask
            if attention_mask is not None and cache is not None:
                start = 0 if cache_position is None else cache_position
                token_mask = ops.gather(attention_mask, ops.arange(input_ids.shape[1], dtype=ms.int32) + start, 1)
            aux_loss = self.ops_impl.load_balancing_loss(router_logits, self.num_experts, self.top_k, token_mask)
            if loss is not None:
                loss = loss + self.router_aux_loss_coef * aux_loss
        # A plain tuple: MindSpore 2.10 builds NamedTuples inside compiled graphs through its Python
        # fallback, which silently zeroes the gradients flowing through them. __call__ names the fields.
        return logits, loss, aux_loss, (router_logits if (want_router and self.is_moe) else None)

    def token_loss(self, input_ids, labels, attention_mask=None, position_ids=None, segment_ids=None):
        """``(loss_sum, count, aux_loss)`` as plain tensors: what a compiled train step differentiates.

        ``loss_sum`` is the summed token cross-entropy of the shifted labels (-100 ignored), ``count`` the
        number of counted tokens, ``aux_loss`` the MoE load-balancing loss (zero for dense models or
        without ``output_router_logits``). Unlike ``__call__`` it builds no named tuple, which MindSpore
        2.10 cannot differentiate through inside ``ms.jit``, and leaves the division to the caller (a
        trainer divides by the tokens of a whole accumulated step).

        Example:
            >>> total, count, aux = model.token_loss(Tensor(ids), Tensor(ids))  # doctest: +SKIP
        """
        hidden, router_logits = self.model(input_ids, attention_mask, position_ids, segment_ids, None, None)
        total, count = self.loss_from_logits(self.head_logits(self._head_input(hidden)), labels)
        aux = ops.zeros((), ms.float32)
        if self.is_moe and self.default_router_logits:
            aux = self.ops_impl.load_balancing_loss(router_logits, self.num_experts, self.top_k, attention_mask)
        return total, count, aux

    def head_logits(self, hidden):
        """float32 logits ``[B, T, V]`` of final hidden states ``[B, T, H]``: the lm_head (the embedding table
        when tied) through the ops backend, int8 ``weight_scale`` included."""
        weight, weight_scale = self._head_parts()
        return self.ops_impl.linear(hidden, weight, None, weight_scale).astype(ms.float32)

    def loss_from_logits(self, logits, labels):
        """``(loss_sum, count)``: summed cross-entropy of ``logits`` ``[B, T, V]`` against the labels shifted by
        one (``labels[:, 1:]``, -100 ignored), and the number of counted tokens (float32 scalars)."""
        v = logits.shape[-1]
        return self._cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1))

    # Pieces a tensor-parallel model (qwen2ms.parallel.ParallelCausalLM) replaces: its head is split by vocabulary.
    def _head_parts(self):
        """``(weight, weight_scale)`` of the head."""
        head = self.model.embed_tokens if self.tied else self.lm_head
        return head.weight, head.weight_scale

    def _head_input(self, hidden):
        return hidden

    def _cross_entropy(self, logits, labels):
        """``(loss_sum, count)`` of ``[N, V]`` logits against ``[N]`` labels."""
        return self.ops_impl.cross_entropy(logits, labels)

    def _full_logits(self, logits):
        return logits

    def __call__(self, input_ids: ArrayLike, attention_mask: Optional[ArrayLike] = None,
                 position_ids: Optional[ArrayLike] = None, labels: Optional[ArrayLike] = None,
                 segment_ids: Optional[ArrayLike] = None, cache: Optional[KVCache] = None,
                 cache_position: Union[int, Tensor, None] = None, output_router_logits: Optional[bool] = None,
                 logits_to_keep: int = 0) -> CausalLMOutput:
        """Run the model on NumPy arrays or MindSpore tensors (see the module docstring).

        Raises:
            ValueError: a shape, dtype or id range that the model cannot take (the message names it).
        """
        args = self._prepare(input_ids, attention_mask, position_ids, labels, segment_ids, cache,
                             cache_position, logits_to_keep)
        if cache is not None and isinstance(self.model, Qwen2Model):
            self.model.plan_fused_decode()
        return CausalLMOutput(*super().__call__(*args, output_router_logits, int(logits_to_keep)))

    def _prepare(self, input_ids, attention_mask, position_ids, labels, segment_ids, cache, cache_position,
                 logits_to_keep):
        shape = _shape_of(input_ids)
        if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, seq] array, got shape {shape}")
        b, t = shape
        ids = _to_tensor(input_ids, "input_ids")
        if isinstance(input_ids, np.ndarray) or not isinstance(input_ids, Tensor):
            arr = np.asarray(input_ids)
            lo, hi = int(arr.min()), int(arr.max())
        else:
            lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids must lie in [0, vocab_size={self.config.vocab_size}), "
                             f"got values in [{lo}, {hi}]")
        if not isinstance(logits_to_keep, (int, np.integer)) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an int >= 0, got {logits_to_keep!r}")
        if cache is not None:
            if not isinstance(cache, KVCache):
                raise ValueError(f"cache must be a qwen2ms KVCache, got {type(cache).__name__}")
            if cache.batch_size != b:
                raise ValueError(f"cache holds batch_size={cache.batch_size} rows but input_ids has {b}")
            if cache.num_layers != self.config.num_hidden_layers:
                raise ValueError(f"cache has {cache.num_layers} layers, the model {self.config.num_hidden_layers}")
            if segment_ids is not None:
                raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
            if cache_position is None:
                cache_position = 0
            if isinstance(cache_position, (int, np.integer)):
                if cache_position < 0 or cache_position + t > cache.max_length:
                    raise ValueError(f"cache_position {cache_position} + {t} new tokens exceeds the cache's "
                                     f"max_length {cache.max_length}")
                cache_position = Tensor(int(cache_position), ms.int32)
            elif isinstance(cache_position, Tensor):
                cache_position = cache_position.astype(ms.int32)
            else:
                raise ValueError(f"cache_position must be an int or an int32 scalar Tensor, got {cache_position!r}")
        elif cache_position is not None:
            raise ValueError("cache_position was given without a cache")
        mask = _to_tensor(attention_mask, "attention_mask", allow_float=True)
        if mask is not None:
            mshape = tuple(mask.shape)
            if cache is None and mshape != (b, t):
                raise ValueError(f"attention_mask must have shape {(b, t)} like input_ids, got {mshape}")
            if cache is not None:
                if len(mshape) != 2 or mshape[0] != b or mshape[1] > cache.max_length:
                    raise ValueError(f"attention_mask with a cache must be [batch={b}, <= max_length="
                                     f"{cache.max_length}], got {mshape}")
                if mshape[1] < cache.max_length:
                    # Slots past the mask are later tokens: causally hidden anyway, padded for a static shape.
                    pad = ops.zeros((b, cache.max_length - mshape[1]), ms.int32)
                    mask = ops.cat((mask, pad), 1)
        pos = _to_tensor(position_ids, "position_ids")
        if pos is not None:
            if pos.ndim == 1:
                pos = pos.reshape(1, -1)
            if pos.ndim != 2 or pos.shape[1] != t or pos.shape[0] not in (1, b):
                raise ValueError(f"position_ids must have shape {(b, t)} (or (1, {t})), got {tuple(pos.shape)}")
        lab = _to_tensor(labels, "labels")
        if lab is not None and tuple(lab.shape) != (b, t):
            raise ValueError(f"labels must have shape {(b, t)} like input_ids, got {tuple(lab.shape)}")
        seg = _to_tensor(segment_ids, "segment_ids")
        if seg is not None and tuple(seg.shape) != (b, t):
            raise ValueError(f"segment_ids must have shape {(b, t)} like input_ids, got {tuple(seg.shape)}")
        if logits_to_keep and lab is not None:
            raise ValueError("labels need the logits of every position; do not combine them with logits_to_keep")
        return ids, mask, pos, lab, seg, cache, cache_position

    # ------------------------------------------------------------------ generation support
    def new_cache(self, batch_size: int, max_length: int, dtype: Any = None) -> KVCache:
        """A :class:`KVCache` for this model, in its compute dtype unless ``dtype`` says otherwise.

        Raises:
            ValueError: ``max_length`` beyond ``max_position_embeddings``, bad sizes, or a bfloat16
                cache on CPU (its select kernel has no bfloat16 version).
        """
        if max_length > self.config.max_position_embeddings and self.model.rope.kind == "default":
            raise ValueError(f"max_length {max_length} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        dt = resolve_dtype(dtype) if dtype is not None else self.compute_dtype
        if dt == ms.bfloat16 and ms.get_context("device_target") == "CPU":
            raise ValueError("a bfloat16 KV cache cannot be updated on CPU; use 'float32' or 'float16'")
        return KVCache(self.config, batch_size, max_length, dt)

    def forward_step(self, input_ids: ArrayLike, attention_mask: Optional[ArrayLike], position_ids: Optional[ArrayLike],
                     cache: KVCache, cache_position: Union[int, Tensor], logits_to_keep: int = 0) -> Tensor:
        """One compiled cached forward: write the tokens at ``cache_position`` and return their logits.

        Args:
            input_ids: ``[B, T]`` (prefill: the prompt, T > 1; decode: T == 1).
            attention_mask: ``[B, <= cache.max_length]`` 1/0 over cache slots (left padding), or None.
            position_ids: ``[B, T]`` RoPE positions, or None (derived from the mask, else the slot index).
            cache: the :class:`KVCache` to read and update.
            cache_position: first slot written (an int or an int32 scalar Tensor).
            logits_to_keep: > 0 returns only the last ``k`` positions' logits (prefill: 1).

        Returns:
            ``[B, T or logits_to_keep, V]`` float32 logits (a MindSpore Tensor).

        The step is compiled with ``ms.jit`` on first use for each (cache, input shape,
        logits_to_keep) and reused afterwards: a decode loop compiles once.
        """
        ids, mask, pos, _, _, cache, cache_position = self._prepare(
            input_ids, attention_mask, position_ids, None, None, cache, cache_position, logits_to_keep)
        steps = cache.__dict__.setdefault("_compiled_steps", {})
        key = (id(self), int(logits_to_keep), mask is None, pos is None)
        step = steps.get(key)
        if step is None:
            if not getattr(self, "_weights_on_huge_pages", False) and ms.get_context("device_target") == "CPU":
                # Every decode step streams all weights: 2 MiB pages spare the TLB and the prefetchers.
                from ..ops.cpu import collapse_huge_pages

                collapse_huge_pages(self.get_parameters())
                self._weights_on_huge_pages = True
            if isinstance(self.model, Qwen2Model):
                self.model.plan_fused_decode()
            step = ms.jit(_CachedStep(self, cache, int(logits_to_keep)))
            steps[key] = step
        return step(ids, mask, pos, cache_position)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_hf(cls, path_or_repo_id: Union[str, os.PathLike], dtype: Any = None,
                revision: Optional[str] = None, check_finite: bool = True) -> "Qwen2ForCausalLM":
        """Load an HF checkpoint folder or hub repo id; see :func:`qwen2ms.checkpoint.hf.load_hf`.

        ``check_finite=True`` (default) refuses NaN/Inf weights with a CheckpointError naming the tensor
        and file; pass False to load them anyway.
        """
        from ..checkpoint.hf import load_hf

        return load_hf(path_or_repo_id, dtype=dtype, revision=revision, check_finite=check_finite)

    @classmethod
    def from_gguf(cls, path: Union[str, os.PathLike], dtype: Any = None, dequantize: bool = False,
                  **kwargs: Any) -> "Qwen2ForCausalLM":
        """Load a GGUF file (llama.cpp's format) with its tokenizer; see :func:`qwen2ms.checkpoint.gguf.load_gguf`.

        Example:
            >>> model = Qwen2ForCausalLM.from_gguf("qwen2-0_5b-instruct-q8_0.gguf")  # doctest: +SKIP
        """
        from ..checkpoint.gguf import load_gguf  # lazy: modeling never imports checkpoint at import time

        return load_gguf(path, dtype=dtype, dequantize=dequantize, **kwargs)

    def save_pretrained(self, save_directory: Union[str, os.PathLike], max_shard_size: Union[int, str] = "5GB",
                        dtype: Any = None) -> None:
        """Write the weights (never the KV cache) in the HF layout, atomically; see
        :func:`qwen2ms.checkpoint.hf.save_hf`."""
        from ..checkpoint.hf import save_hf

        save_hf(self, save_directory, max_shard_size=max_shard_size, dtype=dtype)

    def named_weights(self) -> List[Tuple[str, Parameter]]:
        """``(name, Parameter)`` of every weight of the architecture (HF names, stacked experts as one
        tensor each), as the config describes it: what :meth:`save_pretrained` exports. The KV cache that
        :meth:`generate` keeps on the model is state, not a weight, and is never listed.
        See :func:`qwen2ms.checkpoint.hf.model_weights`."""
        from ..checkpoint.hf import model_weights

        return model_weights(self)

    def num_parameters(self) -> int:
        """Number of weight elements (a tied lm_head counted once, like HF; no KV cache)."""
        return sum(int(np.prod(p.shape)) for _, p in self.named_weights())

    def save_checkpoint(self, path: Union[str, os.PathLike], naming: str = "hf", format: Optional[str] = None,
                        fuse_qkv: bool = False) -> "os.PathLike":
        """Write a MindSpore checkpoint (HF or MindFormers names); see
        :func:`qwen2ms.checkpoint.mindspore.save_ms_checkpoint`.

        Example:
            >>> model.save_checkpoint("qwen2.ckpt", naming="mindformers")  # doctest: +SKIP
        """
        from ..checkpoint.mindspore import save_ms_checkpoint

        return save_ms_checkpoint(self, path, naming=naming, format=format, fuse_qkv=fuse_qkv)

    @classmethod
    def from_checkpoint(cls, path: Union[str, os.PathLike], config: Any = None,
                        dtype: Any = None, check_finite: bool = True) -> "Qwen2ForCausalLM":
        """Load a MindSpore checkpoint (HF or MindFormers names, detected); config defaults to the
        config.json next to it. See :func:`qwen2ms.checkpoint.mindspore.load_ms_model`.

        Example:
            >>> model = Qwen2ForCausalLM.from_checkpoint("qwen2.ckpt", Qwen2Config.from_json("config.json"))  # doctest: +SKIP
        """
        from ..checkpoint.mindspore import load_ms_model

        return load_ms_model(path, config, dtype=dtype, check_finite=check_finite)

    # ------------------------------------------------------------------ generation (thin wrappers)
    def generate(self, input_ids: Any, attention_mask: Optional[ArrayLike] = None, generation_config: Any = None,
                 **kwargs: Any) -> Any:
        """Generate with a KV cache and a compiled decode step; see :func:`qwen2ms.generation.generate`.

        Example:
            >>> model.generate("The capital of France is", max_new_tokens=8)  # doctest: +SKIP
            ' Paris. It is the largest city in'
        """
        from ..generation.generate import generate  # lazy: modeling never imports generation at import time

        return generate(self, input_ids, attention_mask=attention_mask, generation_config=generation_config, **kwargs)

    def chat(self, messages: Any, **gen: Any) -> Any:
        """Reply to ``[{"role": ..., "content": ...}, ...]``; see :func:`qwen2ms.generation.chat`.

        Example:
            >>> model.chat([{"role": "user", "content": "Hi!"}], max_new_tokens=32)  # doctest: +SKIP
            'Hello! How can I help you today?'
        """
        from ..generation.generate import chat

        return chat(self, messages, **gen)


class _CachedStep(nn.Cell):
    """The compiled unit of :meth:`Qwen2ForCausalLM.forward_step`: the model plus one cache."""

    def __init__(self, lm: nn.Cell, cache: KVCache, logits_to_keep: int) -> None:
        # auto_prefix=False keeps the model's parameter names (the HF keys) unchanged.
        super().__init__(auto_prefix=False)
        self.lm = lm
        self.cache = cache
        self.logits_to_keep = logits_to_keep

    def construct(self, input_ids, attention_mask, position_ids, cache_position):
        out = self.lm.construct(input_ids, attention_mask, position_ids, None, None, self.cache, cache_position,
                                False, self.logits_to_keep)
        return out[0]
