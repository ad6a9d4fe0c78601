"""Hostile and broken checkpoints: no KV cache saved, atomic saves, fuzzed safetensors headers, index paths, NaN."""
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import safetensors  # noqa: E402
from safetensors.torch import load_file as torch_load, save_file as torch_save  # noqa: E402

from qwen2ms.checkpoint import CheckpointError, hf as ckpt  # noqa: E402
from qwen2ms.modeling import Qwen2ForCausalLM  # noqa: E402
from test_modeling import assert_close, hf_logits, ids_for, make_hf  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def folder_bytes(folder):
    """Every file under ``folder`` (relative path -> bytes), to compare a folder before and after."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder):
    """Staging folders or temp files of saves into ``folder``, next to it or inside it."""
    near = [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]
    inside = [p.name for p in folder.iterdir() if ".tmp-" in p.name] if folder.is_dir() else []
    return near + inside


def transformers_load(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                                     output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ 1. the KV cache is never a weight
@pytest.mark.slow
def test_save_after_generate_writes_only_weights(tmp_path):
    hf, src = make_hf(tmp_path)
    model = Qwen2ForCausalLM.from_hf(src)
    count = model.num_parameters()
    model.generate(ids_for(1, 4), max_new_tokens=3, do_sample=False)
    assert any("kv_cache" in p.name for p in model.get_parameters())  # generate() keeps its cache on the model
    assert model.num_parameters() == count
    out = tmp_path / "after_generate"
    model.save_pretrained(out)
    assert set(torch_load(str(out / "model.safetensors"))) == set(torch_load(str(src / "model.safetensors")))
    again = Qwen2ForCausalLM.from_hf(out)
    ids = ids_for(2, 6)
    ref = hf_logits(hf, ids).logits.numpy()
    assert_close(again(ids).logits, ref)
    assert_close(hf_logits(transformers_load(out), ids).logits.numpy(), ref, 1e-6)


@pytest.mark.parametrize("moe,overrides", [(False, {"tie_word_embeddings": True}), (True, {})])
def test_a_cache_held_by_the_model_is_never_exported(tmp_path, moe, overrides):
    _, src = make_hf(tmp_path, moe=moe, **overrides)
    model = Qwen2ForCausalLM.from_hf(src)
    count = model.num_parameters()
    model._generation_cache = model.new_cache(batch_size=1, max_length=8)  # what generate() does
    assert model.num_parameters() == count
    assert not any("cache" in name for name, _ in model.named_weights())
    out = tmp_path / "export"
    model.save_pretrained(out, max_shard_size="100KB")
    saved = {k for f in out.glob("*.safetensors") for k in torch_load(str(f))}
    assert saved == set(torch_load(str(src / "model.safetensors")))
    assert set(json.loads((out / ckpt.INDEX_NAME).read_text())["weight_map"]) == saved
    # The MindSpore checkpoint export takes the same list.
    from qwen2ms.checkpoint.mindspore import MSCheckpointReader

    with MSCheckpointReader(model.save_checkpoint(tmp_path / "export.ckpt")) as reader:
        assert set(reader.keys()) == saved


def test_folder_with_stale_cache_buffers_loads_with_a_warning(tmp_path):
    """Folders that the old save_pretrained wrote after generate() still load (the buffers are skipped)."""
    hf, src = make_hf(tmp_path)
    tensors = torch_load(str(src / "model.safetensors"))
    tensors["_generation_cache.kv_cache0.key.0"] = torch.zeros(1, 2, 8, 16)
    tensors["_generation_cache.kv_cache0.value.1"] = torch.zeros(1, 2, 8, 16)
    torch_save(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="2 KV cache buffers"):
        model = Qwen2ForCausalLM.from_hf(src)
    ids = ids_for(1, 5)
    assert_close(model(ids).logits, hf_logits(hf, ids).logits.numpy())


def test_lora_adapters_are_not_silently_dropped(tmp_path):
    from qwen2ms import LoraConfig, apply_lora, merge_and_unload

    _, src = make_hf(tmp_path)
    model = Qwen2ForCausalLM.from_hf(src)
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(CheckpointError, match=r"lora_A.*merge_and_unload"):
        model.save_pretrained(tmp_path / "lora")
    assert not (tmp_path / "lora").exists() and leftovers(tmp_path / "lora") == []
    merge_and_unload(model)
    model.save_pretrained(tmp_path / "lora")
    transformers_load(tmp_path / "lora")


def test_int8_quantized_model_is_refused_clearly(tmp_path):
    from qwen2ms.modeling.quantize import quantize_int8_weights

    _, src = make_hf(tmp_path)
    model = Qwen2ForCausalLM.from_hf(src)
    quantize_int8_weights(model, group_size=None)
    with pytest.raises(CheckpointError, match="is Int8.*before quantize_int8_weights"):
        model.save_pretrained(tmp_path / "int8")
    assert not (tmp_path / "int8").exists()


# ------------------------------------------------------------------ 3. atomic saves
def _sharded(tmp_path, name="out"):
    hf, src = make_hf(tmp_path)
    model = Qwen2ForCausalLM.from_hf(src)
    out = tmp_path / name
    model.save_pretrained(out, max_shard_size="60KB")
    return hf, model, out


def _fail_on(monkeypatch, name, when):
    real = getattr(ckpt, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(args)
        if when(len(calls), args):
            raise OSError(f"simulated crash in {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, name, failing)


@pytest.mark.parametrize("where", ["second shard", "config.json", "generation_config.json", "swap"])
def test_crash_mid_save_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch, where):
    _, model, out = _sharded(tmp_path)
    (out / "notes.txt").write_text("mine")
    before = folder_bytes(out)
    model.model.norm.weight.set_data(model.model.norm.weight * 2)  # the new save differs in every layout
    if where == "second shard":
        _fail_on(monkeypatch, "_write_safetensors", lambda n, a: n == 2)
    elif where == "swap":
        _fail_on(monkeypatch, "_swap_in", lambda n, a: True)
    else:
        _fail_on(monkeypatch, "atomic_write_text", lambda n, a: Path(a[0]).name == where)
    with pytest.raises(OSError, match="simulated crash"):
        model.save_pretrained(out, max_shard_size="30KB")
    assert folder_bytes(out) == before
    assert leftovers(out) == []


def test_crash_between_the_two_renames_of_the_portable_swap(tmp_path, monkeypatch):
    """Without renameat2 the swap is two renames; a failure of the second puts the old folder back."""
    _, model, out = _sharded(tmp_path)
    before = folder_bytes(out)
    monkeypatch.setattr(ckpt, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(a, b):
        if Path(b) == out.resolve() and ".tmp-" in Path(a).name:
            raise OSError("simulated crash in rename")
        return real_rename(a, b)

    monkeypatch.setattr(ckpt.os, "rename", rename)
    with pytest.raises(OSError, match="simulated crash"):
        model.save_pretrained(out)
    assert folder_bytes(out) == before and leftovers(out) == []
    monkeypatch.setattr(ckpt.os, "rename", real_rename)
    model.save_pretrained(out)  # the portable swap itself
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"] and leftovers(out) == []
    # A process killed between the renames left no folder and the old one aside: the next save restores it.
    old = tmp_path / f".out.old-{dead_pid()}-0"
    os.rename(out, old)
    assert ckpt.clean_stale_saves(out) == [] and out.is_dir() and not old.exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]


def test_killed_save_leaves_old_checkpoint_and_next_save_cleans_up(tmp_path):
    hf, model, out = _sharded(tmp_path)
    before = folder_bytes(out)
    child = textwrap.dedent(f"""
        import os, signal, sys
        from qwen2ms.checkpoint import hf as ckpt
        from qwen2ms.modeling import Qwen2ForCausalLM
        model = Qwen2ForCausalLM.from_hf({str(out)!r})
        real, calls = ckpt._write_safetensors, []
        def killed(*args):
            calls.append(args)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args)
        ckpt._write_safetensors = killed
        model.save_pretrained({str(out)!r}, max_shard_size="30KB")
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], env=dict(os.environ, GLOG_v="3"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    assert folder_bytes(out) == before  # entirely the old checkpoint
    stale = [p for p in tmp_path.iterdir() if p.name.startswith(f".out.tmp-{proc.pid}-")]
    assert len(stale) == 1 and len(list(stale[0].glob("*.safetensors"))) == 2
    # What the per-file saves of earlier versions left inside the folder (159 MB seen), and a live save's stage.
    (out / f".model-00001-of-00003.safetensors.tmp-{dead_pid()}").write_bytes(b"x" * 1000)
    live = tmp_path / f".out.tmp-{os.getppid()}-0"
    live.mkdir()
    model.save_pretrained(out)
    assert not stale[0].exists() and live.exists()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    ids = ids_for(1, 5)
    assert_close(Qwen2ForCausalLM.from_hf(out)(ids).logits, hf_logits(hf, ids).logits.numpy())


def test_saving_over_a_folder_keeps_user_files_and_replaces_checkpoint_files(tmp_path, qwen2_tokenizer_dir):
    _, model, out = _sharded(tmp_path)
    (out / "README.md").write_text("my notes")
    (out / "runs").mkdir()
    (out / "runs" / "log.txt").write_text("step 1")
    (out / "link").symlink_to("README.md")
    (out / "tokenizer.json").write_text("{}")  # an earlier tokenizer the user put there
    model.generation_config_dict = None
    model.save_pretrained(out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "link", "model.safetensors", "runs", "tokenizer.json"]
    assert (out / "README.md").read_text() == "my notes" and (out / "runs" / "log.txt").read_text() == "step 1"
    assert os.readlink(out / "link") == "README.md"
    # A model with a tokenizer replaces every tokenizer file: no stale tokenizer.json beside the new vocab.
    from qwen2ms import Qwen2Tokenizer

    model.tokenizer = Qwen2Tokenizer.from_pretrained(qwen2_tokenizer_dir)
    model.save_pretrained(out)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["README.md", "config.json", "link", "merges.txt", "model.safetensors", "runs",
                     "tokenizer_config.json", "vocab.json"]


def test_save_into_a_mount_point_the_working_directory_or_through_a_symlink(tmp_path, monkeypatch):
    _, model, out = _sharded(tmp_path)
    (out / "keep.txt").write_text("k")
    real = os.path.ismount
    monkeypatch.setattr(ckpt.os.path, "ismount", lambda p: Path(p) == out.resolve() or real(p))
    model.save_pretrained(out)  # no sibling to swap with: files are staged inside and moved one by one
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "keep.txt",
                                                     "model.safetensors"]
    monkeypatch.setattr(ckpt.os.path, "ismount", real)
    monkeypatch.chdir(out)
    model.save_pretrained(".", max_shard_size="60KB")  # swapping the working directory would orphan it
    assert Path.cwd() == out.resolve() and Path(os.getcwd()).is_dir() and (out / ckpt.INDEX_NAME).is_file()
    assert not (out / "model.safetensors").exists() and (out / "keep.txt").is_file()
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(out)
    model.save_pretrained(link)
    assert link.is_symlink() and (out / "model.safetensors").is_file() and (out / "keep.txt").is_file()
    assert not (out / ckpt.INDEX_NAME).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        model.save_pretrained(tmp_path / "file")


# ------------------------------------------------------------------ 4. safetensors headers
def _st_file(path, header, data, raw=None):
    raw = json.dumps(header).encode() if raw is None else raw
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_aliased_tensor_offsets_are_refused(tmp_path):
    """o_proj pointing at q_proj's bytes (same shape) loaded q_proj's values as o_proj's."""
    _, src = make_hf(tmp_path)
    path = src / "model.safetensors"
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    header[o]["data_offsets"] = header[q]["data_offsets"]
    _st_file(path, header, blob[8 + n:])
    with pytest.raises(safetensors.SafetensorError):
        safetensors.deserialize(path.read_bytes())
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: tensors '{o}' .* and '{q}' .* overlap"):
        Qwen2ForCausalLM.from_hf(src)


def test_gap_and_trailing_bytes_are_refused(tmp_path):
    f = tmp_path / "x.safetensors"
    _st_file(f, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"no tensor holds data bytes \[0, 4\) before tensor 'a'"):
        ckpt.read_safetensors_header(f)
    _st_file(f, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9)
    with pytest.raises(CheckpointError, match="5 bytes after its last tensor"):
        ckpt.read_safetensors_header(f)
    f.write_bytes(struct.pack("<Q", 100_000_001) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds the safetensors limit"):
        ckpt.read_safetensors_header(f)


ST_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32", "U64"]
ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "U16": 2, "U32": 4, "U64": 8}
# Dtypes the safetensors library knows and qwen2ms does not read (numpy has no such type).
LIBRARY_ONLY = ["F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "C64"]
ODD = st.sampled_from([-1, -0.0, 1.0, 2.5, True, None, "2", [1], {"a": 1}, 2 ** 64, 2 ** 63 - 1, 10 ** 30])


@st.composite
def headers(draw):
    """A valid header of 1-4 tensors with 0-3 corruptions; returns (header bytes, data length, length field)."""
    entries, offset = [], 0
    for i in range(draw(st.integers(1, 4))):
        dtype = draw(st.sampled_from(ST_DTYPES))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        nbytes = int(np.prod(shape, dtype=np.int64)) * ITEMSIZE[dtype]
        entries.append([f"t{i}", {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}])
        offset += nbytes
    data_len, metadata, pad, length_delta = offset, None, b"", 0
    for kind in draw(st.lists(st.sampled_from(
            ["alias", "offset", "shape", "dtype", "drop", "extra", "entry", "metadata", "data_len", "dup",
             "offsets_len", "shuffle", "pad", "length"]), max_size=3)):
        name, entry = entries[draw(st.integers(0, len(entries) - 1))]
        if not isinstance(entry, dict):
            continue
        if kind == "alias":
            other = draw(st.sampled_from([e for _, e in entries if isinstance(e, dict)]))
            if "data_offsets" in other:
                entry["data_offsets"] = list(other["data_offsets"])
        elif kind == "offset" and isinstance(entry.get("data_offsets"), list) and entry["data_offsets"]:
            i = draw(st.integers(0, len(entry["data_offsets"]) - 1))
            entry["data_offsets"][i] = draw(st.one_of(st.integers(-2, data_len + 4), ODD))
        elif kind == "shape" and isinstance(entry.get("shape"), list):
            entry["shape"] = draw(st.one_of(ODD, st.lists(st.one_of(st.integers(-1, 5), ODD), max_size=3)))
        elif kind == "dtype":
            entry["dtype"] = draw(st.sampled_from(LIBRARY_ONLY + ["f32", "F33", "", 5, None, ["F32"]]))
        elif kind == "drop":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif kind == "extra":
            entry["extra"] = draw(st.one_of(ODD, st.text(max_size=3)))
        elif kind == "entry":
            entries[[n for n, _ in entries].index(name)][1] = draw(ODD)
        elif kind == "metadata":
            metadata = draw(st.sampled_from([{"format": "pt"}, {"a": 1}, [], None, "x", {"a": None}]))
            entries.insert(0, ["__metadata__", metadata])
        elif kind == "data_len":
            data_len = max(0, data_len + draw(st.integers(-3, 3)))
        elif kind == "dup":
            entries.append([name, json.loads(json.dumps(entry))])
        elif kind == "offsets_len" and isinstance(entry.get("data_offsets"), list):
            entry["data_offsets"] = entry["data_offsets"][: draw(st.integers(0, 1))] + \
                draw(st.lists(st.integers(0, 8), max_size=2))
        elif kind == "shuffle":
            entries = draw(st.permutations(entries))
        elif kind == "pad":
            pad = draw(st.sampled_from([b"   ", b"\t\n", b"\0\0", b" x"]))
        elif kind == "length":
            length_delta = draw(st.integers(-3, 3))
    raw = ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in entries) + "}").encode() + pad
    return raw, data_len, len(raw) + length_delta


def _ours(blob):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.safetensors"
        path.write_bytes(blob)
        try:
            return ckpt.read_safetensors_header(path)[0], None
        except CheckpointError as e:
            assert str(path) in str(e), e  # the message names the file
            return None, e


@FUZZ
@given(headers())
def test_fuzzed_headers_fail_cleanly_and_agree_with_the_safetensors_library(case):
    raw, data_len, length = case
    blob = struct.pack("<Q", max(0, length)) + raw + (bytes(range(251)) * (data_len // 251 + 1))[:data_len]
    ours, err = _ours(blob)  # never an exception other than CheckpointError
    try:
        theirs = {name: info for name, info in safetensors.deserialize(blob)}
    except safetensors.SafetensorError:
        theirs = None
    if theirs is None:
        assert err is not None, "qwen2ms accepted a header that the safetensors library refuses"
    elif err is not None:
        # Stricter only where qwen2ms cannot represent the file: a dtype numpy lacks, or a name given twice.
        assert "unsupported dtype" in str(err) or "appears twice" in str(err), err
    else:
        assert sorted(ours) == sorted(theirs)
        for name, info in ours.items():
            assert info.dtype == theirs[name]["dtype"] and list(info.shape) == theirs[name]["shape"]
            assert blob[info.start:info.start + info.nbytes] == bytes(theirs[name]["data"])


@FUZZ
@given(st.binary(max_size=80), st.integers(0, 100))
def test_random_bytes_never_crash_the_header_reader(raw, data_len):
    blob = struct.pack("<Q", len(raw)) + raw + bytes(data_len)
    _ours(blob)
    _ours(raw)  # no length prefix at all


def test_convert_validates_headers_too(tmp_path):
    from qwen2ms.checkpoint.convert import convert
    from qwen2ms.checkpoint.mindspore import MSCheckpointError

    _, src = make_hf(tmp_path)
    path = src / "model.safetensors"
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    k, v = "model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.weight"
    header[v]["data_offsets"] = header[k]["data_offsets"]
    _st_file(path, header, blob[8 + n:])
    with pytest.raises(MSCheckpointError, match="overlap"):
        convert(src, tmp_path / "out.ckpt", to="ms", verbose=False)
    assert not (tmp_path / "out.ckpt").exists()


# ------------------------------------------------------------------ 5. index shard names
def _sharded_src(tmp_path):
    hf, _ = make_hf(tmp_path)
    src = tmp_path / "sharded"
    hf.save_pretrained(src, max_shard_size="50KB")
    index = json.loads((src / ckpt.INDEX_NAME).read_text())
    return hf, src, index


def _rename_shard(src, index, old, new):
    index["weight_map"] = {k: (new if v == old else v) for k, v in index["weight_map"].items()}
    (src / ckpt.INDEX_NAME).write_text(json.dumps(index))


def test_index_cannot_name_files_outside_the_folder(tmp_path):
    from qwen2ms.checkpoint.convert import ConvertError, convert

    _, src, index = _sharded_src(tmp_path)
    first = sorted(set(index["weight_map"].values()))[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(src / first, elsewhere / first)
    current = first
    for name in (f"../elsewhere/{first}", str(elsewhere / first)):
        _rename_shard(src, index, current, name)
        current = name
        with pytest.raises(CheckpointError, match=f"shard file '{re.escape(name)}'.*(outside the checkpoint "
                                                  "folder|absolute path)"):
            Qwen2ForCausalLM.from_hf(src)
        with pytest.raises(ConvertError, match="outside the checkpoint folder|absolute path"):
            convert(src, tmp_path / "out.ckpt", to="ms", verbose=False)
    # A symlink inside the folder that leads out of it is refused the same way.
    (src / first).symlink_to(elsewhere / first)
    _rename_shard(src, index, current, first)
    with pytest.raises(CheckpointError, match="symlink that leads outside"):
        Qwen2ForCausalLM.from_hf(src)
    # Inside the folder (even through a subfolder and "..") is fine.
    (src / first).unlink()
    (src / "sub").mkdir()
    shutil.move(elsewhere / first, src / "sub" / first)
    _rename_shard(src, index, first, f"sub/../sub/{first}")
    Qwen2ForCausalLM.from_hf(src)


def test_index_naming_a_missing_shard_or_garbage(tmp_path):
    _, src, index = _sharded_src(tmp_path)
    first = sorted(set(index["weight_map"].values()))[0]
    _rename_shard(src, index, first, "model-00009-of-00009.safetensors")
    with pytest.raises(CheckpointError, match=r"not in .*\['model-00009-of-00009.safetensors'\]"):
        Qwen2ForCausalLM.from_hf(src)
    for bad in ({"weight_map": {"a": 5}}, {"weight_map": {"a": ""}}, {"weight_map": []}, [], {"x": 1}):
        (src / ckpt.INDEX_NAME).write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="index"):
            Qwen2ForCausalLM.from_hf(src)


def test_hub_snapshot_symlinks_into_the_blob_store_are_allowed(tmp_path):
    hf, src, index = _sharded_src(tmp_path)
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    ids = ids_for(1, 5)
    assert_close(Qwen2ForCausalLM.from_hf(snapshot)(ids).logits, hf_logits(hf, ids).logits.numpy())


# ------------------------------------------------------------------ 6. NaN / Inf weights
@pytest.mark.parametrize("dtype,bad", [(torch.float32, float("nan")), (torch.bfloat16, float("inf")),
                                       (torch.float16, float("-inf"))])
def test_nonfinite_weights_are_refused_unless_asked(tmp_path, dtype, bad):
    hf, src = make_hf(tmp_path)
    tensors = {k: v.to(dtype) for k, v in torch_load(str(src / "model.safetensors")).items()}
    key = "model.layers.1.mlp.down_proj.weight"
    tensors[key][3, 5] = bad
    torch_save(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    where = re.escape(f"tensor '{key}' in {src / 'model.safetensors'} ({bad} at flat index {3 * 96 + 5} ")
    with pytest.raises(CheckpointError, match=rf"{where}.*check_finite=False"):
        Qwen2ForCausalLM.from_hf(src)
    model = Qwen2ForCausalLM.from_hf(src, check_finite=False)
    value = float(model.parameters_dict()[key].asnumpy().astype(np.float32)[3, 5])
    assert (np.isnan(value) and np.isnan(bad)) or value == bad


def test_narrowing_cast_overflow_is_refused(tmp_path):
    _, src = make_hf(tmp_path)
    tensors = torch_load(str(src / "model.safetensors"))
    tensors["model.norm.weight"][7] = 1e6  # finite in float32, +inf in float16
    torch_save(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    Qwen2ForCausalLM.from_hf(src)
    Qwen2ForCausalLM.from_hf(src, dtype="bfloat16")
    with pytest.raises(CheckpointError, match="'model.norm.weight'.*overflows F16 when cast from the file's F32"):
        Qwen2ForCausalLM.from_hf(src, dtype="float16")
    Qwen2ForCausalLM.from_hf(src, dtype="float16", check_finite=False)


@FUZZ
@given(st.sampled_from(["F64", "F32", "F16", "BF16"]), st.integers(0, 3000),
       st.lists(st.tuples(st.integers(0, 2999), st.sampled_from([np.nan, np.inf, -np.inf, 6e4, 3e38, -0.0])),
                max_size=3))
def test_first_nonfinite_agrees_with_numpy(st_dtype, size, values):
    np_dtype = ckpt._ST_DTYPES[st_dtype][0]
    wide = np.random.default_rng(size).standard_normal(size).astype(np.float32)
    for i, v in values:
        if i < size:
            wide[i] = v
    with np.errstate(over="ignore"):
        arr = wide.astype(np_dtype)
    bad = np.flatnonzero(~np.isfinite(arr.astype(np.float64)))
    chunk, ckpt._FINITE_CHUNK = ckpt._FINITE_CHUNK, 256  # several chunks per tensor
    try:
        assert ckpt.first_nonfinite(arr.reshape(-1, 1), st_dtype) == (int(bad[0]) if bad.size else None)
    finally:
        ckpt._FINITE_CHUNK = chunk
    assert ckpt.first_nonfinite(arr, "I32") is None


def test_mindspore_checkpoints_and_conversion_refuse_nonfinite_weights(tmp_path):
    from qwen2ms.checkpoint.convert import convert
    from qwen2ms.checkpoint.mindspore import MSCheckpointError, load_ms_checkpoint

    _, src = make_hf(tmp_path)
    key = "model.layers.0.self_attn.v_proj.bias"
    tensors = torch_load(str(src / "model.safetensors"))
    tensors[key][2] = float("nan")
    torch_save(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MSCheckpointError, match=rf"tensor '{re.escape(key)}' in .*model.safetensors \(nan"):
        convert(src, tmp_path / "ms" / "model.ckpt", to="ms", verbose=False)
    assert not (tmp_path / "ms" / "model.ckpt").exists()
    convert(src, tmp_path / "ms" / "model.ckpt", to="ms", verbose=False, check_finite=False)
    ckpt_file = tmp_path / "ms" / "model.ckpt"
    for load in (lambda **kw: Qwen2ForCausalLM.from_checkpoint(ckpt_file, **kw),
                 lambda **kw: load_ms_checkpoint(ckpt_file, **kw)):
        with pytest.raises(MSCheckpointError, match=rf"tensor '{re.escape(key)}' in {re.escape(str(ckpt_file))}.*"
                                                    "check_finite=False"):
            load()
        load(check_finite=False)
    with pytest.raises(MSCheckpointError, match="not finite"):
        convert(ckpt_file, tmp_path / "back", to="hf", verbose=False)
    assert not (tmp_path / "back").exists() and leftovers(tmp_path / "back") == []


def test_conversion_to_hf_is_atomic_and_keeps_user_files(tmp_path, monkeypatch):
    from qwen2ms.checkpoint import convert as convert_module

    hf, src = make_hf(tmp_path)
    ckpt_file = tmp_path / "model.ckpt"
    convert_module.convert(src, ckpt_file, to="ms", verbose=False)
    out = tmp_path / "hf_out"
    convert_module.convert(ckpt_file, out, to="hf", max_shard_size="60KB", verbose=False)
    (out / "notes.txt").write_text("mine")
    before = folder_bytes(out)
    real, calls = convert_module.read_checked, []

    def failing(*args, **kwargs):
        calls.append(args)
        if len(calls) == 10:
            raise OSError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(convert_module, "read_checked", failing)
    with pytest.raises(OSError, match="simulated crash"):
        convert_module.convert(ckpt_file, out, to="hf", verbose=False)
    assert folder_bytes(out) == before and leftovers(out) == []
    monkeypatch.setattr(convert_module, "read_checked", real)
    summary = convert_module.convert(ckpt_file, out, to="hf", verbose=False)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "notes.txt"]
    assert sorted(summary.files) == sorted(out / n for n in ("model.safetensors", "config.json",
                                                               "generation_config.json"))
    ids = ids_for(1, 5)
    assert_close(hf_logits(transformers_load(out), ids).logits.numpy(), hf_logits(hf, ids).logits.numpy(), 1e-6)
