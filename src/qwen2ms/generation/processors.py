"""Logits processors: small NumPy callables ``(input_ids [B, T], scores [B, V] float32) -> scores``.

Each one reproduces the Hugging Face processor of the same purpose (same arithmetic, same tie
handling) so that decoding decisions match transformers. They never modify their inputs. Any
callable with that signature can be passed to ``generate(logits_processors=[...])``.
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence, Union

import numpy as np

from .config import GenerationConfig

__all__ = [
    "LogitsProcessor",
    "RepetitionPenalty",
    "Temperature",
    "TopK",
    "TopP",
    "MinNewTokens",
    "VocabLimit",
    "apply_processors",
    "build_processors",
    "padding_lengths",
]

#: ``(input_ids [B, T] int, scores [B, V] float32) -> scores [B, V] float32``
LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]

_NEG_INF = np.float32(-np.inf)


def padding_lengths(attention_mask: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """Per-row count of left-padding positions: the index of the first non-zero mask entry.

    Same rule as HF (``argmax`` of ``mask != 0``; an all-zero row counts as 0).
    """
    if attention_mask is None:
        return None
    mask = np.asarray(attention_mask) != 0
    return mask.argmax(axis=1).astype(np.int64)


class RepetitionPenalty:
    """CTRL repetition penalty on every id already in ``input_ids`` (prompt and generated).

    Scores of seen ids are divided by ``penalty`` when positive and multiplied when negative, once
    per id however often it occurred (HF's ``RepetitionPenaltyLogitsProcessor``). Left-padding
    positions can be excluded per row with ``prompt_ignore_length`` (HF's ``generate`` passes the
    padding lengths derived from the attention mask, so pad tokens are not penalised). Ids outside
    ``[0, V)`` are ignored.

    Args:
        penalty: > 0; 1.0 is a no-op, > 1 discourages repetition.
        prompt_ignore_length: an int (same for every row) or an int array [B] of leading
            positions to skip.

    Example:
        >>> RepetitionPenalty(2.0)(np.array([[1]]), np.array([[1.0, 4.0, -4.0]], np.float32))
        array([[1., 2., -4.]], dtype=float32)
    """

    def __init__(self, penalty: float, prompt_ignore_length: Union[int, np.ndarray, None] = None):
        if not penalty > 0:
            raise ValueError(f"repetition penalty must be > 0, got {penalty!r}")
        self.penalty = float(penalty)
        self.prompt_ignore_length = prompt_ignore_length

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        batch, vocab = scores.shape
        ids = np.asarray(input_ids, dtype=np.int64)
        ignore = self.prompt_ignore_length
        if ignore is not None and np.ndim(ignore) == 0:
            ids = ids[:, int(ignore):]
        elif ignore is not None:
            ignore = np.asarray(ignore)
            if ignore.shape != (batch,):
                raise ValueError(f"prompt_ignore_length has shape {ignore.shape}, expected ({batch},)")
            ids = np.where(np.arange(ids.shape[1])[None, :] < ignore[:, None], vocab, ids)
        valid = (ids >= 0) & (ids < vocab)  # ids outside the output vocab are not penalised, as in HF
        rows = np.broadcast_to(np.arange(batch)[:, None], ids.shape)[valid]
        cols = ids[valid]
        out = np.array(scores, dtype=np.float32, copy=True)
        # Gather from the original scores, scatter back: repeated ids write the same value, so each
        # id is penalised once (HF's gather/scatter), and only the seen columns are touched.
        seen = out[rows, cols]
        penalty = np.float32(self.penalty)
        out[rows, cols] = np.where(seen < 0, seen * penalty, seen / penalty)
        return out


class Temperature:
    """Divide the scores by ``temperature`` (> 0), as HF's ``TemperatureLogitsWarper``.

    Example:
        >>> Temperature(0.5)(None, np.array([[1.0, -2.0]], np.float32))
        array([[ 2., -4.]], dtype=float32)
    """

    def __init__(self, temperature: float):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 for the Temperature processor (0 means greedy: "
                             f"skip sampling instead), got {temperature!r}")
        self.temperature = float(temperature)

    def __call__(self, input_ids: Optional[np.ndarray], scores: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            out = (scores / np.float32(self.temperature)).astype(np.float32, copy=False)
        if (np.isinf(out) & np.isfinite(scores)).any():
            # so small a temperature overflows float32: its limit, all mass on each row's best scores
            best = scores == scores.max(axis=-1, keepdims=True)
            return np.where(best, np.float32(0.0), _NEG_INF).astype(np.float32, copy=False)
        return out


class TopK:
    """Keep the ``top_k`` highest scores per row (ties with the k-th score are all kept), -inf the rest.

    HF's ``TopKLogitsWarper``: ``k = max(top_k, min_tokens_to_keep)`` capped at V.

    Example:
        >>> TopK(2)(None, np.array([[3.0, 1.0, 2.0, 2.0]], np.float32))
        array([[ 3., -inf,  2.,  2.]], dtype=float32)
    """

    def __init__(self, top_k: int, min_tokens_to_keep: int = 1):
        if not isinstance(top_k, (int, np.integer)) or top_k <= 0:
            raise ValueError(f"top_k must be a positive integer for the TopK processor, got {top_k!r}")
        self.top_k = max(int(top_k), int(min_tokens_to_keep))

    def __call__(self, input_ids: Optional[np.ndarray], scores: np.ndarray) -> np.ndarray:
        k = min(self.top_k, scores.shape[-1])
        kth = np.partition(scores, -k, axis=-1)[:, -k:-k + 1 or None]  # the k-th largest, [B, 1]
        return np.where(scores < kth, _NEG_INF, scores).astype(np.float32, copy=False)


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class TopP:
    """Nucleus filtering, exactly HF's ``TopPLogitsWarper``.

    Scores are sorted ascending (stable, so equal scores keep index order), the softmax of the
    sorted scores is accumulated, and positions whose cumulative probability is ``<= 1 - top_p``
    are removed, except the ``min_tokens_to_keep`` highest. Rows that are mostly -inf (after top-k)
    are processed on their finite entries only, which gives the same result much faster.

    Example:
        >>> TopP(0.5)(None, np.log(np.array([[0.1, 0.6, 0.3]], np.float32)))
        array([[-inf, -0.5108256, -inf]], dtype=float32)
    """

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1):
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if min_tokens_to_keep < 1:
            raise ValueError(f"min_tokens_to_keep must be >= 1, got {min_tokens_to_keep!r}")
        self.top_p = float(top_p)
        self.min_tokens_to_keep = int(min_tokens_to_keep)

    def _row(self, row: np.ndarray) -> np.ndarray:
        fast = self._row_from_the_top(row)
        if fast is not None:
            return fast
        order = np.argsort(row, kind="stable")
        probs = _softmax(row[order][None, :])[0]
        # HF's comparison runs in float32 with the threshold cast to float32; torch's CPU cumsum
        # accumulates float32 in double, so we do the same.
        cumulative = np.cumsum(probs, dtype=np.float64).astype(np.float32)
        remove = cumulative <= np.float32(1.0 - self.top_p)
        remove[-self.min_tokens_to_keep:] = False
        out = row.copy()
        out[order[remove]] = _NEG_INF
        return out

    def _row_from_the_top(self, row: np.ndarray) -> Optional[np.ndarray]:
        """The same result without sorting the whole row, or None where this shortcut does not apply.

        Sorting 152k scores per row and step cost ~100 ms. The removed positions are a prefix of the
        ascending order, so when the ``m`` highest scores leave a mass at or below ``1 - top_p`` for all
        the others, every other token is removed and only the ``m`` need sorting (m grows 4x per try).
        It requires a strict gap between the two sets (equal scores across it would have an index-order
        position in the full sort) and keeps HF's arithmetic: float32 probabilities summed in float64.
        """
        n = row.shape[0]
        if n < 4096 or not np.isfinite(row).all():
            return None
        shifted = np.exp(row - row.max())
        z = shifted.sum(dtype=np.float32)
        limit = np.float32(1.0 - self.top_p)
        m = 256
        while 4 * m <= n:
            top = np.sort(np.argpartition(row, n - m)[n - m:])
            rest = np.ones(n, dtype=bool)
            rest[top] = False
            low = row[rest]
            if self.min_tokens_to_keep <= m and row[top].min() > low.max():
                rest_mass = (shifted[rest] / z).astype(np.float32).sum(dtype=np.float64)
                if np.float32(rest_mass) <= limit:
                    vals = row[top]
                    order = np.argsort(vals, kind="stable")
                    probs = (shifted[top][order] / z).astype(np.float32)
                    cumulative = (rest_mass + np.cumsum(probs, dtype=np.float64)).astype(np.float32)
                    remove = cumulative <= limit
                    remove[-self.min_tokens_to_keep:] = False
                    out = np.full_like(row, _NEG_INF)
                    keep = top[order[~remove]]
                    out[keep] = row[keep]
                    return out
            m *= 4
        return None

    def __call__(self, input_ids: Optional[np.ndarray], scores: np.ndarray) -> np.ndarray:
        out = np.array(scores, dtype=np.float32, copy=True)
        for b in range(out.shape[0]):
            row = out[b]
            finite = np.flatnonzero(row != _NEG_INF)
            if len(finite) >= self.min_tokens_to_keep and len(finite) < row.shape[0] // 2:
                # -inf entries have probability 0 and sort first: dropping them changes nothing.
                row[finite] = self._row(row[finite])
            else:
                out[b] = self._row(row)
        return out


class MinNewTokens:
    """Set the eos scores to -inf while fewer than ``min_new_tokens`` tokens were generated.

    HF's ``MinNewTokensLengthLogitsProcessor``: the count is ``T - prompt_len`` of ``input_ids``.

    Example:
        >>> MinNewTokens(prompt_len=1, min_new_tokens=2, eos_token_id=[0])(np.zeros((1, 2)), np.zeros((1, 2), np.float32))
        array([[-inf,   0.]], dtype=float32)
    """

    def __init__(self, prompt_len: int, min_new_tokens: int, eos_token_id: Union[int, Sequence[int]]):
        self.prompt_len = int(prompt_len)
        self.min_new_tokens = int(min_new_tokens)
        self.eos = np.atleast_1d(np.asarray(eos_token_id, dtype=np.int64))

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        out = np.array(scores, dtype=np.float32, copy=True)
        if np.shape(input_ids)[-1] - self.prompt_len < self.min_new_tokens:
            eos = self.eos[(self.eos >= 0) & (self.eos < out.shape[-1])]
            out[:, eos] = _NEG_INF
        return out


class VocabLimit:
    """Set the scores of ids ``>= limit`` to -inf: padded embedding rows are never valid output.

    Qwen2's embedding has 151936 (or 152064) rows but the tokenizer only 151646 ids; the rest are
    padding whose random or untrained logits must not be sampled.

    Example:
        >>> VocabLimit(2)(None, np.zeros((1, 3), np.float32))
        array([[  0.,   0., -inf]], dtype=float32)
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"vocab limit must be >= 1, got {limit!r}")
        self.limit = int(limit)

    def __call__(self, input_ids: Optional[np.ndarray], scores: np.ndarray) -> np.ndarray:
        if self.limit >= scores.shape[-1]:
            return scores
        out = np.array(scores, dtype=np.float32, copy=True)
        out[:, self.limit:] = _NEG_INF
        return out


def apply_processors(processors: Iterable[LogitsProcessor], input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Run ``processors`` in order on float32 ``scores`` [B, V] and return the result.

    Example:
        >>> apply_processors([Temperature(2.0)], np.zeros((1, 1), np.int64), np.ones((1, 2), np.float32))
        array([[0.5, 0.5]], dtype=float32)
    """
    scores = np.asarray(scores, dtype=np.float32)
    for proc in processors:
        scores = proc(input_ids, scores)
    return scores


def build_processors(
    config: GenerationConfig,
    prompt_len: int,
    vocab_limit: Optional[int] = None,
    attention_mask: Optional[np.ndarray] = None,
    extra: Sequence[LogitsProcessor] = (),
) -> List[LogitsProcessor]:
    """The processors ``config`` asks for, in HF's order.

    Order (HF ``_get_logits_processor``): vocab limit (ours, first so nothing downstream can pick
    a padding id), repetition penalty, min_new_tokens, the caller's ``extra`` processors, then the
    sampling-only warpers when sampling: temperature, top-k, top-p. Neutral settings add nothing.

    Args:
        config: the generation settings.
        prompt_len: the (padded) prompt length; new tokens are counted from it.
        vocab_limit: ``len(tokenizer)``; ids at or above it are masked (None: no mask).
        attention_mask: the prompt mask [B, prompt_len]; its left padding is exempt from the
            repetition penalty, as in HF.
        extra: caller-supplied processors.

    Returns:
        A list of callables for :func:`apply_processors`.

    Example:
        >>> cfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1)
        >>> [type(p).__name__ for p in build_processors(cfg, prompt_len=5)]
        ['RepetitionPenalty', 'Temperature', 'TopK', 'TopP']
    """
    procs: List[LogitsProcessor] = []
    if vocab_limit is not None:
        procs.append(VocabLimit(vocab_limit))
    if config.repetition_penalty != 1.0:
        procs.append(RepetitionPenalty(config.repetition_penalty, padding_lengths(attention_mask)))
    if config.min_new_tokens > 0 and config.eos_token_ids:
        procs.append(MinNewTokens(prompt_len, config.min_new_tokens, config.eos_token_ids))
    procs.extend(extra)
    if not config.is_greedy:
        if config.temperature != 1.0:
            procs.append(Temperature(config.temperature))
        if config.top_k != 0:
            procs.append(TopK(config.top_k))
        if config.top_p < 1.0:
            procs.append(TopP(config.top_p))
    return procs
