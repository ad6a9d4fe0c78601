"""The KV block pool: block tables per sequence, reference counts, and prefix caching of full blocks."""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["BlockManager", "block_hash"]

_ROOT = b"qwen2ms-kv-prefix"


def block_hash(parent: Optional[bytes], tokens: Sequence[int]) -> bytes:
    """The prefix-cache key of a full block: SHA-256 of the parent block's key and the block's token ids.

    Chaining makes a key name the whole prefix, not just the block's own tokens; a cryptographic hash (as
    vLLM's ``sha256`` option) keeps one client from crafting a collision that would hand another its KV.

    Example:
        >>> block_hash(None, [1, 2]) == block_hash(None, [1, 2]) != block_hash(block_hash(None, [0, 0]), [1, 2])
        True
    """
    h = hashlib.sha256(parent if parent is not None else _ROOT)
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.digest()


class BlockManager:
    """A fixed pool of ``num_blocks`` block ids shared by the sequences' block tables.

    Every block is in exactly one state: *free* (no owner, no cached content), *cached* (no owner, but it
    holds the KV of a full block whose prefix key is known: kept in LRU order and handed out again on a
    prefix hit, or evicted, oldest first, when no free block is left), or *used* (``refcount`` > 0: as many
    block tables hold it). Only full blocks whose every token's KV was written (see :meth:`mark_computed`) get
    a key, and a block with a key is never written again: a sequence always writes into blocks it alone owns.

    Args:
        num_blocks: the pool size.
        block_size: tokens per block.
        enable_prefix_caching: reuse full blocks of earlier prompts and replies.

    Example:
        >>> bm = BlockManager(num_blocks=8, block_size=4)
        >>> bm.allocate("a", [1, 2, 3, 4, 5]), bm.block_table("a")
        (0, [0, 1])
        >>> bm.mark_computed("a", [1, 2, 3, 4, 5], 5); bm.free("a")
        >>> bm.allocate("b", [1, 2, 3, 4, 9])  # the first block is a prefix hit
        4
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if int(num_blocks) < 1 or int(block_size) < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self.refcount = [0] * self.num_blocks
        self._free: deque = deque(range(self.num_blocks))
        self._cached: "OrderedDict[int, None]" = OrderedDict()  # refcount-0 blocks with a key, LRU first
        self._key_of: Dict[int, bytes] = {}
        self._block_of: Dict[bytes, int] = {}
        self._tables: Dict[str, List[int]] = {}
        self._keys: Dict[str, List[bytes]] = {}  # the chain of keys of each sequence's full computed blocks
        self.hit_tokens = 0

    # ------------------------------------------------------------------ counts
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now (free or cached)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one sequence."""
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Unowned blocks kept for prefix hits."""
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return -(-int(num_tokens) // self.block_size)

    def has_sequence(self, seq_id: str) -> bool:
        return seq_id in self._tables

    def num_blocks_of(self, seq_id: str) -> int:
        """Length of the sequence's block table."""
        return len(self._tables[seq_id])

    def block_table(self, seq_id: str) -> List[int]:
        """The sequence's block ids, in position order (a copy)."""
        return list(self._tables[seq_id])

    # ------------------------------------------------------------------ prefix lookup
    def _prefix_hits(self, token_ids: Sequence[int]) -> List[int]:
        """Cached blocks that hold the leading full blocks of ``token_ids``, in order."""
        if not self.enable_prefix_caching:
            return []
        hits: List[int] = []
        parent = None
        bs = self.block_size
        # At least the last token is always computed (its logits are needed), so a prompt that is all full
        # cached blocks reuses all but the last one.
        for i in range((len(token_ids) - 1) // bs):
            parent = block_hash(parent, token_ids[i * bs:(i + 1) * bs])
            block = self._block_of.get(parent)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_allocate(self, token_ids: Sequence[int], reserve: int = 0) -> bool:
        """Whether :meth:`allocate` for ``token_ids`` would succeed and leave ``reserve`` blocks free."""
        hits = self._prefix_hits(token_ids)
        revived = sum(1 for b in hits if self.refcount[b] == 0)  # taken out of the cached set, so not free
        need = self.blocks_for(len(token_ids)) - len(hits)
        return need + revived + reserve <= self.num_free_blocks

    # ------------------------------------------------------------------ ownership
    def _take_block(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._cached.popitem(last=False)  # evict the least recently used cached block
        del self._block_of[self._key_of.pop(block)]
        return block

    def _release(self, block: int) -> None:
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            if block in self._key_of:
                self._cached[block] = None
            else:
                self._free.append(block)

    def allocate(self, seq_id: str, token_ids: Sequence[int]) -> int:
        """Give ``seq_id`` a block table for ``token_ids``; return how many leading tokens are already cached.

        Raises:
            ValueError: ``seq_id`` already has blocks, or the pool cannot hold the tokens (check
                :meth:`can_allocate` first).
        """
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already has blocks; free it first")
        if not self.can_allocate(token_ids):
            raise ValueError(f"{len(token_ids)} tokens need {self.blocks_for(len(token_ids))} blocks of "
                             f"{self.block_size}, but only {self.num_free_blocks} of {self.num_blocks} are free")
        hits = self._prefix_hits(token_ids)
        for block in hits:
            if self.refcount[block] == 0:
                del self._cached[block]
            self.refcount[block] += 1
        table = list(hits)
        for _ in range(self.blocks_for(len(token_ids)) - len(hits)):
            block = self._take_block()
            self.refcount[block] = 1
            table.append(block)
        self._tables[seq_id] = table
        self._keys[seq_id] = [self._key_of[b] for b in hits]
        cached = len(hits) * self.block_size
        self.hit_tokens += cached
        return cached

    def append_slots(self, seq_id: str, num_tokens: int) -> bool:
        """Grow the sequence's table to hold ``num_tokens`` tokens; False (nothing changed) if the pool is out."""
        table = self._tables[seq_id]
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.num_free_blocks:
            return False
        for _ in range(need):
            block = self._take_block()
            self.refcount[block] = 1
            table.append(block)
        return True

    def mark_computed(self, seq_id: str, token_ids: Sequence[int], num_computed: int) -> None:
        """Record that the KV of ``token_ids[:num_computed]`` is written: full blocks among them get prefix keys."""
        if not self.enable_prefix_caching:
            return
        table, keys = self._tables[seq_id], self._keys[seq_id]
        bs = self.block_size
        for i in range(len(keys), min(num_computed // bs, len(table))):
            key = block_hash(keys[-1] if keys else None, token_ids[i * bs:(i + 1) * bs])
            keys.append(key)
            block = table[i]
            # A block computed twice (two sequences missed the cache at once) stays unkeyed: one key, one block.
            if key not in self._block_of and block not in self._key_of:
                self._block_of[key] = block
                self._key_of[block] = key

    def free(self, seq_id: str) -> None:
        """Drop the sequence's table; blocks nobody else holds become free (or cached, if keyed). Unknown: no-op."""
        table = self._tables.pop(seq_id, None)
        self._keys.pop(seq_id, None)
        if table is None:
            return
        # Later blocks first: under LRU eviction a prefix's tail goes before its head, which stays useful longer.
        for block in reversed(table):
            self._release(block)

    def reset_prefix_cache(self) -> None:
        """Forget every cached, unowned block (they become free); blocks in use keep their keys."""
        for block in list(self._cached):
            del self._block_of[self._key_of.pop(block)]
            self._free.append(block)
        self._cached.clear()

    def check(self) -> None:
        """Assert the pool's invariants (for tests): states partition the pool and refcounts match the tables."""
        counts = [0] * self.num_blocks
        for table in self._tables.values():
            for b in table:
                counts[b] += 1
        assert counts == self.refcount, "refcounts differ from the block tables"
        free, cached = set(self._free), set(self._cached)
        used = {b for b in range(self.num_blocks) if self.refcount[b] > 0}
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not (free & cached) and not (free & used) and not (cached & used), "a block is in two states"
        assert len(free) + len(cached) + len(used) == self.num_blocks, "a block is in no state"
        assert all(b in self._key_of for b in cached) and not (free & set(self._key_of)), "cached/free keys wrong"
        assert {v: k for k, v in self._block_of.items()} == self._key_of, "key maps disagree"
