"""Choosing the next token from processed scores: greedy argmax or seeded multinomial sampling."""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

__all__ = ["Sampler", "greedy", "sample", "make_rng"]

#: ``(scores [B, V] float32, rng) -> next ids [B] int64``
Sampler = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def make_rng(seed: Optional[int] = None) -> np.random.Generator:
    """A fresh ``numpy.random.Generator`` for one generate call (no global random state is touched).

    Example:
        >>> make_rng(0).integers(10) == make_rng(0).integers(10)
        True
    """
    return np.random.default_rng(seed)


def greedy(scores: np.ndarray, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """The highest-scoring id per row (the first one on ties, as ``torch.argmax``).

    Example:
        >>> greedy(np.array([[0.1, 0.9, 0.9]], np.float32))
        array([1])
    """
    return np.asarray(scores).argmax(axis=-1).astype(np.int64)


def sample(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one id per row from ``softmax(scores)`` using ``rng`` (inverse-CDF sampling).

    Ids with -inf scores have probability 0 and are never drawn. Probabilities are computed in
    float64 so that tiny masses are not lost to rounding.

    Args:
        scores: processed scores [B, V] (temperature/top-k/top-p already applied).
        rng: the call's generator; the same seed and scores give the same ids.

    Returns:
        int64 ids [B].

    Raises:
        ValueError: a row has no finite score (nothing can be sampled), or NaN/+inf scores.

    Example:
        >>> sample(np.array([[0.0, -np.inf]], np.float32), make_rng(0))
        array([0])
    """
    scores = np.asarray(scores)
    if np.isnan(scores).any() or np.isposinf(scores).any():
        raise ValueError("scores contain NaN or +inf; the model produced invalid logits")
    batch, vocab = scores.shape
    draws = rng.random(batch)  # one draw per row, whatever the path below: seeds stay reproducible
    ids = np.empty(batch, dtype=np.int64)
    for b in range(batch):
        row = scores[b]
        keep = np.flatnonzero(row != -np.inf)
        if keep.size == 0:
            raise ValueError(f"row {b} of the scores has no finite value: every token was filtered out")
        # After top-k/top-p most ids are -inf (probability 0): work on the others only.
        sub = row[keep].astype(np.float64) if keep.size < vocab // 2 else None
        weights = np.exp((sub if sub is not None else row.astype(np.float64)) - row.max())
        cdf = np.cumsum(weights)
        # side="right" skips zero-probability ids: their cdf equals the previous entry's.
        pick = int(np.searchsorted(cdf, draws[b] * cdf[-1], side="right"))
        if pick >= cdf.size:  # r * total can round up to total itself
            pick = int(np.flatnonzero(weights > 0)[-1])
        ids[b] = keep[pick] if sub is not None else pick
    return ids
