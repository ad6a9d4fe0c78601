"""A static, preallocated key/value cache passed into the model's forward (fixed shapes suit graph mode).

Layout: for each layer ``l``, ``cache.keys[l]`` and ``cache.values[l]`` are Parameters of shape
``[batch_size, num_key_value_heads, max_length, head_dim]``. Slot ``j`` of the cache holds the
token written at step ``j`` (slots are not RoPE positions: with left padding a row's first real
token sits in a later slot, and its position comes from ``position_ids``).

A forward with ``cache=`` and ``cache_position=p`` (an int or an int32 scalar Tensor) writes the
``T`` new tokens into slots ``[p, p + T)`` and attends to slots ``<= p + t``. Passing ``p`` as a
Tensor lets one compiled decode step serve every token without recompiling.

Example:
    >>> cache = KVCache(config, batch_size=2, max_length=64)
    >>> out = model(ids, attention_mask=mask, cache=cache, cache_position=0)   # prefill
"""
from __future__ import annotations

from typing import Union

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from ..config import Qwen2Config

__all__ = ["KVCache"]

_cache_ids = iter(range(1 << 62))


class KVCache(nn.Cell):
    """Preallocated per-layer key/value tensors ``[B, kv_heads, max_length, head_dim]``.

    Args:
        config: the model's :class:`~qwen2ms.Qwen2Config`.
        batch_size: rows the cache holds (``B`` of every forward that uses it).
        max_length: slots per row: prompt length plus tokens to generate (size it from the request,
            not from ``max_position_embeddings``).
        dtype: storage dtype (a MindSpore dtype or "float32"/"float16"/"bfloat16" name); defaults to
            float32. Use the model's compute dtype (``model.compute_dtype``).

    Raises:
        ValueError: a non-positive size.

    Example:
        >>> cache = KVCache(Qwen2Config.from_preset("qwen2-0.5b"), batch_size=1, max_length=256)
        >>> cache.keys[0].shape
        (1, 2, 256, 64)
    """

    def __init__(self, config: Qwen2Config, batch_size: int, max_length: int, dtype=None) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVCache {name} must be a positive integer, got {value!r}")
        from .model import resolve_dtype

        self.dtype = resolve_dtype(dtype) if dtype is not None else ms.float32
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.num_layers = config.num_hidden_layers
        shape = (self.batch_size, config.num_key_value_heads, self.max_length, config.head_dim)
        # Unique names: two caches may live in one process, and MindSpore keys graph parameters by name.
        uid = next(_cache_ids)
        self.keys = ms.ParameterTuple([
            Parameter(initializer("zeros", shape, self.dtype), name=f"kv_cache{uid}.key.{i}", requires_grad=False)
            for i in range(self.num_layers)])
        self.values = ms.ParameterTuple([
            Parameter(initializer("zeros", shape, self.dtype), name=f"kv_cache{uid}.value.{i}", requires_grad=False)
            for i in range(self.num_layers)])

    def update(self, layer_idx: int, key: Tensor, value: Tensor, cache_position: Union[int, Tensor]):
        """Write ``key``/``value`` ``[B, kv_heads, T, D]`` into slots ``[cache_position, cache_position + T)``.

        Returns:
            The layer's full updated ``(keys, values)`` ``[B, kv_heads, max_length, D]``.
        """
        k_param = self.keys[layer_idx]
        v_param = self.values[layer_idx]
        t = key.shape[2]
        length = k_param.shape[2]
        # Every slot takes either its old value or the new token that lands on it: one static-shape
        # select, valid for any (tensor) start position, so a compiled step is reused for all tokens.
        src = ops.arange(length, dtype=ms.int32) - cache_position
        valid = ops.logical_and(src >= 0, src < t).reshape(1, 1, length, 1)
        # Broadcast explicitly: implicitly broadcasting selects keep their temporaries alive for the
        # whole graph on MindSpore 2.10's CPU backend (see reference.attention).
        valid = ops.broadcast_to(valid, k_param.shape)
        src = ops.maximum(ops.minimum(src, t - 1), 0)
        new_k = ops.select(valid, ops.gather(key.astype(k_param.dtype), src, 2), k_param)
        new_v = ops.select(valid, ops.gather(value.astype(v_param.dtype), src, 2), v_param)
        ops.assign(k_param, new_k)
        ops.assign(v_param, new_v)
        return new_k, new_v

    def reset(self) -> None:
        """Zero every slot (a new request can then reuse the cache)."""
        for p in list(self.keys) + list(self.values):
            p.set_data(Tensor(np.zeros(p.shape, dtype=np.float32)).astype(p.dtype))

    def nbytes(self) -> int:
        """Bytes held by the cache."""
        per = int(np.prod(self.keys[0].shape)) * (2 if self.dtype in (ms.float16, ms.bfloat16) else 4)
        return 2 * self.num_layers * per
