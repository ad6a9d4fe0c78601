"""Conversion of alpaca / ShareGPT / messages records to chat-message JSONL, and the bad-record report."""
import json
from pathlib import Path

import pytest

from qwen2ms.data import (
    DEFAULT_SYSTEM_PROMPT,
    DataFormatError,
    convert_file,
    convert_records,
    load_records,
    record_to_messages,
)

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "alpaca_sample.json"


def _roles(messages):
    return [m["role"] for m in messages]


def test_alpaca_instruction_and_input_joined_with_blank_line():
    m = record_to_messages({"instruction": "Summarise.", "input": "Long text.", "output": "Short."})
    assert m == [
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
        {"role": "user", "content": "Summarise.\n\nLong text."},
        {"role": "assistant", "content": "Short."},
    ]


def test_alpaca_without_input_field_or_blank_input():
    a = record_to_messages({"instruction": "Say hi.", "output": "Hi!"})
    b = record_to_messages({"instruction": "Say hi.", "input": "  ", "output": "Hi!"})
    assert a == b and a[1]["content"] == "Say hi."


def test_empty_instruction_uses_input_alone():
    m = record_to_messages({"instruction": "", "input": "What is 2+2?", "output": "4"})
    assert m[1] == {"role": "user", "content": "What is 2+2?"}


def test_system_prompt_configurable_omittable_and_per_record():
    rec = {"instruction": "Q", "output": "A"}
    assert record_to_messages(rec, system_prompt="Be brief.")[0] == {"role": "system", "content": "Be brief."}
    assert _roles(record_to_messages(rec, system_prompt=None)) == ["user", "assistant"]
    own = dict(rec, system="You are a pirate.")
    assert record_to_messages(own, system_prompt=None)[0]["content"] == "You are a pirate."


def test_sharegpt_multi_turn_and_role_names():
    rec = {"conversations": [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "Hi"},
        {"from": "gpt", "value": "Hello"},
        {"from": "user", "value": "Again"},
        {"from": "assistant", "value": "Sure"},
    ]}
    m = record_to_messages(rec)
    assert _roles(m) == ["system", "user", "assistant", "user", "assistant"]
    assert [x["content"] for x in m] == ["S", "Hi", "Hello", "Again", "Sure"]


def test_messages_style_kept_and_system_added_when_missing():
    rec = {"messages": [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"},
                        {"role": "user", "content": "3"}, {"role": "assistant", "content": "4"}]}
    m = record_to_messages(rec)
    assert _roles(m) == ["system", "user", "assistant", "user", "assistant"]
    with_system = {"messages": [{"role": "system", "content": "own"}] + rec["messages"]}
    assert record_to_messages(with_system)[0]["content"] == "own"


BAD = [
    ({"input": "x", "output": "y"}, "missing field 'instruction'"),
    ({"instruction": "x"}, "missing field 'output'"),
    ({"instruction": 3, "output": "y"}, "'instruction' must be a string"),
    ({"instruction": "x", "output": ["y"]}, "'output' must be a string"),
    ({"instruction": "x", "input": None, "output": "y"}, "'input' must be a string"),
    ({"instruction": "x", "output": "   "}, "empty output"),
    ({"instruction": "", "input": "", "output": "y"}, "both 'instruction' and 'input' are empty"),
    ({"instruction": "x", "output": "y", "system": 1}, "'system' must be a string"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "tool", "value": "b"}]}, "unknown role 'tool'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}, "unknown role 'bot'"),
    ({"messages": "hello"}, "must be a list of turns"),
    ({"messages": ["hello"]}, "messages[0] must be an object"),
    ({"messages": [{"role": "user"}]}, "messages[0] is missing 'content'"),
    ({"conversations": [{"value": "a"}]}, "conversations[0] is missing 'from'"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "where 'user' was expected"),
    ({"messages": [{"role": "user", "content": "a"}]}, "does not end with an assistant reply"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, "does not end with an assistant reply"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "b"}]}, "has role 'system' where 'assistant' was expected"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "'user' where 'assistant'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}, "has empty content"),
    ({"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}]}, "has empty content"),
    ({"messages": []}, "no user/assistant turns"),
    ({"question": "a", "answer": "b"}, "unrecognised record"),
    (["instruction", "output"], "must be a JSON object"),
    ("just text", "must be a JSON object"),
]


@pytest.mark.parametrize("record,reason", BAD, ids=[r for _, r in BAD])
def test_every_bad_record_is_skipped_with_index_and_reason(record, reason):
    good = {"instruction": "ok", "output": "fine"}
    rows, report = convert_records([good, record, good])
    assert report.total == 3 and report.converted == 2 and len(rows) == 2
    assert len(report.skipped) == 1
    index, why = report.skipped[0]
    assert index == 1 and reason in why
    with pytest.raises(DataFormatError, match=r"record 1: .*" + __import__("re").escape(reason)):
        convert_records([good, record, good], strict=True)


def test_report_summary_lists_skipped():
    _, report = convert_records([{"instruction": "a", "output": ""}] * 12 + [{"instruction": "a", "output": "b"}])
    text = report.summary(max_listed=3)
    assert "records: 13, converted: 1, skipped: 12" in text
    assert "skipped record 2: empty output" in text and "... and 9 more" in text


def test_load_json_array_with_bom_and_crlf_and_unicode(tmp_path):
    records = [{"instruction": "翻译成英文：\r\n你好", "input": "", "output": "Hello 👋\r\nbye"}]
    body = json.dumps(records, ensure_ascii=False, indent=1).replace("\n", "\r\n")
    path = tmp_path / "a.json"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    loaded = load_records(path)
    assert loaded == records
    out = tmp_path / "out.jsonl"
    report = convert_file(path, out)
    assert report.converted == 1
    line = out.read_text(encoding="utf-8").splitlines()
    assert len(line) == 1
    msgs = json.loads(line[0])["messages"]
    assert msgs[1]["content"] == "翻译成英文：\r\n你好" and msgs[2]["content"] == "Hello 👋\r\nbye"
    assert "你好" in out.read_text(encoding="utf-8")  # non-ASCII kept readable, not \u-escaped


def test_load_jsonl_with_crlf_blank_lines_and_a_broken_line(tmp_path):
    lines = [json.dumps({"instruction": "a", "output": "b"}), "", "{not json", json.dumps({"instruction": "c", "output": "d"})]
    path = tmp_path / "a.jsonl"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8"))
    rows, report = convert_records(load_records(path))
    assert [r["messages"][1]["content"] for r in rows] == ["a", "c"]
    assert report.skipped[0][0] == 1 and "line 3 is not valid JSON" in report.skipped[0][1]


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist"):
        load_records(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"instruction": "a",', encoding="utf-8")
    with pytest.raises(DataFormatError, match="bad.json.*not valid JSON"):
        load_records(bad)
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"instruction": "a", "output": "b"}, indent=2))
    with pytest.raises(DataFormatError, match="one JSON object spread over several lines"):
        load_records(one)
    latin = tmp_path / "latin.json"
    latin.write_bytes('[{"instruction": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(DataFormatError, match="not UTF-8"):
        load_records(latin)


def test_strict_file_conversion_writes_nothing(tmp_path):
    src = tmp_path / "a.json"
    src.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": ""}]))
    out = tmp_path / "out.jsonl"
    with pytest.raises(DataFormatError, match="record 1: empty output"):
        convert_file(src, out, strict=True)
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_existing_output_replaced_only_when_complete(tmp_path):
    src = tmp_path / "a.json"
    src.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    convert_file(src, out)
    assert json.loads(out.read_text())["messages"][-1]["content"] == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "out.jsonl"]


def test_bundled_sample_converts_cleanly(tmp_path):
    records = load_records(SAMPLE)
    assert 200 <= len(records) <= 1000
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)
    assert any(not r["instruction"] for r in records)
    assert any("\n" in r["output"] for r in records) and any("```python" in r["output"] for r in records)
    assert any(any("\u4e00" <= ch <= "\u9fff" for ch in r["output"]) for r in records)
    report = convert_file(SAMPLE, tmp_path / "s.jsonl")
    assert report.converted == len(records) and not report.skipped
