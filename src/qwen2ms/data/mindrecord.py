"""Write tokenised SFT rows to MindRecord atomically and read them back, sharded for data parallelism."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["write_mindrecord", "read_mindrecord", "iter_mindrecord"]

_SCHEMA_ORDER = ("input_ids", "labels", "attention_mask", "position_ids", "segment_ids")


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


def read_mindrecord(
    path: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    columns: Optional[Sequence[str]] = None,
    num_shards: Optional[int] = None,
    shard_id: Optional[int] = None,
    shuffle: bool = False,
    num_parallel_workers: int = 1,
) -> Any:
    """Open MindRecord rows as a ``mindspore.dataset.MindDataset``.

    Args:
        path: the first data file written by :func:`write_mindrecord` (its sibling shards are
            found through it), or a list of files.
        columns: columns to read (default: all).
        num_shards: number of data-parallel readers. Each gets ``ceil(rows / num_shards)`` rows,
            disjoint when ``num_shards`` divides the row count; otherwise MindDataset repeats a few
            rows so that every rank runs the same number of steps.
        shard_id: this reader's index in ``[0, num_shards)``.
        shuffle: shuffle rows (seeded by ``mindspore.dataset.config.set_seed``).
        num_parallel_workers: reader threads.

    Returns:
        The ``MindDataset``.

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
        if not Path(f).is_file():
            raise FileNotFoundError(f"MindRecord file {f!r} does not exist (for sharded output pass the file ending in 0).")
    return ds.MindDataset(
        files,
        columns_list=list(columns) if columns else None,
        num_shards=num_shards,
        shard_id=shard_id,
        shuffle=shuffle,
        num_parallel_workers=num_parallel_workers,
    )


def iter_mindrecord(
    path: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    num_shards: Optional[int] = None,
    shard_id: Optional[int] = None,
) -> Iterator[Dict[str, np.ndarray]]:
    """Yield the rows of a MindRecord dataset as dicts of numpy arrays, in stored order.

    Args:
        path: see :func:`read_mindrecord`.
        num_shards: see :func:`read_mindrecord`.
        shard_id: see :func:`read_mindrecord`.

    Yields:
        ``{column: np.ndarray}`` per row.

    Example:
        >>> rows = list(iter_mindrecord("alpaca.mindrecord"))  # doctest: +SKIP
    """
    dataset = read_mindrecord(path, num_shards=num_shards, shard_id=shard_id, shuffle=False)
    yield from dataset.create_dict_iterator(num_epochs=1, output_numpy=True)
