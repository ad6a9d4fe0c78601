"""A paged KV cache (fixed-size blocks in one preallocated pool, per-sequence block tables) and the runner that
prefills and decodes sequences through it with compiled, bucketed graphs (the model side of continuous batching).

Layout: for each layer ``l``, ``cache.key_pools[l]`` and ``cache.value_pools[l]`` are Parameters of shape
``[num_blocks + 1, block_size, num_key_value_heads, head_dim]`` (Ascend ReshapeAndCache's layout). Blocks
``0 .. num_blocks - 1`` belong to the caller (a block manager); block ``num_blocks`` is the cache's scratch
block, where padding tokens write and which pads block tables, so the caller never sees it.

A sequence's block table lists its blocks in position order: position ``p`` lives in block
``table[p // block_size]`` at offset ``p % block_size`` (flat slot ``block * block_size + offset``). Blocks
may be anywhere in the pool and in any order, and two tables may share blocks (a prefix-cache hit).

Example:
    >>> cache = PagedKVCache(model.config, num_blocks=64, block_size=16)            # doctest: +SKIP
    >>> runner = PagedModelRunner(model, cache, max_num_seqs=8, max_model_len=512)  # doctest: +SKIP
    >>> logits = runner.prefill([5, 6, 7], start=0, block_table=[3])                # [V]  # doctest: +SKIP
    >>> logits = runner.decode([int(logits.argmax())], positions=[3], block_tables=[[3]])  # [1, V]  # doctest: +SKIP
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from ..config import Qwen2Config
from ..dtypes import resolve_dtype

__all__ = ["PagedKVCache", "PagedModelRunner"]

_pool_ids = iter(range(1 << 62))

#: The shortest prefill bucket: prompts are left-padded to the next power of two at least this long.
MIN_PREFILL_BUCKET = 16
#: Default longest prefill call: longer prompts are prefilled in chunks of this many tokens.
PREFILL_CHUNK = 512


def _itemsize(dtype: Any) -> int:
    return 2 if dtype in (ms.float16, ms.bfloat16) else 4


def _positive_int(name: str, value: Any) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


class PagedKVCache(nn.Cell):
    """Per-layer key/value pools ``[num_blocks + 1, block_size, kv_heads, head_dim]`` (one scratch block).

    Args:
        config: the model's :class:`~qwen2ms.Qwen2Config`.
        num_blocks: blocks the caller may use (ids ``0 .. num_blocks - 1``).
        block_size: tokens per block.
        dtype: storage dtype (a MindSpore dtype or "float32"/"float16" name); default float32. Use the model's
            compute dtype (``model.compute_dtype``).

    Raises:
        ValueError: a non-positive size, or a bfloat16 pool on CPU (its scatter kernel has no bfloat16 version).

    Example:
        >>> cache = PagedKVCache(Qwen2Config.from_preset("qwen2-0.5b"), num_blocks=128, block_size=16)
        >>> cache.key_pools[0].shape
        (129, 16, 2, 64)
    """

    #: The model's attention takes its paged branch for this cache (see :class:`qwen2ms.modeling.KVCache`).
    paged = True

    def __init__(self, config: Qwen2Config, num_blocks: int, block_size: int = 16, dtype: Any = None) -> None:
        super().__init__()
        self.num_blocks = _positive_int("num_blocks", num_blocks)
        self.block_size = _positive_int("block_size", block_size)
        self.dtype = resolve_dtype(dtype) if dtype is not None else ms.float32
        if self.dtype == ms.bfloat16 and ms.get_context("device_target") == "CPU":
            raise ValueError("a bfloat16 paged KV cache cannot be written on CPU; use dtype 'float32' or 'float16'")
        self.num_layers = config.num_hidden_layers
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        #: The block padding rows and padded table entries point at; never handed to the caller.
        self.scratch_block = self.num_blocks
        shape = (self.num_blocks + 1, self.block_size, self.num_kv_heads, self.head_dim)
        # Unique names: several caches may live in one process, and MindSpore keys graph parameters by name.
        uid = next(_pool_ids)
        self.key_pools = ms.ParameterTuple([
            Parameter(initializer("zeros", shape, self.dtype), name=f"paged_kv{uid}.key.{i}", requires_grad=False)
            for i in range(self.num_layers)])
        self.value_pools = ms.ParameterTuple([
            Parameter(initializer("zeros", shape, self.dtype), name=f"paged_kv{uid}.value.{i}", requires_grad=False)
            for i in range(self.num_layers)])

    @staticmethod
    def bytes_per_block(config: Qwen2Config, block_size: int, dtype: Any = None) -> int:
        """Bytes one block takes over all layers, keys and values.

        Example:
            >>> PagedKVCache.bytes_per_block(Qwen2Config.from_preset("qwen2-0.5b"), 16, "float32")
            393216
        """
        dt = resolve_dtype(dtype) if dtype is not None else ms.float32
        per_layer = int(block_size) * config.num_key_value_heads * config.head_dim * _itemsize(dt)
        return 2 * config.num_hidden_layers * per_layer

    def nbytes(self) -> int:
        """Bytes held by the pools, the scratch block included."""
        per_block = self.block_size * self.num_kv_heads * self.head_dim * _itemsize(self.dtype)
        return 2 * self.num_layers * (self.num_blocks + 1) * per_block

    # ------------------------------------------------------------------ called inside the model's graph
    def attention_masks(self, position_ids: Tensor, cache_position: Tuple[Tensor, Tensor],
                        sliding_window: Optional[int]) -> Tuple[Tensor, Tensor]:
        """``(full, sliding)`` bool masks ``[B, 1, T, M * block_size]``: query ``(b, t)`` sees the keys at
        positions ``<= position_ids[b, t]`` (and, sliding, ``> position_ids[b, t] - sliding_window``)."""
        block_tables = cache_position[1]
        b, t = position_ids.shape
        keys = block_tables.shape[1] * self.block_size
        k_pos = ops.arange(keys, dtype=ms.int32).reshape(1, 1, keys)
        q_pos = position_ids.astype(ms.int32).reshape(b, t, 1)
        allowed = k_pos <= q_pos  # [B, T, S]
        full = allowed.reshape(b, 1, t, keys)
        if sliding_window is None:
            return full, full
        return full, ops.logical_and(allowed, k_pos > q_pos - sliding_window).reshape(b, 1, t, keys)

    def attend(self, layer_idx: int, q: Tensor, key: Tensor, value: Tensor, cache_position: Tuple[Tensor, Tensor],
               mask: Tensor, scale: float, ops_impl: Any) -> Tensor:
        """Write this call's ``key``/``value`` ``[B, Hkv, T, D]`` at ``cache_position[0]`` (slot mapping ``[B*T]``)
        and attend ``q`` ``[B, Hq, T, D]`` to the keys of each row's block table (``cache_position[1]``)."""
        slot_mapping, block_tables = cache_position
        k_pool, v_pool = ops_impl.paged_cache_write(self.key_pools[layer_idx], self.value_pools[layer_idx],
                                                    key, value, slot_mapping)
        return ops_impl.paged_attention(q, k_pool, v_pool, block_tables, mask, scale)


class _PagedStep(nn.Cell):
    """The compiled unit of :class:`PagedModelRunner`: the model plus one paged cache, last-token logits."""

    def __init__(self, lm: nn.Cell, cache: PagedKVCache) -> None:
        # auto_prefix=False keeps the model's parameter names (the HF keys) unchanged.
        super().__init__(auto_prefix=False)
        self.lm = lm
        self.cache = cache

    def construct(self, input_ids, position_ids, slot_mapping, block_tables):
        out = self.lm.construct(input_ids, None, position_ids, None, None, self.cache, (slot_mapping, block_tables),
                                False, 1)
        return out[0]  # [B, 1, V]


def _buckets(limit: int, first: int) -> List[int]:
    """Powers of two from ``first`` while below ``limit``, then ``limit`` itself."""
    out, n = [], first
    while n < limit:
        out.append(n)
        n *= 2
    return out + [limit]


class PagedModelRunner:
    """Prefill and decode many sequences through a :class:`PagedKVCache` (no scheduling, no sampling).

    Args:
        model: a :class:`~qwen2ms.modeling.Qwen2ForCausalLM`.
        cache: the :class:`PagedKVCache` (built for the model's config, in its compute dtype).
        max_num_seqs: the most sequences one :meth:`decode` call takes.
        max_model_len: the most positions a sequence may hold (prompt plus generated tokens).
        prefill_chunk: the most tokens one prefill graph takes; a longer prompt is prefilled in chunks (each
            chunk attends to the earlier ones through the cache), which bounds prefill memory.

    Graphs: one decode graph per batch bucket (1, 2, 4, ... and ``max_num_seqs``), and prefill graphs per length
    bucket (16, 32, 64, ... up to ``prefill_chunk``) and block-table width (powers of two times the blocks of the
    shortest bucket, up to ``max_model_len``'s), each compiled on first use. Every call pads to its buckets
    (padding writes to the scratch block and is masked), so no request mix recompiles anything. Decode graphs
    take full-width tables: the CPU kernel reads only each row's blocks up to its position.

    Raises:
        ValueError: a non-positive size, a cache that does not fit the model, ``max_model_len`` beyond the
            model's ``max_position_embeddings``, dynamic-NTK RoPE (its frequencies depend on the longest
            sequence of a batch, so rows would not be independent), or sliding-window layers on the Ascend
            backend.

    Example:
        >>> runner = PagedModelRunner(model, cache, max_num_seqs=16, max_model_len=2048)  # doctest: +SKIP
    """

    def __init__(self, model: Any, cache: PagedKVCache, max_num_seqs: int, max_model_len: int,
                 prefill_chunk: int = PREFILL_CHUNK) -> None:
        self.max_num_seqs = _positive_int("max_num_seqs", max_num_seqs)
        self.max_model_len = _positive_int("max_model_len", max_model_len)
        self.prefill_chunk = _positive_int("prefill_chunk", prefill_chunk)
        config = model.config
        if not isinstance(cache, PagedKVCache):
            raise ValueError(f"cache must be a qwen2ms PagedKVCache, got {type(cache).__name__}")
        if (cache.num_layers, cache.num_kv_heads, cache.head_dim) != (
                config.num_hidden_layers, config.num_key_value_heads, config.head_dim):
            raise ValueError(f"cache was built for {cache.num_layers} layers x {cache.num_kv_heads} kv heads x "
                             f"head_dim {cache.head_dim}, the model has {config.num_hidden_layers} x "
                             f"{config.num_key_value_heads} x {config.head_dim}")
        if model.model.rope_dynamic:
            raise ValueError("dynamic-NTK RoPE scaling cannot be served from a paged cache: its frequencies depend "
                             "on the longest sequence in a batch; use model.generate for this model")
        if model.model.has_sliding and model.ops_impl.name == "ascend":
            raise ValueError("sliding-window attention layers cannot be served from a paged cache on the 'ascend' "
                             "ops backend (its PagedAttention attends to keys [0, context_len)); use ops_backend "
                             "'reference' for this model")
        if self.max_model_len > config.max_position_embeddings and model.model.rope.kind == "default":
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's max_position_embeddings "
                             f"{config.max_position_embeddings}")
        self.model = model
        self.cache = cache
        self.block_size = cache.block_size
        self.vocab_size = int(config.vocab_size)
        #: Entries of every block table the graphs take (tables are padded with the scratch block).
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        self.decode_buckets = _buckets(self.max_num_seqs, 1)
        longest = min(self.prefill_chunk, self.max_model_len)
        self.prefill_buckets = _buckets(longest, min(MIN_PREFILL_BUCKET, longest))
        # Prefill attends over the blocks its positions need, not max_model_len's: a short prompt in a server with
        # a long context would otherwise scan (and, gathering, copy) the whole table width per layer.
        narrowest = min(-(-self.prefill_buckets[0] // self.block_size), self.max_blocks_per_seq)
        self.prefill_table_widths = _buckets(self.max_blocks_per_seq, narrowest)
        self._scratch_slot = cache.scratch_block * self.block_size
        self._step = None

    # ------------------------------------------------------------------ public API
    def prefill(self, token_ids: Sequence[int], start: int, block_table: Sequence[int]) -> np.ndarray:
        """Write the KV of ``token_ids`` at positions ``[start, start + len)`` and return the last token's logits.

        Positions ``[0, start)`` must already be cached in ``block_table``'s blocks (a prefix-cache hit, or an
        earlier chunk).

        Args:
            token_ids: the new tokens (at least one).
            start: the position of the first of them.
            block_table: the sequence's blocks in position order, covering at least ``start + len`` positions.

        Returns:
            float32 ``[vocab_size]`` logits of the token after the last one.

        Raises:
            ValueError: empty or out-of-vocabulary ``token_ids``, ``start`` negative or ``start + len`` beyond
                ``max_model_len``, a ``block_table`` too short or with an id outside ``[0, num_blocks)``.
        """
        ids = self._tokens(token_ids, "token_ids")
        n = len(ids)
        if n == 0:
            raise ValueError("token_ids must hold at least one token")
        if not isinstance(start, (int, np.integer)) or isinstance(start, bool) or start < 0:
            raise ValueError(f"start must be an integer >= 0, got {start!r}")
        start = int(start)
        if start + n > self.max_model_len:
            raise ValueError(f"start {start} + {n} token_ids reaches position {start + n - 1}, beyond max_model_len "
                             f"{self.max_model_len}")
        table = self._table(block_table, start + n - 1, "block_table")
        logits = None
        for first in range(0, n, self.prefill_chunk):
            logits = self._prefill_chunk(ids[first:first + self.prefill_chunk], start + first, table)
        return logits

    def _prefill_chunk(self, ids: np.ndarray, start: int, table: np.ndarray) -> np.ndarray:
        n = len(ids)
        bucket = next(b for b in self.prefill_buckets if b >= n)
        need = (start + n - 1) // self.block_size + 1
        width = next(w for w in self.prefill_table_widths if w >= need)
        pad = bucket - n
        # Left padding: the last real token is the graph's last row, whose logits are the only ones computed.
        input_ids = np.zeros((1, bucket), np.int32)
        input_ids[0, pad:] = ids
        positions = np.zeros((1, bucket), np.int32)
        positions[0, pad:] = np.arange(start, start + n, dtype=np.int32)
        slots = np.full((bucket,), self._scratch_slot, np.int32)
        pos = positions[0, pad:]
        slots[pad:] = table[pos // self.block_size] * self.block_size + pos % self.block_size
        tables = np.full((1, width), self.cache.scratch_block, np.int32)
        tables[0, :min(width, len(table))] = table[:width]
        return self._run(input_ids, positions, slots, tables)[0]

    def decode(self, tokens: Sequence[int], positions: Sequence[int],
               block_tables: Sequence[Sequence[int]]) -> np.ndarray:
        """One new token per sequence: write each at its position and return the next-token logits.

        Args:
            tokens: one token id per sequence.
            positions: each token's position (its sequence attends to positions ``[0, positions[i]]``).
            block_tables: each sequence's blocks in position order, covering its position.

        Returns:
            float32 ``[len(tokens), vocab_size]`` logits.

        Raises:
            ValueError: no sequences or more than ``max_num_seqs``, lists of different lengths, a token outside
                the vocabulary, a position outside ``[0, max_model_len)``, a block table too short or with an id
                outside ``[0, num_blocks)``, or two sequences writing the same slot.
        """
        ids = self._tokens(tokens, "tokens")
        n = len(ids)
        if not 1 <= n <= self.max_num_seqs:
            raise ValueError(f"decode takes 1 to max_num_seqs={self.max_num_seqs} tokens, got {n}")
        if len(positions) != n or len(block_tables) != n:
            raise ValueError(f"tokens, positions and block_tables must have one entry per sequence, got lengths "
                             f"{n}, {len(positions)}, {len(block_tables)}")
        pos = np.asarray(positions)
        if pos.dtype == object or not np.issubdtype(pos.dtype, np.integer) or pos.ndim != 1:
            raise ValueError(f"positions must be a list of integers, got {positions!r}")
        bad = np.flatnonzero((pos < 0) | (pos >= self.max_model_len))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"positions[{i}] = {int(pos[i])} is outside [0, max_model_len={self.max_model_len})")
        bucket = next(b for b in self.decode_buckets if b >= n)
        input_ids = np.zeros((bucket, 1), np.int32)
        input_ids[:n, 0] = ids
        position_ids = np.zeros((bucket, 1), np.int32)
        position_ids[:n, 0] = pos
        slots = np.full((bucket,), self._scratch_slot, np.int32)
        tables = np.full((bucket, self.max_blocks_per_seq), self.cache.scratch_block, np.int32)
        for i in range(n):
            p = int(pos[i])
            table = self._table(block_tables[i], p, f"block_tables[{i}]")
            tables[i, :len(table)] = table
            slots[i] = table[p // self.block_size] * self.block_size + p % self.block_size
        if len(set(slots[:n].tolist())) != n:
            raise ValueError("two sequences in one decode call write the same KV slot (same block and offset): "
                             "each running sequence needs its own last block")
        return self._run(input_ids, position_ids, slots, tables)[:n]

    # ------------------------------------------------------------------ internals
    def _tokens(self, token_ids: Sequence[int], name: str) -> np.ndarray:
        arr = np.asarray(token_ids)
        if arr.ndim != 1 or (arr.size and (arr.dtype == object or not np.issubdtype(arr.dtype, np.integer))):
            raise ValueError(f"{name} must be a flat list of integer token ids, got {token_ids!r:.80}")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= self.vocab_size):
            raise ValueError(f"{name} must lie in [0, vocab_size={self.vocab_size}), got values in "
                             f"[{int(arr.min())}, {int(arr.max())}]")
        return arr.astype(np.int32)

    def _table(self, block_table: Sequence[int], last_position: int, name: str) -> np.ndarray:
        table = np.asarray(block_table)
        if table.ndim != 1 or (table.size and (table.dtype == object or not np.issubdtype(table.dtype, np.integer))):
            raise ValueError(f"{name} must be a flat list of integer block ids, got {block_table!r:.80}")
        need = last_position // self.block_size + 1
        if table.size < need:
            raise ValueError(f"{name} has {table.size} blocks but position {last_position} needs {need} "
                             f"(block_size {self.block_size})")
        if table.size > self.max_blocks_per_seq:
            raise ValueError(f"{name} has {table.size} blocks, more than max_model_len {self.max_model_len} needs "
                             f"({self.max_blocks_per_seq})")
        lo, hi = int(table.min()), int(table.max())
        if lo < 0 or hi >= self.cache.num_blocks:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} holds block id {bad}, outside [0, num_blocks={self.cache.num_blocks})")
        return table.astype(np.int32)

    def _run(self, input_ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, tables: np.ndarray) -> np.ndarray:
        if self._step is None:
            model = self.model
            if not getattr(model, "_weights_on_huge_pages", False) and ms.get_context("device_target") == "CPU":
                # Every decode step streams all weights: 2 MiB pages spare the TLB and the prefetchers.
                from ..ops.cpu import collapse_huge_pages

                collapse_huge_pages(model.get_parameters())
                model._weights_on_huge_pages = True
            # One jit object: it compiles once per input shape (bucket) and reuses the graph afterwards.
            self._step = ms.jit(_PagedStep(model, self.cache))
        logits = self._step(Tensor(input_ids), Tensor(positions), Tensor(slots), Tensor(tables))
        return logits.asnumpy()[:, -1, :].astype(np.float32, copy=False)
