"""Incremental detokenisation for streaming: text pieces that never split a UTF-8 character."""
from __future__ import annotations

import codecs
from typing import TYPE_CHECKING, Iterable, List

if TYPE_CHECKING:  # pragma: no cover
    from .tokenizer import Qwen2Tokenizer

__all__ = ["IncrementalDetokenizer"]


class IncrementalDetokenizer:
    """Turn token ids, fed one at a time, into text increments.

    Bytes of a character split across tokens are held back until the character is complete, so
    no increment ends in a partial character; invalid bytes become U+FFFD exactly as
    :meth:`Qwen2Tokenizer.decode` makes them. Each step costs O(bytes of the new tokens): the
    sequence so far is never decoded again. ``"".join`` of all increments plus :meth:`flush`
    equals ``tokenizer.decode(all_ids)``.

    Args:
        tokenizer: the tokenizer whose ids are fed.
        skip_special_tokens: drop special tokens (e.g. ``<|im_end|>``) from the text.

    Example:
        >>> detok = IncrementalDetokenizer(tok)  # doctest: +SKIP
        >>> pieces = [detok.push(i) for i in ids] + [detok.flush()]  # doctest: +SKIP
        >>> "".join(pieces) == tok.decode(ids)  # doctest: +SKIP
        True
    """

    def __init__(self, tokenizer: "Qwen2Tokenizer", skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: List[str] = []

    def push(self, token_id: int) -> str:
        """Add one token id and return the text it completes (possibly "").

        Args:
            token_id: a token id of the tokenizer.

        Returns:
            The newly completed text.

        Raises:
            TokenizerError: an id without a token (see :meth:`Qwen2Tokenizer.decode`).
        """
        data = self._tokenizer.id_bytes(token_id, skip_special_tokens=self._skip)
        text = self._decoder.decode(data, final=False)
        if text:
            self._parts.append(text)
        return text

    def extend(self, token_ids: Iterable[int]) -> str:
        """Add several ids; return the text they complete, joined."""
        return "".join(self.push(i) for i in token_ids)

    def flush(self) -> str:
        """End the stream: return held-back bytes of an unfinished character as U+FFFD (or "")."""
        text = self._decoder.decode(b"", final=True)
        if text:
            self._parts.append(text)
        return text

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def reset(self) -> None:
        """Forget everything, ready for a new sequence."""
        self._decoder.reset()
        self._parts.clear()
