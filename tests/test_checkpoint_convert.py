"""Streaming conversion HF folder <-> MindSpore checkpoint: exact round trips checked with transformers, the CLI, errors."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import mindspore as ms  # noqa: E402
from safetensors import safe_open  # noqa: E402

from qwen2ms.checkpoint.convert import ConvertError, convert, parse_size  # noqa: E402
from qwen2ms.checkpoint.mindformers import CheckpointNamingError  # noqa: E402
from qwen2ms.checkpoint.mindspore import MSCheckpointError, load_ms_checkpoint  # noqa: E402
from qwen2ms.cli import main  # noqa: E402
from qwen2ms.hub import HubError  # noqa: E402

DENSE = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
MOE = dict(DENSE, num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
           shared_expert_intermediate_size=12, mlp_only_layers=[1])
IDS = torch.tensor([[3, 17, 42, 5, 9, 60, 1, 2]])


def write_hf(folder, moe=False, tie=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    if moe:
        cfg = transformers.Qwen2MoeConfig(**MOE, tie_word_embeddings=tie)
        model = transformers.Qwen2MoeForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**DENSE, tie_word_embeddings=tie)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # HF inits biases to zero; random ones make the q/k/v order visible
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    model = model.to(dtype).eval()
    model.save_pretrained(folder)
    return model


def tensors(folder):
    out = {}
    names = [n for n in os.listdir(folder) if n.endswith(".safetensors")]
    for name in names:
        with safe_open(os.path.join(folder, name), "np") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def assert_identical(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def logits(folder_or_model):
    model = folder_or_model
    if not isinstance(model, torch.nn.Module):
        model = transformers.AutoModelForCausalLM.from_pretrained(folder_or_model, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.mark.parametrize("naming,fuse,fmt", [("mindformers", True, "ckpt"), ("mindformers", False, "safetensors"),
                                             ("hf", False, "ckpt")])
def test_dense_round_trip_identical_and_transformers_reloads(tmp_path, naming, fuse, fmt, capsys):
    model = write_hf(tmp_path / "hf")
    ms_file = tmp_path / "ms" / f"qwen2.{fmt}"
    s1 = convert(tmp_path / "hf", ms_file, to="ms", naming=naming, fuse_qkv=fuse)
    assert s1.line() in capsys.readouterr().out
    assert (tmp_path / "ms" / "config.json").read_bytes() == (tmp_path / "hf" / "config.json").read_bytes()
    assert (tmp_path / "ms" / "generation_config.json").is_file()
    keys = set(ms.load_checkpoint(str(ms_file), format=fmt))
    assert ("model.layers.0.attention.w_qkv.weight" in keys) == fuse
    assert ("model.tok_embeddings.embedding_weight" in keys) == (naming == "mindformers")
    s2 = convert(ms_file, tmp_path / "back", to="hf", verbose=False)  # config.json found next to the ckpt
    assert s2.naming == naming
    assert (s2.tensors > s1.tensors) if fuse else (s2.tensors == s1.tensors)  # w_qkv, w_gate_hidden split
    assert_identical(tensors(tmp_path / "back"), tensors(tmp_path / "hf"))
    assert torch.equal(logits(tmp_path / "back"), logits(model))


def test_moe_sharded_gmm_round_trip_and_transformers_reloads(tmp_path):
    model = write_hf(tmp_path / "hf", moe=True)
    convert(tmp_path / "hf", tmp_path / "ms", to="ms", naming="mindformers", expert_layout="in_out", verbose=False)
    ckpt = tmp_path / "ms" / "model.ckpt"
    stacked = ms.load_checkpoint(str(ckpt))["model.layers.0.feed_forward.routed_experts.ffn.w1.weight"]
    assert stacked.shape == (4, 16, 8)  # [E, in, out]
    summary = convert(ckpt, tmp_path / "back", to="hf", max_shard_size="20KB", verbose=False)
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(summary.files) > 4 and len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == summary.bytes
    assert_identical(tensors(tmp_path / "back"), tensors(tmp_path / "hf"))
    assert torch.equal(logits(tmp_path / "back"), logits(model))


def test_bf16_bit_exact_and_dtype_cast(tmp_path):
    write_hf(tmp_path / "hf16", dtype=torch.bfloat16)
    s = convert(tmp_path / "hf16", tmp_path / "ms.safetensors", to="ms", naming="mindformers", fuse_qkv=True,
                verbose=False)
    assert s.dtypes == ("bfloat16",)
    convert(tmp_path / "ms.safetensors", tmp_path / "back16", to="hf", verbose=False)
    assert_identical(tensors(tmp_path / "back16"), tensors(tmp_path / "hf16"))

    model = write_hf(tmp_path / "hf32")
    s = convert(tmp_path / "hf32", tmp_path / "cast.ckpt", to="ms", dtype="bf16", verbose=False)
    assert s.dtypes == ("bfloat16",)
    loaded = load_ms_checkpoint(tmp_path / "cast.ckpt")
    want = model.model.layers[1].mlp.down_proj.weight.detach().to(torch.bfloat16).view(torch.int16).numpy()
    assert loaded["model.layers.1.mlp.down_proj.weight"].view(np.int16).tobytes() == want.tobytes()
    convert(tmp_path / "cast.ckpt", tmp_path / "back32", to="hf", dtype="fp32", verbose=False)
    back = tensors(tmp_path / "back32")
    assert back["model.norm.weight"].dtype == np.float32


def test_tied_model_has_no_lm_head_and_reloads(tmp_path):
    model = write_hf(tmp_path / "hf", tie=True)
    assert "lm_head.weight" not in tensors(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "m.ckpt", to="ms", naming="mindformers", verbose=False)
    # An upstream checkpoint of a tied model also carries lm_head; it is dropped again on export.
    sd = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(tmp_path / "m.ckpt")).items()}
    sd["lm_head.weight"] = sd["model.tok_embeddings.embedding_weight"]
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in sd.items()], str(tmp_path / "up.ckpt"))
    s = convert(tmp_path / "up.ckpt", tmp_path / "back", to="hf", config=tmp_path / "hf", verbose=False)
    assert s.skipped == 1
    assert_identical(tensors(tmp_path / "back"), tensors(tmp_path / "hf"))
    assert torch.equal(logits(tmp_path / "back"), logits(model))
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in sd.items()], str(tmp_path / "untied.ckpt"))
    with pytest.raises(ConvertError, match="differs from the embeddings"):
        convert(tmp_path / "untied.ckpt", tmp_path / "bad", to="hf", config=tmp_path / "hf", verbose=False)
    assert not (tmp_path / "bad").exists()


def test_export_replaces_stale_weights_in_existing_folder(tmp_path):
    write_hf(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "m.ckpt", to="ms", verbose=False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model-00001-of-00009.safetensors").write_bytes(b"old")
    (tmp_path / "out" / "README.md").write_text("keep me")
    convert(tmp_path / "m.ckpt", tmp_path / "out", to="hf", config=tmp_path / "hf" / "config.json", verbose=False)
    assert sorted(os.listdir(tmp_path / "out")) == ["README.md", "config.json", "generation_config.json",
                                                    "model.safetensors"]


def test_cli_convert(tmp_path, capsys):
    write_hf(tmp_path / "hf")
    rc = main(["convert", str(tmp_path / "hf"), str(tmp_path / "q.ckpt"), "--to", "ms", "--naming", "mindformers",
               "--dtype", "bf16", "--fuse-qkv"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "converted" in out and "bfloat16" in out and "mindformers" in out
    assert main(["convert", str(tmp_path / "q.ckpt"), str(tmp_path / "back"), "--to", "hf", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert (tmp_path / "back" / "model.safetensors").is_file()
    os.remove(tmp_path / "config.json")
    assert main(["convert", str(tmp_path / "q.ckpt"), str(tmp_path / "b2"), "--to", "hf"]) == 2
    assert "pass --config" in capsys.readouterr().err


def test_bad_inputs(tmp_path):
    write_hf(tmp_path / "hf")
    with pytest.raises(ConvertError, match="to must be"):
        convert(tmp_path / "hf", tmp_path / "x.ckpt", to="mindspore")
    with pytest.raises(ConvertError, match="fuse_qkv"):
        convert(tmp_path / "hf", tmp_path / "x.ckpt", to="ms", fuse_qkv=True)
    with pytest.raises(MSCheckpointError, match="unknown dtype"):
        convert(tmp_path / "hf", tmp_path / "x.ckpt", to="ms", dtype="int4")
    with pytest.raises(HubError, match="neither an existing folder"):
        convert(tmp_path / "nope", tmp_path / "x.ckpt", to="ms")
    with pytest.raises(ConvertError, match="does not exist"):
        convert(tmp_path / "nope.ckpt", tmp_path / "out", to="hf", config=tmp_path / "hf")
    with pytest.raises(ConvertError, match="config .* does not exist"):
        convert(tmp_path / "hf", tmp_path / "x.ckpt", to="ms", config=tmp_path / "missing.json")

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_bytes((tmp_path / "hf" / "config.json").read_bytes())
    with pytest.raises(ConvertError, match="no model.safetensors"):
        convert(tmp_path / "empty", tmp_path / "x.ckpt", to="ms")
    (tmp_path / "empty" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ConvertError, match="not in the folder"):
        convert(tmp_path / "empty", tmp_path / "x.ckpt", to="ms")

    good = tmp_path / "m" / "good.ckpt"
    convert(tmp_path / "hf", good, to="ms", naming="mindformers", verbose=False)
    os.remove(tmp_path / "m" / "config.json")
    with pytest.raises(ConvertError, match="no config.json next to"):
        convert(good, tmp_path / "out", to="hf")
    with pytest.raises(ConvertError, match="uses mindformers names"):
        convert(good, tmp_path / "out", to="hf", naming="hf", config=tmp_path / "hf")
    small = tmp_path / "small"
    small.mkdir()
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (small / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=20)))
    with pytest.raises(MSCheckpointError, match=r"wrong shape \(6\)"):
        convert(good, tmp_path / "out", to="hf", config=small)
    with pytest.raises(MSCheckpointError, match=r"wrong shape \(6\)"):
        convert(tmp_path / "hf", tmp_path / "y.ckpt", to="ms", config=small)

    foreign = tmp_path / "foreign.ckpt"
    ms.save_checkpoint([{"name": "backbone.blocks.0.attn.qkv.weight", "data": ms.Tensor(np.zeros((2, 2)))}],
                       str(foreign))
    with pytest.raises(CheckpointNamingError, match="backbone.blocks.0.attn.qkv.weight"):
        convert(foreign, tmp_path / "out", to="hf", config=tmp_path / "hf")
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.ckpt").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    with pytest.raises(ConvertError, match="max_shard_size|size"):
        parse_size("lots")
    assert parse_size("1.5MB") == 1_500_000 and parse_size("2GiB") == 2 * 2**30
