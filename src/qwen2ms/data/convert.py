"""Convert alpaca, ShareGPT and ``messages`` style records into chat-message JSONL, skipping and reporting bad records."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

from ..hub import atomic_write_text
from ..errors import Qwen2msError

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "DataFormatError",
    "ConversionReport",
    "load_records",
    "record_to_messages",
    "convert_records",
    "convert_file",
    "write_messages_jsonl",
]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

Message = Dict[str, str]

# ShareGPT speakers seen in the wild, mapped to chat roles; anything else (tool, observation,
# function_call, ...) is an unknown role for a plain SFT chat and the record is rejected.
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}
_CHAT_ROLES = ("system", "user", "assistant")


class DataFormatError(Qwen2msError, ValueError):
    """A data file or record does not have the expected shape; the message names it and says why."""


@dataclass
class ConversionReport:
    """What :func:`convert_records` did with each input record.

    Attributes:
        total: number of input records seen.
        converted: number written out.
        skipped: ``(index, reason)`` for every rejected record, index 0-based in input order
            (for JSONL input: the index among non-blank lines).
    """

    total: int = 0
    converted: int = 0
    skipped: List[Tuple[int, str]] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        """How many records were rejected."""
        return len(self.skipped)

    def summary(self, max_listed: int = 10) -> str:
        """A human-readable one-paragraph summary, listing at most ``max_listed`` skipped records."""
        lines = [f"records: {self.total}, converted: {self.converted}, skipped: {self.num_skipped}"]
        for index, reason in self.skipped[:max_listed]:
            lines.append(f"  skipped record {index}: {reason}")
        if self.num_skipped > max_listed:
            lines.append(f"  ... and {self.num_skipped - max_listed} more")
        return "\n".join(lines)


class _BadLine:
    """Marks a JSONL line that did not parse, so it is reported like any other bad record."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def load_records(path: Union[str, os.PathLike]) -> List[Any]:
    """Read a JSON array file or a JSONL file (UTF-8, BOM and CRLF tolerated).

    A file whose first non-blank character is ``[`` is one JSON array; otherwise each non-blank
    line is one JSON value. A JSONL line that fails to parse becomes a bad record (reported by
    :func:`convert_records` under its index) rather than aborting the whole file.

    Args:
        path: the input file.

    Returns:
        The records in file order.

    Raises:
        DataFormatError: the file is missing, not UTF-8, or a JSON array file does not parse or
            is not an array.

    Example:
        >>> records = load_records("examples/data/alpaca_sample.json")  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"data file {str(p)!r} does not exist (expected a JSON array or JSONL file).")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFormatError(f"{str(p)!r} is not UTF-8 text ({e}); re-encode it as UTF-8.") from e
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise DataFormatError(
                f"{str(p)!r} starts with '[' but is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}."
            ) from e
        if not isinstance(data, list):  # pragma: no cover - a text starting with '[' parses to a list
            raise DataFormatError(f"{str(p)!r} must hold a JSON array of records.")
        return data
    if stripped.startswith("{") and "\n" in stripped.strip():
        # One pretty-printed object would otherwise surface as dozens of "bad JSONL lines".
        try:
            whole = json.loads(stripped)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            raise DataFormatError(
                f"{str(p)!r} holds one JSON object spread over several lines; expected a JSON array of "
                "records ([{...}, {...}]) or JSONL (one record per line)."
            )
    records: List[Any] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            records.append(_BadLine(f"line {lineno} is not valid JSON ({e.msg} at column {e.colno})"))
    return records


def _require_str(record: Dict[str, Any], key: str, what: str) -> str:
    if key not in record:
        raise DataFormatError(f"missing field {key!r} ({what})")
    value = record[key]
    if not isinstance(value, str):
        raise DataFormatError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _alpaca_to_messages(record: Dict[str, Any]) -> List[Message]:
    instruction = _require_str(record, "instruction", "the task text")
    output = _require_str(record, "output", "the reply to train on")
    extra = record.get("input", "")
    if not isinstance(extra, str):
        raise DataFormatError(f"field 'input' must be a string when present, got {type(extra).__name__}")
    if not output.strip():
        raise DataFormatError("empty output (nothing to train on)")
    if instruction.strip() and extra.strip():
        user = instruction + "\n\n" + extra
    elif instruction.strip():
        user = instruction
    elif extra.strip():
        user = extra
    else:
        raise DataFormatError("both 'instruction' and 'input' are empty (no user turn)")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _turns(record: Dict[str, Any], list_key: str, role_key: str, text_key: str, roles: Dict[str, str]) -> List[Message]:
    turns = record[list_key]
    if not isinstance(turns, list):
        raise DataFormatError(f"field {list_key!r} must be a list of turns, got {type(turns).__name__}")
    out: List[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataFormatError(f"{list_key}[{i}] must be an object, got {type(turn).__name__}")
        for key in (role_key, text_key):
            if key not in turn:
                raise DataFormatError(f"{list_key}[{i}] is missing {key!r}")
            if not isinstance(turn[key], str):
                raise DataFormatError(f"{list_key}[{i}].{key} must be a string, got {type(turn[key]).__name__}")
        role = roles.get(turn[role_key].strip().lower())
        if role is None:
            raise DataFormatError(
                f"{list_key}[{i}] has unknown role {turn[role_key]!r} (expected one of {sorted(set(roles))})"
            )
        out.append({"role": role, "content": turn[text_key]})
    return out


def _check_order(messages: List[Message]) -> None:
    """System (optional, first only), then user/assistant alternating, starting with user, ending with assistant."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise DataFormatError("no user/assistant turns")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            pos = i + (len(messages) - len(body))
            raise DataFormatError(
                f"turn {pos} has role {m['role']!r} where {expected!r} was expected "
                "(turns must alternate user/assistant after an optional leading system message)"
            )
        if not m["content"].strip():
            pos = i + (len(messages) - len(body))
            raise DataFormatError(f"turn {pos} ({m['role']}) has empty content")
    if body[-1]["role"] != "assistant":
        raise DataFormatError("the conversation does not end with an assistant reply")


def record_to_messages(record: Any, system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT) -> List[Message]:
    """Turn one record into a validated list of chat messages.

    Recognised shapes (checked in this order):

    * ``{"messages": [{"role", "content"}, ...]}`` with roles system/user/assistant;
    * ShareGPT ``{"conversations": [{"from", "value"}, ...]}`` with from human/user,
      gpt/assistant/chatgpt, system (case-insensitive);
    * alpaca ``{"instruction", "input"?, "output"}``. The user text is
      ``instruction + "\\n\\n" + input`` when both are non-blank (the blank line keeps the task and
      its material visibly apart, as in the Alpaca prompt), the instruction alone when the input is
      blank or missing, and the input alone when the instruction is blank.

    ShareGPT and alpaca records may carry a top-level string ``"system"`` that overrides
    ``system_prompt``. Contents are kept verbatim (no stripping).

    Args:
        record: one parsed JSON value.
        system_prompt: system message prepended when the record has none; ``None`` adds none
            (note the Qwen2 chat template then inserts its own default system message when rendering).

    Returns:
        ``[{"role": ..., "content": ...}, ...]``: an optional system message, then user/assistant
        turns alternating, ending with an assistant reply.

    Raises:
        DataFormatError: missing or non-string fields, empty output or turn, unknown role, wrong
            turn order, or an unrecognised record shape; the message says which.

    Example:
        >>> record_to_messages({"instruction": "Add 2 and 3.", "output": "5"})
        [{'role': 'system', 'content': 'You are a helpful assistant.'}, {'role': 'user', 'content': 'Add 2 and 3.'}, {'role': 'assistant', 'content': '5'}]
    """
    if isinstance(record, _BadLine):
        raise DataFormatError(record.reason)
    if not isinstance(record, dict):
        raise DataFormatError(f"a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = _turns(record, "messages", "role", "content", {r: r for r in _CHAT_ROLES})
    elif "conversations" in record:
        messages = _turns(record, "conversations", "from", "value", _SHAREGPT_ROLES)
    elif "instruction" in record or "output" in record:
        messages = _alpaca_to_messages(record)
    else:
        raise DataFormatError(
            f"unrecognised record with keys {sorted(record)[:8]}; expected 'messages', 'conversations' "
            "(ShareGPT) or alpaca 'instruction'/'input'/'output'"
        )
    own_system = record.get("system")
    if own_system is not None and not isinstance(own_system, str):
        raise DataFormatError(f"field 'system' must be a string, got {type(own_system).__name__}")
    if messages and messages[0]["role"] != "system":
        prompt = own_system if own_system is not None else system_prompt
        if prompt is not None:
            messages.insert(0, {"role": "system", "content": prompt})
    _check_order(messages)
    return messages


def convert_records(
    records: Iterable[Any],
    system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
    strict: bool = False,
) -> Tuple[List[Dict[str, List[Message]]], ConversionReport]:
    """Convert records to ``{"messages": [...]}`` rows, skipping (or, if ``strict``, rejecting) bad ones.

    Args:
        records: parsed records, e.g. from :func:`load_records`.
        system_prompt: see :func:`record_to_messages`.
        strict: raise on the first bad record instead of skipping it.

    Returns:
        ``(rows, report)``.

    Raises:
        DataFormatError: only with ``strict=True``; names the record index and the reason.

    Example:
        >>> rows, report = convert_records([{"instruction": "Hi", "output": "Hello!"}, {"output": ""}])
        >>> report.converted, report.skipped
        (1, [(1, "missing field 'instruction' (the task text)")])
    """
    rows: List[Dict[str, List[Message]]] = []
    report = ConversionReport()
    for index, record in enumerate(records):
        report.total += 1
        try:
            rows.append({"messages": record_to_messages(record, system_prompt)})
        except DataFormatError as e:
            if strict:
                raise DataFormatError(f"record {index}: {e}") from None
            report.skipped.append((index, str(e)))
    report.converted = len(rows)
    return rows, report


def write_messages_jsonl(rows: Iterable[Dict[str, Any]], path: Union[str, os.PathLike]) -> None:
    """Write rows as UTF-8 JSONL (non-ASCII kept readable) through a temp file and a rename.

    Args:
        rows: JSON-serialisable objects, one per line.
        path: the output file; it appears only once fully written.
    """
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(path, text)


def convert_file(
    data_path: Union[str, os.PathLike],
    output_path: Union[str, os.PathLike],
    system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
    strict: bool = False,
) -> ConversionReport:
    """Convert an alpaca/ShareGPT/messages file (JSON array or JSONL) to chat-message JSONL.

    Nothing is written when ``strict`` rejects a record, and the output file never exists half-written.

    Args:
        data_path: input JSON array or JSONL file.
        output_path: output JSONL, one ``{"messages": [...]}`` per line.
        system_prompt: see :func:`record_to_messages`.
        strict: raise on the first bad record instead of skipping it.

    Returns:
        The :class:`ConversionReport`.

    Raises:
        DataFormatError: unreadable input, or a bad record with ``strict=True``.

    Example:
        >>> report = convert_file("alpaca_data.json", "alpaca_messages.jsonl")  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    rows, report = convert_records(load_records(data_path), system_prompt=system_prompt, strict=strict)
    write_messages_jsonl(rows, output_path)
    return report
