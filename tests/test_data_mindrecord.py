"""MindRecord and tokenised-JSONL writers/readers: round trip, sharded reading, atomic output."""
import json

import numpy as np
import pytest

from qwen2ms.data import (
    DataFormatError,
    iter_mindrecord,
    load_samples_jsonl,
    pack_samples,
    read_mindrecord,
    save_samples_jsonl,
    write_mindrecord,
)


def _samples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        length = int(rng.integers(2, 20))
        ids = rng.integers(0, 151646, size=length).tolist()
        labels = [-100] * (length // 2) + ids[length // 2:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_round_trip_variable_length_rows(tmp_path):
    samples = _samples(25)
    path = tmp_path / "d.mindrecord"
    written = write_mindrecord(samples, path)
    assert written == [path]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.mindrecord", "d.mindrecord.db"]
    rows = list(iter_mindrecord(path))
    assert len(rows) == 25
    for got, want in zip(rows, samples):
        assert set(got) == {"input_ids", "labels"}
        assert got["input_ids"].dtype == np.int32
        assert got["input_ids"].tolist() == want["input_ids"] and got["labels"].tolist() == want["labels"]


def test_packed_rows_round_trip_and_sharded_reading(tmp_path):
    rows = pack_samples(_samples(60, seed=1), 32, pad_token_id=151643)
    path = tmp_path / "p.mindrecord"
    files = write_mindrecord(rows, path, shard_num=2)
    assert [f.name for f in files] == ["p.mindrecord0", "p.mindrecord1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "p.mindrecord0", "p.mindrecord0.db", "p.mindrecord1", "p.mindrecord1.db"]
    everything = list(iter_mindrecord(files[0]))
    assert len(everything) == len(rows)
    key = lambda r: tuple(r["input_ids"].tolist())
    assert sorted(map(key, everything)) == sorted(map(key, rows))
    assert set(everything[0]) == {"input_ids", "labels", "position_ids", "segment_ids"}
    n = len(rows)
    parts = [list(iter_mindrecord(files[0], num_shards=3, shard_id=k)) for k in range(3)]
    seen = [key(r) for part in parts for r in part]
    # every rank gets ceil(n/3) rows (MindDataset repeats a few so ranks step together) and all rows are covered
    assert [len(p) for p in parts] == [-(-n // 3)] * 3
    assert set(seen) == set(map(key, rows)) and len(seen) - n == 3 * -(-n // 3) - n
    even = list(iter_mindrecord(files[0], num_shards=n, shard_id=0)) + list(iter_mindrecord(files[0], num_shards=n, shard_id=n - 1))
    assert len(even) == 2 and key(even[0]) != key(even[1])
    ds = read_mindrecord(files[0], columns=["input_ids"], num_shards=2, shard_id=0)
    assert ds.get_col_names() == ["input_ids"]


def test_failed_write_leaves_nothing_and_keeps_old_output(tmp_path):
    path = tmp_path / "d.mindrecord"
    write_mindrecord(_samples(3), path)
    before = path.read_bytes()
    bad = _samples(3) + [{"input_ids": [1, 2]}]
    with pytest.raises(ValueError, match="row 3 has columns"):
        write_mindrecord(bad, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.mindrecord", "d.mindrecord.db"]
    with pytest.raises(ValueError, match="no rows"):
        write_mindrecord([], tmp_path / "e.mindrecord")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_mindrecord(_samples(1), path, overwrite=False)
    with pytest.raises(FileNotFoundError, match="create it first"):
        write_mindrecord(_samples(1), tmp_path / "no" / "x.mindrecord")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.mindrecord", "d.mindrecord.db"]


def test_reader_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ending in 0"):
        read_mindrecord(tmp_path / "nope.mindrecord")
    path = tmp_path / "d.mindrecord"
    write_mindrecord(_samples(2), path)
    with pytest.raises(ValueError, match="both num_shards and shard_id"):
        read_mindrecord(path, num_shards=2)
    with pytest.raises(ValueError, match=r"shard_id must be in \[0, 2\)"):
        read_mindrecord(path, num_shards=2, shard_id=2)


def test_small_data_gives_small_files(tmp_path):
    path = tmp_path / "d.mindrecord"
    write_mindrecord(pack_samples(_samples(30), 512, 0), path)
    assert path.stat().st_size < 4 * 2**20  # the writer's defaults would give ~18-50 MB


def test_samples_jsonl_round_trip_and_errors(tmp_path):
    samples = _samples(5)
    packed = pack_samples(samples, 32, 0)
    path = tmp_path / "t.jsonl"
    assert save_samples_jsonl(samples, path) == 5
    assert load_samples_jsonl(path) == samples
    assert save_samples_jsonl(packed, path) == len(packed)
    assert load_samples_jsonl(path)[0]["segment_ids"] == packed[0]["segment_ids"].tolist()
    for line, reason in [
        ("{bad", "line 1 is not valid JSON"),
        (json.dumps({"input_ids": [1]}), "must be an object with 'input_ids' and 'labels'"),
        (json.dumps({"input_ids": [1, 2], "labels": [1]}), "'labels' has 1 entries but 'input_ids' has 2"),
        (json.dumps({"input_ids": [1, "a"], "labels": [1, 2]}), "'input_ids' must be a list of integers"),
    ]:
        path.write_text(line + "\n")
        with pytest.raises(DataFormatError, match=reason):
            load_samples_jsonl(path)
    with pytest.raises(DataFormatError, match="does not exist"):
        load_samples_jsonl(tmp_path / "missing.jsonl")
