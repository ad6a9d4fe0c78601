"""Hostile GGUF files: each one gives a single clear CheckpointError (never another exception, never a silent load)."""
import os
import struct
import tempfile
import warnings

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from qwen2ms import CheckpointError, Qwen2ForCausalLM  # noqa: E402
from qwen2ms.checkpoint import convert_gguf  # noqa: E402
from test_gguf import Q, write_gguf  # noqa: E402
from test_modeling import make_hf  # noqa: E402

GV = gguf.GGUFValueType


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf, _ = make_hf(tmp_path_factory.mktemp("hf"), vocab_size=264, num_hidden_layers=1)
    return hf


@pytest.fixture(scope="module")
def good(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.gguf"
    write_gguf(path, tiny)
    return path.read_bytes()


_HEADER_LEN = {}


def good_header_len(data: bytes) -> int:
    """Bytes before the tensor data (metadata and tensor descriptions), as gguf's own reader finds them."""
    if len(data) not in _HEADER_LEN:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "h.gguf")
            with open(path, "wb") as f:
                f.write(data)
            _HEADER_LEN[len(data)] = gguf.GGUFReader(path).data_offset
    return _HEADER_LEN[len(data)]


def tensor_info_offset(data: bytes, name: str) -> int:
    """Byte offset of the n_dims field of tensor ``name``'s description."""
    key = struct.pack("<Q", len(name)) + name.encode()
    start = data.index(key)
    return start + len(key)


def patch_tensor(data: bytes, name: str, type_id=None, offset=None, dim0=None) -> bytes:
    pos = tensor_info_offset(data, name)
    (n_dims,) = struct.unpack_from("<I", data, pos)
    out = bytearray(data)
    if dim0 is not None:
        struct.pack_into("<Q", out, pos + 4, dim0)
    type_pos = pos + 4 + 8 * n_dims
    if type_id is not None:
        struct.pack_into("<I", out, type_pos, type_id)
    if offset is not None:
        struct.pack_into("<Q", out, type_pos + 4, offset)
    return bytes(out)


def tensor_offset(data: bytes, name: str) -> int:
    pos = tensor_info_offset(data, name)
    (n_dims,) = struct.unpack_from("<I", data, pos)
    return struct.unpack_from("<Q", data, pos + 4 + 8 * n_dims + 4)[0]


def load(path, **kw):
    with pytest.raises(CheckpointError) as info:
        Qwen2ForCausalLM.from_gguf(path, **kw)
    message = str(info.value)
    assert str(path) in message, message  # every message names the file
    return message


def test_not_a_gguf(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "random.gguf").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    for name in ("empty.gguf", "random.gguf", "model.safetensors"):
        assert "is not a GGUF file" in load(tmp_path / name)
    assert "does not exist" in load(tmp_path / "absent.gguf")
    assert "does not exist" in load(tmp_path)  # a folder


def test_wrong_architecture(tmp_path, tiny):
    write_gguf(tmp_path / "llama.gguf", tiny, arch="llama")
    assert "GGUF architecture 'llama' is not a Qwen2 model" in load(tmp_path / "llama.gguf")


def test_missing_and_mis_shaped_tensors_are_listed_together(tmp_path, tiny):
    path = tmp_path / "bad.gguf"
    write_gguf(path, tiny, drop=("blk.0.ffn_up.weight",),
               replace={"blk.0.attn_q.weight": np.zeros((64, 32), np.float32)})
    msg = load(path)
    assert "missing (1): blk.0.ffn_up.weight" in msg
    assert "shape mismatch (1): blk.0.attn_q.weight: file [64, 32] vs model [64, 64]" in msg


def test_extra_tensor_is_unexpected(tmp_path, tiny):
    path = tmp_path / "extra.gguf"
    write_gguf(path, tiny)
    data = path.read_bytes()
    # rename a real tensor to a name the model does not have: it is both unexpected and missing
    patched = data.replace(b"blk.0.ffn_up.weight", b"blk.0.ffn_xx.weight")
    path.write_bytes(patched)
    msg = load(path)
    assert "unexpected (1): blk.0.ffn_xx.weight" in msg and "missing (1): blk.0.ffn_up.weight" in msg


def test_unknown_and_unsupported_tensor_types(tmp_path, good):
    path = tmp_path / "unknown.gguf"
    path.write_bytes(patch_tensor(good, "blk.0.ffn_norm.weight", type_id=99))
    assert "unsupported tensor type" in load(path) and "blk.0.ffn_norm.weight: type id 99" in load(path)
    path.write_bytes(patch_tensor(good, "blk.0.ffn_norm.weight", type_id=int(Q.I32)))  # same size as F32
    assert "blk.0.ffn_norm.weight: I32" in load(path)


@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.3, 0.7, 0.9999])
def test_truncated_file(tmp_path, good, fraction):
    path = tmp_path / "cut.gguf"
    path.write_bytes(good[: max(8, int(len(good) * fraction))])
    msg = load(path)
    assert "truncated" in msg, msg


def test_overlapping_tensor_data(tmp_path, good):
    path = tmp_path / "overlap.gguf"
    path.write_bytes(patch_tensor(good, "blk.0.attn_k.weight", offset=tensor_offset(good, "blk.0.attn_q.weight")))
    assert "overlaps tensor" in load(path)


def test_tensor_dimension_beyond_the_file(tmp_path, good):
    path = tmp_path / "huge.gguf"
    path.write_bytes(patch_tensor(good, "token_embd.weight", dim0=1 << 40))
    assert "truncated" in load(path)


@pytest.mark.parametrize("meta,expect", [
    ({"qwen2.block_count": ("2", GV.STRING)}, "'qwen2.block_count' is STRING; expected int"),
    ({"qwen2.block_count": (10 ** 9, GV.UINT32)}, "block_count is 1000000000, but the file holds only"),
    ({"qwen2.attention.head_count": (0, GV.UINT32)}, "'qwen2.attention.head_count' is 0"),
    ({"qwen2.attention.head_count_kv": (3, GV.UINT32)}, "num_key_value_heads (3) must divide"),
    ({"qwen2.attention.layer_norm_rms_epsilon": (-1.0, GV.FLOAT32)}, "rms_norm_eps"),
    ({"qwen2.rope.scaling.type": ("longrope", GV.STRING)}, "rope scaling type 'longrope' is not supported"),
    ({"qwen2.attention.key_length": (32, GV.UINT32)}, "'qwen2.attention.key_length' is 32"),
])
def test_bad_metadata(tmp_path, tiny, meta, expect):
    path = tmp_path / "meta.gguf"
    write_gguf(path, tiny, meta=meta)  # GGUFWriter overwrites the keys it wrote itself
    msg = load(path)
    assert expect in msg, msg


def test_non_finite_weights_are_refused_unless_asked(tmp_path, tiny):
    path = tmp_path / "nan.gguf"
    bad = tiny.model.layers[0].mlp.down_proj.weight.detach().numpy().copy()
    bad[3, 5] = np.nan
    write_gguf(path, tiny, replace={"blk.0.ffn_down.weight": bad})
    assert "'blk.0.ffn_down.weight' holds NaN or Inf" in load(path)
    model = Qwen2ForCausalLM.from_gguf(path, check_finite=False)
    assert np.isnan(model.model.layers[0].mlp.down_proj.weight.asnumpy()).any()
    q8 = tmp_path / "inf_scale.gguf"
    write_gguf(q8, tiny, qtype=lambda name, arr: Q.Q8_0)
    data = bytearray(q8.read_bytes())
    start = data_offset_of(q8, "blk.0.ffn_down.weight")
    data[start:start + 2] = np.array([np.inf], np.float16).tobytes()  # the first block's scale
    q8.write_bytes(bytes(data))
    assert "non-finite Q8_0 scales" in load(q8)


def data_offset_of(path, name: str) -> int:
    """Absolute file offset of tensor ``name``'s data, as gguf's own reader finds it."""
    return next(t.data_offset for t in gguf.GGUFReader(path).tensors if t.name == name)


def test_bad_tokenizer_warns_and_loads_the_weights(tmp_path, tiny):
    path = tmp_path / "tok.gguf"
    write_gguf(path, tiny, tokenizer=False, meta={"tokenizer.ggml.model": ("llama", GV.STRING)})
    with pytest.warns(UserWarning, match="tokenizer.ggml.model is 'llama'; Qwen2 tokenizers are byte-level BPE"):
        model = Qwen2ForCausalLM.from_gguf(path)
    assert model.tokenizer is None


def test_convert_gguf_refuses_like_load(tmp_path, tiny):
    write_gguf(tmp_path / "llama.gguf", tiny, arch="llama")
    with pytest.raises(CheckpointError, match="is not a Qwen2 model"):
        convert_gguf(tmp_path / "llama.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_headers_fail_with_checkpoint_error_only(tmp_path, good, data):
    header_len = good_header_len(good)
    blob = bytearray(good)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, header_len - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(blob))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a damaged tokenizer only warns
            Qwen2ForCausalLM.from_gguf(path, ops_backend="reference")
    except CheckpointError as e:
        assert str(path) in str(e)
