"""Byte-level BPE (GPT-2 byte<->unicode map, Qwen2 pre-tokenisation, rank-ordered merges) with a word cache."""
from __future__ import annotations

import bisect
import heapq
import itertools
import operator
import unicodedata
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import regex

from ..errors import Qwen2msError

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
_repeat = itertools.repeat
# Pieces with more symbols than this merge through rank buckets (linear-ish) instead of the
# rescan-per-merge loop, which is quicker for words but quadratic on long runs such as 'a' * 10**6.
_LONG_PIECE = 64
# The word cache skips longer pieces (as the reference does) and bounds the characters it holds,
# so adversarial text with endless distinct long pieces cannot grow it past a few tens of MB.
_CACHE_MAX_PIECE = 256
_CACHE_CHARS_PER_ENTRY = 8
# Caps of the per-character and per-character-pair memos (about 40 MB each when full).
_CHAR_TABLE_CAP = 1 << 17
_PAIR_MEMO_CAP = 1 << 18
_NO_BYTES: frozenset = frozenset()


class TokenizerError(Qwen2msError, ValueError):
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
    lines = [line.rstrip("\r\n") for line in lines]
    first = 1 if lines and lines[0].startswith("#version") else 0
    merges = [tuple(line.split(" ")) for line in lines[first:] if line]
    if all(len(m) == 2 and m[0] and m[1] for m in merges):
        return merges  # type: ignore[return-value]
    for lineno, line in enumerate(lines[first:], start=first + 1):
        parts = line.split(" ")
        if line and (len(parts) != 2 or not parts[0] or not parts[1]):
            raise TokenizerError(
                f"{source}: line {lineno} is malformed: {line!r}; each merge line must be two symbols "
                "separated by one space, like 'Ġ t'."
            )
    raise AssertionError("unreachable: a malformed merge was detected above")


class _WordCache(dict):
    """piece -> token ids; computes misses through ``__missing__`` so the warm path stays in C (map/chain).

    Holds at most ``cap`` pieces and ``cap * 8`` characters; pieces over 256 characters are not kept.
    """

    __slots__ = ("_bpe", "_cap", "_char_cap", "_held")

    def __init__(self, bpe: "ByteLevelBPE", cap: int) -> None:
        super().__init__()
        self._bpe = bpe
        self._cap = cap
        self._char_cap = cap * _CACHE_CHARS_PER_ENTRY
        self._held = 0  # characters of the cached pieces

    def __missing__(self, piece: str) -> Sequence[int]:
        ids = self._bpe.bpe_piece(piece)
        size = len(piece)
        if size > _CACHE_MAX_PIECE:
            return ids
        if len(self) >= self._cap or self._held + size > self._char_cap:
            # Drop the oldest half (dicts keep insertion order): bounded memory, recent words stay hot.
            for key in list(itertools.islice(iter(self), len(self) // 2 + 1)):
                self._held -= len(key)
                del self[key]
        self[piece] = ids
        self._held += size
        return ids

    def clear(self) -> None:
        super().clear()
        self._held = 0


class ByteLevelBPE:
    """Byte-level BPE model: NFC, Qwen2 pre-tokenisation, byte->unicode map, rank-ordered merges.

    Args:
        vocab: token string (byte-level alphabet) -> id.
        merges: ``(left, right)`` pairs in rank order; both sides and their concatenation must be in ``vocab``.
        cache_size: maximum number of cached pre-tokenised pieces.

    Example:
        >>> import json
        >>> vocab = json.load(open("vocab.json", encoding="utf-8"))  # doctest: +SKIP
        >>> bpe = ByteLevelBPE(vocab, parse_merges(open("merges.txt", encoding="utf-8")))  # doctest: +SKIP
        >>> bpe.encode_ordinary("Hello world")  # doctest: +SKIP
        [9707, 1879]
    """

    def __init__(self, vocab: Dict[str, int], merges: Sequence[Tuple[str, str]], cache_size: int = 1 << 18) -> None:
        self.vocab = vocab
        if isinstance(merges, (str, bytes)):
            raise TokenizerError("merges must be a list of (left, right) pairs, e.g. parse_merges(open('merges.txt')).")
        self.merges = list(merges)
        # types and lengths checked in C; what the symbols are is checked against vocab below
        if not (set(map(type, self.merges)) <= {tuple, list} and set(map(len, self.merges)) <= {2}
                and set(map(type, itertools.chain.from_iterable(self.merges))) <= {str}):
            rank = next(k for k, m in enumerate(self.merges) if not _is_pair(m))
            raise TokenizerError(
                f"merge {rank} is {self.merges[rank]!r}; each merge must be a pair of non-empty strings like ('Ġ', 't')."
            )
        self.id_to_token: Dict[int, str] = {i: t for t, i in vocab.items()}
        if len(self.id_to_token) != len(vocab):
            first: Dict[int, str] = {}
            tok, idx = next((t, i) for t, i in vocab.items() if first.setdefault(i, t) != t)
            raise TokenizerError(
                f"vocab.json maps two tokens to id {idx} ({first[idx]!r} and {tok!r}); each id must be used once."
            )
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
        lefts = [m[0] for m in self.merges]
        rights = [m[1] for m in self.merges]
        merged = list(map(operator.add, lefts, rights))
        columns = [list(map(vocab.get, col)) for col in (lefts, rights, merged)]
        for col in columns:
            if None in col:
                rank = col.index(None)
                left, right = self.merges[rank]
                sym = next(x for x in (left, right, left + right) if x not in vocab)
                raise TokenizerError(
                    f"merge {rank} ({left!r} {right!r}, rank order from 0) uses {sym!r}, which is not in the "
                    "vocabulary; vocab.json and merges.txt must come from the same tokenizer."
                )
        left_ids, right_ids, merged_ids = columns
        keys = list(map(operator.or_, map(operator.lshift, left_ids, _repeat(_ID_BITS)), right_ids))
        values = map(operator.or_, map(operator.lshift, range(len(keys)), _repeat(_ID_BITS)), merged_ids)
        # Built from the back so that for a repeated pair the first (lowest-rank) merge wins, as in the reference.
        pair_merge: Dict[int, int] = dict(zip(reversed(keys), reversed(list(values))))
        self._merge_ids = (left_ids, right_ids)
        self._pair_merge = pair_merge
        self._merge_long = self._merge_by_rank if _ranks_rise(left_ids, right_ids, merged_ids) else self._merge_by_heap
        self._split = regex.compile(PRETOKENIZE_PATTERN).findall
        self._char_byte = {c: b for b, c in byte_char.items()}
        # byte-level str -> latin-1 str whose code points are the bytes; other characters below 256
        # become a lone surrogate so that encoding fails for tokens outside the byte alphabet.
        self._to_latin1 = str.maketrans({**{chr(i): "\ud800" for i in range(256)},
                                         **{c: chr(b) for b, c in byte_char.items()}})
        self.cache = _WordCache(self, cache_size)
        self._chars = _CharTable(self)
        self._uniform3 = _UniformRun(self._chars, 3)
        self._uniform2 = _UniformRun(self._chars, 2)
        self._safe3 = _SafeBoundary3(self)

    # ---- encoding -------------------------------------------------------------------------------
    def bpe_piece(self, piece: str) -> Tuple[int, ...]:
        """Token ids of one pre-tokenised piece (the piece itself is not cached; parts of long CJK runs are).

        Args:
            piece: a piece produced by the pre-tokenisation regex (any str works).

        Returns:
            The ids, applying merges lowest rank first, leftmost first on ties.
        """
        if piece.isascii():
            ids = list(map(self.byte_ids.__getitem__, piece.encode("ascii")))
        else:
            parts = self._cut_cjk(piece)
            if parts is not None:
                return tuple(itertools.chain.from_iterable(map(self.cache.__getitem__, parts)))
            lo, hi = min(piece), max(piece)
            if "\u0800" <= lo and hi <= "\uffff":  # all 3-byte characters (most CJK runs)
                ids = list(itertools.chain.from_iterable(map(self._uniform3.__getitem__, piece)))
            elif "\u0080" <= lo and hi <= "\u07ff":  # all 2-byte characters (Cyrillic, Greek, Arabic, ...)
                ids = list(itertools.chain.from_iterable(map(self._uniform2.__getitem__, piece)))
            else:
                ids = self._initial_ids(piece)
        n = len(ids)
        if n < 2:
            return tuple(ids)
        if n > _LONG_PIECE:
            return tuple(self._merge_long(ids))
        get = self._pair_merge.get
        nm = _NO_MERGE
        # ranks[i] is the merge value of the pair (ids[i], ids[i+1]); min() and index() run in C.
        ranks = list(map(get, map(operator.or_, map(operator.lshift, ids, _repeat(_ID_BITS)), ids[1:]), _repeat(nm)))
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

    def _merge_by_rank(self, ids: List[int]) -> List[int]:
        # BPE on a long piece in O(n log n). Valid when every merge's inputs are base symbols or
        # made only by lower-ranked merges (checked at load; true of trained BPE such as Qwen2's):
        # then merging rank r only creates pairs ranked above r, so BPE merges rank by rank, each
        # rank's occurrences left to right, exactly as the lowest-rank-first, leftmost-first rule.
        # Symbols form a linked list over the initial positions; each rank keeps a bucket of the
        # positions where its pair was seen, checked when the rank's turn comes (a stale entry
        # no longer holds the pair and is skipped).
        get = self._pair_merge.get
        left_ids, right_ids = self._merge_ids
        n = len(ids)
        ids.append(-1)  # sentinel: pairs with it are never in the merge table
        nxt = list(range(1, n + 2))
        prv = list(range(-1, n))
        buckets: Dict[int, List[int]] = {}
        for i, v in enumerate(map(get, map(operator.or_, map(operator.lshift, ids, _repeat(_ID_BITS)), ids[1:n]))):
            if v is not None:
                bucket = buckets.get(v)
                if bucket is None:
                    buckets[v] = [i]
                else:
                    bucket.append(i)
        pending = list(buckets)
        heapq.heapify(pending)
        pop, push = heapq.heappop, heapq.heappush
        while pending:
            v = pop(pending)
            positions = buckets.pop(v)
            positions.sort()
            new = v & _ID_MASK
            rank = v >> _ID_BITS
            a, b = left_ids[rank], right_ids[rank]
            for i in positions:
                if ids[i] != a:
                    continue
                j = nxt[i]
                if ids[j] != b:
                    continue
                ids[i] = new
                ids[j] = -1
                k = nxt[j]
                nxt[i] = k
                prv[k] = i
                p = prv[i]
                if p >= 0:
                    w = get(ids[p] << _ID_BITS | new)
                    if w is not None:
                        bucket = buckets.get(w)
                        if bucket is None:
                            buckets[w] = [p]
                            push(pending, w)
                        else:
                            bucket.append(p)
                w = get(new << _ID_BITS | ids[k])
                if w is not None:
                    bucket = buckets.get(w)
                    if bucket is None:
                        buckets[w] = [i]
                        push(pending, w)
                    else:
                        bucket.append(i)
        return [x for x in ids if x >= 0]

    def _merge_by_heap(self, ids: List[int]) -> List[int]:
        # BPE on a long piece in O(n log n) for any merge list: a heap of (merge value, position)
        # pops the lowest rank, leftmost on ties; entries whose pair has since changed are skipped.
        get = self._pair_merge.get
        n = len(ids)
        ids.append(-1)
        nxt = list(range(1, n + 2))
        prv = list(range(-1, n))
        vals = map(get, map(operator.or_, map(operator.lshift, ids, _repeat(_ID_BITS)), ids[1:n]))
        heap = [v << 32 | i for i, v in enumerate(vals) if v is not None]
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            key = pop(heap)
            i = key & 0xFFFFFFFF
            v = key >> 32
            j = nxt[i]
            if get(ids[i] << _ID_BITS | ids[j]) != v:
                continue
            new = v & _ID_MASK
            ids[i] = new
            ids[j] = -1
            k = nxt[j]
            nxt[i] = k
            prv[k] = i
            p = prv[i]
            if p >= 0:
                w = get(ids[p] << _ID_BITS | new)
                if w is not None:
                    push(heap, w << 32 | p)
            w = get(new << _ID_BITS | ids[k])
            if w is not None:
                push(heap, w << 32 | i)
        return [x for x in ids if x >= 0]

    def _cut_cjk(self, piece: str) -> Optional[Iterable[str]]:
        # Long CJK runs are single pieces and rarely repeat; cut them where no vocabulary token can
        # span the boundary (see _SafeBoundary3). The parts' BPE results concatenate to the
        # piece's, and the parts (mostly words) hit the cache.
        n = len(piece)
        if n < 3:
            return None
        body, off = piece, 0
        if not ("\u0800" <= min(body) and max(body) <= "\uffff"):
            body, off = piece[1:], 1  # a one-character prefix such as a space or punctuation
            if not ("\u0800" <= min(body) and max(body) <= "\uffff"):
                return None
        ends = list(itertools.compress(range(off + 1, n), map(self._safe3.__getitem__, map(operator.add, body, body[1:]))))
        if not ends:
            return None
        starts = [0] + ends
        ends.append(n)
        return map(piece.__getitem__, map(slice, starts, ends))

    def _initial_ids(self, piece: str) -> List[int]:
        # Multi-byte characters start from their own merged state when that is provably what BPE
        # reaches anyway given the neighbouring bytes (see _CharTable): most CJK merges disappear.
        info = list(map(self._chars.__getitem__, piece))
        ids: List[int] = []
        prev_last = -1
        nxt = len(info) - 1
        for j, (byte_ids, start_ids, bad_left, bad_right, _, last) in enumerate(info):
            if start_ids is byte_ids or prev_last in bad_left or (j < nxt and info[j + 1][4] in bad_right):
                ids += byte_ids
            else:
                ids += start_ids
            prev_last = last
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
        try:
            return token.translate(self._to_latin1).encode("latin-1")
        except UnicodeEncodeError:
            return token.encode("utf-8")

def _is_pair(merge: Any) -> bool:
    return type(merge) in (tuple, list) and len(merge) == 2 and type(merge[0]) is str and type(merge[1]) is str \
        and bool(merge[0]) and bool(merge[1])


def _ranks_rise(left_ids: Sequence[int], right_ids: Sequence[int], merged_ids: Sequence[int]) -> bool:
    """True when each merge's inputs are base symbols or made only by merges of lower rank."""
    made_last = dict(zip(merged_ids, itertools.count()))  # token id -> highest rank of a merge producing it
    ranks = range(len(merged_ids))
    return all(map(operator.lt, map(made_last.get, left_ids, _repeat(-1)), ranks)) and all(
        map(operator.lt, map(made_last.get, right_ids, _repeat(-1)), ranks))


class _CharTable(dict):
    """char -> (byte ids, start ids, bad left bytes, bad right bytes, first byte, last byte).

    BPE of a piece equals BPE started with a character already merged to its own result ("start
    ids") whenever no merge across the character's edges can win against its pending internal
    merges. Precisely: at every internal step, every merge that pairs the current edge symbol with
    a neighbour symbol must rank after that step's merge, and merges touching the final edge
    symbols must rank after all internal merges; then the neighbours can never reach into the
    character before it is complete, and once complete the state is the same as ours. Which
    neighbour symbols are possible depends only on the neighbouring byte (the left neighbour's
    last byte, the right neighbour's first byte), so the check yields the sets of neighbouring
    bytes for which the shortcut is invalid. Characters whose shortcut is always invalid, or
    that have a single byte, use their byte ids.

    Holds at most 2**17 characters (text of random code points would otherwise fill it with all
    1.1M of them, about 1 GB); equal byte sets are shared.
    """

    __slots__ = ("_bpe", "_by_left_byte", "_by_right_byte", "_sets")

    def __init__(self, bpe: "ByteLevelBPE") -> None:
        super().__init__()
        self._bpe = bpe
        # built on the first multi-byte character; symbol -> (ranks ascending, neighbour bytes in that order)
        self._by_left_byte: Optional[Dict[int, Tuple[List[int], List[int]]]] = None
        self._by_right_byte: Optional[Dict[int, Tuple[List[int], List[int]]]] = None
        self._sets: Dict[frozenset, frozenset] = {}

    def _build(self) -> None:
        bpe = self._bpe
        cb = bpe._char_byte
        # _by_left_byte[s][L]: lowest rank of a merge (x, s) where x ends with byte L;
        # _by_right_byte[s][F]: lowest rank of a merge (s, y) where y starts with byte F.
        by_left: Dict[int, Dict[int, int]] = {}
        by_right: Dict[int, Dict[int, int]] = {}
        left_ids, right_ids = bpe._merge_ids
        firsts = [cb[m[1][0]] for m in bpe.merges]
        lasts = [cb[m[0][-1]] for m in bpe.merges]
        for rank, (a, b, first, last) in enumerate(zip(left_ids, right_ids, firsts, lasts)):
            if 0x80 <= first < 0xC0:
                continue  # b continues a character: (a, b) never spans a character boundary
            d = by_left.setdefault(b, {})
            if last not in d:
                d[last] = rank
            d = by_right.setdefault(a, {})
            if first not in d:
                d[first] = rank
        # sorted by rank, so the bytes of merges ranked below r are a prefix found by bisection
        self._by_left_byte = {s: _by_rank(d) for s, d in by_left.items()}
        self._by_right_byte = {s: _by_rank(d) for s, d in by_right.items()}

    def __missing__(self, ch: str) -> Tuple[Tuple[int, ...], Tuple[int, ...], frozenset, frozenset, int, int]:
        raw = ch.encode("utf-8")
        byte_ids = tuple(self._bpe.byte_ids[b] for b in raw)
        info = (byte_ids, byte_ids, _NO_BYTES, _NO_BYTES, raw[0], raw[-1])
        if len(byte_ids) > 1:
            info = self._start(byte_ids, raw)
        if len(self) >= _CHAR_TABLE_CAP:
            self.clear()  # entries are recomputed on demand; the per-vocabulary tables stay
        self[ch] = info
        return info

    def _start(self, byte_ids: Tuple[int, ...], raw: bytes) -> Tuple[Tuple[int, ...], Tuple[int, ...], frozenset, frozenset, int, int]:
        if self._by_left_byte is None:
            self._build()
        get = self._bpe._pair_merge.get
        empty: Tuple[List[int], List[int]] = ([], [])
        by_left, by_right = self._by_left_byte, self._by_right_byte
        bad_left: set = set()
        bad_right: set = set()

        def forbid(edge_left: int, edge_right: int, rank: int) -> None:
            ranks, found = by_left.get(edge_left, empty)
            bad_left.update(found[:bisect.bisect_left(ranks, rank)])
            ranks, found = by_right.get(edge_right, empty)
            bad_right.update(found[:bisect.bisect_left(ranks, rank)])

        ids = list(byte_ids)
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
            forbid(ids[0], ids[-1], rank)
            highest = max(highest, rank)
            ids[at : at + 2] = [best & _ID_MASK]
        forbid(ids[0], ids[-1], highest)
        start = tuple(ids)
        if start == byte_ids or len(bad_left) >= 256 or len(bad_right) >= 256:
            # the byte sets are only consulted for a start that differs from the bytes
            return byte_ids, byte_ids, _NO_BYTES, _NO_BYTES, raw[0], raw[-1]
        intern = self._sets.setdefault
        left, right = frozenset(bad_left), frozenset(bad_right)
        return byte_ids, start, intern(left, left), intern(right, right), raw[0], raw[-1]


def _by_rank(lowest: Dict[int, int]) -> Tuple[List[int], List[int]]:
    pairs = sorted((r, b) for b, r in lowest.items())
    return [r for r, _ in pairs], [b for _, b in pairs]


class _UniformRun(dict):
    """char -> start ids valid next to any character of the same UTF-8 length ``width``, else byte ids.

    In a piece made only of ``width``-byte characters every left neighbour ends with a
    continuation byte and every right neighbour starts with a ``width``-byte lead byte, so one
    context-free lookup per character replaces the per-neighbour check of :class:`_CharTable`.
    """

    __slots__ = ("_chars", "_left", "_right")

    def __init__(self, chars: _CharTable, width: int) -> None:
        super().__init__()
        self._chars = chars
        self._left = frozenset(range(0x80, 0xC0))
        self._right = frozenset(range(0xC0, 0xE0) if width == 2 else range(0xE0, 0xF0))

    def __missing__(self, ch: str) -> Tuple[int, ...]:
        byte_ids, start_ids, bad_left, bad_right, _, _ = self._chars[ch]
        ids = start_ids if self._left.isdisjoint(bad_left) and self._right.isdisjoint(bad_right) else byte_ids
        self[ch] = ids
        return ids


class _SafeBoundary3(dict):
    """two 3-byte characters -> True when no vocabulary token spans the boundary between them.

    Every symbol BPE ever forms is a vocabulary token, so if none of them can contain bytes from
    both sides of a boundary, no merge crosses it and BPE of the two sides runs independently.
    A spanning token splits as A + B with A a suffix of the left text and B a prefix of the
    right. For every token split at a 3-byte character start we record B's first <= 3 bytes
    under A's last <= 3 bytes; a character's "followers" are the union over its own suffixes, and
    a boundary is safe unless one of the right character's prefixes is among the left one's.
    """

    __slots__ = ("_bpe", "_by_suffix", "_followers", "_sets")

    def __init__(self, bpe: "ByteLevelBPE") -> None:
        super().__init__()
        self._bpe = bpe
        self._by_suffix: Optional[Dict[bytes, set]] = None  # built on the first CJK run
        self._followers: Dict[str, frozenset] = {}
        self._sets: Dict[frozenset, frozenset] = {}

    def _build(self) -> None:
        bpe = self._bpe
        to_latin1 = bpe._to_latin1
        # a continuation byte followed by a 3-byte lead byte: the start of a 3-byte character inside a token
        boundary = regex.compile("[\x80-\xbf](?=[\xe0-\xef])").search
        by_suffix: Dict[bytes, set] = {}
        for tok in bpe.vocab:
            if tok.isascii():
                continue  # printable ASCII tokens hold no byte >= 0x80, so no 3-byte character boundary
            text = tok.translate(to_latin1)
            if boundary(text) is None:
                continue
            try:
                raw = text.encode("latin-1")
            except UnicodeEncodeError:
                continue  # not a byte-level token: BPE never forms it
            for p in range(1, len(raw)):
                if 0xE0 <= raw[p] < 0xF0 and 0x80 <= raw[p - 1] < 0xC0:
                    by_suffix.setdefault(raw[max(0, p - 3):p], set()).add(raw[p:p + 3])
        self._by_suffix = by_suffix
        self._followers = {}

    def _followers_of(self, ch: str) -> frozenset:
        if self._by_suffix is None:
            self._build()
        raw = ch.encode("utf-8")
        empty: set = set()
        found = frozenset().union(*(self._by_suffix.get(raw[-a:], empty) for a in (1, 2, 3)))
        found = self._sets.setdefault(found, found)  # few distinct sets; 3-byte characters are 61k
        self._followers[ch] = found
        return found

    def __missing__(self, pair: str) -> bool:
        left, right = pair[0], pair[1]
        followers = self._followers.get(left)
        if followers is None:
            followers = self._followers_of(left)
        if followers:
            raw = right.encode("utf-8")
            safe = not (raw in followers or raw[:1] in followers or raw[:2] in followers)
        else:
            safe = True
        if len(self) >= _PAIR_MEMO_CAP:
            self.clear()  # bounded memo; entries are cheap to recompute
        self[pair] = safe
        return safe
