"""When rows stop: eos ids, stop strings on the generated text, caller criteria; padding after a row ends.

Token arrays follow HF exactly: the token that ends a row (an eos id, or the token completing a
stop string) is kept, later positions of that row hold ``pad_token_id``, and the loop ends when
every row has ended or ``max_new_tokens`` were generated. Text completions are cut right after
the first stop string (the stop string is kept; any characters the final token adds past it are
dropped), so streamed text and the returned string agree.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np

from .streamers import make_detokenizer

__all__ = ["StoppingCriterion", "StopStrings", "RowText", "StopState", "run_criteria"]

#: A caller criterion: ``(input_ids [B, T]) -> bool [B]`` (True ends that row), like HF's StoppingCriteria.
StoppingCriterion = Callable[[np.ndarray], np.ndarray]


class StopStrings:
    """Find stop strings in generated text.

    Matching is on decoded text of the generated part only (the prompt is not searched; HF also
    lets a stop string start inside the prompt), over complete characters.

    Args:
        stop_strings: non-empty strings.

    Example:
        >>> StopStrings(["\\nUser:", "###"]).find_end("Hi!### more")
        6
    """

    def __init__(self, stop_strings: Sequence[str]):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if not stop_strings or not all(isinstance(s, str) and s for s in stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
        self.strings = list(stop_strings)
        self.max_len = max(len(s) for s in self.strings)

    def find_end(self, text: str, start: int = 0) -> Optional[int]:
        """The smallest end index (exclusive) of a stop string occurring in ``text[start:]``, or None."""
        ends = [i + len(s) for s in self.strings for i in [text.find(s, start)] if i >= 0]
        return min(ends) if ends else None


class RowText:
    """The generated text of one row, grown token by token, cut at the first stop string.

    Args:
        tokenizer: has ``decode(ids, skip_special_tokens=...)``.
        stop: the stop strings to watch, or None.

    Example:
        >>> row = RowText(tok, StopStrings(["."]))  # doctest: +SKIP
        >>> row.push(token_id)  # the new text piece; row.stopped turns True at the first "."  # doctest: +SKIP
    """

    def __init__(self, tokenizer: Any, stop: Optional[StopStrings] = None):
        self.decoder = make_detokenizer(tokenizer, skip_special_tokens=True)
        self.stop = stop
        self.text = ""
        self.stopped = False

    def _add(self, piece: str) -> str:
        if not piece or self.stopped:
            return ""
        before = len(self.text)
        self.text += piece
        if self.stop is not None:
            # Only a match that ends inside the new piece can be new; earlier text was already checked.
            end = self.stop.find_end(self.text, max(0, before - self.stop.max_len + 1))
            if end is not None:
                self.text = self.text[:end]
                self.stopped = True
        return self.text[before:]

    def push(self, token_id: int) -> str:
        """Feed the row's next token; return the text it completes (cut at a stop string)."""
        return self._add(self.decoder.push(token_id))

    def flush(self) -> str:
        """Return text still pending at the end of generation (an unfinished character)."""
        return self._add(self.decoder.flush())


class StopState:
    """Per-row finished flags, HF style: finished rows get ``pad_token_id`` as their next tokens.

    Args:
        batch: number of rows.
        eos_token_ids: ids that end a row (may be empty).
        pad_token_id: written into rows that already ended.

    Example:
        >>> st = StopState(2, eos_token_ids=[7], pad_token_id=0)
        >>> st.update(st.select(np.array([7, 3])))
        >>> st.select(np.array([5, 5])), st.done
        (array([0, 5]), False)
    """

    def __init__(self, batch: int, eos_token_ids: Sequence[int], pad_token_id: int):
        self.unfinished = np.ones(batch, dtype=bool)
        self.eos = np.asarray(list(eos_token_ids), dtype=np.int64)
        self.pad_token_id = int(pad_token_id)

    def select(self, next_tokens: np.ndarray) -> np.ndarray:
        """The tokens to append: ``next_tokens`` for running rows, pad for finished ones."""
        return np.where(self.unfinished, next_tokens, self.pad_token_id).astype(np.int64)

    def update(self, appended: np.ndarray, stopped: Optional[np.ndarray] = None) -> None:
        """Mark rows whose appended token is an eos id, or flagged in ``stopped`` [B], as finished."""
        ended = np.isin(appended, self.eos) if self.eos.size else np.zeros(len(appended), dtype=bool)
        if stopped is not None:
            ended = ended | np.asarray(stopped, dtype=bool)
        self.unfinished &= ~ended

    @property
    def done(self) -> bool:
        """True once every row has finished."""
        return not self.unfinished.any()


def run_criteria(criteria: Sequence[StoppingCriterion], input_ids: np.ndarray) -> Optional[np.ndarray]:
    """OR of the caller's criteria on ``input_ids`` [B, T] (None when there are none)."""
    if not criteria:
        return None
    out = np.zeros(input_ids.shape[0], dtype=bool)
    for crit in criteria:
        res = np.asarray(crit(input_ids), dtype=bool)
        if res.ndim == 0:
            res = np.full(input_ids.shape[0], bool(res))
        if res.shape != (input_ids.shape[0],):
            raise ValueError(f"stopping criterion {crit!r} returned shape {res.shape}; expected "
                             f"({input_ids.shape[0]},) booleans, one per row")
        out |= res
    return out
