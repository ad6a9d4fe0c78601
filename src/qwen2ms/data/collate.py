"""Dynamic padding of SFT samples into batches (right padding to a multiple of N) and a simple batch iterator."""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from .sft import IGNORE_INDEX

__all__ = ["DataCollatorForSFT", "iter_batches"]

_PACKED_KEYS = ("input_ids", "labels", "position_ids", "segment_ids")


class DataCollatorForSFT:
    """Stack samples into int32 arrays, right-padding to the batch's longest sample rounded up to a multiple of N.

    Rounding to a multiple keeps the number of distinct shapes small, so a compiled train step
    (which compiles once per shape) recompiles only a few times. Packed rows (which carry
    ``position_ids`` and ``segment_ids`` and already share one length) are stacked unchanged.

    Args:
        pad_token_id: id written into padded ``input_ids`` positions.
        pad_to_multiple_of: round the padded length up to a multiple of this (1: no rounding).
        max_length: optional cap; a batch whose longest sample is longer raises ``ValueError``.

    Returns (when called):
        ``{"input_ids", "labels", "attention_mask"}`` of shape ``[B, T]`` (``attention_mask`` 1 on
        real tokens), or for packed rows ``{"input_ids", "labels", "position_ids", "segment_ids"}``.

    Example:
        >>> collate = DataCollatorForSFT(pad_token_id=0, pad_to_multiple_of=4)
        >>> b = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}])
        >>> b["input_ids"].tolist(), b["attention_mask"].tolist()
        ([[5, 6, 7, 0], [8, 0, 0, 0]], [[1, 1, 1, 0], [1, 0, 0, 0]])
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 8, max_length: Optional[int] = None) -> None:
        if pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = int(pad_to_multiple_of)
        self.max_length = max_length

    def __call__(self, samples: Sequence[Dict[str, Sequence[int]]]) -> Dict[str, np.ndarray]:
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        if "segment_ids" in samples[0]:
            lengths = {len(s["input_ids"]) for s in samples}
            if len(lengths) != 1:
                raise ValueError(f"packed rows must share one length, got lengths {sorted(lengths)}")
            return {k: np.stack([np.asarray(s[k], dtype=np.int32) for s in samples]) for k in _PACKED_KEYS}
        longest = max(len(s["input_ids"]) for s in samples)
        if self.max_length is not None and longest > self.max_length:
            raise ValueError(f"a sample has {longest} tokens, more than max_length={self.max_length}")
        m = self.pad_to_multiple_of
        width = -(-longest // m) * m
        if self.max_length is not None:
            width = min(width, self.max_length)
        batch = len(samples)
        ids = np.full((batch, width), self.pad_token_id, dtype=np.int32)
        labels = np.full((batch, width), IGNORE_INDEX, dtype=np.int32)
        mask = np.zeros((batch, width), dtype=np.int32)
        for r, s in enumerate(samples):
            n = len(s["input_ids"])
            if len(s["labels"]) != n:
                raise ValueError(f"sample {r}: input_ids has {n} tokens but labels has {len(s['labels'])}")
            ids[r, :n] = s["input_ids"]
            labels[r, :n] = s["labels"]
            mask[r, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def iter_batches(
    samples: Sequence[Dict[str, Sequence[int]]],
    batch_size: int,
    collate_fn: Callable[[Sequence[Dict[str, Sequence[int]]]], Dict[str, np.ndarray]],
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> Iterator[Dict[str, np.ndarray]]:
    """Yield collated batches from an in-memory list of samples (the dynamic-padding path).

    Args:
        samples: tokenised samples or packed rows.
        batch_size: samples per batch.
        collate_fn: e.g. a :class:`DataCollatorForSFT`.
        shuffle: visit samples in a permutation drawn from ``seed``.
        seed: permutation seed (same seed, same order).
        drop_last: skip a final batch smaller than ``batch_size``.

    Yields:
        Collated batches.

    Example:
        >>> batches = list(iter_batches(samples, 8, DataCollatorForSFT(151643)))  # doctest: +SKIP
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order: List[int] = list(range(len(samples)))
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(samples)).tolist()
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        if drop_last and len(chunk) < batch_size:
            return
        yield collate_fn([samples[i] for i in chunk])
