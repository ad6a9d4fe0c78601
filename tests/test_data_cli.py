"""End-to-end `qwen2ms alpaca-convert` and `qwen2ms preprocess` on the bundled alpaca sample."""
import json
from pathlib import Path

import numpy as np

from qwen2ms.cli import main
from qwen2ms.data import IGNORE_INDEX, iter_mindrecord, load_records, load_samples_jsonl

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "alpaca_sample.json"
IM_END = 151645


def test_alpaca_convert_cli(tmp_path, capsys):
    out = tmp_path / "chat.jsonl"
    assert main(["alpaca-convert", "--data-path", str(SAMPLE), "--output-path", str(out)]) == 0
    n = len(load_records(SAMPLE))
    assert f"records: {n}, converted: {n}, skipped: 0" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == n and all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in rows)

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": ""}]))
    assert main(["alpaca-convert", "--data-path", str(bad), "--output-path", str(out), "--no-system-prompt"]) == 0
    assert "skipped record 1: empty output" in capsys.readouterr().out
    assert [m["role"] for m in json.loads(out.read_text())["messages"]] == ["user", "assistant"]
    strict_out = tmp_path / "strict.jsonl"
    assert main(["alpaca-convert", "--data-path", str(bad), "--output-path", str(strict_out), "--strict"]) == 2
    assert "record 1: empty output" in capsys.readouterr().err and not strict_out.exists()


def test_preprocess_cli_packed_mindrecord(tmp_path, capsys, qwen2_tokenizer_dir):
    out = tmp_path / "sample.mindrecord"
    argv = ["preprocess", "--input", str(SAMPLE), "--tokenizer", str(qwen2_tokenizer_dir),
            "--seq-length", "256", "--output", str(out), "--packing", "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    n = len(load_records(SAMPLE))
    for key in (f"records: {n}", f"samples: {n}", "tokens: ", "truncated: 0", "dropped: 0", "packing efficiency: "):
        assert key in text
    efficiency = float(text.split("packing efficiency: ")[1].split()[0])
    rows = list(iter_mindrecord(out))
    assert f"rows: {len(rows)}" in text and len(rows) < n / 3
    real = sum(int((r["segment_ids"] > 0).sum()) for r in rows)
    assert abs(efficiency - real / (len(rows) * 256)) < 1e-4 and efficiency > 0.9
    assert sum(int(r["segment_ids"].max()) for r in rows) == n
    ends = sum(int(((r["input_ids"] == IM_END) & (r["labels"] == IM_END)).sum()) for r in rows)
    assert ends == n  # exactly one trained <|im_end|> per single-turn sample


def test_preprocess_cli_truncate_drop_and_jsonl(tmp_path, capsys, qwen2_tokenizer_dir):
    mr = tmp_path / "padded.mindrecord"
    base = ["preprocess", "--input", str(SAMPLE), "--tokenizer", str(qwen2_tokenizer_dir), "--seq-length", "40", "--no-progress"]
    assert main(base + ["--output", str(mr), "--truncate"]) == 0
    text = capsys.readouterr().out
    truncated = int(text.split("truncated: ")[1].split()[0])
    assert truncated > 0
    rows = list(iter_mindrecord(mr))
    assert set(rows[0]) == {"input_ids", "labels", "attention_mask"} and all(r["input_ids"].shape == (40,) for r in rows)
    assert all((r["labels"][r["attention_mask"] == 0] == IGNORE_INDEX).all() for r in rows)

    js = tmp_path / "drop.jsonl"
    assert main(base + ["--output", str(js), "--drop-long", "--only-last-turn"]) == 0
    text = capsys.readouterr().out
    assert "truncated: 0" in text
    dropped = int(text.split("dropped: ")[1].split()[0])
    samples = load_samples_jsonl(js)
    assert dropped >= truncated and len(samples) + dropped == len(load_records(SAMPLE))
    assert all(len(s["input_ids"]) <= 40 and set(s) == {"input_ids", "labels"} for s in samples)
    assert np.mean([len(s["input_ids"]) for s in samples]) < 40


def test_preprocess_cli_reports_bad_input(tmp_path, capsys, qwen2_tokenizer_dir):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "output": ""}]))
    rc = main(["preprocess", "--input", str(bad), "--tokenizer", str(qwen2_tokenizer_dir), "--seq-length", "64",
               "--output", str(tmp_path / "x.mindrecord"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "no usable sample" in err and "empty output" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json"]


def test_convert_then_preprocess_equals_direct_preprocess(tmp_path, capsys, qwen2_tokenizer_dir):
    chat = tmp_path / "chat.jsonl"
    assert main(["alpaca-convert", "--data-path", str(SAMPLE), "--output-path", str(chat)]) == 0
    common = ["--tokenizer", str(qwen2_tokenizer_dir), "--seq-length", "128", "--no-progress"]
    assert main(["preprocess", "--input", str(SAMPLE), "--output", str(tmp_path / "a.jsonl")] + common) == 0
    assert main(["preprocess", "--input", str(chat), "--output", str(tmp_path / "b.jsonl")] + common) == 0
    a, b = load_samples_jsonl(tmp_path / "a.jsonl"), load_samples_jsonl(tmp_path / "b.jsonl")
    assert a == b and len(a) == len(load_records(SAMPLE))


def test_preprocess_cli_bad_tokenizer_folder(tmp_path, capsys):
    rc = main(["preprocess", "--input", str(SAMPLE), "--tokenizer", str(tmp_path), "--output", str(tmp_path / "x.mindrecord")])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot load the tokenizer" in err and str(tmp_path) in err
