"""Write tokenised SFT rows to MindRecord atomically and read them back, sharded for data parallelism."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import struct
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .convert import DataFormatError

__all__ = ["write_mindrecord", "read_mindrecord", "iter_mindrecord", "mindrecord_columns", "MindRecordError",
           "MindRecordNotFoundError"]

_SCHEMA_ORDER = ("input_ids", "labels", "attention_mask", "position_ids", "segment_ids")
SFT_COLUMNS = ("input_ids", "labels")
_REWRITE = "write it again (qwen2ms preprocess, or write_mindrecord)"


class MindRecordError(DataFormatError):
    """A MindRecord file cannot be read: the message names the file and what is wrong with it."""


class MindRecordNotFoundError(MindRecordError, FileNotFoundError):
    """A MindRecord data file or its ``.db`` index does not exist."""


def _columns(first: Dict[str, Any]) -> List[str]:
    known = [c for c in _SCHEMA_ORDER if c in first]
    return known + sorted(c for c in first if c not in _SCHEMA_ORDER)


def write_mindrecord(
    rows: Iterable[Dict[str, Sequence[int]]],
    path: Union[str, os.PathLike],
    shard_num: int = 1,
    overwrite: bool = True,
    batch_rows: int = 1024,
    progress: bool = False,
) -> List[Path]:
    """Write rows (dicts of int sequences, same keys in every row) as int32 MindRecord columns.

    MindRecord refuses files renamed after writing (the ``.db`` index records the name), so the
    files are written under their final names into a hidden temp folder next to ``path`` and then
    moved in, the file you open last (``path`` itself, or ``path + "0"`` when sharded) moved last.
    A failed write leaves no output behind.

    Args:
        rows: e.g. ``{"input_ids", "labels"}`` (+ ``attention_mask``), or packed rows with
            ``position_ids`` and ``segment_ids``.
        path: output file name, e.g. ``"alpaca.mindrecord"``.
        shard_num: number of MindRecord files (``path0..path{n-1}`` when more than 1).
        overwrite: replace existing output files; otherwise raise ``FileExistsError``.
        batch_rows: rows handed to the writer per call.
        progress: show a tqdm progress bar.

    Returns:
        The data files written (each has a ``.db`` sidecar); pass the first to :func:`read_mindrecord`.

    Example:
        >>> write_mindrecord(rows, "out/alpaca.mindrecord")  # doctest: +SKIP
        [PosixPath('out/alpaca.mindrecord')]
    """
    from mindspore.mindrecord import FileWriter

    final = Path(path)
    if not final.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(final.parent)!r} does not exist; create it first.")
    names = [final.name] if shard_num == 1 else [f"{final.name}{i}" for i in range(shard_num)]
    targets = [final.parent / n for n in names]
    if not overwrite:
        for t in targets:
            if t.exists() or Path(f"{t}.db").exists():
                raise FileExistsError(f"{str(t)!r} (or its .db) exists; pass overwrite=True or choose another path.")
    tmpdir = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmpdir, ignore_errors=True)
    tmpdir.mkdir()
    try:
        rows = list(rows)
        if not rows:
            raise ValueError("no rows to write; MindRecord needs at least one row")
        columns = _columns(rows[0])
        for i, row in enumerate(rows):
            if set(row) != set(columns):
                raise ValueError(f"row {i} has columns {sorted(row)}, expected {sorted(columns)} like row 0")
        writer = FileWriter(str(tmpdir / final.name), shard_num=shard_num, overwrite=True)
        page_size, header_size = _sizes(rows, columns)
        writer.set_page_size(page_size)
        writer.set_header_size(header_size)
        writer.add_schema({c: {"type": "int32", "shape": [-1]} for c in columns}, "qwen2ms_sft")
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(rows), desc="writing mindrecord", unit="row")
        for start in range(0, len(rows), batch_rows):
            chunk = rows[start: start + batch_rows]
            writer.write_raw_data([{c: np.asarray(r[c], dtype=np.int32).reshape(-1) for c in columns} for r in chunk])
            if bar is not None:
                bar.update(len(chunk))
        writer.commit()
        if bar is not None:
            bar.close()
        # Everything but the entry file first, so a reader never finds the entry file without its shards.
        order = [f"{n}.db" for n in names] + names[1:] + names[:1]
        for n in order:
            os.replace(tmpdir / n, final.parent / n)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return targets


def _sizes(rows: Sequence[Dict[str, Sequence[int]]], columns: Sequence[str]) -> Tuple[int, int]:
    """Page and header sizes for the writer, scaled to the data.

    The defaults (32 MiB pages, 16 MiB header) make a 31-row file weigh 18-50 MB. A page only has
    to hold the largest row (with headroom); the header indexes every page (measured: ~180 bytes
    per page is too little, ~700 enough), within the writer's limits 32 KiB..256 MiB and 16 KiB..128 MiB.
    """
    sizes = [sum(len(r[c]) for c in columns) * 4 for r in rows]
    page = 1 << 20
    while page < 4 * max(sizes) + 4096 and page < (1 << 28):
        page *= 2
    pages = sum(sizes) // page + 2
    header = 1 << 16
    while header < pages * 1024 + (1 << 16) and header < (1 << 27):
        header *= 2
    return page, header


def _header(path: Path) -> Dict[str, Any]:
    """The JSON header of one MindRecord data file, after checking the file is complete.

    A data file is an 8-byte little-endian header length, the JSON header (padded to
    ``header_size``), then its pages: every page but the last takes ``page_size`` bytes.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            raw = f.read(n) if 0 < n <= min(size - 8, 1 << 28) else b""
        header = json.loads(raw.decode("utf-8")) if raw else None
    except (OSError, UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict) or not isinstance(header.get("page"), list) or "schema" not in header:
        raise MindRecordError(f"{str(path)!r} is not a MindRecord data file ({size} bytes without a readable "
                              f"MindRecord header): the file is corrupt, truncated or of another format; {_REWRITE}")
    try:
        pages = sorted(header["page"], key=lambda pg: int(pg["page_id"]))
        expected = int(header["header_size"]) + (int(header["page_size"]) * (len(pages) - 1)
                                                 + int(pages[-1]["page_size"]) if pages else 0)
    except (KeyError, TypeError, ValueError) as e:
        raise MindRecordError(f"{str(path)!r} has a malformed MindRecord header (no {e}); {_REWRITE}") from None
    if size < expected:
        raise MindRecordError(f"{str(path)!r} is truncated: it has {size} bytes but its header describes "
                              f"{expected} ({len(pages)} pages); the copy or the write was cut short; {_REWRITE}")
    return header


def _check_index(path: Path) -> None:
    """The ``.db`` sidecar exists, is a MindRecord index, and names this file (MindRecord refuses renamed files)."""
    db = Path(f"{path}.db")
    if not db.is_file():
        raise MindRecordNotFoundError(f"the index {str(db)!r} of MindRecord file {str(path)!r} is missing: every data "
                                      f"file needs the .db written next to it (copy both together); {_REWRITE}")
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            names = [r[0] for r in con.execute("SELECT NAME FROM SHARD_NAME")]
        finally:
            con.close()
    except sqlite3.Error as e:
        raise MindRecordError(f"the index {str(db)!r} of MindRecord file {str(path)!r} is not a MindRecord index "
                              f"({e}); it is corrupt or was replaced; {_REWRITE}") from None
    if names and path.name not in names:
        raise MindRecordError(f"MindRecord file {str(path)!r} was renamed after writing: its index records the name "
                              f"{names[0]!r}, and MindSpore refuses renamed files; rename it (and its .db) back to "
                              f"{names[0]!r}, or {_REWRITE}")


def mindrecord_columns(path: Union[str, os.PathLike]) -> List[str]:
    """Check a MindRecord dataset's files and return its columns, with no MindSpore reader involved.

    Every data file of the dataset (the shards named in the header of ``path``) must exist, be
    complete, and have its ``.db`` index naming it.

    Args:
        path: a data file written by :func:`write_mindrecord` (for sharded output, any shard).

    Returns:
        The column names of the schema.

    Raises:
        MindRecordNotFoundError: a data file or its ``.db`` is missing.
        MindRecordError: a file is truncated, corrupt, renamed, or not MindRecord at all.

    Example:
        >>> mindrecord_columns("alpaca.mindrecord")  # doctest: +SKIP
        ['input_ids', 'labels', 'attention_mask']
    """
    p = Path(path)
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "does not exist"
        raise MindRecordNotFoundError(f"MindRecord file {str(p)!r} {what} (for sharded output pass the file ending "
                                      f"in 0).")
    header = _header(p)
    columns: List[str] = []
    for entry in header.get("schema") or []:
        for c in (entry.get("schema") or {}) if isinstance(entry, dict) else {}:
            if c not in columns:
                columns.append(c)
    shards = [Path(a).name for a in header.get("shard_addresses") or [p.name]]
    if p.name not in shards:
        raise MindRecordError(f"MindRecord file {str(p)!r} was renamed after writing: its header records the name(s) "
                              f"{shards}, and MindSpore refuses renamed files; rename it back or {_REWRITE}")
    for name in shards:
        shard = p.parent / name
        if shard != p:
            if not shard.is_file():
                raise MindRecordNotFoundError(f"MindRecord shard {str(shard)!r} is missing: {str(p)!r} is one of "
                                              f"{len(shards)} files {shards} that must sit in one folder")
            _header(shard)
        _check_index(shard)
    return columns


def _reader_error(files: Union[str, List[str]], e: BaseException) -> MindRecordError:
    """A MindRecordError naming the files, with the useful line of MindSpore's multi-section message."""
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= set("-")]
    reason = next((ln[len("[ERROR]"):].strip() for ln in lines if ln.startswith("[ERROR]")), lines[0] if lines else text)
    return MindRecordError(f"cannot read MindRecord {files!r}: {reason}; the file is corrupt or was changed after "
                           f"writing; {_REWRITE}")


def read_mindrecord(
    path: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    columns: Optional[Sequence[str]] = None,
    num_shards: Optional[int] = None,
    shard_id: Optional[int] = None,
    shuffle: bool = False,
    num_parallel_workers: int = 1,
) -> Any:
    """Open MindRecord rows as a ``mindspore.dataset.MindDataset``.

    The files are checked first (:func:`mindrecord_columns`), so a missing, truncated, renamed or
    foreign file is a :class:`MindRecordError` naming it rather than MindSpore's pipeline error.

    Args:
        path: the first data file written by :func:`write_mindrecord` (its sibling shards are
            found through it), or a list of files.
        columns: columns to read (default: all); each must be in the schema.
        num_shards: number of data-parallel readers. Each gets ``ceil(rows / num_shards)`` rows,
            disjoint when ``num_shards`` divides the row count; otherwise MindDataset repeats a few
            rows so that every rank runs the same number of steps.
        shard_id: this reader's index in ``[0, num_shards)``.
        shuffle: shuffle rows (seeded by ``mindspore.dataset.config.set_seed``).
        num_parallel_workers: reader threads.

    Returns:
        The ``MindDataset``.

    Raises:
        MindRecordNotFoundError: a file or its ``.db`` is missing.
        MindRecordError: a file is unreadable, or lacks a requested column.

    Example:
        >>> ds = read_mindrecord("alpaca.mindrecord", num_shards=8, shard_id=rank)  # doctest: +SKIP
        >>> for row in ds.create_dict_iterator(output_numpy=True): ...  # doctest: +SKIP
    """
    import mindspore.dataset as ds

    if (num_shards is None) != (shard_id is None):
        raise ValueError("pass both num_shards and shard_id, or neither")
    if num_shards is not None and not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, {num_shards}), got {shard_id}")
    files = [os.fspath(p) for p in path] if isinstance(path, (list, tuple)) else os.fspath(path)
    for f in files if isinstance(files, list) else [files]:
        have = mindrecord_columns(f)
        missing = [c for c in columns or () if c not in have]
        if missing:
            raise MindRecordError(f"MindRecord file {f!r} has no column(s) {missing}: its columns are {have}")
    try:
        return ds.MindDataset(
            files,
            columns_list=list(columns) if columns else None,
            num_shards=num_shards,
            shard_id=shard_id,
            shuffle=shuffle,
            num_parallel_workers=num_parallel_workers,
        )
    except RuntimeError as e:
        raise _reader_error(files, e) from e


def iter_mindrecord(
    path: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    num_shards: Optional[int] = None,
    shard_id: Optional[int] = None,
    required_columns: Sequence[str] = SFT_COLUMNS,
) -> Iterator[Dict[str, np.ndarray]]:
    """Yield the rows of a MindRecord dataset as dicts of numpy arrays, in stored order.

    Args:
        path: see :func:`read_mindrecord`.
        num_shards: see :func:`read_mindrecord`.
        shard_id: see :func:`read_mindrecord`.
        required_columns: columns the schema must have (default: the SFT columns ``input_ids``
            and ``labels``; ``()`` reads any schema).

    Yields:
        ``{column: np.ndarray}`` per row.

    Raises:
        MindRecordError: see :func:`read_mindrecord`; also a schema without ``required_columns``
            and a file that fails while its rows are read.

    Example:
        >>> rows = list(iter_mindrecord("alpaca.mindrecord"))  # doctest: +SKIP
    """
    first = os.fspath(path[0]) if isinstance(path, (list, tuple)) and path else os.fspath(path)
    have = mindrecord_columns(first)
    missing = [c for c in required_columns if c not in have]
    if missing:
        raise MindRecordError(f"MindRecord file {first!r} is not SFT training data: it lacks the column(s) {missing} "
                              f"(its columns are {have}); write it with qwen2ms preprocess or write_mindrecord from "
                              f"rows with {list(required_columns)}")
    dataset = read_mindrecord(path, num_shards=num_shards, shard_id=shard_id, shuffle=False)
    try:
        yield from dataset.create_dict_iterator(num_epochs=1, output_numpy=True)
    except RuntimeError as e:
        raise _reader_error(os.fspath(path) if not isinstance(path, (list, tuple)) else
                            [os.fspath(x) for x in path], e) from e
