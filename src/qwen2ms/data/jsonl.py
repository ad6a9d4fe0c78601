"""Save and load tokenised SFT samples as JSONL, the input of the dynamic-padding training path."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence, Union

from ..hub import atomic_write_text
from .convert import DataFormatError

__all__ = ["save_samples_jsonl", "load_samples_jsonl"]


def save_samples_jsonl(samples: Iterable[Dict[str, Sequence[int]]], path: Union[str, os.PathLike]) -> int:
    """Write one ``{"input_ids": [...], "labels": [...], ...}`` object per line (temp file + rename).

    Args:
        samples: tokenised samples or packed rows (lists or numpy arrays of ints).
        path: output file.

    Returns:
        The number of lines written.

    Example:
        >>> save_samples_jsonl([{"input_ids": [1, 2], "labels": [-100, 2]}], "train.tok.jsonl")  # doctest: +SKIP
        1
    """
    lines: List[str] = []
    for s in samples:
        lines.append(json.dumps({k: [int(v) for v in vals] for k, vals in s.items()}, separators=(",", ":")) + "\n")
    atomic_write_text(path, "".join(lines))
    return len(lines)


def load_samples_jsonl(path: Union[str, os.PathLike]) -> List[Dict[str, List[int]]]:
    """Read samples written by :func:`save_samples_jsonl`, checking each has equal-length int lists.

    Args:
        path: a tokenised-samples JSONL file.

    Returns:
        The samples as dicts of int lists.

    Raises:
        DataFormatError: a line is not JSON, lacks ``input_ids``/``labels``, holds non-integers,
            or has columns of different lengths; the message names the line.

    Example:
        >>> samples = load_samples_jsonl("train.tok.jsonl")  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise DataFormatError(f"tokenised sample file {str(p)!r} does not exist.")
    out: List[Dict[str, List[int]]] = []
    with open(p, "r", encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj: Any = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{str(p)!r} line {lineno} is not valid JSON: {e.msg}") from e
            if not isinstance(obj, dict) or "input_ids" not in obj or "labels" not in obj:
                raise DataFormatError(f"{str(p)!r} line {lineno} must be an object with 'input_ids' and 'labels'")
            n = len(obj["input_ids"]) if isinstance(obj["input_ids"], list) else -1
            for k, v in obj.items():
                if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                    raise DataFormatError(f"{str(p)!r} line {lineno}: {k!r} must be a list of integers")
                if len(v) != n:
                    raise DataFormatError(
                        f"{str(p)!r} line {lineno}: {k!r} has {len(v)} entries but 'input_ids' has {n}"
                    )
            out.append(obj)
    return out
