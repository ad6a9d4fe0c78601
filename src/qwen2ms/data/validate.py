"""Check tokenised SFT samples before training: integer ids inside the vocabulary, labels -100 or in range, and trained tokens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from .convert import DataFormatError
from .sft import IGNORE_INDEX

__all__ = ["SampleError", "UntrainedDatasetError", "DatasetStats", "check_samples"]

_INT_KINDS = "iu"
_INDEX_COLUMNS = ("attention_mask", "position_ids", "segment_ids")


class SampleError(DataFormatError):
    """A tokenised sample the model cannot train on; the message names the dataset, sample, column, position and value."""


class UntrainedDatasetError(DataFormatError):
    """A dataset in which no token is trained (every label is -100): training on it would learn nothing."""


@dataclass
class DatasetStats:
    """What :func:`check_samples` counted.

    Attributes:
        samples: samples checked.
        tokens: input tokens over all samples.
        trained_tokens: tokens that contribute to the loss (``labels[1:] != -100``; the first label
            of a sample has no token before it to predict it).
        untrained_samples: samples without a trained token (allowed one by one; they add nothing).
    """

    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    untrained_samples: int = 0


def _column(sample: Mapping[str, Any], key: str, where: str) -> np.ndarray:
    try:
        arr = np.asarray(sample[key])
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise SampleError(f"{where}: {key!r} is not a flat list of token ids ({e})") from None
    if arr.ndim != 1:
        raise SampleError(f"{where}: {key!r} must be a flat list of token ids, got an array of shape {arr.shape}")
    if arr.size and arr.dtype.kind not in _INT_KINDS:
        values = list(np.asarray(sample[key], dtype=object).reshape(-1))
        for at, v in enumerate(values):
            if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
                raise SampleError(f"{where}: {key}[{at}] = {v!r} ({type(v).__name__}): token ids must be integers")
        # Only Python ints too large for int64 get here.
        at = next(i for i, v in enumerate(values) if abs(int(v)) >= 2 ** 63)
        raise SampleError(f"{where}: {key}[{at}] = {values[at]} is far outside any vocabulary")
    return arr


def _first_bad(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0])


def check_samples(samples: Sequence[Mapping[str, Any]], vocab_size: Optional[int] = None, name: str = "dataset",
                  require_trained: bool = True) -> DatasetStats:
    """Check every sample once (vectorised per sample) and count its trained tokens.

    Checked: each sample is a mapping with ``input_ids`` and ``labels`` (plus optional
    ``attention_mask`` / ``position_ids`` / ``segment_ids``) of equal, non-zero length holding
    integers; ``input_ids`` in ``[0, vocab_size)``; ``labels`` equal to -100 or in
    ``[0, vocab_size)``; the index columns non-negative. A sample without a trained token is
    allowed (it happens, e.g. after truncation), a dataset without one is not.

    Args:
        samples: a sequence of tokenised samples or packed rows.
        vocab_size: the model's vocabulary size; ``None`` skips the upper bound.
        name: what to call the dataset in messages (e.g. ``"train_dataset"``).
        require_trained: raise :class:`UntrainedDatasetError` when no token is trained.

    Returns:
        The :class:`DatasetStats`.

    Raises:
        SampleError: the first bad sample, naming its index, column, position, value and the vocabulary size.
        UntrainedDatasetError: ``require_trained`` and every label is -100 (or the dataset is empty).

    Example:
        >>> check_samples([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}], vocab_size=10, name="train").trained_tokens
        2
        >>> check_samples([{"input_ids": [5, 60], "labels": [-100, 60]}], vocab_size=10, name="train")
        Traceback (most recent call last):
        ...
        qwen2ms.data.validate.SampleError: train sample 0: input_ids[1] = 60 is outside the vocabulary (vocab_size=10): ids must be in [0, 9]; the data was probably tokenised with another tokenizer than the model's
    """
    stats = DatasetStats()
    for index in range(len(samples)):
        sample = samples[index]
        where = f"{name} sample {index}"
        if not isinstance(sample, Mapping) or "input_ids" not in sample or "labels" not in sample:
            got = sorted(sample) if isinstance(sample, Mapping) else type(sample).__name__
            raise SampleError(f"{where}: must be a mapping with 'input_ids' and 'labels', got {got}")
        ids = _column(sample, "input_ids", where)
        labels = _column(sample, "labels", where)
        n = ids.size
        if n == 0:
            raise SampleError(f"{where}: 'input_ids' is empty; every sample needs at least one token")
        if labels.size != n:
            raise SampleError(f"{where}: 'labels' has {labels.size} entries but 'input_ids' has {n}")
        for key in _INDEX_COLUMNS:
            if key in sample:
                col = _column(sample, key, where)
                if col.size != n:
                    raise SampleError(f"{where}: {key!r} has {col.size} entries but 'input_ids' has {n}")
                if col.size and col.min() < 0:
                    at = _first_bad(col < 0)
                    raise SampleError(f"{where}: {key}[{at}] = {int(col[at])} is negative")
        top = f"[0, {vocab_size - 1}]" if vocab_size is not None else ">= 0"
        bad_ids = ids < 0 if vocab_size is None else (ids < 0) | (ids >= vocab_size)
        if bad_ids.any():
            at = _first_bad(bad_ids)
            raise SampleError(f"{where}: input_ids[{at}] = {int(ids[at])} is outside the vocabulary "
                              f"(vocab_size={vocab_size}): ids must be in {top}; the data was probably tokenised "
                              f"with another tokenizer than the model's")
        target = labels != IGNORE_INDEX
        bad_labels = target & ((labels < 0) if vocab_size is None else ((labels < 0) | (labels >= vocab_size)))
        if bad_labels.any():
            at = _first_bad(bad_labels)
            raise SampleError(f"{where}: labels[{at}] = {int(labels[at])} is not a token id (vocab_size={vocab_size}): "
                              f"labels must be in {top}, or -100 for tokens the loss ignores")
        trained = int(target[1:].sum())
        stats.samples += 1
        stats.tokens += n
        stats.trained_tokens += trained
        stats.untrained_samples += trained == 0
    if require_trained and stats.trained_tokens == 0:
        if stats.samples == 0:
            raise UntrainedDatasetError(f"{name} is empty: there is nothing to train on")
        raise UntrainedDatasetError(
            f"{name}: none of its {stats.samples} samples ({stats.tokens} tokens) has a trained token: every label "
            f"after the first of each sample is -100, so the loss would be 0.0 and nothing would be learned. Likely "
            f"causes: prompts longer than seq_length, so truncation cut every reply (raise data.seq_length, or use "
            f"overflow: drop); labels built without the replies (check only_last_turn / train-on-inputs settings of "
            f"the preprocessing); or a tokenised file whose labels are all -100")
    return stats
