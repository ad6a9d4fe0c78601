"""Supervised fine-tuning tokenisation: chat-template rendering with loss masks found by re-rendering prefixes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .convert import DataFormatError, record_to_messages, DEFAULT_SYSTEM_PROMPT

__all__ = [
    "IGNORE_INDEX",
    "TemplateMismatchError",
    "PreprocessReport",
    "tokenize_conversation",
    "fit_to_length",
    "tokenize_dataset",
]

IGNORE_INDEX = -100

Sample = Dict[str, List[int]]


class TemplateMismatchError(DataFormatError):
    """Rendering a conversation prefix did not give a token prefix of the full rendering."""


@dataclass
class PreprocessReport:
    """Counts from :func:`tokenize_dataset` (and packing, when used).

    Attributes:
        records: input records seen.
        samples: samples kept (after dropping).
        tokens: tokens in the kept samples (after truncation, before padding).
        trained_tokens: tokens in the kept samples whose label is not ignored.
        truncated: samples cut to ``seq_length`` (and kept).
        dropped: samples dropped for length: over-long with ``overflow="drop"``, or left with no
            trained token after truncation.
        skipped: ``(index, reason)`` for records rejected as malformed or not renderable.
        rows: output rows (packed rows when packing, else equal to ``samples``).
        padded_tokens: ``rows * seq_length`` for fixed-length output, else ``tokens``.
    """

    records: int = 0
    samples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    skipped: List[Tuple[int, str]] = field(default_factory=list)
    rows: int = 0
    padded_tokens: int = 0

    @property
    def packing_efficiency(self) -> float:
        """Real tokens over row slots (``tokens / padded_tokens``); 1.0 when nothing is padded."""
        return self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    def summary(self, max_listed: int = 10) -> str:
        """A human-readable summary, listing at most ``max_listed`` skipped records."""
        lines = [
            f"records: {self.records}",
            f"samples: {self.samples}",
            f"tokens: {self.tokens} (trained: {self.trained_tokens})",
            f"truncated: {self.truncated}",
            f"dropped: {self.dropped}",
            f"skipped: {len(self.skipped)}",
            f"rows: {self.rows}",
            f"packing efficiency: {self.packing_efficiency:.4f}",
        ]
        for index, reason in self.skipped[:max_listed]:
            lines.append(f"  skipped record {index}: {reason}")
        if len(self.skipped) > max_listed:
            lines.append(f"  ... and {len(self.skipped) - max_listed} more")
        return "\n".join(lines)


def _as_ids(out: Any) -> List[int]:
    # Our tokenizer returns a plain list; tolerate a mapping with "input_ids" for other duck types.
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return [int(i) for i in out]


def _render(tokenizer: Any, messages: Sequence[Dict[str, str]], add_generation_prompt: bool) -> List[int]:
    return _as_ids(tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt, tokenize=True))


def _single_token_id(tokenizer: Any, token: str) -> int:
    ids = _as_ids(tokenizer.encode(token))
    if len(ids) != 1:
        raise ValueError(
            f"end token {token!r} encodes to {len(ids)} ids {ids} with this tokenizer; pass the "
            "special token that closes an assistant turn in its chat template (Qwen2: '<|im_end|>')."
        )
    return ids[0]


def _check_prefix(full: List[int], prefix: List[int], what: str, messages: Sequence[Dict[str, str]], k: int) -> None:
    if full[: len(prefix)] == prefix:
        return
    at = next((i for i, (a, b) in enumerate(zip(full, prefix)) if a != b), min(len(full), len(prefix)))
    hint = ""
    if k < len(messages) and messages[k]["content"][:1] in ("\n", "\r", " ", "\t"):
        hint = (
            f" Message {k} starts with whitespace {messages[k]['content'][:2]!r}, which the BPE merges with "
            "the template's newline into a different token; strip leading whitespace from that message."
        )
    raise TemplateMismatchError(
        f"rendering {what} is not a token prefix of the full conversation (first difference at token {at}), "
        f"so the loss mask of message {k} cannot be placed.{hint}"
    )


def tokenize_conversation(
    messages: Sequence[Dict[str, str]],
    tokenizer: Any,
    only_last_turn: bool = False,
    end_token: str = "<|im_end|>",
) -> Sample:
    """Render ``messages`` with the tokenizer's chat template and build labels that train only the replies.

    The span of assistant message ``k`` is found by rendering ``messages[:k]`` with the generation
    prompt (``...<|im_start|>assistant\\n``) and ``messages[:k+1]``, checking both are token prefixes
    of the full rendering, and taking the tokens in between up to and including the first
    ``end_token``. So each reply's content tokens and its ``<|im_end|>`` are trained; the ``"\\n"``
    the template writes after ``<|im_end|>`` is not (as in HF TRL / LLaMA-Factory: the model learns to
    stop at ``<|im_end|>``; what follows is template glue it never has to generate). System, user
    and template tokens get label ``-100``.

    Labels are aligned with ``input_ids`` (not shifted); the model shifts them when computing the loss.

    Args:
        messages: ``[{"role", "content"}, ...]`` containing at least one assistant message.
        tokenizer: any object with ``apply_chat_template(messages, add_generation_prompt=, tokenize=True)``
            returning token ids and ``encode(text)`` (e.g. :class:`qwen2ms.Qwen2Tokenizer`).
        only_last_turn: train only the last assistant message.
        end_token: the special token closing an assistant turn.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length.

    Raises:
        TemplateMismatchError: a prefix rendering is not a token prefix of the full one (e.g. a
            reply starting with a newline), so the mask would be wrong.
        DataFormatError: no assistant message, or a reply's span lacks the end token or holds it
            more than once (the reply's text contains ``<|im_end|>``).

    Example:
        >>> from qwen2ms import Qwen2Tokenizer  # doctest: +SKIP
        >>> tok = Qwen2Tokenizer.from_pretrained("Qwen/Qwen2-0.5B-Instruct")  # doctest: +SKIP
        >>> s = tokenize_conversation([{"role": "user", "content": "Hi"},
        ...                            {"role": "assistant", "content": "Hello!"}], tok)  # doctest: +SKIP
        >>> tok.decode([t for t, l in zip(s["input_ids"], s["labels"]) if l != -100])  # doctest: +SKIP
        'Hello!<|im_end|>'
    """
    assistant_idx = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant_idx:
        raise DataFormatError("the conversation has no assistant message to train on")
    if only_last_turn:
        assistant_idx = assistant_idx[-1:]
    end_id = _single_token_id(tokenizer, end_token)
    full = _render(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    for k in assistant_idx:
        prompt = _render(tokenizer, messages[:k], add_generation_prompt=True)
        _check_prefix(full, prompt, f"messages[:{k}] with the generation prompt", messages, k)
        upto = full if k == len(messages) - 1 else _render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        _check_prefix(full, upto, f"messages[:{k + 1}]", messages, k + 1)
        span = full[len(prompt): len(upto)]
        if end_id not in span:
            raise DataFormatError(
                f"assistant message {k} renders without {end_token!r}; the chat template does not close "
                "turns with that token (pass end_token= matching the template)."
            )
        if span.count(end_id) > 1:
            raise DataFormatError(
                f"assistant message {k} contains the text {end_token!r}, which tokenises as the end-of-turn "
                "token: training on it would teach the model to stop mid-reply; remove it from the data."
            )
        stop = len(prompt) + span.index(end_id) + 1
        labels[len(prompt): stop] = full[len(prompt): stop]
    return {"input_ids": full, "labels": labels}


def fit_to_length(sample: Sample, seq_length: int, overflow: str = "truncate") -> Tuple[Optional[Sample], str]:
    """Apply the length policy to one tokenised sample.

    Args:
        sample: ``{"input_ids", "labels"}``.
        seq_length: the maximum number of tokens.
        overflow: ``"truncate"`` keeps the first ``seq_length`` tokens (labels cut the same way);
            ``"drop"`` drops over-long samples.

    Returns:
        ``(sample_or_None, status)`` with status ``"ok"``, ``"truncated"``, ``"dropped_long"`` or
        ``"dropped_untrained"`` (truncation left no trained token).

    Example:
        >>> fit_to_length({"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, 2)
        ({'input_ids': [1, 2], 'labels': [-100, 2]}, 'truncated')
    """
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    if seq_length < 2:
        raise ValueError(f"seq_length must be at least 2, got {seq_length}")
    n = len(sample["input_ids"])
    if n <= seq_length:
        return sample, "ok"
    if overflow == "drop":
        return None, "dropped_long"
    cut = {"input_ids": sample["input_ids"][:seq_length], "labels": sample["labels"][:seq_length]}
    # labels[0] is never a target (nothing precedes it), so a sample needs a trained token after it.
    if all(label == IGNORE_INDEX for label in cut["labels"][1:]):
        return None, "dropped_untrained"
    return cut, "truncated"


def tokenize_dataset(
    records: Iterable[Any],
    tokenizer: Any,
    seq_length: int,
    overflow: str = "truncate",
    only_last_turn: bool = False,
    system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
    strict: bool = False,
    progress: bool = False,
    report: Optional[PreprocessReport] = None,
) -> Tuple[List[Sample], PreprocessReport]:
    """Tokenise records of any supported shape (alpaca, ShareGPT, messages) into masked SFT samples.

    Args:
        records: parsed records (see :func:`qwen2ms.data.load_records`).
        tokenizer: see :func:`tokenize_conversation`.
        seq_length: maximum tokens per sample.
        overflow: ``"truncate"`` or ``"drop"``; see :func:`fit_to_length`.
        only_last_turn: train only the last assistant reply of each conversation.
        system_prompt: system message added to records without one (``None``: none added).
        strict: raise on the first malformed or unrenderable record instead of skipping it.
        progress: show a tqdm progress bar.
        report: an existing report to add to (a new one when ``None``).

    Returns:
        ``(samples, report)``; ``report.rows``/``padded_tokens`` describe unpadded samples.

    Raises:
        DataFormatError: only with ``strict=True``, naming the record index and reason.

    Example:
        >>> samples, report = tokenize_dataset(load_records("data.jsonl"), tok, 4096)  # doctest: +SKIP
    """
    if not isinstance(seq_length, int) or isinstance(seq_length, bool) or seq_length < 2:
        raise ValueError(f"seq_length must be an integer >= 2 (a prompt token and a trained token), got {seq_length!r}")
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    report = report if report is not None else PreprocessReport()
    samples: List[Sample] = []
    items: Iterable[Any] = records
    if progress:
        from tqdm import tqdm

        items = tqdm(records, desc="tokenising", unit="rec", total=len(records) if hasattr(records, "__len__") else None)
    for index, record in enumerate(items):
        report.records += 1
        try:
            messages = record_to_messages(record, system_prompt)
            sample = tokenize_conversation(messages, tokenizer, only_last_turn=only_last_turn)
        except DataFormatError as e:
            if strict:
                raise DataFormatError(f"record {index}: {e}") from None
            report.skipped.append((index, str(e)))
            continue
        fitted, status = fit_to_length(sample, seq_length, overflow)
        if fitted is None:
            report.dropped += 1
            continue
        if status == "truncated":
            report.truncated += 1
        samples.append(fitted)
        report.samples += 1
        report.tokens += len(fitted["input_ids"])
        report.trained_tokens += sum(1 for label in fitted["labels"] if label != IGNORE_INDEX)
    report.rows = len(samples)
    report.padded_tokens = report.tokens
    return samples, report
