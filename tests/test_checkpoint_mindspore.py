"""MindSpore checkpoints: save/load round trips (ckpt and safetensors, HF and MindFormers names), streaming I/O, errors."""
import os

import numpy as np
import pytest

import mindspore as ms
from mindspore.common import np_dtype

from qwen2ms.checkpoint.mindformers import CheckpointNamingError, hf_parameter_shapes, to_mindformers
from qwen2ms.checkpoint.mindspore import (
    MSCheckpointError,
    MSCheckpointReader,
    MSCheckpointWriter,
    SafetensorsWriter,
    cast_array,
    load_ms_checkpoint,
    save_ms_checkpoint,
    sniff_format,
)
from qwen2ms.config import Qwen2Config
from qwen2ms.dtypes import numpy_dtype

BF16 = np_dtype.bfloat16


def dense_config(**kw):
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False)
    base.update(kw)
    return Qwen2Config(**base)


def moe_config(**kw):
    base = dict(model_type="qwen2_moe", vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, num_experts=3, num_experts_per_tok=2,
                moe_intermediate_size=8, shared_expert_intermediate_size=12, mlp_only_layers=[1])
    base.update(kw)
    return Qwen2Config(**base)


def random_state(config, dtype=BF16, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32).astype(dtype)
            for k, s in hf_parameter_shapes(config).items()}


def assert_bit_exact(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert got[k].tobytes() == want[k].tobytes(), k


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
@pytest.mark.parametrize("naming,fuse", [("hf", False), ("mindformers", False), ("mindformers", True)])
@pytest.mark.parametrize("make", [dense_config, moe_config])
def test_save_load_round_trip_bf16_bit_exact(tmp_path, fmt, naming, fuse, make):
    cfg = make()
    state = random_state(cfg)
    path = tmp_path / f"model.{fmt}"
    assert save_ms_checkpoint(state, path, naming=naming, fuse_qkv=fuse, config=cfg) == path
    assert sniff_format(path) == fmt
    assert not [p for p in os.listdir(tmp_path) if p != path.name]  # no temp files left
    on_disk = ms.load_checkpoint(str(path), format=fmt)
    want_keys = set(state) if naming == "hf" else set(to_mindformers(state, cfg, fuse_qkv=fuse))
    assert set(on_disk) == want_keys
    assert all(p.dtype == ms.bfloat16 for p in on_disk.values())
    assert_bit_exact(load_ms_checkpoint(path, cfg), state)  # naming detected from the keys
    assert_bit_exact(load_ms_checkpoint(path, cfg, naming=naming), state)


def test_dtype_cast_and_ms_tensor_inputs(tmp_path):
    cfg = dense_config()
    state = random_state(cfg, np.float32)
    path = tmp_path / "m.ckpt"
    save_ms_checkpoint({k: ms.Tensor(v) for k, v in state.items()}, path, dtype="bf16")
    loaded = load_ms_checkpoint(path)
    assert all(v.dtype == BF16 for v in loaded.values())
    k = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(loaded[k], state[k].astype(BF16))
    as_f32 = load_ms_checkpoint(path, dtype=ms.float32)
    assert as_f32[k].dtype == np.float32
    np.testing.assert_array_equal(as_f32[k], state[k].astype(BF16).astype(np.float32))
    assert load_ms_checkpoint(path, dtype="fp16")[k].dtype == np.float16


def test_streaming_ckpt_writer_is_byte_identical_to_mindspore(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {"a.weight": rng.standard_normal((5, 3)).astype(np.float32),
              "b.bias": rng.standard_normal(7).astype(np.float16),
              "c.weight": rng.standard_normal((2, 2, 3)).astype(np.float32).astype(BF16),
              "d.count": np.array([3, 4], np.int64)}
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in arrays.items()], str(tmp_path / "ref.ckpt"))
    with MSCheckpointWriter(tmp_path / "ours.ckpt") as w:
        for k, v in arrays.items():
            w.add(k, v)
    assert (tmp_path / "ours.ckpt").read_bytes() == (tmp_path / "ref.ckpt").read_bytes()
    with MSCheckpointWriter(tmp_path / "ours.safetensors") as w:
        for k, v in arrays.items():
            w.add(k, v)
    loaded = ms.load_checkpoint(str(tmp_path / "ours.safetensors"), format="safetensors")
    for k, v in arrays.items():
        assert loaded[k].asnumpy().tobytes() == v.tobytes() and loaded[k].asnumpy().dtype == v.dtype


def test_reader_matches_mindspore_loader_with_slices_strings_and_crc(tmp_path):
    from mindspore.train.checkpoint_pb2 import Checkpoint

    rng = np.random.default_rng(2)
    big = rng.standard_normal((4, 6)).astype(np.float32)
    # A tensor split over two records, as save_checkpoint does above 512 MiB, and a string entry.
    msg = Checkpoint()
    for part in np.array_split(big.reshape(-1), 2):
        v = msg.value.add()
        v.tag = "big.weight"
        v.tensor.dims.extend([4, 6])
        v.tensor.tensor_type = "Float32"
        v.tensor.tensor_content = part.tobytes()
    v = msg.value.add()
    v.tag = "small.weight"
    v.tensor.dims.extend([3])
    v.tensor.tensor_type = "BFloat16"
    v.tensor.tensor_content = np.arange(3, dtype=np.float32).astype(BF16).tobytes()
    path = tmp_path / "sliced.ckpt"
    path.write_bytes(msg.SerializeToString())
    ref = ms.load_checkpoint(str(path))
    with MSCheckpointReader(path) as r:
        assert r.keys() == ["big.weight", "small.weight"]
        assert r.shape("big.weight") == (4, 6) and r.dtype("small.weight") == BF16
        for k in r.keys():
            assert r.get(k).tobytes() == ref[k].asnumpy().tobytes()

    crc = tmp_path / "crc.ckpt"
    ms.save_checkpoint([{"name": "w", "data": ms.Tensor(big)}], str(crc), crc_check=True,
                       append_dict={"epoch_num": 3, "note": "hello"})
    with MSCheckpointReader(crc) as r:
        assert "note" not in r.keys()
        np.testing.assert_array_equal(r.get("w"), big)
        assert int(r.get("epoch_num")) == 3


def test_training_checkpoint_skips_optimizer_state(tmp_path):
    cfg = dense_config()
    state = random_state(cfg, np.float32)
    mf = to_mindformers(state, cfg)
    items = [{"name": k, "data": ms.Tensor(v)} for k, v in mf.items()]
    items += [{"name": "adam_m." + k, "data": ms.Tensor(np.zeros_like(v))} for k, v in list(mf.items())[:3]]
    items += [{"name": "global_step", "data": ms.Tensor(np.array([7], np.int32))}]
    ms.save_checkpoint(items, str(tmp_path / "train.ckpt"))
    assert_bit_exact(load_ms_checkpoint(tmp_path / "train.ckpt", cfg), state)


def test_safetensors_writer_large_header_and_abort(tmp_path, monkeypatch):
    monkeypatch.setattr(SafetensorsWriter, "_RESERVE", 64)  # force the rewrite path
    from safetensors import safe_open

    arrays = {f"t{i}": np.full((i + 1,), i, np.float32) for i in range(5)}
    with SafetensorsWriter(tmp_path / "x.safetensors", {"format": "pt"}) as w:
        for k, v in arrays.items():
            w.add(k, v)
    with safe_open(str(tmp_path / "x.safetensors"), "np") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in arrays.items():
            np.testing.assert_array_equal(f.get_tensor(k), v)
    with pytest.raises(RuntimeError):
        with SafetensorsWriter(tmp_path / "y.safetensors") as w:
            w.add("a", np.ones(3, np.float32))
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors"]


def test_bad_files_give_clear_errors(tmp_path):
    cfg = dense_config()
    state = random_state(cfg)
    with pytest.raises(MSCheckpointError, match="does not exist"):
        load_ms_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(MSCheckpointError, match="folder"):
        load_ms_checkpoint(tmp_path)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(MSCheckpointError, match="empty"):
        load_ms_checkpoint(tmp_path / "empty.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(MSCheckpointError, match="neither"):
        load_ms_checkpoint(tmp_path / "junk.ckpt")
    for fmt in ("ckpt", "safetensors"):
        good = tmp_path / f"good.{fmt}"
        save_ms_checkpoint(state, good)
        cut = tmp_path / f"cut.{fmt}"
        cut.write_bytes(good.read_bytes()[:-40])
        with pytest.raises(MSCheckpointError, match="truncated"):
            load_ms_checkpoint(cut)
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}'
    (tmp_path / "badhdr.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    with pytest.raises(MSCheckpointError, match="corrupt safetensors header.*do not fit shape"):
        load_ms_checkpoint(tmp_path / "badhdr.safetensors")
    path = tmp_path / "good.ckpt"
    with pytest.raises(CheckpointNamingError, match="uses hf names"):
        load_ms_checkpoint(path, naming="mindformers")
    with pytest.raises(MSCheckpointError, match=r"missing \(12\).*\(\+2 more\).*wrong shape \(6\)"):
        load_ms_checkpoint(path, dense_config(num_hidden_layers=3, intermediate_size=20))
    partial = {k: v for k, v in state.items() if k != "model.norm.weight"}
    save_ms_checkpoint({**partial, "model.layers.0.self_attn.q_proj.weight": np.zeros((3, 3), BF16)},
                       tmp_path / "bad.ckpt")
    with pytest.raises(MSCheckpointError, match=r"missing \(1\): \['model.norm.weight'\].*q_proj.weight: \(3, 3\)"):
        load_ms_checkpoint(tmp_path / "bad.ckpt", cfg)
    with pytest.raises(MSCheckpointError, match="format"):
        save_ms_checkpoint(state, tmp_path / "x.safetensors", format="ckpt")
    with pytest.raises(MSCheckpointError, match="naming"):
        save_ms_checkpoint(state, tmp_path / "x.ckpt", naming="megatron")
    with pytest.raises(MSCheckpointError, match="dtype"):
        save_ms_checkpoint(state, tmp_path / "x.ckpt", dtype="int8")
    with pytest.raises(CheckpointNamingError, match="not Qwen2 Hugging Face"):
        save_ms_checkpoint({"transformer.wte.weight": np.zeros(2)}, tmp_path / "x.ckpt", naming="mindformers")
    with pytest.raises(MSCheckpointError, match="Qwen2ForCausalLM or a dict"):
        save_ms_checkpoint([1, 2], tmp_path / "x.ckpt")


def test_dtype_helpers(tmp_path):
    assert numpy_dtype(None) is None
    assert numpy_dtype("FP32") == np.float32 and numpy_dtype(ms.float16) == np.float16
    assert numpy_dtype(ms.bfloat16) == BF16 and numpy_dtype(np.float32) == np.float32
    with pytest.raises(MSCheckpointError, match="unknown dtype 'fp8'"):
        save_ms_checkpoint({"lm_head.weight": np.zeros((2, 2), np.float32)}, tmp_path / "x.ckpt", dtype="fp8")
    x = np.array([1.0, 1.00390625, 3.14159], np.float32)
    assert cast_array(x, None) is x
    assert cast_array(x, numpy_dtype("bf16")).tobytes() == x.astype(BF16).tobytes()
    assert cast_array(x.astype(BF16), np.dtype(np.float16)).dtype == np.float16
    ints = np.arange(3)
    assert cast_array(ints, np.dtype(np.float16)) is ints


@pytest.mark.parametrize("naming,fuse,fmt", [("hf", False, "ckpt"), ("mindformers", True, "ckpt"),
                                             ("mindformers", False, "safetensors")])
@pytest.mark.parametrize("make", [dense_config, lambda: moe_config(tie_word_embeddings=True)])
def test_model_save_checkpoint_and_from_checkpoint(tmp_path, naming, fuse, fmt, make):
    from safetensors import safe_open

    from qwen2ms.modeling.model import Qwen2ForCausalLM

    cfg = make()
    model = Qwen2ForCausalLM(cfg, dtype="bfloat16", seed=3)
    path = tmp_path / f"m.{fmt}"
    model.save_checkpoint(path, naming=naming, fuse_qkv=fuse)
    cfg.to_json(tmp_path / "config.json")
    back = Qwen2ForCausalLM.from_checkpoint(path)  # config.json next to the file
    want = {p.name: p.asnumpy() for p in model.get_parameters()}
    got = {p.name: p.asnumpy() for p in back.get_parameters()}
    assert_bit_exact(got, want)
    ids = np.array([[1, 5, 7, 30, 2]])
    np.testing.assert_array_equal(back(ids).logits.asnumpy(), model(ids).logits.asnumpy())
    # the same weights as the HF export, in the released per-expert layout
    model.save_pretrained(tmp_path / "hf")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "np") as f:
        hf = {k: f.get_tensor(k) for k in f.keys()}
    assert_bit_exact(load_ms_checkpoint(path, cfg), hf)
    as_f32 = Qwen2ForCausalLM.from_checkpoint(path, cfg, dtype="float32")
    assert all(p.dtype == ms.float32 for p in as_f32.get_parameters())


def test_from_checkpoint_errors(tmp_path):
    from qwen2ms.modeling.model import Qwen2ForCausalLM

    cfg = dense_config()
    path = tmp_path / "m.ckpt"
    Qwen2ForCausalLM(cfg, seed=1).save_checkpoint(path, naming="mindformers")
    with pytest.raises(MSCheckpointError, match="no config.json"):
        Qwen2ForCausalLM.from_checkpoint(path)
    with pytest.raises(MSCheckpointError, match=r"wrong shape"):
        Qwen2ForCausalLM.from_checkpoint(path, dense_config(hidden_size=32))
    with pytest.raises(MSCheckpointError, match="does not exist"):
        Qwen2ForCausalLM.from_checkpoint(tmp_path / "nope.ckpt", cfg)
