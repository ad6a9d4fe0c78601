"""Streaming text out of generation: a UTF-8-safe incremental decoder and streamers (stdout or a callback)."""
from __future__ import annotations

import sys
from typing import Any, Callable, List, Optional, Protocol, TextIO, Union, runtime_checkable

__all__ = ["IncrementalDecoder", "make_detokenizer", "Streamer", "TextStreamer", "CallbackStreamer", "as_streamer"]

_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Turns token ids, fed one at a time, into text pieces that never split a character.

    The fallback for tokenizers other than qwen2ms's own (e.g. a transformers tokenizer passed as
    ``tokenizer=``); :func:`make_detokenizer` prefers the tokenizer package's byte-level
    :class:`~qwen2ms.tokenization.IncrementalDetokenizer` when the tokenizer offers ``id_bytes``.
    Works with any tokenizer that has ``decode(ids, skip_special_tokens=...)``. Two offsets into
    the ids seen so far delimit a small window that is decoded twice (with and without the newest
    ids); the difference is the new text. While the window's text ends in U+FFFD (a multi-byte
    character whose bytes have not all arrived), nothing is emitted and the ids stay pending.
    Joining every piece of :meth:`push` and :meth:`flush` gives exactly ``tokenizer.decode(ids)``
    for byte-level BPE tokenizers such as Qwen2's.

    Args:
        tokenizer: an object with ``decode(ids, skip_special_tokens=bool) -> str``.
        skip_special_tokens: drop special tokens (eos, ``<|im_end|>``) from the text.

    Example:
        >>> dec = IncrementalDecoder(tok)  # doctest: +SKIP
        >>> "".join(dec.push(i) for i in tok.encode("你好")) + dec.flush()  # doctest: +SKIP
        '你好'
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: List[int] = []
        self._prefix = 0  # start of the decode window (a position where the text was complete)
        self._read = 0  # end of the ids whose text has been emitted

    def _decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly "")."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            piece = new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Return any pending text (an unfinished character decodes to U+FFFD, as a full decode would)."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):]


def make_detokenizer(tokenizer: Any, skip_special_tokens: bool = True) -> Any:
    """An incremental detokenizer (``push(id) -> str``, ``flush() -> str``) for ``tokenizer``.

    qwen2ms tokenizers (which expose ``id_bytes``) get the tokenization package's
    :class:`~qwen2ms.tokenization.IncrementalDetokenizer` (O(new bytes) per token); any other
    tokenizer with ``decode`` gets :class:`IncrementalDecoder`.

    Example:
        >>> make_detokenizer(Qwen2Tokenizer.from_pretrained(path)).push(9707)  # doctest: +SKIP
        'Hello'
    """
    if callable(getattr(tokenizer, "id_bytes", None)):
        from ..tokenization import IncrementalDetokenizer

        return IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    if not callable(getattr(tokenizer, "decode", None)):
        raise TypeError(f"tokenizer {type(tokenizer).__name__} has neither id_bytes() nor decode(); "
                        "cannot turn generated ids into text")
    return IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens)


@runtime_checkable
class Streamer(Protocol):
    """What ``generate(streamer=...)`` calls: ``put(text)`` per new text piece, ``end()`` once at the end."""

    def put(self, text: str) -> None: ...

    def end(self) -> None: ...


class TextStreamer:
    """Print generated text as it arrives (to stdout by default), with a newline at the end.

    Args:
        file: where to write; flushed after every piece so a terminal shows it at once.

    Example:
        >>> model.generate("Tell me a story", streamer=TextStreamer())  # doctest: +SKIP
    """

    def __init__(self, file: Optional[TextIO] = None):
        self.file = file

    def put(self, text: str) -> None:
        """Write one text piece."""
        out = self.file if self.file is not None else sys.stdout
        out.write(text)
        out.flush()

    def end(self) -> None:
        """Finish the line."""
        self.put("\n")


class CallbackStreamer:
    """Adapt a plain function ``fn(text)`` to the streamer interface (``end`` does nothing).

    Example:
        >>> pieces = []
        >>> s = CallbackStreamer(pieces.append); s.put("你"); s.end(); pieces
        ['你']
    """

    def __init__(self, fn: Callable[[str], Any]):
        self.fn = fn

    def put(self, text: str) -> None:
        """Pass one text piece to the function."""
        self.fn(text)

    def end(self) -> None:
        """Nothing to finish for a callback."""


def as_streamer(obj: Union[Streamer, Callable[[str], Any], None]) -> Optional[Streamer]:
    """Normalise ``generate``'s ``streamer=`` argument.

    Args:
        obj: None, an object with ``put(text)`` and ``end()``, or a callable taking the text.

    Returns:
        None or an object with ``put``/``end``.

    Raises:
        TypeError: ``obj`` is neither.

    Example:
        >>> as_streamer(print).__class__.__name__
        'CallbackStreamer'
    """
    if obj is None:
        return None
    if callable(getattr(obj, "put", None)) and callable(getattr(obj, "end", None)):
        return obj
    if callable(obj):
        return CallbackStreamer(obj)
    raise TypeError(f"streamer must be an object with put(text) and end() or a function taking the text, "
                    f"got {type(obj).__name__}")
