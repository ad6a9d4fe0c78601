"""Reference implementations of the model's compute ops in plain ``mindspore.ops`` (run everywhere, incl. CPU).

Every function here works in PyNative, under ``ms.jit`` and in graph mode. The model never calls them
directly: it calls its backend object (``self.ops_impl``, from :func:`qwen2ms.ops.dispatch.get_ops`), whose
:class:`~qwen2ms.ops.dispatch.ReferenceOps` methods delegate here and whose fused backends
(:class:`~qwen2ms.ops.cpu.CpuOps`, :class:`~qwen2ms.ops.ascend.AscendOps`) override them with the same
signatures.

Dtype policy: weights may be stored in float32, float16 or bfloat16. Activations are computed in
the dtype of the input ``x`` (the model's compute dtype); a weight stored in another dtype is cast
to it inside the op, per call (on CPU bfloat16 cannot be multiplied, so a bf16 model computes in
float32 and pays one cast per weight per call instead of holding a second float32 copy).
Norm statistics, softmax, router probabilities and the loss are always computed in float32.
"""
from __future__ import annotations

from typing import Optional, Tuple

import mindspore as ms
from mindspore import Tensor, ops

__all__ = [
    "linear",
    "linear_int4",
    "dequantize_int4",
    "INT4_BLOCK",
    "quantize_activations",
    "Q8_BLOCK",
    "embedding",
    "rms_norm",
    "rope_cos_sin",
    "apply_rope",
    "attention_mask",
    "attention",
    "cache_update",
    "paged_cache_write",
    "paged_attention",
    "paged_gather",
    "act_mul",
    "moe_router",
    "moe_experts",
    "cross_entropy",
    "load_balancing_loss",
    "MASK_VALUE",
]

#: Score given to masked attention entries. Finite (not -inf) so that a row whose keys are all
#: masked (a left-padding query position) softmaxes to a uniform row instead of NaN.
MASK_VALUE = -1.0e30

_matmul_tb = ops.MatMul(transpose_b=True)
_bmm_tb = ops.BatchMatMul(transpose_b=True)
_bmm = ops.BatchMatMul()


def _as(w: Tensor, dtype) -> Tensor:
    return w if w.dtype == dtype else w.astype(dtype)


def _full(a: Tensor, shape) -> Tensor:
    """``a`` broadcast to ``shape`` explicitly.

    MindSpore 2.10's CPU graphs keep the temporaries of implicitly broadcasting binary ops alive
    until the whole graph ends, so a 24-layer prefill held every layer's [T, H]-sized (and, in
    attention, [T, S]-sized) buffers at once: measured +1.4 GB per layer at 2048 tokens for the
    attention mask alone. Operands broadcast by ``broadcast_to`` first are freed layer by layer.
    """
    return a if tuple(a.shape) == tuple(shape) else ops.broadcast_to(a, tuple(shape))


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ weight.T + bias`` with ``weight`` in the Hugging Face layout ``[out, in]``.

    Args:
        x: ``[..., in]`` activations (their dtype is the compute dtype).
        weight: ``[out, in]``; cast to ``x.dtype`` when stored in another dtype.
        bias: optional ``[out]``.

    Returns:
        ``[..., out]`` in ``x.dtype``.

    Example:
        >>> y = linear(Tensor(np.ones((2, 3), np.float32)), Tensor(np.ones((4, 3), np.float32)))
    """
    lead = x.shape[:-1]
    y = _matmul_tb(x.reshape(-1, x.shape[-1]), _as(weight, x.dtype))
    if bias is not None:
        y = y + _full(_as(bias, x.dtype), y.shape)
    return y.reshape(lead + (weight.shape[0],))


#: Inputs per packed int4 block: the nibble layout repeats every 32 inputs, so K must be a multiple of it.
INT4_BLOCK = 32


def dequantize_int4(packed: Tensor, scale: Tensor, dtype=ms.float32) -> Tensor:
    """The ``[N, K]`` matrix of packed int4 weights: ``(nibble - 8) * scale`` of each input's group.

    Layout (GGUF Q4_0's): ``packed`` is uint8 ``[N, K / 2]``; in each block of 32 inputs (16 bytes) byte ``j``
    holds input ``j`` in its low nibble and input ``j + 16`` in its high nibble, each as value + 8 (0..15).

    Args:
        packed: uint8 ``[N, K / 2]`` (K a multiple of 32).
        scale: float32 ``[N, G]`` (one scale per ``K / G`` consecutive inputs) or ``[N]`` (per channel).
        dtype: dtype of the result.

    Returns:
        ``[N, K]`` in ``dtype``.

    Example:
        >>> w = dequantize_int4(Tensor(np.full((1, 16), 0x9F, np.uint8)), Tensor(np.ones((1, 1), np.float32)))
        >>> w.asnumpy()[0, [0, 16]].tolist()
        [7.0, 1.0]
    """
    n, half = packed.shape
    k = 2 * half
    p = packed.astype(ms.int32).reshape(n, k // INT4_BLOCK, INT4_BLOCK // 2)
    # Arithmetic rather than bitwise ops: floor division and subtraction run on every backend and dtype.
    high = ops.floor_div(p, 16)
    low = p - high * 16
    q = (ops.cat((low, high), -1) - 8).astype(dtype)  # [N, K / 32, 32]
    if scale.ndim == 1:
        return q.reshape(n, k) * ops.broadcast_to(scale.astype(dtype).reshape(-1, 1), (n, k))
    g = scale.shape[1]
    s = ops.broadcast_to(scale.astype(dtype).expand_dims(-1), (n, g, k // g))
    return (q.reshape(n, g, k // g) * s).reshape(n, k)


def linear_int4(x: Tensor, packed: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``x @ dequantize_int4(packed, scale).T + bias``: int4 weight-only linear, computed in ``x.dtype``.

    Args:
        x: ``[..., K]`` activations.
        packed: uint8 ``[N, K / 2]`` int4 weights (see :func:`dequantize_int4`).
        scale: float32 ``[N, G]`` group scales or ``[N]``.
        bias: optional ``[N]``.

    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    return linear(x, dequantize_int4(packed, scale, x.dtype), bias)


#: Inputs per scale of quantised activations (llama.cpp's Q8_0 block).
Q8_BLOCK = 32
#: A block of activations whose max |x| is below this rounds to zero (127 / max|x| would near float32's overflow).
Q8_MIN_AMAX = 127.0 * 1.17549435e-38


def quantize_activations(x: Tensor) -> Tensor:
    """``x`` as int8/int4 linear layers read it: rounded to int8 codes per block of 32 inputs along the last axis.

    Per block (a last partial block on its own): ``d = max|x| / 127``, codes ``round(x * (127 / max|x|))`` (to
    nearest even, in float32, as ggml's ``quantize_row_q8_0`` on AVX2), value ``codes * d`` (ggml then stores ``d``
    in float16; it stays float32 here); a block with max|x| below :data:`Q8_MIN_AMAX` becomes zeros, and a
    non-finite input makes its block NaN. The CPU kernels with quantised activations compute exactly
    ``x' @ W.T`` for this ``x'``, with integer dot products per block (only the float summation order differs).

    Args:
        x: ``[..., K]`` activations, any float dtype.

    Returns:
        ``[..., K]`` in ``x.dtype``.

    Example:
        >>> y = quantize_activations(Tensor(np.array([[0.5, -1.0, 0.3]], np.float32)))
        >>> (y.asnumpy() * 127).round().tolist()
        [[64.0, -127.0, 38.0]]
    """
    shape = x.shape
    k = shape[-1]
    pad = (-k) % Q8_BLOCK
    xf = x.astype(ms.float32).reshape(-1, k)
    if pad:
        xf = ops.cat((xf, ops.zeros((xf.shape[0], pad), ms.float32)), -1)
    blocks = xf.reshape(xf.shape[0], (k + pad) // Q8_BLOCK, Q8_BLOCK)
    amax = ops.abs(blocks).max(-1, keepdims=True)
    keep = amax >= Q8_MIN_AMAX
    d = ops.select(keep, amax / 127.0, ops.zeros_like(amax))
    inv = ops.select(keep, 127.0 / ops.select(keep, amax, ops.ones_like(amax)), ops.zeros_like(amax))
    out = ops.round(blocks * inv) * d
    out = out.reshape(xf.shape[0], k + pad)
    if pad:
        out = out[:, :k]
    out = out.reshape(shape).astype(x.dtype)
    # Straight-through, as the kernels' bprops: the rounding counts as the identity for gradients (ops.round's
    # own gradient is zero, which froze everything below an int8/int4 layer, e.g. LoRA on a quantised base).
    # out + (x - x) is exactly out for the finite x that reach this point.
    return ops.stop_gradient(out) + (x - ops.stop_gradient(x))


def embedding(input_ids: Tensor, weight: Tensor, dtype) -> Tensor:
    """Rows of ``weight`` ``[V, H]`` for ``input_ids`` ``[B, T]`` -> ``[B, T, H]`` in ``dtype``.

    The CPU Gather kernel has no bfloat16 version, so a table stored in another dtype is cast first.
    """
    if weight.dtype == ms.bfloat16:
        return ops.gather(weight.astype(dtype), input_ids, 0)
    return ops.gather(weight, input_ids, 0).astype(dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Root-mean-square norm over the last axis, statistics in float32 (HF Qwen2RMSNorm semantics).

    Args:
        x: ``[..., H]``.
        weight: ``[H]`` scale.
        eps: added to the mean square.

    Returns:
        ``weight * normalize(x)`` in ``x.dtype``.
    """
    h = x.astype(ms.float32)
    var = ops.mean(h * h, -1, keep_dims=True)
    h = (h * _full(ops.rsqrt(var + eps), h.shape)).astype(x.dtype)
    return _full(_as(weight, x.dtype), h.shape) * h


def rope_cos_sin(position_ids: Tensor, inv_freq: Tensor, attention_scaling: float = 1.0) -> Tuple[Tensor, Tensor]:
    """cos/sin tables ``[B, T, D]`` (float32) for integer ``position_ids`` ``[B, T]``.

    Args:
        position_ids: absolute positions ``[B, T]``.
        inv_freq: ``[D/2]`` float32 inverse frequencies (see :mod:`qwen2ms.modeling.rope`).
        attention_scaling: multiplies cos and sin (YaRN's attention factor; 1.0 otherwise).
    """
    freqs = position_ids.astype(ms.float32).expand_dims(-1) * inv_freq.reshape(1, 1, -1)
    emb = ops.cat((freqs, freqs), -1)
    return ops.cos(emb) * attention_scaling, ops.sin(emb) * attention_scaling


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return ops.cat((-x[..., half:], x[..., :half]), -1)


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor]:
    """Rotate ``q`` ``[B, Hq, T, D]`` and ``k`` ``[B, Hkv, T, D]`` by cos/sin ``[B, T, D]`` (half-split layout)."""
    cos = cos.expand_dims(1).astype(q.dtype)
    sin = sin.expand_dims(1).astype(q.dtype)
    cq, sq, ck, sk = _full(cos, q.shape), _full(sin, q.shape), _full(cos, k.shape), _full(sin, k.shape)
    return q * cq + _rotate_half(q) * sq, k * ck + _rotate_half(k) * sk


def attention_mask(
    query_slots: Tensor,
    key_len: int,
    key_padding: Optional[Tensor] = None,
    sliding_window: Optional[int] = None,
    segment_ids: Optional[Tensor] = None,
) -> Tensor:
    """Boolean mask ``[B or 1, 1, T, S]`` (True = may attend) for causal attention.

    Args:
        query_slots: ``[T]`` int32 slot index of each query token in the key sequence (``arange(T)``
            without a cache; ``cache_position + arange(T)`` with one).
        key_len: ``S``, the number of key slots.
        key_padding: optional ``[B, S]`` 1/0 (or bool) mask of real key tokens.
        sliding_window: when set, a query sees at most the last ``sliding_window`` slots, itself included
            (the reference's ``kv_idx > q_idx - sliding_window``).
        segment_ids: optional ``[B, S]`` (``S == T``, no cache) packed-sequence ids: attention never
            crosses segments.
    """
    k_slots = ops.arange(key_len, dtype=ms.int32).reshape(1, -1)
    q = query_slots.astype(ms.int32).reshape(-1, 1)
    allowed = k_slots <= q  # [T, S]
    if sliding_window is not None:
        allowed = ops.logical_and(allowed, k_slots > q - sliding_window)
    allowed = allowed.reshape(1, 1, allowed.shape[0], key_len)
    if key_padding is not None:
        pad = key_padding.astype(ms.bool_)
        allowed = ops.logical_and(allowed, pad.reshape(pad.shape[0], 1, 1, key_len))
    if segment_ids is not None:
        seg = segment_ids.astype(ms.int32)
        same = ops.equal(seg.expand_dims(2), seg.expand_dims(1))  # [B, T, S]
        allowed = ops.logical_and(allowed, same.expand_dims(1))
    return allowed


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Grouped-query attention, softmax in float32.

    Args:
        q: ``[B, Hq, T, D]``.
        k, v: ``[B, Hkv, S, D]`` (``Hq`` a multiple of ``Hkv``; query head ``h`` reads kv head ``h // (Hq/Hkv)``).
        mask: bool ``[B or 1, 1, T, S]`` from :func:`attention_mask`.
        scale: score multiplier (``D ** -0.5``).

    Returns:
        ``[B, Hq, T, D]`` in ``q.dtype``. Fully masked rows are finite (uniform over keys).
    """
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    # Fold the query groups into the row axis so each kv head is read once, never copied per group.
    scores = _bmm_tb(q.reshape(b, hkv, g * t, d), _as(k, q.dtype)) * scale  # [B, Hkv, G*T, S]
    scores = scores.astype(ms.float32).reshape(b, hkv, g, t, s)
    # An explicitly broadcast mask and a full-size fill value (see _full: `where` with a scalar kept
    # every layer's [.., T, S] temporaries alive).
    keep = _full(mask.expand_dims(1), scores.shape)
    scores = ops.select(keep, scores, ops.full_like(scores, MASK_VALUE))
    probs = ops.softmax(scores, -1).astype(q.dtype).reshape(b, hkv, g * t, s)
    out = _bmm(probs, _as(v, q.dtype))  # [B, Hkv, G*T, D]
    return out.reshape(b, hq, t, d)


def cache_update(k_cache: Tensor, v_cache: Tensor, key: Tensor, value: Tensor,
                 start: Tensor) -> Tuple[Tensor, Tensor]:
    """Write ``key``/``value`` ``[B, H, T, D]`` into cache slots ``[start, start + T)``; return the full caches.

    Args:
        k_cache, v_cache: the cache Parameters ``[B, H, L, D]`` (updated with ``ops.assign``).
        key, value: the new rows (cast to the cache dtype).
        start: int32 scalar Tensor (or int), the first slot written; slots outside ``[0, L)`` are skipped.

    Returns:
        ``(keys, values)`` ``[B, H, L, D]`` after the write.
    """
    t = key.shape[2]
    length = k_cache.shape[2]
    # Every slot takes either its old value or the new token that lands on it: one static-shape
    # select, valid for any (tensor) start position, so a compiled step is reused for all tokens.
    src = ops.arange(length, dtype=ms.int32) - start
    valid = _full(ops.logical_and(src >= 0, src < t).reshape(1, 1, length, 1), k_cache.shape)
    src = ops.maximum(ops.minimum(src, t - 1), 0)
    new_k = ops.select(valid, ops.gather(key.astype(k_cache.dtype), src, 2), k_cache)
    new_v = ops.select(valid, ops.gather(value.astype(v_cache.dtype), src, 2), v_cache)
    ops.assign(k_cache, new_k)
    ops.assign(v_cache, new_v)
    return new_k, new_v


def paged_cache_write(key_pool: Tensor, value_pool: Tensor, key: Tensor, value: Tensor,
                      slot_mapping: Tensor) -> Tuple[Tensor, Tensor]:
    """Write ``key``/``value`` ``[B, H, T, D]`` into a paged KV pool at one slot per token; return the pools.

    Args:
        key_pool, value_pool: the pool Parameters ``[num_blocks, block_size, H, D]`` (updated in place).
        key, value: the new tokens (cast to the pool dtype).
        slot_mapping: int32 ``[B * T]``, token ``(b, t)``'s slot ``block_id * block_size + offset`` (row-major
            over ``(b, t)``, vLLM's and Ascend ReshapeAndCache's convention).

    Returns:
        ``(key_pool, value_pool)`` after the write.
    """
    b, h, t, d = key.shape
    bs = key_pool.shape[1]
    slots = slot_mapping.astype(ms.int32).reshape(-1)
    index = ops.stack((ops.floor_div(slots, bs), slots - ops.floor_div(slots, bs) * bs), -1)  # [B*T, 2]
    rows_k = key.transpose(0, 2, 1, 3).reshape(b * t, h, d).astype(key_pool.dtype)
    rows_v = value.transpose(0, 2, 1, 3).reshape(b * t, h, d).astype(value_pool.dtype)
    return ops.scatter_nd_update(key_pool, index, rows_k), ops.scatter_nd_update(value_pool, index, rows_v)


def paged_gather(pool: Tensor, block_tables: Tensor) -> Tensor:
    """A pool ``[N, block_size, H, D]`` read through ``block_tables`` ``[B, M]`` as ``[B, H, M * block_size, D]``
    (key ``s`` of row ``b`` is the token at position ``s`` of that sequence)."""
    b, m = block_tables.shape
    _, bs, h, d = pool.shape
    return ops.gather(pool, block_tables, 0).reshape(b, m * bs, h, d).transpose(0, 2, 1, 3)


def paged_attention(q: Tensor, key_pool: Tensor, value_pool: Tensor, block_tables: Tensor, mask: Tensor,
                    scale: float) -> Tensor:
    """Grouped-query attention over keys/values held in a paged pool, read through per-row block tables.

    Args:
        q: ``[B, Hq, T, D]``.
        key_pool, value_pool: ``[num_blocks, block_size, Hkv, D]``.
        block_tables: int32 ``[B, M]``: entry ``j`` of row ``b`` is the pool block holding that sequence's
            positions ``[j * block_size, (j + 1) * block_size)``.
        mask: bool ``[B, 1, T, M * block_size]``, True = may attend (key index = position in the sequence).
        scale: score multiplier.

    Returns:
        ``[B, Hq, T, D]`` in ``q.dtype``: :func:`attention` over the gathered keys and values.
    """
    return attention(q, paged_gather(key_pool, block_tables), paged_gather(value_pool, block_tables), mask, scale)


def _act(x: Tensor, name: str) -> Tensor:
    if name in ("silu", "swish"):
        return ops.silu(x)
    if name == "gelu":
        return ops.gelu(x, approximate="none")
    if name in ("gelu_pytorch_tanh", "gelu_new"):
        return ops.gelu(x, approximate="tanh")
    return ops.relu(x)


def act_mul(gate: Tensor, up: Tensor, act: str = "silu") -> Tensor:
    """``act(gate) * up`` (SwiGLU for ``act="silu"``)."""
    return _act(gate, act) * up


def moe_router(x: Tensor, weight: Tensor, top_k: int, norm_topk_prob: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Top-k softmax router.

    Args:
        x: ``[N, H]`` tokens.
        weight: ``[E, H]`` router weight.
        top_k: experts per token.
        norm_topk_prob: renormalise the chosen probabilities to sum to one.

    Returns:
        ``(router_logits [N, E] in x.dtype, top_weights [N, K] in x.dtype, top_index [N, K] int32)``;
        probabilities are computed in float32.
    """
    logits = linear(x, weight)
    probs = ops.softmax(logits.astype(ms.float32), -1)
    top_w, top_i = ops.topk(probs, top_k)
    if norm_topk_prob:
        top_w = top_w / top_w.sum(-1, keepdims=True)
    return logits, top_w.astype(x.dtype), top_i.astype(ms.int32)


def moe_experts(x: Tensor, gate_up: Tensor, down: Tensor, top_index: Tensor, top_weights: Tensor,
                act: str = "silu") -> Tensor:
    """Weighted sum of each token's chosen experts (exact, static shapes).

    Args:
        x: ``[N, H]`` tokens.
        gate_up: ``[E, 2I, H]`` stacked experts (rows ``[:I]`` gate, ``[I:]`` up).
        down: ``[E, H, I]``.
        top_index, top_weights: ``[N, K]`` from :func:`moe_router`.
        act: activation name.

    Returns:
        ``[N, H]`` in ``x.dtype``.

    Few tokens (``N*K <= E``, decoding) gather only the chosen experts' weights; more tokens run every
    expert on every token with zero weight for unchosen ones (E/K times the useful FLOPs, but one
    static-shape batched matmul; fused backends replace this with grouped matmuls).
    """
    n, h = x.shape
    k = top_index.shape[1]
    e, i2 = gate_up.shape[0], gate_up.shape[1]
    inter = i2 // 2
    gate_up = _as(gate_up, x.dtype)
    down = _as(down, x.dtype)
    if n * k <= e:
        flat = top_index.reshape(-1)
        gu = ops.gather(gate_up, flat, 0)  # [N*K, 2I, H]
        dn = ops.gather(down, flat, 0)  # [N*K, H, I]
        xs = ops.broadcast_to(x.reshape(n, 1, 1, h), (n, k, 1, h)).reshape(n * k, 1, h)
        hid = _bmm_tb(xs, gu)  # [N*K, 1, 2I]
        a = act_mul(hid[..., :inter], hid[..., inter:], act)
        y = _bmm_tb(a, dn).reshape(n, k, h)  # [N, K, H]
        return (y * top_weights.reshape(n, k, 1)).sum(1)
    xs = ops.broadcast_to(x.reshape(1, n, h), (e, n, h))
    hid = _bmm_tb(xs, gate_up)  # [E, N, 2I]
    a = act_mul(hid[..., :inter], hid[..., inter:], act)
    y = _bmm_tb(a, down)  # [E, N, H]
    onehot = ops.one_hot(top_index, e, Tensor(1.0, x.dtype), Tensor(0.0, x.dtype))  # [N, K, E]
    combine = (onehot * top_weights.expand_dims(-1)).sum(1).transpose(1, 0)  # [E, N]
    chosen = onehot.sum(1).transpose(1, 0) > 0
    # Unchosen experts may overflow in float16; select them away instead of multiplying by zero.
    y = ops.where(chosen.expand_dims(-1), y * combine.expand_dims(-1), ops.zeros((), x.dtype))
    return y.sum(0)


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tuple[Tensor, Tensor]:
    """Summed token cross-entropy in float32 and the number of counted tokens.

    Args:
        logits: ``[N, V]`` (any float dtype; cast to float32).
        labels: ``[N]`` integer targets; ``ignore_index`` entries are skipped.

    Returns:
        ``(loss_sum, count)`` float32 scalars; the mean is ``loss_sum / max(count, 1)``.
    """
    logp = ops.log_softmax(logits.astype(ms.float32), -1)
    labels = labels.astype(ms.int32)
    keep = labels != ignore_index
    safe = ops.where(keep, labels, ops.zeros_like(labels))
    picked = ops.gather_elements(logp, 1, safe.reshape(-1, 1)).reshape(-1)
    keepf = keep.astype(ms.float32)
    return -(picked * keepf).sum(), keepf.sum()


def load_balancing_loss(router_logits: Tuple[Tensor, ...], num_experts: int, top_k: int,
                        token_mask: Optional[Tensor] = None) -> Tensor:
    """Switch-Transformer auxiliary loss with the reference's (transformers 5) semantics.

    Args:
        router_logits: one ``[N, E]`` tensor per sparse layer (``N = B*T``).
        num_experts: ``E``.
        top_k: experts per token.
        token_mask: optional ``[B, T]`` attention mask; padding tokens do not count.

    Returns:
        float32 scalar ``E * sum_e(frac_tokens_e * mean_prob_e)`` pooled over layers.
    """
    counts = ops.zeros((num_experts,), ms.float32)
    prob_sum = ops.zeros((num_experts,), ms.float32)
    rows = ops.zeros((), ms.float32)
    for layer_logits in router_logits:
        probs = ops.softmax(layer_logits.astype(ms.float32), -1)
        _, chosen = ops.topk(probs, top_k)
        onehot = ops.one_hot(chosen.astype(ms.int32), num_experts, Tensor(1.0, ms.float32),
                             Tensor(0.0, ms.float32))  # [N, K, E]
        if token_mask is None:
            counts = counts + onehot.sum((0, 1))
            prob_sum = prob_sum + probs.sum(0)
            rows = rows + probs.shape[0]
        else:
            m = token_mask.reshape(-1).astype(ms.float32)
            counts = counts + (onehot * m.reshape(-1, 1, 1)).sum((0, 1))
            prob_sum = prob_sum + (probs * m.reshape(-1, 1)).sum(0)
            rows = rows + m.sum()
    return (counts / rows * (prob_sum / rows)).sum() * num_experts
