"""hub.resolve_pretrained: local folders, bad paths and clear offline errors; atomic writes."""
import pytest

from qwen2ms.hub import HubError, atomic_write_text, resolve_pretrained


def test_local_folder_is_returned(tmp_path):
    assert resolve_pretrained(tmp_path) == tmp_path


def test_file_and_missing_path_errors(tmp_path):
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(HubError, match="is a file"):
        resolve_pretrained(f)
    with pytest.raises(HubError, match="neither an existing folder"):
        resolve_pretrained(tmp_path / "no" / "such" / "dir")


def test_empty_location_is_not_the_working_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a folder that exists: "" used to resolve to it
    for text in ("", "  "):
        with pytest.raises(HubError, match="empty"):
            resolve_pretrained(text)


def test_offline_hub_id_says_how_to_pass_a_local_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError) as e:
        resolve_pretrained("Qwen/Qwen2-0.5B-Instruct-not-cached", allow_patterns=["*.json"])
    msg = str(e.value)
    assert "Qwen/Qwen2-0.5B-Instruct-not-cached" in msg and "HF_HUB_OFFLINE" in msg and "local folder" in msg


def test_unreachable_hub_fails_fast_with_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import importlib

    import huggingface_hub.constants as c

    importlib.reload(c)  # the endpoint is read at import time
    try:
        with pytest.raises(HubError, match="could not be reached"):
            resolve_pretrained("Qwen/Qwen2-0.5B", allow_patterns=["config.json"])
    finally:
        monkeypatch.undo()
        importlib.reload(c)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    p = tmp_path / "x.txt"
    atomic_write_text(p, "héllo")
    atomic_write_text(p, "again")
    assert p.read_text(encoding="utf-8") == "again"
    assert [q.name for q in tmp_path.iterdir()] == ["x.txt"]
