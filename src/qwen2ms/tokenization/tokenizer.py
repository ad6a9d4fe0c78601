"""Qwen2Tokenizer: byte-level BPE with special tokens, padding/truncation, chat templates and save/load."""
from __future__ import annotations

import json
import operator
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import regex

from ..hub import atomic_write_text, resolve_pretrained
from .bpe import PRETOKENIZE_PATTERN, ByteLevelBPE, TokenizerError, parse_merges
from .chat_template import (
    DEFAULT_MAX_ITERATIONS,
    DEFAULT_MAX_OUTPUT_CHARS,
    DEFAULT_TIMEOUT,
    QWEN2_CHAT_TEMPLATE,
    render_chat_template,
)

__all__ = ["Qwen2Tokenizer", "BatchEncoding", "AddedToken", "TOKENIZER_FILES"]

TOKENIZER_FILES = ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]

# Qwen2's own special tokens, placed right after the 151,643 BPE tokens.
QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

_SPECIAL_ATTRS = ("bos_token", "eos_token", "unk_token", "pad_token")

_SURROGATE = regex.compile("[\ud800-\udfff]")

# Ids index a dense table; a stray huge id in a config would otherwise allocate gigabytes.
_MAX_ADDED_ID = (1 << 20) - 1


@dataclass(frozen=True)
class AddedToken:
    """A token matched in raw text before BPE (e.g. ``<|im_end|>``).

    Attributes:
        content: the token's text.
        id: its id.
        special: skipped by ``decode(..., skip_special_tokens=True)``.
        lstrip: also swallow whitespace on its left.
        rstrip: also swallow whitespace on its right.
        normalized: matched after NFC normalisation instead of in the raw text.
        single_word: only matched when not inside a word.
    """

    content: str
    id: int
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False
    single_word: bool = False

    def to_config(self) -> Dict[str, Any]:
        return {"content": self.content, "lstrip": self.lstrip, "normalized": self.normalized,
                "rstrip": self.rstrip, "single_word": self.single_word, "special": self.special}


class BatchEncoding(dict):
    """The result of calling a tokenizer: a dict (``input_ids``, ``attention_mask``) with attribute access.

    Example:
        >>> enc = BatchEncoding(input_ids=[1, 2], attention_mask=[1, 1])
        >>> enc.input_ids
        [1, 2]
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _is_bool(value: Any) -> bool:
    # bool (and numpy.bool_) pass operator.index, but a mask passed as ids is a mistake
    return isinstance(value, bool) or type(value).__name__ == "bool_"


def _read_json(path: Path) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}).") from e
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path} is not UTF-8 text ({e}).") from e
    except OSError as e:
        raise TokenizerError(f"{path} cannot be read ({e.strerror or e}).") from e


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path} is not UTF-8 text ({e}).") from e
    except OSError as e:
        raise TokenizerError(f"{path} cannot be read ({e.strerror or e}).") from e


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and _SURROGATE.search(text) is not None


def _token_content(value: Any, field: str, source: str) -> Optional[str]:
    # Special-token fields are a str, None, or a serialised AddedToken dict with "content".
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"{source}: {field} must be a token string (or a dict with 'content'); got {value!r}.")


def _check_vocab(vocab: Any, source: str) -> Dict[str, int]:
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"{source} must hold a non-empty JSON object mapping token strings to ids.")
    for tok, idx in vocab.items():
        if type(idx) is not int or idx < 0:
            raise TokenizerError(f"{source}: token {tok!r} has id {idx!r}; ids must be non-negative integers.")
    bad = "" if "" in vocab else None
    if bad is None and _has_surrogate("".join(vocab)):  # one scan of all tokens, in C
        bad = next(tok for tok in vocab if _has_surrogate(tok))
    if bad is not None:
        raise TokenizerError(
            f"{source}: token {bad!r} (id {vocab[bad]}) is empty or holds an unpaired surrogate; "
            "vocabulary tokens must be non-empty, valid Unicode."
        )
    return vocab


def _check_reachable(vocab: Dict[str, int], merges: Sequence[Tuple[str, str]], source: str) -> None:
    # A merges.txt cut at a line boundary parses fine, but the tokens of its lost merges can never
    # be produced: every encoding would silently differ. A few unreachable tokens are normal
    # (GPT-2 keeps <|endoftext|> in vocab.json), a cut file leaves many.
    made = set(map(operator.add, map(operator.itemgetter(0), merges), map(operator.itemgetter(1), merges)))
    unreachable = [t for t in vocab.keys() - made if len(t) > 1]  # set difference in C; the rest is small
    if len(unreachable) > max(16, len(vocab) // 100):
        example = sorted(unreachable, key=vocab.__getitem__)[0]
        raise TokenizerError(
            f"{len(unreachable)} of vocab.json's {len(vocab)} tokens (e.g. {example!r}, id {vocab[example]}) are made "
            f"by none of the {len(merges)} merges: {source} is truncated or from another tokenizer. vocab.json and "
            "merges.txt must come from the same tokenizer."
        )


class Qwen2Tokenizer:
    """The Qwen2 tokenizer: byte-level BPE that matches Hugging Face's ``Qwen2Tokenizer`` token for token.

    Text is split on added/special tokens first (``<|endoftext|>`` 151643, ``<|im_start|>`` 151644,
    ``<|im_end|>`` 151645 and any others configured), the rest is NFC-normalised, pre-tokenised
    with Qwen2's regex and BPE-encoded (with a bounded word cache). No BOS token is added.

    Args:
        vocab: BPE token (byte-level alphabet) -> id.
        merges: merge pairs in rank order.
        added_tokens: tokens matched before BPE; defaults to Qwen2's three special tokens.
        eos_token: end-of-sequence token (``"<|im_end|>"`` for instruct models, ``"<|endoftext|>"`` for base).
        pad_token: padding token.
        unk_token: unknown token (unused by byte-level BPE; kept for the config round trip).
        bos_token: beginning-of-sequence token (Qwen2 has none).
        additional_special_tokens: further special token strings (must be added tokens).
        chat_template: Jinja chat template; None means the Qwen2-Instruct ChatML template.
        model_max_length: the default ``max_length`` for truncation.
        padding_side: ``"right"`` or ``"left"``.
        truncation_side: ``"right"`` or ``"left"``.
        cache_size: maximum entries of the word cache.

    Example:
        >>> tok = Qwen2Tokenizer.from_pretrained("/models/Qwen2-0.5B-Instruct")  # doctest: +SKIP
        >>> tok.encode("Hello world")  # doctest: +SKIP
        [9707, 1879]
    """

    def __init__(
        self,
        vocab: Dict[str, int],
        merges: Sequence[Tuple[str, str]],
        added_tokens: Optional[Sequence[AddedToken]] = None,
        eos_token: Optional[str] = "<|endoftext|>",
        pad_token: Optional[str] = "<|endoftext|>",
        unk_token: Optional[str] = "<|endoftext|>",
        bos_token: Optional[str] = None,
        additional_special_tokens: Optional[Sequence[str]] = None,
        chat_template: Optional[str] = None,
        model_max_length: int = 32768,
        padding_side: str = "right",
        truncation_side: str = "right",
        cache_size: int = 1 << 18,
    ) -> None:
        self._bpe = ByteLevelBPE(_check_vocab(vocab, "vocab"), merges, cache_size=cache_size)
        _check_reachable(vocab, self._bpe.merges, "merges.txt")
        if added_tokens is None:
            start = len(vocab)
            added_tokens = [AddedToken(t, start + k) for k, t in enumerate(QWEN2_SPECIAL_TOKENS) if t not in vocab]
        self._added: Dict[int, AddedToken] = {}
        self._added_by_content: Dict[str, AddedToken] = {}
        seen: Dict[str, int] = {}
        for tok in added_tokens:
            if not isinstance(tok, AddedToken):
                raise TokenizerError(f"added_tokens must hold AddedToken(content, id) entries; got {tok!r}.")
            if not isinstance(tok.content, str) or not tok.content or _has_surrogate(tok.content):
                raise TokenizerError(
                    f"added token {tok.content!r} (id {tok.id}) must be a non-empty str of valid Unicode; an empty "
                    "added token would match between every two characters."
                )
            if isinstance(tok.id, bool) or not isinstance(tok.id, int) or not 0 <= tok.id <= _MAX_ADDED_ID:
                raise TokenizerError(f"added token {tok.content!r} has id {tok.id!r}; ids must be ints in "
                                     f"[0, {_MAX_ADDED_ID}].")
            if seen.setdefault(tok.content, tok.id) != tok.id:
                raise TokenizerError(
                    f"added token {tok.content!r} is given two ids, {seen[tok.content]} and {tok.id}; each added "
                    "token needs exactly one id."
                )
            clash = self._bpe.id_to_token.get(tok.id)
            if clash is not None and clash != tok.content:
                raise TokenizerError(
                    f"added token {tok.content!r} uses id {tok.id}, which vocab.json gives to {clash!r}; "
                    "added tokens need ids of their own."
                )
            in_vocab = self._bpe.vocab.get(tok.content)
            if in_vocab is not None and in_vocab != tok.id:
                raise TokenizerError(
                    f"added token {tok.content!r} has id {tok.id}, but vocab.json gives it id {in_vocab}; "
                    "an added token that is also a vocabulary token must keep its vocabulary id."
                )
            other = self._added.get(tok.id)
            if other is not None and other.content != tok.content:
                raise TokenizerError(f"added tokens {other.content!r} and {tok.content!r} share id {tok.id}.")
            self._added[tok.id] = tok
            self._added_by_content[tok.content] = tok
        self.chat_template: str = chat_template if chat_template is not None else QWEN2_CHAT_TEMPLATE
        if not isinstance(self.chat_template, str):
            raise TokenizerError(f"chat_template must be a str of Jinja source; got {type(chat_template).__name__}.")
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int) or model_max_length < 1:
            raise TokenizerError(f"model_max_length must be a positive int; got {model_max_length!r}.")
        self.model_max_length = model_max_length
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self._special: Dict[str, Optional[str]] = {}
        for attr, value in zip(_SPECIAL_ATTRS, (bos_token, eos_token, unk_token, pad_token)):
            self._set_special(attr, value)
        self.additional_special_tokens: List[str] = list(additional_special_tokens or [])
        for t in self.additional_special_tokens:
            self._require_token(t, "additional_special_tokens")
        self._build_tables()

    # ---- construction ---------------------------------------------------------------------------
    def _require_token(self, token: str, field: str) -> int:
        if token in self._added_by_content:
            return self._added_by_content[token].id
        if token in self._bpe.vocab:
            return self._bpe.vocab[token]
        raise TokenizerError(
            f"{field} is {token!r}, which is neither in vocab.json nor an added token; "
            f"known special tokens: {sorted(self._added_by_content)}."
        )

    def _set_special(self, attr: str, value: Optional[str]) -> None:
        if value is not None:
            if not isinstance(value, str):
                raise TokenizerError(f"{attr} must be a token string or None; got {value!r}.")
            self._require_token(value, attr)
        self._special[attr] = value

    def _build_tables(self) -> None:
        n = max([max(self._bpe.id_to_token)] + list(self._added)) + 1
        # None marks an id without a token (a gap in the vocabulary): joining it fails, and decode says why
        table: List[Optional[bytes]] = [None] * n
        for i, t in self._bpe.id_to_token.items():
            table[i] = self._bpe.token_bytes(t)
        for i, t in self._added.items():
            table[i] = self._bpe.token_bytes(t.content)
        self._id_bytes = table
        special_ids = set(self.all_special_ids)
        self._id_bytes_skip = [b"" if i in special_ids and b is not None else b for i, b in enumerate(table)]
        self._raw_split = self._added_pattern([t for t in self._added.values() if not t.normalized])
        self._norm_split = self._added_pattern([t for t in self._added.values() if t.normalized])

    def _added_pattern(self, tokens: List[AddedToken]) -> Optional[Tuple[Any, List[int]]]:
        if not tokens:
            return None
        # Longest first, so that at one position the longest token wins (leftmost-longest, as the reference).
        tokens = sorted(tokens, key=lambda t: (-len(t.content), t.content))
        alts = []
        for t in tokens:
            body = "(" + regex.escape(t.content) + ")"
            if t.single_word:
                body = r"(?<!\w)" + body + r"(?!\w)"
            alts.append((r"\s*" if t.lstrip else "") + body + (r"\s*" if t.rstrip else ""))
        return regex.compile("|".join(alts)), [t.id for t in tokens]

    @classmethod
    def from_pretrained(cls, path_or_repo_id: Union[str, os.PathLike], revision: Optional[str] = None,
                        **overrides: Any) -> "Qwen2Tokenizer":
        """Load from a folder or a Hugging Face hub repo id.

        The folder holds vocab.json + merges.txt (+ tokenizer_config.json), or tokenizer.json alone.
        A hub id downloads only the tokenizer files and honours ``HF_HUB_OFFLINE``.

        Args:
            path_or_repo_id: a local folder or a repo id such as ``"Qwen/Qwen2-0.5B-Instruct"``.
            revision: a hub branch, tag or commit.
            **overrides: constructor arguments that replace the config's (e.g. ``padding_side="left"``).

        Returns:
            The tokenizer.

        Raises:
            TokenizerError: missing or malformed files (the message names the file).
            qwen2ms.HubError: the id could not be fetched (offline/unreachable); the message says how
                to pass a local folder instead.

        Example:
            >>> tok = Qwen2Tokenizer.from_pretrained("Qwen/Qwen2-0.5B-Instruct")  # doctest: +SKIP
        """
        folder = resolve_pretrained(path_or_repo_id, allow_patterns=TOKENIZER_FILES, revision=revision)
        vocab_path, merges_path, tj_path = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
        config_path = folder / "tokenizer_config.json"
        config: Dict[str, Any] = {}
        if config_path.is_file():
            config = _read_json(config_path)
            if not isinstance(config, dict):
                raise TokenizerError(f"{config_path} must hold a JSON object.")
        tj_added: List[Dict[str, Any]] = []
        if vocab_path.is_file() and merges_path.is_file():
            vocab = _check_vocab(_read_json(vocab_path), str(vocab_path))
            merges = parse_merges(_read_text(merges_path).splitlines(), source=str(merges_path))
            if tj_path.is_file():
                tj = _read_json(tj_path)
                if not isinstance(tj, dict):
                    raise TokenizerError(f"{tj_path} must hold a JSON object (a tokenizers' tokenizer.json).")
                tj_added = _tj_added(tj, tj_path)
        elif tj_path.is_file():
            vocab, merges, tj_added = _read_tokenizer_json(tj_path)
        else:
            missing = [p.name for p in (vocab_path, merges_path) if not p.is_file()]
            raise TokenizerError(
                f"{folder} has no {' and no '.join(missing)} (and no tokenizer.json); a Qwen2 tokenizer folder needs "
                "vocab.json + merges.txt, or tokenizer.json."
            )
        added = _added_tokens(config, tj_added, str(config_path))
        kwargs: Dict[str, Any] = {}
        for attr in _SPECIAL_ATTRS:
            if attr in config:
                kwargs[attr] = _token_content(config[attr], attr, str(config_path))
        if "additional_special_tokens" in config:
            extra = config["additional_special_tokens"] or []
            if not isinstance(extra, list):
                raise TokenizerError(f"{config_path}: additional_special_tokens must be a list of token strings.")
            kwargs["additional_special_tokens"] = [
                _token_content(t, "additional_special_tokens", str(config_path)) for t in extra
            ]
        template = _chat_template(config, folder / "chat_template.jinja", str(config_path))
        if template is not None:
            kwargs["chat_template"] = template
        for key in ("model_max_length", "padding_side", "truncation_side"):
            if config.get(key) is not None:
                kwargs[key] = config[key]
        limit = kwargs.get("model_max_length")
        if isinstance(limit, (int, float)) and not isinstance(limit, bool) and limit > 1 << 40:
            kwargs["model_max_length"] = 32768  # HF writes 1e30 for "no limit"
        elif limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise TokenizerError(f"{config_path}: model_max_length must be a positive int; got {limit!r}.")
        kwargs.update(overrides)
        try:
            return cls(vocab, merges, added_tokens=added, **kwargs)
        except TokenizerError as e:
            raise TokenizerError(f"{folder}: {e}") from e  # the message names the file, this the folder

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> List[Path]:
        """Write vocab.json, merges.txt and tokenizer_config.json (each atomically).

        Both :meth:`from_pretrained` and ``transformers.AutoTokenizer`` load the folder back to the
        same tokenizer.

        Args:
            save_directory: the folder (created if missing).

        Returns:
            The written file paths.

        Example:
            >>> tok.save_pretrained("out/tokenizer")  # doctest: +SKIP
        """
        out = Path(save_directory)
        if out.exists() and not out.is_dir():
            raise TokenizerError(f"save_pretrained: {out} is a file; pass a folder (it is created if missing).")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TokenizerError(f"save_pretrained: cannot create the folder {out} ({e.strerror or e}).") from e
        vocab = dict(sorted(self._bpe.vocab.items(), key=lambda kv: kv[1]))
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self._bpe.merges)
        config = {
            "add_prefix_space": False,
            "added_tokens_decoder": {str(i): t.to_config() for i, t in sorted(self._added.items())},
            "additional_special_tokens": list(self.additional_special_tokens),
            "bos_token": self._special["bos_token"],
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": False,
            "eos_token": self._special["eos_token"],
            "errors": "replace",
            "model_max_length": self.model_max_length,
            "pad_token": self._special["pad_token"],
            "padding_side": self.padding_side,
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "truncation_side": self.truncation_side,
            "unk_token": self._special["unk_token"],
        }
        written = []
        for name, text in (
            ("vocab.json", json.dumps(vocab, ensure_ascii=False)),
            ("merges.txt", merges),
            ("tokenizer_config.json", json.dumps(config, ensure_ascii=False, indent=2) + "\n"),
        ):
            try:
                atomic_write_text(out / name, text)
            except OSError as e:
                raise TokenizerError(f"save_pretrained: cannot write {out / name} ({e.strerror or e}).") from e
            written.append(out / name)
        return written

    # ---- properties -----------------------------------------------------------------------------
    def __len__(self) -> int:
        """Number of tokens including added ones (151646 for Qwen2)."""
        return len(self._bpe.vocab) + sum(1 for t in self._added.values() if t.content not in self._bpe.vocab)

    @property
    def vocab_size(self) -> int:
        """Size of the BPE vocabulary without added tokens (151643 for Qwen2)."""
        return len(self._bpe.vocab)

    def get_vocab(self) -> Dict[str, int]:
        """token -> id for every token, added ones included."""
        vocab = dict(self._bpe.vocab)
        vocab.update({t.content: i for i, t in self._added.items()})
        return vocab

    def _special_id(self, attr: str) -> Optional[int]:
        token = self._special[attr]
        return None if token is None else self._require_token(token, attr)

    @property
    def eos_token(self) -> Optional[str]:
        """End-of-sequence token string."""
        return self._special["eos_token"]

    @eos_token.setter
    def eos_token(self, value: Optional[str]) -> None:
        self._set_special("eos_token", value)
        self._build_tables()

    @property
    def eos_token_id(self) -> Optional[int]:
        """End-of-sequence token id."""
        return self._special_id("eos_token")

    @property
    def pad_token(self) -> Optional[str]:
        """Padding token string."""
        return self._special["pad_token"]

    @pad_token.setter
    def pad_token(self, value: Optional[str]) -> None:
        self._set_special("pad_token", value)
        self._build_tables()

    @property
    def pad_token_id(self) -> Optional[int]:
        """Padding token id."""
        return self._special_id("pad_token")

    @property
    def bos_token(self) -> Optional[str]:
        """Beginning-of-sequence token (None for Qwen2)."""
        return self._special["bos_token"]

    @property
    def bos_token_id(self) -> Optional[int]:
        """Beginning-of-sequence token id (None for Qwen2)."""
        return self._special_id("bos_token")

    @property
    def unk_token(self) -> Optional[str]:
        """Unknown token string."""
        return self._special["unk_token"]

    @property
    def unk_token_id(self) -> Optional[int]:
        """Unknown token id."""
        return self._special_id("unk_token")

    @property
    def all_special_tokens(self) -> List[str]:
        """Every special token string, sorted by id."""
        return [self.convert_ids_to_tokens(i) for i in self.all_special_ids]

    @property
    def all_special_ids(self) -> List[int]:
        """Ids of special added tokens and of the named special tokens, ascending."""
        ids = {i for i, t in self._added.items() if t.special}
        for attr in _SPECIAL_ATTRS:
            if self._special[attr] is not None:
                ids.add(self._require_token(self._special[attr], attr))
        ids.update(self._require_token(t, "additional_special_tokens") for t in self.additional_special_tokens)
        return sorted(ids)

    @property
    def added_tokens(self) -> List[AddedToken]:
        """The tokens matched before BPE, by id."""
        return [self._added[i] for i in sorted(self._added)]

    @property
    def padding_side(self) -> str:
        """Where ``__call__`` pads: ``"right"`` or ``"left"`` (left for batched generation)."""
        return self._padding_side

    @padding_side.setter
    def padding_side(self, value: str) -> None:
        if value not in ("right", "left"):
            raise TokenizerError(f"padding_side must be 'right' or 'left'; got {value!r}.")
        self._padding_side = value

    @property
    def truncation_side(self) -> str:
        """Which end ``truncation`` cuts: ``"right"`` or ``"left"``."""
        return self._truncation_side

    @truncation_side.setter
    def truncation_side(self, value: str) -> None:
        if value not in ("right", "left"):
            raise TokenizerError(f"truncation_side must be 'right' or 'left'; got {value!r}.")
        self._truncation_side = value

    # ---- encoding -------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> List[int]:
        """Token ids of ``text``; special-token strings in it become their ids.

        Args:
            text: the text.
            add_special_tokens: kept for API compatibility; Qwen2 adds no BOS/EOS either way.

        Returns:
            Token ids.

        Example:
            >>> tok.encode("Hello world")  # doctest: +SKIP
            [9707, 1879]
        """
        if not isinstance(text, str):
            raise TokenizerError(f"encode() takes a str; got {type(text).__name__}.")
        try:
            if self._raw_split is None:
                return self._encode_normalized(text)
            pattern, ids_by_group = self._raw_split
            out: List[int] = []
            pos = 0
            for m in pattern.finditer(text):
                if m.start() > pos:
                    out += self._encode_normalized(text[pos:m.start()])
                out.append(ids_by_group[m.lastindex - 1])
                pos = m.end()
            if pos < len(text):
                out += self._encode_normalized(text[pos:] if pos else text)
            return out
        except UnicodeEncodeError as e:
            # e.start indexes whatever part was being encoded (a piece, the text after a special
            # token, its NFC form), so find the surrogate in the caller's own string
            found = _SURROGATE.search(text)
            at = found.start() if found is not None else e.start
            raise TokenizerError(
                f"text holds an unpaired surrogate {text[at]!r} at index {at} (of {len(text)} characters), which has "
                "no UTF-8 encoding; pass valid Unicode text (e.g. decode bytes with errors='replace')."
            ) from e

    def _encode_normalized(self, text: str) -> List[int]:
        if self._norm_split is None:
            return self._bpe.encode_ordinary(text)
        if not unicodedata.is_normalized("NFC", text):
            text = unicodedata.normalize("NFC", text)
        pattern, ids_by_group = self._norm_split
        out: List[int] = []
        pos = 0
        for m in pattern.finditer(text):
            if m.start() > pos:
                out += self._bpe.encode_ordinary(text[pos:m.start()])
            out.append(ids_by_group[m.lastindex - 1])
            pos = m.end()
        if pos < len(text):
            out += self._bpe.encode_ordinary(text[pos:])
        return out

    def tokenize(self, text: str) -> List[str]:
        """Token strings (byte-level alphabet) of ``text``."""
        return self.convert_ids_to_tokens(self.encode(text))

    def __call__(
        self,
        text: Union[str, Sequence[str]],
        padding: Union[bool, str] = False,
        truncation: bool = False,
        max_length: Optional[int] = None,
        padding_side: Optional[str] = None,
        return_tensors: Optional[str] = None,
        return_attention_mask: bool = True,
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Encode one text or a batch, with optional truncation, padding and tensors.

        Args:
            text: a str or a list of str.
            padding: False (none), True/"longest" (to the longest in the batch) or "max_length".
            truncation: cut each sequence to ``max_length`` (default ``model_max_length``) tokens.
            max_length: the length for truncation and for ``padding="max_length"``.
            padding_side: "right" or "left"; defaults to :attr:`padding_side`.
            return_tensors: None (lists), "np" (int64 arrays) or "ms" (MindSpore int64 Tensors).
            return_attention_mask: include ``attention_mask`` (1 for tokens, 0 for padding).
            add_special_tokens: kept for API compatibility (Qwen2 adds none).

        Returns:
            A :class:`BatchEncoding` with ``input_ids`` (and ``attention_mask``); for a str input the
            lists are flat, for a list input they are one row per text.

        Example:
            >>> tok(["Hi", "Hello world"], padding=True, padding_side="left")["input_ids"]  # doctest: +SKIP
            [[151643, 13048], [9707, 1879]]
        """
        single = isinstance(text, str)
        if not single:
            if isinstance(text, (bytes, bytearray)) or not isinstance(text, Sequence) or not all(
                isinstance(t, str) for t in text
            ):
                raise TokenizerError("tokenizer() takes a str or a list of str.")
        texts = [text] if single else list(text)
        side = self.padding_side if padding_side is None else padding_side
        if side not in ("right", "left"):
            raise TokenizerError(f"padding_side must be 'right' or 'left'; got {side!r}.")
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise TokenizerError(f"padding must be False, True, 'longest' or 'max_length'; got {padding!r}.")
        if return_tensors not in (None, "np", "ms"):
            raise TokenizerError(f"return_tensors must be None, 'np' or 'ms'; got {return_tensors!r}.")
        if max_length is not None and (type(max_length) is not int or max_length < 1):
            raise TokenizerError(f"max_length must be a positive int; got {max_length!r}.")
        rows = [self.encode(t) for t in texts]
        if truncation:
            limit = self.model_max_length if max_length is None else max_length
            if self._truncation_side == "right":
                rows = [r[:limit] for r in rows]
            else:
                rows = [r[-limit:] if len(r) > limit else r for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding == "max_length":
            if max_length is None:
                raise TokenizerError("padding='max_length' needs max_length=N.")
            target = max_length
        elif padding in (True, "longest"):
            target = max((len(r) for r in rows), default=0)
        else:
            target = None
        if target is not None:
            pad_id = self.pad_token_id
            if pad_id is None:
                raise TokenizerError("padding needs a pad token; set tokenizer.pad_token (e.g. '<|endoftext|>').")
            for k, r in enumerate(rows):
                extra = target - len(r)
                if extra > 0:
                    if side == "right":
                        rows[k] = r + [pad_id] * extra
                        masks[k] = masks[k] + [0] * extra
                    else:
                        rows[k] = [pad_id] * extra + r
                        masks[k] = [0] * extra + masks[k]
        enc = BatchEncoding(input_ids=rows[0] if single else rows)
        if return_attention_mask:
            enc["attention_mask"] = masks[0] if single else masks
        if return_tensors is not None:
            lengths = {len(r) for r in rows}
            if len(lengths) > 1:
                raise TokenizerError(
                    f"return_tensors={return_tensors!r} needs equal lengths but got {sorted(lengths)}; pass padding=True."
                )
            import numpy as np

            width = len(rows[0]) if rows else 0
            arrays = {k: np.asarray(v, dtype=np.int64).reshape(len(rows), width) for k, v in enc.items()}
            if return_tensors == "ms":
                import mindspore  # imported here: plain tokenisation must not pay MindSpore's import cost

                arrays = {k: mindspore.Tensor(a, dtype=mindspore.int64) for k, a in arrays.items()}
            enc = BatchEncoding(arrays)
        return enc

    # ---- decoding -------------------------------------------------------------------------------
    def _as_ids(self, ids: Any) -> List[int]:
        if hasattr(ids, "asnumpy"):
            ids = ids.asnumpy()
        if hasattr(ids, "tolist") and not isinstance(ids, list):
            ids = ids.tolist()
        if isinstance(ids, int) and not isinstance(ids, bool):
            ids = [ids]
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
            raise TokenizerError(f"token ids must be an int or a list of ints; got {type(ids).__name__}.")
        out = list(ids)
        if not set(map(type, out)) <= {int}:  # numpy scalars, bools, floats, ...
            bad = next((i for i in out if _is_bool(i)), None)
            if bad is not None:
                raise TokenizerError(f"token ids must be ints; got the bool {bad!r} (a mask, not ids?).")
            try:
                out = [operator.index(i) for i in out]
            except TypeError:
                bad = next(i for i in out if not hasattr(i, "__index__"))
                raise TokenizerError(f"token ids must be ints; got {bad!r} ({type(bad).__name__}).") from None
        if out and min(out) < 0:
            self._unknown_id(min(out))
        return out

    def _unknown_id(self, token_id: int) -> None:
        n = len(self._id_bytes)
        if token_id < 0:
            raise TokenizerError(f"token id {token_id} is negative; this tokenizer's ids are 0..{n - 1}.")
        if token_id < n:
            raise TokenizerError(
                f"token id {token_id} has no token (vocab.json and the added tokens skip it); this tokenizer's "
                f"ids are 0..{n - 1}."
            )
        raise TokenizerError(
            f"token id {token_id} is past the vocabulary: this tokenizer has {len(self)} tokens, ids 0..{n - 1}. "
            f"Ids from {n} up (such as the rows a model pads its embedding to) have no text; decode ids this "
            "tokenizer produced, or mask the others (generate() does when given the tokenizer)."
        )

    def id_bytes(self, token_id: int, skip_special_tokens: bool = False) -> bytes:
        """The bytes one id stands for.

        Args:
            token_id: a token id of this tokenizer.
            skip_special_tokens: return b"" for special tokens.

        Returns:
            The token's bytes.

        Raises:
            TokenizerError: not an int, or an id without a token (negative, past the vocabulary, or a gap).
        """
        if _is_bool(token_id):
            raise TokenizerError(f"token id must be an int; got the bool {token_id!r}.")
        try:
            i = operator.index(token_id)
        except TypeError:
            raise TokenizerError(f"token id must be an int; got {token_id!r} ({type(token_id).__name__}).") from None
        table = self._id_bytes_skip if skip_special_tokens else self._id_bytes
        data = table[i] if 0 <= i < len(table) else None
        if data is None:
            self._unknown_id(i)
        return data

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of token ids; invalid UTF-8 becomes U+FFFD.

        Args:
            ids: an int, a list of ints, or a 1-D numpy array / MindSpore Tensor.
            skip_special_tokens: leave out special tokens such as ``<|im_end|>``.

        Returns:
            The text.

        Raises:
            TokenizerError: a non-integer id, or an id without a token (negative, at or above
                ``len(tokenizer)``, or a gap in the vocabulary); the message names the id.

        Example:
            >>> tok.decode([9707, 1879])  # doctest: +SKIP
            'Hello world'
        """
        ids = self._as_ids(ids)
        table = self._id_bytes_skip if skip_special_tokens else self._id_bytes
        try:
            return b"".join(map(table.__getitem__, ids)).decode("utf-8", "replace")
        except (IndexError, TypeError):  # past the table, or None for a gap
            self._unknown_id(next(i for i in ids if i >= len(table) or table[i] is None))
            raise

    def batch_decode(self, sequences: Iterable[Any], skip_special_tokens: bool = False) -> List[str]:
        """:meth:`decode` for each sequence (a list of lists, or a 2-D array/Tensor)."""
        if hasattr(sequences, "asnumpy"):
            sequences = sequences.asnumpy()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def convert_ids_to_tokens(self, ids: Union[int, Sequence[int]]) -> Union[str, List[str]]:
        """Token string(s) of id(s).

        Raises:
            TokenizerError: a non-integer id or an id without a token (see :meth:`decode`).

        Example:
            >>> tok.convert_ids_to_tokens([21927, 151645])  # doctest: +SKIP
            ['ĠHello', '<|im_end|>']
        """
        single = isinstance(ids, int) or (hasattr(ids, "__index__") and not hasattr(ids, "__len__"))
        out = []
        for i in self._as_ids(ids):
            added = self._added.get(i)
            token = added.content if added is not None else self._bpe.id_to_token.get(i)
            if token is None:
                self._unknown_id(i)
            out.append(token)
        return out[0] if single else out

    def convert_tokens_to_ids(self, tokens: Union[str, Sequence[str]]) -> Union[int, List[int]]:
        """Id(s) of token string(s).

        Raises:
            TokenizerError: a token that is neither in the vocabulary nor an added token.

        Example:
            >>> tok.convert_tokens_to_ids("<|im_end|>")  # doctest: +SKIP
            151645
        """
        if isinstance(tokens, str):
            return self._require_token(tokens, "token")
        return [self._require_token(t, "token") for t in tokens]

    # ---- chat -----------------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        tools: Optional[Sequence[Mapping[str, Any]]] = None,
        documents: Optional[Sequence[Mapping[str, Any]]] = None,
        chat_template: Optional[str] = None,
        max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
        max_iterations: int = DEFAULT_MAX_ITERATIONS,
        timeout: float = DEFAULT_TIMEOUT,
        **kwargs: Any,
    ) -> Union[str, List[int]]:
        """Render a conversation with the chat template (sandboxed Jinja) and optionally tokenize it.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant"|..., "content": str}, ...]``.
            add_generation_prompt: end with ``<|im_start|>assistant\\n`` so the model replies next.
            tokenize: return token ids instead of the text.
            tools: tool JSON schemas for templates that use them.
            documents: documents for templates that use them.
            chat_template: a template to use instead of :attr:`chat_template`.
            max_output_chars: the largest prompt (and string or list built while rendering) allowed.
            max_iterations: the most template loop iterations plus macro calls allowed.
            timeout: the most seconds rendering may take.
            **kwargs: extra template variables.

        Returns:
            The prompt text, or its ids when ``tokenize`` is True.

        Raises:
            TokenizerError: malformed messages, or a template that fails, breaks the sandbox or
                goes past a rendering limit (then a ``ChatTemplateLimitError`` naming the limit).

        Example:
            >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)  # doctest: +SKIP
            '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
        """
        template = self.chat_template if chat_template is None else chat_template
        text = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    tools=tools, documents=documents, max_output_chars=max_output_chars,
                                    max_iterations=max_iterations, timeout=timeout, **kwargs)
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        return (f"Qwen2Tokenizer(vocab_size={self.vocab_size}, len={len(self)}, eos_token={self.eos_token!r}, "
                f"pad_token={self.pad_token!r}, padding_side={self.padding_side!r})")


def _read_tokenizer_json(path: Path) -> Tuple[Dict[str, int], List[Tuple[str, str]], List[Dict[str, Any]]]:
    data = _read_json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE" or "vocab" not in model:
        raise TokenizerError(f"{path} does not describe a BPE model (model.type 'BPE' with a vocab); not a Qwen2 tokenizer.")
    normalizer = data.get("normalizer")
    if normalizer is not None and not isinstance(normalizer, dict):
        raise TokenizerError(f"{path} normalizer must be an object like {{\"type\": \"NFC\"}}; got {normalizer!r}.")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise TokenizerError(f"{path} uses normalizer {normalizer.get('type')!r}; Qwen2 tokenizers use NFC.")
    patterns = regex.findall(r'"Regex":\s*("(?:[^"\\]|\\.)*")', json.dumps(data.get("pre_tokenizer")))
    for p in patterns:
        if json.loads(p) != PRETOKENIZE_PATTERN:
            raise TokenizerError(f"{path} pre-tokenises with {json.loads(p)!r}, not Qwen2's pattern; not a Qwen2 tokenizer.")
    vocab = _check_vocab(model["vocab"], f"{path} model.vocab")
    merges: List[Tuple[str, str]] = []
    raw_merges = model.get("merges") or []
    if not isinstance(raw_merges, list):
        raise TokenizerError(f"{path} model.merges must be a list of 'a b' strings or ['a', 'b'] pairs.")
    for k, m in enumerate(raw_merges):
        if isinstance(m, str):
            merges.extend(parse_merges([m], source=f"{path} model.merges[{k}]"))
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(s, str) and s for s in m):
            merges.append((m[0], m[1]))
        else:
            raise TokenizerError(f"{path} model.merges[{k}] is {m!r}; each merge must be 'a b' or ['a', 'b'].")
    return vocab, merges, _tj_added(data, path)


def _tj_added(data: Dict[str, Any], path: Path) -> List[Dict[str, Any]]:
    added = data.get("added_tokens") or []
    if not isinstance(added, list):
        raise TokenizerError(f"{path} added_tokens must be a list of {{'id': int, 'content': str, ...}} entries.")
    return added


def _added_tokens(config: Dict[str, Any], tj_added: List[Dict[str, Any]], source: str) -> Optional[List[AddedToken]]:
    entries: Dict[int, Dict[str, Any]] = {}
    for t in tj_added:
        if not isinstance(t, dict) or type(t.get("id")) is not int or not isinstance(t.get("content"), str):
            raise TokenizerError(f"tokenizer.json added_tokens entry {t!r} needs an int 'id' and a str 'content'.")
        if not 0 <= t["id"] <= _MAX_ADDED_ID:
            raise TokenizerError(f"tokenizer.json added_tokens entry {t['content']!r} has id {t['id']}; ids must lie "
                                 f"in [0, {_MAX_ADDED_ID}].")
        entries[t["id"]] = t
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise TokenizerError(f"{source}: added_tokens_decoder must map ids to token dicts.")
    for key, t in decoder.items():
        try:
            idx = int(key)
        except ValueError:
            raise TokenizerError(f"{source}: added_tokens_decoder key {key!r} is not an integer id.") from None
        if not 0 <= idx <= _MAX_ADDED_ID:
            raise TokenizerError(f"{source}: added_tokens_decoder key {key!r} must be an id in [0, {_MAX_ADDED_ID}].")
        if not isinstance(t, dict) or not isinstance(t.get("content"), str):
            raise TokenizerError(f"{source}: added_tokens_decoder[{key!r}] needs a str 'content'; got {t!r}.")
        entries[idx] = t
    if not entries:
        return None
    out = []
    for idx, t in sorted(entries.items()):
        for flag in ("special", "lstrip", "rstrip", "normalized", "single_word"):
            if t.get(flag) is not None and not isinstance(t[flag], bool):
                raise TokenizerError(
                    f"{source}: added token {t['content']!r} (id {idx}) has {flag}={t[flag]!r}; it must be true or false."
                )
        special = bool(t.get("special", True))
        out.append(AddedToken(
            content=t["content"], id=idx, special=special,
            lstrip=bool(t.get("lstrip", False)), rstrip=bool(t.get("rstrip", False)),
            normalized=bool(t.get("normalized", not special)), single_word=bool(t.get("single_word", False)),
        ))
    return out


def _chat_template(config: Dict[str, Any], jinja_path: Path, source: str) -> Optional[str]:
    if jinja_path.is_file():
        return _read_text(jinja_path)
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: the "default" one is the chat template
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise TokenizerError(f"{source}: chat_template must be a Jinja string (or a list with a 'default' entry).")
