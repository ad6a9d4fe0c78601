"""GGUF import: logits of from_gguf equal transformers' on the same (dequantised) weights, tokenizer and convert."""
import json
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from qwen2ms import Qwen2ForCausalLM  # noqa: E402
from qwen2ms.checkpoint import convert_gguf  # noqa: E402
from qwen2ms.checkpoint.gguf import gguf_config, gguf_tokenizer  # noqa: E402
from qwen2ms import set_activations  # noqa: E402
from test_modeling import BASE, MOE, hf_logits, make_hf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import llamacpp  # noqa: E402

Q = gguf.GGMLQuantizationType
TOL = 1e-4
IDS = np.array([[3, 17, 200, 45, 9, 128, 77, 1, 250, 31]])
TEXTS = ["Hello world", "  leading spaces and\ttabs\n\nnew lines ", "你好，世界！こんにちは", "emoji 🤗🚀 and café",
         "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "numbers 1234567 and code: def f(x): return x**2",
         "'s 're 've 'll 'd I'M DON'T"]


# ---------------------------------------------------------------------------------------------
# Writing GGUFs directly (gguf.GGUFWriter), with our own HF -> GGUF name table
# ---------------------------------------------------------------------------------------------
_LAYER_NAMES = [
    ("input_layernorm.weight", "attn_norm.weight"), ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ("self_attn.q_proj.weight", "attn_q.weight"), ("self_attn.q_proj.bias", "attn_q.bias"),
    ("self_attn.k_proj.weight", "attn_k.weight"), ("self_attn.k_proj.bias", "attn_k.bias"),
    ("self_attn.v_proj.weight", "attn_v.weight"), ("self_attn.v_proj.bias", "attn_v.bias"),
    ("self_attn.o_proj.weight", "attn_output.weight"), ("mlp.gate_proj.weight", "ffn_gate.weight"),
    ("mlp.up_proj.weight", "ffn_up.weight"), ("mlp.down_proj.weight", "ffn_down.weight"),
]
_TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}


def gguf_name(hf_name):
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    return f"blk.{m.group(1)}." + dict(_LAYER_NAMES)[m.group(2)]


def hf_tensors(hf):
    """The HF checkpoint tensors (tied lm_head left out) as float32 numpy arrays."""
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def write_gguf(path, hf, qtype=lambda name, arr: Q.F32, arch="qwen2", meta=None, drop=(), replace=None,
               tokenizer=True):
    """A GGUF of ``hf``'s weights, each tensor in ``qtype(gguf name, array)``; returns the dequantised tensors.

    ``meta`` overrides/adds metadata ({key: (value, GGUFValueType)}); ``drop`` leaves tensors out; ``replace``
    swaps tensor arrays ({gguf name: array}). ``tokenizer`` adds a byte-level BPE of 261 tokens (the 256 byte symbols, two merges, three special tokens).
    """
    cfg = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    meta = dict(meta or {})
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                         else float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if tokenizer:
        from qwen2ms.tokenization.bpe import bytes_to_unicode

        alphabet = list(bytes_to_unicode().values())
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(alphabet + ["he", "Ġt", "<|endoftext|>", "<|im_start|>", "<|im_end|>"])  # ids 0-260
        w.add_token_types([1] * 258 + [3, 3, 3])
        w.add_token_merges(["h e", "Ġ t"])
        w.add_eos_token_id(260)
    for key, (value, vtype) in meta.items():
        w.add_key_value(key, value, vtype)
    dequantised = {}
    for name, arr in hf_tensors(hf).items():
        g = gguf_name(name)
        if g in drop:
            continue
        arr = (replace or {}).get(g, arr)
        t = qtype(g, arr) if arr.ndim == 2 else Q.F32
        data = gguf.quants.quantize(arr, t) if t not in (Q.F32,) else arr
        w.add_tensor(g, data, raw_dtype=t)
        dequantised[name] = gguf.quants.dequantize(data, t).reshape(arr.shape) if t != Q.F32 else arr
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dequantised


def reference_logits(hf, tensors, ids=IDS):
    """transformers' logits with ``tensors`` (HF name -> array) as the weights."""
    ref = type(hf)(hf.config).eval()
    with torch.no_grad():
        sd = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
        missing, unexpected = ref.load_state_dict(sd, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        if hf.config.tie_word_embeddings:
            ref.tie_weights()
    return hf_logits(ref, ids).logits.numpy()


def max_diff(model, ref, ids=IDS):
    # The references multiply float activations: int8/int4 layers (Q8_0/Q4_0 blocks) read them unrounded here.
    set_activations(model, "float32")
    return float(np.abs(model(ids).logits.asnumpy() - ref).max())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf, _ = make_hf(tmp_path_factory.mktemp("hf"), vocab_size=264)  # room for write_gguf's 261 tokens
    return hf


# ---------------------------------------------------------------------------------------------
# Tensor types written by gguf.GGUFWriter
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0], ids=lambda t: t.name)
def test_quantised_gguf_logits_equal_transformers_on_the_dequantised_weights(tmp_path, tiny, qtype):
    path = tmp_path / "m.gguf"
    deq = write_gguf(path, tiny, qtype=lambda name, arr: qtype)
    ref = reference_logits(tiny, deq)
    model = Qwen2ForCausalLM.from_gguf(path, dtype="float32")
    assert max_diff(model, ref) <= TOL
    # the error of the format itself is real: the exact weights give other logits
    assert np.abs(ref - hf_logits(tiny, IDS).logits.numpy()).max() > 10 * TOL


def test_q8_0_linear_weights_stay_int8_with_the_blocks_scales(tmp_path, tiny):
    path = tmp_path / "q8.gguf"
    deq = write_gguf(path, tiny, qtype=lambda name, arr: Q.Q8_0)
    model = Qwen2ForCausalLM.from_gguf(path, dtype="float32")
    q = model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == ms.int8 and tuple(q.weight_scale.shape) == (64, 64 // 32)
    exact = q.weight.asnumpy().astype(np.float32).reshape(64, 2, 32) * q.weight_scale.asnumpy()[:, :, None]
    np.testing.assert_array_equal(exact.reshape(64, 64), deq["model.layers.0.self_attn.q_proj.weight"])
    assert model.lm_head.weight.dtype == ms.int8
    # the embedding table too: int8 codes with one scale per block of 32 (the lookup kernel and the reference
    # op apply the group scales; a tied lm_head would read the same codes)
    emb = model.model.embed_tokens
    assert emb.weight.dtype == ms.int8 and tuple(emb.weight_scale.shape) == (264, 64 // 32)
    exact = emb.weight.asnumpy().astype(np.float32).reshape(264, 2, 32) * emb.weight_scale.asnumpy()[:, :, None]
    np.testing.assert_array_equal(exact.reshape(264, 64), deq["model.embed_tokens.weight"])
    ref = reference_logits(tiny, deq)
    assert max_diff(model, ref) <= TOL
    assert max_diff(Qwen2ForCausalLM.from_gguf(path, dtype="float32", ops_backend="reference"), ref) <= TOL
    floats = Qwen2ForCausalLM.from_gguf(path, dtype="float32", dequantize=True)
    assert floats.model.layers[0].self_attn.q_proj.weight.dtype == ms.float32
    assert floats.model.layers[0].self_attn.q_proj.weight_scale is None
    assert max_diff(floats, ref) <= TOL


def test_default_dtype_follows_the_file(tmp_path, tiny):
    cases = [(Q.F32, ms.float32), (Q.F16, ms.float16), (Q.BF16, ms.bfloat16), (Q.Q4_0, ms.bfloat16)]
    for qtype, want in cases:
        path = tmp_path / f"{qtype.name}.gguf"
        write_gguf(path, tiny, qtype=lambda name, arr, t=qtype: t)
        assert Qwen2ForCausalLM.from_gguf(path).storage_dtype == want, qtype.name


def test_bf16_weights_keep_their_bits(tmp_path, tiny):
    path = tmp_path / "bf16.gguf"
    deq = write_gguf(path, tiny, qtype=lambda name, arr: Q.BF16)
    model = Qwen2ForCausalLM.from_gguf(path)
    assert model.tokenizer.encode("the") == [116, 256]  # 't', 'he'
    assert model.tokenizer.encode(" the<|im_end|>") == [257, 256, 260]  # 'Ġt', 'he', eos
    got = model.model.layers[1].mlp.down_proj.weight.astype(ms.float32).asnumpy()
    np.testing.assert_array_equal(got, deq["model.layers.1.mlp.down_proj.weight"])


def test_k_quants_dequantise_like_gguf(tmp_path):
    # K-quant blocks span 256 values per row; gguf (Python) dequantises but cannot quantise them, so the
    # blocks are random bytes with finite, small fp16 scales (llama-quantize files: tests/test_llamacpp_parity.py).
    hf, _ = make_hf(tmp_path, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2)
    rng = np.random.default_rng(0)
    blocks = {}

    def random_blocks(qtype, shape):
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
        scale = rng.uniform(1e-4, 2e-3, raw.shape[:2]).astype(np.float16).view(np.uint8).reshape(*raw.shape[:2], 2)
        if qtype == Q.Q6_K:
            raw[..., -2:] = scale  # d ends the block
        else:
            raw[..., 0:2], raw[..., 2:4] = scale, 0  # d, then dmin (0.0)
        return raw.reshape(shape[0], -1)

    path = tmp_path / "k.gguf"
    types = {"attn_q.weight": Q.Q4_K, "attn_k.weight": Q.Q6_K, "ffn_down.weight": Q.Q4_K, "ffn_up.weight": Q.Q6_K}
    w = gguf.GGUFWriter(str(path), "qwen2")
    cfg = hf.config
    for add, value in ((w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, 256),
                       (w.add_feed_forward_length, 256), (w.add_head_count, 4), (w.add_head_count_kv, 2)):
        add(value)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    deq = {}
    for name, arr in hf_tensors(hf).items():
        g = gguf_name(name)
        t = types.get(g.split(".", 2)[-1]) if g.startswith("blk.") else None
        if t is None:
            w.add_tensor(g, arr)
            deq[name] = arr
            continue
        raw = random_blocks(t, arr.shape)
        w.add_tensor(g, raw, raw_dtype=t)
        deq[name] = gguf.quants.dequantize(raw, t).reshape(arr.shape)
        blocks[name] = deq[name]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.warns(UserWarning, match="holds no tokenizer"):
        model = Qwen2ForCausalLM.from_gguf(path, dtype="float32")
    params = {p.name: p for p in model.get_parameters()}
    for name, want in blocks.items():
        np.testing.assert_array_equal(params[name].asnumpy(), want)
    assert max_diff(model, reference_logits(hf, deq)) <= TOL


def test_qwen2moe_gguf_written_directly(tmp_path):
    hf, _ = make_hf(tmp_path, moe=True)
    cfg = hf.config
    path = tmp_path / "moe.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2moe")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    sd = hf_tensors(hf)
    moe_names = {"mlp.gate.weight": "ffn_gate_inp.weight", "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
                 "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
                 "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
                 "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight"}
    for name, arr in sd.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
        if m and m.group(2) == "mlp.experts.gate_up_proj":  # transformers 5 holds experts stacked [E, 2I, H]
            inter = arr.shape[1] // 2
            w.add_tensor(f"blk.{m.group(1)}.ffn_gate_exps.weight", np.ascontiguousarray(arr[:, :inter]))
            w.add_tensor(f"blk.{m.group(1)}.ffn_up_exps.weight", np.ascontiguousarray(arr[:, inter:]))
        elif m and m.group(2) == "mlp.experts.down_proj":
            w.add_tensor(f"blk.{m.group(1)}.ffn_down_exps.weight", arr)
        elif m and m.group(2) in moe_names:
            w.add_tensor(f"blk.{m.group(1)}.{moe_names[m.group(2)]}", arr)
        else:
            w.add_tensor(gguf_name(name), arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.warns(UserWarning, match="holds no tokenizer"):
        model = Qwen2ForCausalLM.from_gguf(path)
    assert model.config.num_experts == MOE["num_experts"] and not model.config.norm_topk_prob
    assert max_diff(model, hf_logits(hf, IDS).logits.numpy()) <= TOL


# ---------------------------------------------------------------------------------------------
# GGUFs made by llama.cpp's own convert_hf_to_gguf.py from a transformers checkpoint (slow: the real
# Qwen2 vocabulary, 151,936 embedding rows, and five conversions in one child process, ~30 s quiet)
# ---------------------------------------------------------------------------------------------
CONVERTED = {"f32": "F32", "bf16": "BF16", "q8_0": "Q8_0"}  # F16 files: the GGUFWriter tests
SMALL = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, bos_token_id=151643, eos_token_id=151645, max_position_embeddings=128,
             rope_theta=1000000.0)


def _save_source(folder_parent, name, hf, qwen2_tokenizer_dir):
    folder = folder_parent / name
    hf.save_pretrained(folder)
    # a real Qwen2 folder: tokenizer.json (what the converter reads the pad token from) and tokenizer_config.json
    transformers.AutoTokenizer.from_pretrained(str(qwen2_tokenizer_dir)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory, qwen2_tokenizer_dir):
    """GGUFs written by llama.cpp's converter: dense untied in every outtype, dense tied Q8_0, MoE F32."""
    try:
        llamacpp.convert_script()
    except llamacpp.LlamaCppUnavailable as e:
        pytest.skip(f"llama.cpp's convert_hf_to_gguf.py is not available: {e}")
    root = tmp_path_factory.mktemp("converted")
    torch.manual_seed(0)
    models = {}
    for name, cls_cfg, cls, extra in (
            ("dense", transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
            ("tied", transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
            ("moe", transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
             dict(MOE, moe_intermediate_size=32, shared_expert_intermediate_size=64))):
        hf = cls(cls_cfg(**dict(dict(SMALL, tie_word_embeddings=False), **extra))).eval()
        with torch.no_grad():
            for pname, p in hf.named_parameters():
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if pname.endswith("norm.weight") else 0.15 * torch.randn_like(p))
        models[name] = (hf, _save_source(root, name, hf, qwen2_tokenizer_dir))
    jobs = [(models["dense"][1], root / f"dense-{t}.gguf", t) for t in CONVERTED]
    jobs += [(models["tied"][1], root / "tied-q8_0.gguf", "q8_0"), (models["moe"][1], root / "moe-f32.gguf", "f32")]
    llamacpp.convert_hf_to_gguf(jobs)
    return {"root": root, "models": models, "tokenizer_dir": qwen2_tokenizer_dir}


def _as_stored(hf, outtype):
    """The source weights as the converter stores them for ``outtype``: 2-D weights (not norms, not the MoE router)
    through gguf's quantize/dequantize."""
    qtype = Q[CONVERTED[outtype]]
    out = {}
    for name, arr in hf_tensors(hf).items():
        keep = arr.ndim < 2 or name.endswith("norm.weight") or name.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))
        out[name] = arr if keep or qtype == Q.F32 else gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype).reshape(arr.shape)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("outtype", list(CONVERTED))
def test_converter_gguf_logits_equal_transformers(converted, outtype):
    hf, _ = converted["models"]["dense"]
    model = Qwen2ForCausalLM.from_gguf(converted["root"] / f"dense-{outtype}.gguf", dtype="float32")
    assert model.config.rope_theta == 1000000.0 and model.config.rms_norm_eps == 1e-6
    ids = np.array([[151644, 872, 198, 9707, 1879, 151645, 198, 151644, 77091, 198]])
    ref = reference_logits(hf, _as_stored(hf, outtype), ids)
    assert max_diff(model, ref, ids) <= TOL
    if outtype == "f32":  # the converter does not permute q/k for qwen2: the source model's own logits
        assert max_diff(model, hf_logits(hf, ids).logits.numpy(), ids) <= TOL


@pytest.mark.slow
def test_converter_tied_q8_0_and_moe(converted):
    hf, _ = converted["models"]["tied"]
    model = Qwen2ForCausalLM.from_gguf(converted["root"] / "tied-q8_0.gguf", dtype="float32")
    assert model.tied and model.model.layers[0].mlp.down_proj.weight.dtype == ms.int8
    assert max_diff(model, reference_logits(hf, _as_stored(hf, "q8_0"))) <= TOL
    hf, _ = converted["models"]["moe"]
    model = Qwen2ForCausalLM.from_gguf(converted["root"] / "moe-f32.gguf")
    assert model.config.is_moe and model.config.shared_expert_intermediate_size == 64
    assert max_diff(model, hf_logits(hf, IDS).logits.numpy()) <= TOL


@pytest.mark.slow
def test_tokenizer_and_chat_template_from_gguf_metadata(converted):
    _, src = converted["models"]["dense"]
    ref = transformers.AutoTokenizer.from_pretrained(str(src))
    tok = gguf_tokenizer(converted["root"] / "dense-q8_0.gguf")
    for text in TEXTS:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.chat_template == ref.chat_template
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "你好"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert len(tok) == len(ref) == 151646  # llama.cpp's [PAD] fillers up to 151936 rows are not tokens
    model = Qwen2ForCausalLM.from_gguf(converted["root"] / "dense-f32.gguf")
    assert model.tokenizer.encode(TEXTS[2]) == tok.encode(TEXTS[2])
    assert (model.config.eos_token_id, model.config.bos_token_id) == (151645, 151643)


@pytest.mark.slow
def test_convert_gguf_writes_a_folder_transformers_and_from_hf_load(converted, tmp_path):
    hf, src = converted["models"]["dense"]
    out = convert_gguf(converted["root"] / "dense-q8_0.gguf", tmp_path / "hf_out", dtype="float32")
    ref = reference_logits(hf, _as_stored(hf, "q8_0"))
    again = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert np.abs(hf_logits(again, IDS).logits.numpy() - ref).max() <= TOL
    ours = Qwen2ForCausalLM.from_hf(out)
    assert max_diff(ours, ref) <= TOL
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    source_tok = transformers.AutoTokenizer.from_pretrained(str(src))
    for text in TEXTS:
        assert tok.encode(text, add_special_tokens=False) == source_tok.encode(text, add_special_tokens=False)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 151936
    assert gguf_config(converted["root"] / "dense-q8_0.gguf").hidden_size == 32


def test_cli_converts_and_generates_from_a_gguf_file(tmp_path, tiny, capsys):
    from qwen2ms.cli import main

    path = tmp_path / "tiny-q8_0.gguf"
    write_gguf(path, tiny, qtype=lambda name, arr: Q.Q8_0 if arr.shape[-1] % 32 == 0 else Q.F32)
    assert main(["convert", str(path), str(tmp_path / "ms.ckpt"), "--to", "ms"]) == 2
    assert "is a GGUF file: it converts to an HF folder (--to hf)" in capsys.readouterr().err
    assert main(["convert", str(path), str(tmp_path / "hf_out"), "--to", "hf", "--dtype", "float32"]) == 0
    from_folder = Qwen2ForCausalLM.from_hf(tmp_path / "hf_out")
    from_file = Qwen2ForCausalLM.from_gguf(path, dtype="float32", dequantize=True)
    assert np.abs(from_folder(IDS).logits.asnumpy() - from_file(IDS).logits.asnumpy()).max() <= 1e-5
    assert from_folder.tokenizer.encode("he the") == from_file.tokenizer.encode("he the")
    capsys.readouterr()
    assert main(["generate", str(path), "--prompt", "he", "--greedy", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() != ""
