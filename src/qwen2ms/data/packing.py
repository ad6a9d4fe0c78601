"""Pack variable-length SFT samples into fixed-length rows with per-sample positions and segment ids."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from .sft import IGNORE_INDEX

__all__ = ["pack_samples", "plan_bins"]


class _FirstFit:
    """Max segment tree over bin free space: the leftmost bin with room for ``size`` in O(log n)."""

    def __init__(self, capacity: int, max_bins: int) -> None:
        self.capacity = capacity
        self.size = 1
        while self.size < max(1, max_bins):
            self.size *= 2
        # Unopened bins have full capacity, so "leftmost bin with room" opens a new bin exactly
        # when no open bin fits: first-fit semantics with no separate bookkeeping.
        self.tree = [capacity] * (2 * self.size)
        self.opened = 0

    def place(self, need: int) -> int:
        node = 1
        while node < self.size:
            node = 2 * node if self.tree[2 * node] >= need else 2 * node + 1
        leaf = node - self.size
        self.tree[node] -= need
        node //= 2
        while node:
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])
            node //= 2
        self.opened = max(self.opened, leaf + 1)
        return leaf


def plan_bins(lengths: Sequence[int], seq_length: int, strategy: str = "ffd") -> List[List[int]]:
    """Assign sample indices to rows of capacity ``seq_length``.

    ``"ffd"`` (first-fit decreasing): samples sorted longest first (ties in input order), each put
    into the first row with room; rows are usually >95% full on chat data. ``"greedy"``: samples in
    input order, a new row started whenever the next sample does not fit (keeps data order, e.g.
    for curricula, at the cost of more padding).

    Args:
        lengths: token count of each sample; each must be in ``[1, seq_length]``.
        seq_length: row capacity.
        strategy: ``"ffd"`` or ``"greedy"``.

    Returns:
        Rows as lists of sample indices (within a row, in placement order).

    Example:
        >>> plan_bins([3, 6, 2, 4], 8)
        [[1, 2], [3, 0]]
        >>> plan_bins([3, 6, 2, 4], 8, strategy="greedy")
        [[0], [1, 2], [3]]
    """
    for i, n in enumerate(lengths):
        if not 1 <= n <= seq_length:
            raise ValueError(
                f"sample {i} has {n} tokens; packing needs 1..seq_length={seq_length} "
                "(truncate or drop long samples first, see fit_to_length)"
            )
    if strategy == "greedy":
        rows: List[List[int]] = []
        used = seq_length + 1
        for i, n in enumerate(lengths):
            if used + n > seq_length:
                rows.append([])
                used = 0
            rows[-1].append(i)
            used += n
        return rows
    if strategy != "ffd":
        raise ValueError(f"strategy must be 'ffd' or 'greedy', got {strategy!r}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    fit = _FirstFit(seq_length, len(lengths))
    bins: List[List[int]] = []
    for i in order:
        b = fit.place(lengths[i])
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
    return bins


def pack_samples(
    samples: Sequence[Dict[str, Sequence[int]]],
    seq_length: int,
    pad_token_id: int,
    strategy: str = "ffd",
) -> List[Dict[str, np.ndarray]]:
    """Pack tokenised samples into rows of exactly ``seq_length`` tokens.

    Each row holds ``input_ids``, ``labels``, ``position_ids`` (restarting at 0 for every sample,
    0 on padding) and ``segment_ids`` (1..n for the n samples in the row, 0 on padding), all
    int32. The model turns ``segment_ids`` into a block-diagonal causal mask, so attention never
    crosses samples. Padding gets label ``-100``, and so does each sample's first token: in an
    unpacked batch the first label is never a target (the loss shifts labels by one), while in a
    packed row it would be the target of the previous sample's last token. With both, a packed row
    yields exactly the same per-token losses as its samples run one by one.

    Args:
        samples: ``{"input_ids", "labels"}`` each, at most ``seq_length`` long.
        seq_length: row length.
        pad_token_id: id written into padding positions.
        strategy: ``"ffd"`` or ``"greedy"``; see :func:`plan_bins`.

    Returns:
        A list of rows (dicts of int32 arrays of shape ``[seq_length]``).

    Example:
        >>> rows = pack_samples([{"input_ids": [5, 6], "labels": [-100, 6]},
        ...                      {"input_ids": [7, 8, 9], "labels": [-100, -100, 9]}], 6, pad_token_id=0)
        >>> rows[0]["segment_ids"].tolist(), rows[0]["position_ids"].tolist()
        ([1, 1, 1, 2, 2, 0], [0, 1, 2, 0, 1, 0])
    """
    lengths = [len(s["input_ids"]) for s in samples]
    for i, s in enumerate(samples):
        if len(s["labels"]) != lengths[i]:
            raise ValueError(f"sample {i}: input_ids has {lengths[i]} tokens but labels has {len(s['labels'])}")
    rows: List[Dict[str, np.ndarray]] = []
    for members in plan_bins(lengths, seq_length, strategy):
        ids = np.full(seq_length, pad_token_id, dtype=np.int32)
        labels = np.full(seq_length, IGNORE_INDEX, dtype=np.int32)
        pos = np.zeros(seq_length, dtype=np.int32)
        seg = np.zeros(seq_length, dtype=np.int32)
        at = 0
        for segment, i in enumerate(members, start=1):
            n = lengths[i]
            ids[at: at + n] = samples[i]["input_ids"]
            labels[at: at + n] = samples[i]["labels"]
            labels[at] = IGNORE_INDEX
            pos[at: at + n] = np.arange(n, dtype=np.int32)
            seg[at: at + n] = segment
            at += n
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos, "segment_ids": seg})
    return rows
