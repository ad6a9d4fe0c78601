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
from ..dtypes import resolve_dtype
from ..ops.dispatch import ReferenceOps

__all__ = ["KVCache"]

_cache_ids = iter(range(1 << 62))
_REFERENCE = ReferenceOps()


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

    #: The model's attention takes the paged branch for caches that set this (qwen2ms.modeling.paged).
    paged = False

    def __init__(self, config: Qwen2Config, batch_size: int, max_length: int, dtype=None) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVCache {name} must be a positive integer, got {value!r}")
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

    def update(self, layer_idx: int, key: Tensor, value: Tensor, cache_position: Union[int, Tensor],
               ops_impl=None):
        """Write ``key``/``value`` ``[B, kv_heads, T, D]`` into slots ``[cache_position, cache_position + T)``.

        Args:
            ops_impl: the ops backend that performs the write (``cache_update``; the model passes its
                own); default: the reference ops.

        Returns:
            The layer's full updated ``(keys, values)`` ``[B, kv_heads, max_length, D]``.
        """
        impl = ops_impl if ops_impl is not None else _REFERENCE
        if isinstance(cache_position, int):
            cache_position = Tensor(cache_position, ms.int32)
        return impl.cache_update(self.keys[layer_idx], self.values[layer_idx], key, value, cache_position)

    def reset(self) -> None:
        """Zero every slot (a new request can then reuse the cache)."""
        for p in list(self.keys) + list(self.values):
            p.set_data(Tensor(np.zeros(p.shape, dtype=np.float32)).astype(p.dtype))

    def nbytes(self) -> int:
        """Bytes held by the cache."""
        per = int(np.prod(self.keys[0].shape)) * (2 if self.dtype in (ms.float16, ms.bfloat16) else 4)
        return 2 * self.num_layers * per
