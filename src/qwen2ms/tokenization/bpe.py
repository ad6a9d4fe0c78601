"""Byte-level BPE (GPT-2 byte<->unicode map, Qwen2 pre-tokenisation, rank-ordered merges) with a word cache."""
from __future__ import annotations

import itertools
import unicodedata
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import regex

__all__ = [
    "PRETOKENIZE_PATTERN",
    "TokenizerError",
    "ByteLevelBPE",
    "bytes_to_unicode",
    "parse_merges",
]

# Qwen2's split pattern (identical to the one in its tokenizer.json); needs the `regex` module for \p{..}.
PRETOKENIZE_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Symbol ids are < 2**20 (Qwen2 has 151,643), so a pair packs into one int: a cheap dict key.
_ID_BITS = 20
_ID_MASK = (1 << _ID_BITS) - 1
_NO_MERGE = 1 << 62


class TokenizerError(ValueError):
    """Bad tokenizer files, inputs or templates; the message names the input and what would be right."""


def bytes_to_unicode() -> Dict[int, str]:
    """The GPT-2 byte -> printable character map used by byte-level BPE vocabularies.

    Returns:
        A dict from each byte value 0..255 to a single character; printable Latin-1 bytes map to
        themselves, the others to code points from U+0100 upwards.

    Example:
        >>> bytes_to_unicode()[ord(" ")]
        'Ġ'
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table: Dict[int, str] = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return dict(sorted(table.items()))


def parse_merges(lines: Iterable[str], source: str = "merges.txt") -> List[Tuple[str, str]]:
    """Parse merges.txt lines into ``(left, right)`` pairs in rank order.

    Args:
        lines: the file's lines (with or without newlines); a leading ``#version`` line and blank
            lines are skipped.
        source: a name for error messages (usually the file path).

    Returns:
        The merges, rank 0 first.

    Raises:
        TokenizerError: a line is not two space-separated symbols; names the line number and content.

    Example:
        >>> parse_merges(["#version: 0.2", "Ġ t", "h e"])
        [('Ġ', 't'), ('h', 'e')]
    """
    merges: List[Tuple[str, str]] = []
    for lineno, raw in enumerate(lines, start=1):
        line = raw.rstrip("\r\n")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise TokenizerError(
                f"{source}: line {lineno} is malformed: {line!r}; each merge line must be two symbols "
                "separated by one space, like 'Ġ t'."
            )
        merges.append((parts[0], parts[1]))
    return merges


class _WordCache(dict):
    """piece -> token ids; computes misses through ``__missing__`` so the warm path stays in C (map/chain)."""

    __slots__ = ("_bpe", "_cap")

    def __init__(self, bpe: "ByteLevelBPE", cap: int) -> None:
        super().__init__()
        self._bpe = bpe
        self._cap = cap

    def __missing__(self, piece: str) -> Sequence[int]:
        ids = self._bpe.bpe_piece(piece)
        if len(self) >= self._cap:
            # Drop the oldest half (dicts keep insertion order): bounded memory, recent words stay hot.
            for key in list(itertools.islice(iter(self), len(self) // 2)):
                del self[key]
        self[piece] = ids
        return ids


class ByteLevelBPE:
    """Byte-level BPE model: NFC, Qwen2 pre-tokenisation, byte->unicode map, rank-ordered merges.

    Args:
        vocab: token string (byte-level alphabet) -> id.
        merges: ``(left, right)`` pairs in rank order; both sides and their concatenation must be in ``vocab``.
        cache_size: maximum number of cached pre-tokenised pieces.

    Example:
        >>> bpe = ByteLevelBPE.from_files("vocab.json", "merges.txt")  # doctest: +SKIP
        >>> bpe.encode_ordinary("Hello world")  # doctest: +SKIP
        [9707, 1879]
    """

    def __init__(self, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]], cache_size: int = 1 << 18) -> None:
        self.vocab = vocab
        self.merges = list(merges)
        self.id_to_token: Dict[int, str] = {i: t for t, i in vocab.items()}
        if len(self.id_to_token) != len(vocab):
            raise TokenizerError("vocab.json maps two tokens to the same id; each id must be used once.")
        if vocab and (min(self.id_to_token) < 0 or max(self.id_to_token) > _ID_MASK):
            raise TokenizerError(f"vocab.json ids must lie in [0, {_ID_MASK}]; got {min(self.id_to_token)}..{max(self.id_to_token)}.")
        byte_char = bytes_to_unicode()
        missing = [c for c in byte_char.values() if c not in vocab]
        if missing:
            raise TokenizerError(
                f"vocab.json lacks {len(missing)} of the 256 byte-level base symbols (e.g. {missing[0]!r}); "
                "a byte-level BPE vocabulary must contain every byte symbol."
            )
        self.byte_ids: List[int] = [vocab[byte_char[b]] for b in range(256)]
        # pair key -> rank << 20 | merged id: one lookup gives both the priority and the result.
        pair_merge: Dict[int, int] = {}
        for rank, (left, right) in enumerate(self.merges):
            for sym in (left, right, left + right):
                if sym not in vocab:
                    raise TokenizerError(
                        f"merges.txt line {rank + 2} ({left} {right}) uses {sym!r}, which is not in vocab.json; "
                        "vocab.json and merges.txt must come from the same tokenizer."
                    )
            key = vocab[left] << _ID_BITS | vocab[right]
            if key not in pair_merge:  # the first (lowest-rank) occurrence wins, as in the reference
                pair_merge[key] = rank << _ID_BITS | vocab[left + right]
        self._pair_merge = pair_merge
        self._split = regex.compile(PRETOKENIZE_PATTERN).findall
        # bytes -> latin-1 str -> byte-level str in one C call each.
        self._byte_trans = str.maketrans({chr(b): c for b, c in byte_char.items()})
        self._char_byte = {c: b for b, c in byte_char.items()}
        self.cache = _WordCache(self, cache_size)
        self._chars: Optional[_CharTable] = None  # built on the first non-ASCII piece

    # ---- encoding -------------------------------------------------------------------------------
    def bpe_piece(self, piece: str) -> Tuple[int, ...]:
        """Token ids of one pre-tokenised piece (no word cache).

        Args:
            piece: a piece produced by the pre-tokenisation regex (any str works).

        Returns:
            The ids, applying merges lowest rank first, leftmost first on ties.
        """
        if piece.isascii():
            ids = [self.byte_ids[b] for b in piece.encode("ascii")]
        else:
            ids = self._initial_ids(piece)
        n = len(ids)
        if n < 2:
            return tuple(ids)
        get = self._pair_merge.get
        nm = _NO_MERGE
        # ranks[i] is the merge value of the pair (ids[i], ids[i+1]); min() and index() run in C.
        ranks = [get(a << _ID_BITS | b, nm) for a, b in zip(ids, ids[1:])]
        while True:
            best = min(ranks)
            if best == nm:
                break
            i = ranks.index(best)
            new = best & _ID_MASK
            ids[i] = new
            del ids[i + 1]
            del ranks[i]
            if i:
                ranks[i - 1] = get(ids[i - 1] << _ID_BITS | new, nm)
            if i < len(ranks):
                ranks[i] = get(new << _ID_BITS | ids[i + 1], nm)
            elif not ranks:
                break
        return tuple(ids)

    def _initial_ids(self, piece: str) -> List[int]:
        # Multi-byte characters start from their own merged state when that is provably what BPE
        # reaches anyway (see _CharTable); this removes most merges from CJK text.
        table = self._chars
        if table is None:
            table = self._chars = _CharTable(self)
        info = list(map(table.__getitem__, piece))
        ids: List[int] = []
        last = len(info) - 1
        for j, (_, byte_ids, ctx_ids, any_ids) in enumerate(info):
            if any_ids is ctx_ids:
                ids += ctx_ids
            elif (j == 0 or info[j - 1][0]) and (j == last or info[j + 1][0]):
                ids += ctx_ids
            else:
                ids += any_ids
        return ids

    def encode_ordinary(self, text: str) -> List[int]:
        """Encode text that holds no special tokens: NFC, pre-tokenise, BPE each piece (cached).

        Args:
            text: any string.

        Returns:
            Token ids.

        Example:
            >>> bpe.encode_ordinary(" Hello world")  # doctest: +SKIP
            [21927, 1879]
        """
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        return list(itertools.chain.from_iterable(map(self.cache.__getitem__, self._split(text))))

    # ---- decoding -------------------------------------------------------------------------------
    def token_bytes(self, token: str) -> bytes:
        """The raw bytes a vocabulary token stands for.

        A token with characters outside the byte-level alphabet (e.g. an added token written in
        plain text) stands for its own UTF-8 encoding, as in the reference decoder.
        """
        cb = self._char_byte
        try:
            return bytes([cb[c] for c in token])
        except KeyError:
            return token.encode("utf-8")

    def pretokenize(self, text: str) -> List[str]:
        """Split (already NFC-normalised) text into the pieces BPE runs on."""
        return self._split(text)

    def token_string(self, piece: str) -> str:
        """The byte-level string of ``piece`` (its UTF-8 bytes through the byte->unicode map)."""
        return piece.encode("utf-8").decode("latin-1").translate(self._byte_trans)


class _CharTable(dict):
    """char -> (is_letter, byte ids, ids when both neighbours are letters or absent, ids in any context).

    BPE of a piece equals BPE started from a character's own merged state whenever no merge that
    crosses the character's edge can win against its pending internal merges: at every internal
    step, each merge pairing an edge symbol with a possible neighbour symbol must rank after the
    step's merge, and the final edge symbols' cross merges must rank after all internal merges.
    The neighbour symbols considered are every symbol (``any``) or only those a letter (or the
    start/end of the piece) can put there (``ctx``); inside Qwen2's letter runs the second applies
    and about three quarters of CJK characters qualify. Characters that fail start from bytes.
    """

    __slots__ = ("_bpe", "_letter", "_tables")

    def __init__(self, bpe: ByteLevelBPE) -> None:
        super().__init__()
        self._bpe = bpe
        self._letter = regex.compile(r"\p{L}").fullmatch
        n = max(bpe.id_to_token) + 1
        tbytes: List[bytes] = [b""] * n
        for i, tok in bpe.id_to_token.items():
            tbytes[i] = bpe.token_bytes(tok)
        inf = _NO_MERGE
        # min rank of a merge with this symbol on the left (right) whose other side can start
        # (end) a neighbouring character: any symbol, or one a letter neighbour can provide.
        left_any, right_any, left_ctx, right_ctx = ([inf] * n for _ in range(4))
        vocab = bpe.vocab
        for rank, (a, b) in enumerate(bpe.merges):
            ia, ib = vocab[a], vocab[b]
            first, last = tbytes[ib][0], tbytes[ia][-1]
            if 0x80 <= first < 0xC0:
                continue  # b continues a character, so (a, b) never spans a character boundary
            if rank < left_any[ia]:
                left_any[ia] = rank
            if rank < right_any[ib]:
                right_any[ib] = rank
            if (first >= 0xC0 or 65 <= first <= 90 or 97 <= first <= 122) and rank < left_ctx[ia]:
                left_ctx[ia] = rank
            if (0x80 <= last < 0xC0 or 65 <= last <= 90 or 97 <= last <= 122) and rank < right_ctx[ib]:
                right_ctx[ib] = rank
        self._tables = ((right_any, left_any), (right_ctx, left_ctx))

    def _start(self, byte_ids: List[int], edge_tables: Tuple[List[int], List[int]]) -> Tuple[int, ...]:
        right_of, left_of = edge_tables  # right_of[s]: cross merge with s as its right side
        ids = list(byte_ids)
        get = self._bpe._pair_merge.get
        highest = -1
        while len(ids) > 1:
            best, at = _NO_MERGE, -1
            for i in range(len(ids) - 1):
                val = get(ids[i] << _ID_BITS | ids[i + 1], _NO_MERGE)
                if val < best:
                    best, at = val, i
            if at < 0:
                break
            rank = best >> _ID_BITS
            if right_of[ids[0]] < rank or left_of[ids[-1]] < rank:
                return tuple(byte_ids)
            highest = max(highest, rank)
            ids[at : at + 2] = [best & _ID_MASK]
        if right_of[ids[0]] < highest or left_of[ids[-1]] < highest:
            return tuple(byte_ids)
        return tuple(ids)

    def __missing__(self, ch: str) -> Tuple[bool, Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]:
        byte_ids = tuple(self._bpe.byte_ids[b] for b in ch.encode("utf-8"))
        if len(byte_ids) == 1:
            info = (self._letter(ch) is not None, byte_ids, byte_ids, byte_ids)
        else:
            any_ids = self._start(list(byte_ids), self._tables[0])
            ctx_ids = self._start(list(byte_ids), self._tables[1])
            if any_ids == ctx_ids:
                any_ids = ctx_ids  # identity marks "context does not matter" for the fast path
            info = (self._letter(ch) is not None, byte_ids, ctx_ids, any_ids)
        self[ch] = info
        return info
