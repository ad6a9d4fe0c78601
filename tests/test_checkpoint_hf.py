"""HF safetensors checkpoints: load, save, round trips with transformers, and every documented error."""
import ast
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file as torch_load, save_file as torch_save  # noqa: E402

from qwen2ms.checkpoint import CheckpointError, hf as ckpt  # noqa: E402
from qwen2ms.modeling import Qwen2ForCausalLM  # noqa: E402
from test_modeling import assert_close, hf_logits, ids_for, make_hf  # noqa: E402


def tensors_of(folder):
    """Every tensor of a checkpoint folder as torch tensors (keeps bfloat16 bits)."""
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(torch_load(str(f)))
    return out


def assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k].view(torch.int16) if a[k].dtype == torch.bfloat16 else a[k],
                           b[k].view(torch.int16) if b[k].dtype == torch.bfloat16 else b[k]), k


@pytest.mark.parametrize("moe,overrides", [(False, {}), (False, {"tie_word_embeddings": True}),
                                           (True, {"decoder_sparse_step": 2})])
def test_hf_to_qwen2ms_to_hf_round_trip(tmp_path, moe, overrides):
    hf, src = make_hf(tmp_path, moe=moe, **overrides)
    model = Qwen2ForCausalLM.from_hf(src)
    out = tmp_path / "export"
    model.save_pretrained(out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert_same_tensors(tensors_of(src), tensors_of(out))
    if overrides.get("tie_word_embeddings"):
        assert "lm_head.weight" not in tensors_of(out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = ids_for(2, 7)
    ref = hf_logits(hf, ids).logits.numpy()
    assert_close(hf_logits(reloaded, ids).logits.numpy(), ref, 1e-6)
    assert_close(model(ids).logits, ref)
    assert model.generation_config_dict == json.loads((src / "generation_config.json").read_text())
    assert json.loads((out / "generation_config.json").read_text()) == model.generation_config_dict


def test_bf16_checkpoint_round_trips_bit_for_bit(tmp_path):
    hf, _ = make_hf(tmp_path)
    src = tmp_path / "bf16"
    hf.to(torch.bfloat16).save_pretrained(src)
    model = Qwen2ForCausalLM.from_hf(src)  # dtype=None keeps the checkpoint's bfloat16
    assert model.storage_dtype == ms.bfloat16
    out = tmp_path / "bf16_out"
    model.save_pretrained(out)
    assert_same_tensors(tensors_of(src), tensors_of(out))
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # the bf16 model computes in float32 on CPU and tracks the bf16 reference
    ids = ids_for(1, 6)
    ref = hf.float()(torch.tensor(ids)).logits.detach().numpy()
    assert np.abs(model(ids).logits.asnumpy() - ref).max() < 1e-3


def test_save_with_dtype_cast_and_load_with_dtype(tmp_path):
    hf, src = make_hf(tmp_path)
    model = Qwen2ForCausalLM.from_hf(src, dtype="bfloat16")
    assert model.storage_dtype == ms.bfloat16
    out = tmp_path / "f16"
    model.save_pretrained(out, dtype="float16")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.float16
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    again = Qwen2ForCausalLM.from_hf(out, dtype=ms.float32)
    assert again.storage_dtype == ms.float32


@pytest.mark.parametrize("moe", [False, True])
def test_sharded_save_and_load(tmp_path, moe):
    hf, src = make_hf(tmp_path, moe=moe)
    model = Qwen2ForCausalLM.from_hf(src)
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="60KB")
    index = json.loads((out / ckpt.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors_of(out).values())
    assert_same_tensors(tensors_of(src), tensors_of(out))
    again = Qwen2ForCausalLM.from_hf(out)
    ids = ids_for(1, 5)
    assert_close(again(ids).logits, hf_logits(hf, ids).logits.numpy())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert_close(hf_logits(reloaded, ids).logits.numpy(), hf_logits(hf, ids).logits.numpy(), 1e-6)
    # Saving again as one file removes the old shards and the index.
    model.save_pretrained(out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / ckpt.INDEX_NAME).exists()


def test_transformers_sharded_checkpoint_loads(tmp_path, capfd):
    hf, single = make_hf(tmp_path)
    src = tmp_path / "hf_sharded"
    hf.save_pretrained(src, max_shard_size="50KB")
    assert (src / ckpt.INDEX_NAME).is_file()
    capfd.readouterr()
    Qwen2ForCausalLM.from_hf(single)
    assert "Loading checkpoint shards" not in capfd.readouterr().err  # one file: no progress bar
    model = Qwen2ForCausalLM.from_hf(src)
    assert "Loading checkpoint shards" in capfd.readouterr().err
    ids = ids_for(1, 5)
    assert_close(model(ids).logits, hf_logits(hf, ids).logits.numpy())


def test_tied_model_loads_with_redundant_lm_head(tmp_path):
    hf, src = make_hf(tmp_path, tie_word_embeddings=True)
    tensors = tensors_of(src)
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    torch_save(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    model = Qwen2ForCausalLM.from_hf(src)
    assert "lm_head.weight" not in model.parameters_dict()
    ids = ids_for(1, 5)
    assert_close(model(ids).logits, hf_logits(hf, ids).logits.numpy())


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    _, src = make_hf(tmp_path)
    model = Qwen2ForCausalLM.from_hf(src)
    out = tmp_path / "out"
    model.save_pretrained(out, max_shard_size="60KB")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = ckpt._write_safetensors
    calls = []

    def failing(path, tensors, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, tensors, metadata)

    monkeypatch.setattr(ckpt, "_write_safetensors", failing)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(out, max_shard_size="30KB")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old checkpoint intact, no temp files


def test_tokenizer_attached_when_present(tmp_path, qwen2_tokenizer_dir):
    pytest.importorskip("qwen2ms.tokenization")
    from qwen2ms.tokenization import Qwen2Tokenizer

    _, src = make_hf(tmp_path)
    model = Qwen2ForCausalLM.from_hf(src)
    assert model.tokenizer is None
    for f in qwen2_tokenizer_dir.iterdir():
        shutil.copy(f, src / f.name)
    model = Qwen2ForCausalLM.from_hf(src)
    assert isinstance(model.tokenizer, Qwen2Tokenizer)
    assert model.tokenizer.encode("Hello world") == [9707, 1879]


def test_parse_shard_size():
    assert ckpt.parse_shard_size("5GB") == 5 * 10 ** 9
    assert ckpt.parse_shard_size("2GiB") == 2 * 2 ** 30
    assert ckpt.parse_shard_size("500 MB") == 500 * 10 ** 6
    assert ckpt.parse_shard_size(1234) == 1234
    for bad in ("lots", "5XB", 0, "-1GB"):
        with pytest.raises(ValueError, match="max_shard_size"):
            ckpt.parse_shard_size(bad)


# ------------------------------------------------------------------ errors
def _edit(src, fn):
    tensors = tensors_of(src)
    fn(tensors)
    torch_save(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})


def test_key_problems_listed_in_one_error(tmp_path):
    _, src = make_hf(tmp_path, moe=True, decoder_sparse_step=2)

    def damage(t):
        del t["model.norm.weight"]
        del t["model.layers.1.mlp.experts.3.up_proj.weight"]
        t["model.layers.0.extra.weight"] = torch.zeros(3)
        t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(5, 64)

    _edit(src, damage)
    with pytest.raises(CheckpointError) as err:
        Qwen2ForCausalLM.from_hf(src)
    msg = str(err.value)
    assert "missing (2)" in msg and "model.norm.weight" in msg and "experts.3.up_proj.weight" in msg
    assert "unexpected (1): model.layers.0.extra.weight" in msg
    assert "shape mismatch (1): model.layers.0.self_attn.q_proj.weight: checkpoint [5, 64] vs model [64, 64]" in msg


def test_non_float_tensor_rejected(tmp_path):
    _, src = make_hf(tmp_path)
    _edit(src, lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match="non-float dtype"):
        Qwen2ForCausalLM.from_hf(src)


def test_truncated_file(tmp_path):
    _, src = make_hf(tmp_path)
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        Qwen2ForCausalLM.from_hf(src)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        Qwen2ForCausalLM.from_hf(src)


def test_corrupt_header(tmp_path):
    _, src = make_hf(tmp_path)
    path = src / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json at!"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Qwen2ForCausalLM.from_hf(src)
    path.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(CheckpointError, match="header length"):
        Qwen2ForCausalLM.from_hf(src)


def test_missing_shard_and_bad_index(tmp_path):
    hf, _ = make_hf(tmp_path)
    src = tmp_path / "sh"
    hf.save_pretrained(src, max_shard_size="50KB")
    shards = sorted(src.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"not in .*{shards[1].name}"):
        Qwen2ForCausalLM.from_hf(src)
    (src / ckpt.INDEX_NAME).write_text("{oops")
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        Qwen2ForCausalLM.from_hf(src)


def test_folder_problems(tmp_path):
    _, src = make_hf(tmp_path)
    (src / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        Qwen2ForCausalLM.from_hf(src)
    (src / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        Qwen2ForCausalLM.from_hf(src)
    _, src2 = make_hf(tmp_path, name="g")
    (src2 / "generation_config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="generation config"):
        Qwen2ForCausalLM.from_hf(src2)
    cfg = json.loads((src2 / "config.json").read_text())
    cfg["num_attention_heads"] = 5
    (src2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        Qwen2ForCausalLM.from_hf(src2)


def test_unresolvable_location_raises_hub_error(tmp_path):
    from qwen2ms import HubError

    with pytest.raises(HubError):
        Qwen2ForCausalLM.from_hf(tmp_path / "does-not-exist")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        Qwen2ForCausalLM.from_hf("nobody/no-such-qwen2-model")


def test_load_casts_equal_torch_bit_for_bit():
    x = torch.randn(300, 37) * 100
    x[0, :4] = torch.tensor([float("inf"), float("-inf"), 1e-40, -0.0])
    b = x.to(torch.bfloat16)
    bf16_np = np.dtype(ms.dtype_to_nptype(ms.bfloat16))
    widened = ckpt._cast(b.view(torch.int16).numpy().view(bf16_np), "BF16", ms.float32, np.dtype(np.float32))
    assert np.array_equal(widened.view(np.uint32), b.float().numpy().view(np.uint32))
    half = ckpt._cast(x.numpy(), "F32", ms.float16, np.dtype(np.float16))
    assert np.array_equal(half.view(np.uint16), x.half().numpy().view(np.uint16))
    rounded = ckpt._cast(x.numpy(), "F32", ms.bfloat16, bf16_np)
    assert np.array_equal(rounded.view(np.uint16), b.view(torch.int16).numpy().view(np.uint16))


# ------------------------------------------------------------------ the README quickstart, run as written
def readme_quickstart():
    """The README's first python block, its checkpoint path literals and its save_pretrained target."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```python\n(.*?)```", text, re.S)
    assert block, "README.md has no ```python block"
    tree = ast.parse(block.group(1))
    loads, saves = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            if node.func.attr in ("from_hf", "from_pretrained"):
                loads.add(node.args[0].value)
            elif node.func.attr == "save_pretrained":
                saves.add(node.args[0].value)
    assert loads and len(saves) == 1, f"the quickstart should load with from_hf and save once: {ast.unparse(tree)}"
    return tree, loads, saves.pop()


@pytest.mark.slow
def test_readme_quickstart_output_loads_in_qwen2ms_and_transformers(tmp_path, qwen2_tokenizer_dir, capsys):
    """The quickstart in one process (generate and chat, then save) writes a folder both libraries load
    without unexpected or missing keys (it used to save generate()'s KV cache as weights)."""
    cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    src, out = tmp_path / "ckpt", tmp_path / "out"
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(src)
    # A short default reply keeps the test fast: chat() then reuses generate()'s cache and compiled step.
    gen = json.loads((src / "generation_config.json").read_text())
    (src / "generation_config.json").write_text(json.dumps(dict(gen, max_new_tokens=16)))
    for f in qwen2_tokenizer_dir.iterdir():
        shutil.copy(f, src / f.name)
    tree, loads, save_to = readme_quickstart()

    class Paths(ast.NodeTransformer):
        def visit_Constant(self, node):
            if node.value in loads:
                return ast.copy_location(ast.Constant(str(src)), node)
            if node.value == save_to:
                return ast.copy_location(ast.Constant(str(out)), node)
            return node

    code = compile(ast.fix_missing_locations(Paths().visit(tree)), "README.md (quickstart)", "exec")
    exec(code, {"__name__": "readme_quickstart"})
    printed = capsys.readouterr().out
    assert printed.count("\n") >= 2, printed  # the generate and chat replies
    ours = Qwen2ForCausalLM.from_hf(out)
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                                     output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    ids = np.random.default_rng(0).integers(0, 151936, (1, 6))
    assert_close(ours(ids).logits, hf_logits(theirs.eval(), ids).logits.numpy(), 1e-4)
