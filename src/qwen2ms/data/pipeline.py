"""End-to-end SFT preprocessing: records file -> masked samples -> (packed) rows -> MindRecord or JSONL."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from .convert import DEFAULT_SYSTEM_PROMPT, load_records
from .jsonl import save_samples_jsonl
from .mindrecord import write_mindrecord
from .packing import pack_samples
from .sft import IGNORE_INDEX, PreprocessReport, tokenize_dataset

__all__ = ["pad_samples", "preprocess_file"]


def pad_samples(samples: Sequence[Dict[str, Sequence[int]]], seq_length: int, pad_token_id: int) -> List[Dict[str, np.ndarray]]:
    """Right-pad each sample to ``seq_length`` (static shapes), adding an ``attention_mask`` column.

    Args:
        samples: ``{"input_ids", "labels"}`` each, at most ``seq_length`` long.
        seq_length: row length.
        pad_token_id: id written into padding.

    Returns:
        Rows of int32 arrays ``input_ids``, ``labels`` (-100 on padding), ``attention_mask`` (1 on real tokens).

    Example:
        >>> pad_samples([{"input_ids": [5, 6], "labels": [-100, 6]}], 4, 0)[0]["attention_mask"].tolist()
        [1, 1, 0, 0]
    """
    rows = []
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        if n > seq_length:
            raise ValueError(f"sample {i} has {n} tokens, more than seq_length={seq_length}")
        ids = np.full(seq_length, pad_token_id, dtype=np.int32)
        labels = np.full(seq_length, IGNORE_INDEX, dtype=np.int32)
        mask = np.zeros(seq_length, dtype=np.int32)
        ids[:n] = s["input_ids"]
        labels[:n] = s["labels"]
        mask[:n] = 1
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": mask})
    return rows


def preprocess_file(
    input_path: Union[str, os.PathLike],
    tokenizer: Any,
    seq_length: int,
    output_path: Union[str, os.PathLike],
    packing: bool = False,
    overflow: str = "truncate",
    only_last_turn: bool = False,
    strategy: str = "ffd",
    system_prompt: Optional[str] = DEFAULT_SYSTEM_PROMPT,
    strict: bool = False,
    shard_num: int = 1,
    progress: bool = False,
) -> PreprocessReport:
    """Tokenise an alpaca/ShareGPT/messages file into SFT training rows and write them.

    Output format follows the suffix of ``output_path``: ``.jsonl`` writes unpadded samples (or
    packed rows) for the dynamic-padding path; anything else writes MindRecord. Unpacked MindRecord
    rows are padded to ``seq_length`` with an ``attention_mask`` column (one static shape for a
    compiled train step); packed rows carry ``position_ids`` and ``segment_ids`` instead.

    Args:
        input_path: JSON array or JSONL of records in any shape :func:`record_to_messages` accepts.
        tokenizer: e.g. :class:`qwen2ms.Qwen2Tokenizer`; needs ``pad_token_id`` besides the methods
            :func:`tokenize_conversation` uses.
        seq_length: tokens per row (maximum tokens per sample).
        output_path: ``*.mindrecord`` (or any non-``.jsonl`` name) or ``*.jsonl``.
        packing: pack several samples per row (see :func:`pack_samples`).
        overflow: ``"truncate"`` or ``"drop"`` over-long samples.
        only_last_turn: train only the last assistant reply.
        strategy: packing strategy, ``"ffd"`` or ``"greedy"``.
        system_prompt: system message for records without one (``None``: none added).
        strict: raise on the first bad record instead of skipping it.
        shard_num: MindRecord files to write.
        progress: show progress bars.

    Returns:
        The :class:`PreprocessReport`; ``packing_efficiency`` is real tokens over row slots.

    Raises:
        ValueError: no sample survived (nothing would be written).
        DataFormatError: unreadable input, or a bad record with ``strict=True``.

    Example:
        >>> report = preprocess_file("alpaca.json", tok, 4096, "alpaca.mindrecord", packing=True)  # doctest: +SKIP
        >>> print(report.summary())  # doctest: +SKIP
    """
    records = load_records(input_path)
    samples, report = tokenize_dataset(
        records, tokenizer, seq_length, overflow=overflow, only_last_turn=only_last_turn,
        system_prompt=system_prompt, strict=strict, progress=progress,
    )
    if not samples:
        raise ValueError(f"no usable sample in {os.fspath(input_path)!r}:\n{report.summary()}")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad_token_id; Qwen2 uses <|endoftext|> (151643).")
    jsonl = Path(output_path).suffix.lower() == ".jsonl"
    rows: Sequence[Dict[str, Any]]
    if packing:
        rows = pack_samples(samples, seq_length, pad_id, strategy=strategy)
        report.padded_tokens = len(rows) * seq_length
    elif jsonl:
        rows = samples
    else:
        rows = pad_samples(samples, seq_length, pad_id)
        report.padded_tokens = len(rows) * seq_length
    report.rows = len(rows)
    if jsonl:
        save_samples_jsonl(rows, output_path)
    else:
        write_mindrecord(rows, output_path, shard_num=shard_num, progress=progress)
    return report
