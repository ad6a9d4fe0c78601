"""Logits/loss parity of Qwen2ForCausalLM with transformers (torch fp32), weights read by our own loader."""
import json

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qwen2ms import Qwen2Config  # noqa: E402
from qwen2ms.modeling import CausalLMOutput, Qwen2ForCausalLM, Qwen2Model  # noqa: E402
from qwen2ms.modeling.rope import dynamic_inv_freq, rope_spec  # noqa: E402

TOL = 1e-4
BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=1, max_position_embeddings=64,
            tie_word_embeddings=False, attn_implementation="eager")
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)


def make_hf(tmp_path, name="hf", moe=False, **overrides):
    """A random tiny transformers model with O(1) weights, saved with save_pretrained into tmp_path/name."""
    kwargs = dict(BASE, **(MOE if moe else {}))
    kwargs.update(overrides)
    cls_cfg = transformers.Qwen2MoeConfig if moe else transformers.Qwen2Config
    cls = transformers.Qwen2MoeForCausalLM if moe else transformers.Qwen2ForCausalLM
    cfg = cls_cfg(**kwargs)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    folder = tmp_path / name
    model.save_pretrained(folder)
    return model, folder


def hf_logits(model, ids, **kw):
    with torch.no_grad():
        tkw = {k: torch.tensor(np.asarray(v), dtype=torch.long) for k, v in kw.items() if v is not None}
        return model(torch.tensor(ids, dtype=torch.long), **tkw)


def ids_for(b, t, seed=0, vocab=256):
    return np.random.default_rng(seed).integers(2, vocab, (b, t))


def assert_close(ours, ref, tol=TOL):
    ours = ours.asnumpy() if hasattr(ours, "asnumpy") else np.asarray(ours)
    diff = np.abs(ours - ref).max()
    assert diff <= tol, f"max |diff| {diff} > {tol}"


def left_pad_batch(lengths, t, seed=1):
    ids = ids_for(len(lengths), t, seed)
    mask = np.zeros((len(lengths), t), np.int64)
    for r, n in enumerate(lengths):
        mask[r, t - n:] = 1
        ids[r, : t - n] = 0
    pos = np.cumsum(mask, 1) - 1
    pos[mask == 0] = 1
    return ids, mask, pos


@pytest.mark.parametrize("name,overrides", [
    ("dense_untied", {}),
    ("dense_tied", {"tie_word_embeddings": True}),
    ("mqa", {"num_key_value_heads": 1}),
    ("mha", {"num_key_value_heads": 4}),
])
def test_dense_logits_and_loss_parity(tmp_path, name, overrides):
    hf, folder = make_hf(tmp_path, **overrides)
    model = Qwen2ForCausalLM.from_hf(folder)
    if overrides.get("tie_word_embeddings"):
        assert "lm_head.weight" not in model.parameters_dict()
    ids = ids_for(2, 9)
    labels = ids.copy()
    labels[0, :3] = -100
    labels[1, -2:] = -100
    out = model(ids, labels=labels)
    ref = hf_logits(hf, ids, labels=labels)
    assert isinstance(out, CausalLMOutput)
    assert out.logits.dtype == ms.float32 and out.logits.shape == (2, 9, 256)
    assert_close(out.logits, ref.logits.numpy())
    assert abs(float(out.loss) - float(ref.loss)) <= TOL


def test_parameter_names_are_hf_keys(tmp_path):
    hf, folder = make_hf(tmp_path, moe=True, mlp_only_layers=[1])
    model = Qwen2ForCausalLM.from_hf(folder)
    ours = {k: tuple(v.shape) for k, v in model.parameters_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ours == theirs  # transformers 5 holds experts stacked in memory, as we do


@pytest.mark.parametrize("overrides", [
    {"mlp_only_layers": [0]},
    {"decoder_sparse_step": 2},
    {"norm_topk_prob": True, "num_hidden_layers": 3, "decoder_sparse_step": 1},
])
def test_moe_parity_logits_loss_aux(tmp_path, overrides):
    hf, folder = make_hf(tmp_path, moe=True, **overrides)
    model = Qwen2ForCausalLM.from_hf(folder)
    ids = ids_for(2, 6)  # 12 tokens * top-2 > 4 experts: the all-experts path
    labels = ids.copy()
    labels[:, :2] = -100
    out = model(ids, labels=labels, output_router_logits=True)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), labels=torch.tensor(labels), output_router_logits=True)
    assert_close(out.logits, ref.logits.numpy())
    assert abs(float(out.aux_loss) - float(ref.aux_loss)) <= TOL
    assert abs(float(out.loss) - float(ref.loss)) <= TOL
    n_sparse = sum(Qwen2Config.from_json(folder).is_sparse_layer(i) for i in range(model.config.num_hidden_layers))
    assert len(out.router_logits) == n_sparse
    plain = model(ids, labels=labels)
    assert plain.aux_loss is None and plain.router_logits is None
    assert abs(float(plain.loss) - float(out.loss) + model.config.router_aux_loss_coef * float(out.aux_loss)) < 1e-5


def test_moe_decode_path_and_masked_aux_loss(tmp_path):
    hf, folder = make_hf(tmp_path, moe=True)
    model = Qwen2ForCausalLM.from_hf(folder)
    one = ids_for(1, 1, seed=3)  # 1 token * top-2 <= 4 experts: the gathered-experts path
    assert_close(model(one).logits, hf_logits(hf, one).logits.numpy())
    ids, mask, pos = left_pad_batch([5, 3], 5)
    out = model(ids, attention_mask=mask, position_ids=pos, output_router_logits=True)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                 output_router_logits=True)
    assert abs(float(out.aux_loss) - float(ref.aux_loss)) <= TOL
    keep = mask.astype(bool)
    assert_close(out.logits.asnumpy()[keep], ref.logits.numpy()[keep])


def test_moe_without_shared_expert(tmp_path):
    cfg = Qwen2Config(model_type="qwen2_moe", vocab_size=128, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=0)
    model = Qwen2ForCausalLM(cfg, seed=1)
    names = set(model.parameters_dict())
    assert not any("shared_expert" in n for n in names)
    assert np.isfinite(model(ids_for(1, 4, vocab=128)).logits.asnumpy()).all()


def test_moe_sliding_window_parity(tmp_path):
    hf, folder = make_hf(tmp_path, moe=True, use_sliding_window=True, sliding_window=3, max_window_layers=2)
    cfg = Qwen2Config.from_json(folder)
    assert "sliding_attention" in cfg.layer_attention_types()
    model = Qwen2ForCausalLM.from_hf(folder)
    ids = ids_for(1, 9)
    assert_close(model(ids).logits, hf_logits(hf, ids).logits.numpy())


def test_sliding_window_parity(tmp_path):
    hf, folder = make_hf(tmp_path, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert Qwen2Config.from_json(folder).layer_attention_types() == ["full_attention", "sliding_attention"]
    model = Qwen2ForCausalLM.from_hf(folder)
    ids = ids_for(2, 11)  # longer than the window
    assert_close(model(ids).logits, hf_logits(hf, ids).logits.numpy())
    # Without the window the logits differ: the test would notice a window that is ignored.
    full = Qwen2ForCausalLM.from_hf(folder)
    full.model.layer_sliding = [False, False]
    full.model.has_sliding = False
    assert np.abs(full(ids).logits.asnumpy() - hf_logits(hf, ids).logits.numpy()).max() > 1e-3


def _rewrite_rope(folder, scaling, key):
    cfg = json.loads((folder / "config.json").read_text())
    theta = cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = theta
    entry = dict(scaling)
    kind = entry.pop("rope_type")
    entry[key] = kind
    cfg["rope_scaling"] = entry
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("scaling,seq", [
    ({"rope_type": "linear", "factor": 2.0}, 12),
    ({"rope_type": "dynamic", "factor": 2.0}, 40),  # beyond max_position_embeddings=32
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}, 20),
    ({"rope_type": "yarn", "factor": 2.0, "beta_fast": 16, "beta_slow": 2, "attention_factor": 1.3}, 12),
])
@pytest.mark.parametrize("key", ["rope_type", "type"])
def test_rope_scaling_parity(tmp_path, scaling, seq, key):
    hf, folder = make_hf(tmp_path, max_position_embeddings=32, num_hidden_layers=1,
                         rope_parameters=dict(scaling, rope_theta=10000.0))
    _rewrite_rope(folder, scaling, key)
    cfg = Qwen2Config.from_json(folder)
    assert cfg.rope_type == scaling["rope_type"]
    # transformers reading the same old-style config.json builds the same frequencies
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    spec = rope_spec(cfg)
    ref_inv = reloaded.model.rotary_emb.inv_freq.numpy()
    if spec.kind != "dynamic":
        np.testing.assert_allclose(spec.inv_freq, ref_inv, rtol=1e-6)
        assert abs(spec.attention_scaling - reloaded.model.rotary_emb.attention_scaling) < 1e-12
    model = Qwen2ForCausalLM.from_hf(folder)
    ids = ids_for(1, seq)
    assert_close(model(ids).logits, hf_logits(reloaded, ids).logits.numpy())
    if spec.kind == "dynamic":
        np.testing.assert_allclose(dynamic_inv_freq(spec, seq), reloaded.model.rotary_emb.inv_freq.numpy(),
                                   rtol=1e-5)
    # our export keeps the scaling: transformers reads it back to the same logits
    model.save_pretrained(tmp_path / "export")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", attn_implementation="eager")
    assert_close(model(ids).logits, hf_logits(again.eval(), ids).logits.numpy())


def test_left_padded_batch_parity_and_no_nan(tmp_path):
    hf, folder = make_hf(tmp_path)
    model = Qwen2ForCausalLM.from_hf(folder)
    ids, mask, pos = left_pad_batch([8, 5, 1], 8)
    out = model(ids, attention_mask=mask)  # positions derived from the mask
    ref = hf_logits(hf, ids, attention_mask=mask, position_ids=pos).logits.numpy()
    keep = mask.astype(bool)
    assert_close(out.logits.asnumpy()[keep], ref[keep])
    assert np.isfinite(out.logits.asnumpy()).all()
    explicit = model(ids, attention_mask=mask, position_ids=pos)
    assert_close(explicit.logits.asnumpy()[keep], ref[keep])
    # A fully masked row is finite too.
    dead = model(ids, attention_mask=np.zeros_like(mask))
    assert np.isfinite(dead.logits.asnumpy()).all()


def test_segment_ids_equal_separate_sequences(tmp_path):
    _, folder = make_hf(tmp_path)
    model = Qwen2ForCausalLM.from_hf(folder)
    a, b = ids_for(1, 5, seed=4), ids_for(1, 4, seed=5)
    packed = np.concatenate([a, b], 1)
    seg = np.array([[0] * 5 + [1] * 4])
    pos = np.array([list(range(5)) + list(range(4))])
    out = model(packed, segment_ids=seg, position_ids=pos).logits.asnumpy()
    assert_close(out[:, :5], model(a).logits.asnumpy(), 1e-5)
    assert_close(out[:, 5:], model(b).logits.asnumpy(), 1e-5)
    leaky = model(packed, position_ids=pos).logits.asnumpy()
    assert np.abs(leaky[:, 5:] - out[:, 5:]).max() > 1e-3
    derived = model(packed, segment_ids=seg).logits.asnumpy()  # positions restart per segment by default
    assert_close(derived, out, 1e-6)
    # segment ids with right padding (padding as its own segment, masked out)
    padded = np.concatenate([packed, np.zeros((1, 2), np.int64)], 1)
    pseg = np.concatenate([seg, np.full((1, 2), 2)], 1)
    pmask = np.concatenate([np.ones((1, 9)), np.zeros((1, 2))], 1).astype(np.int64)
    assert_close(model(padded, attention_mask=pmask, segment_ids=pseg).logits.asnumpy()[:, :9], out, 1e-5)


def test_loss_all_ignored_is_zero_not_nan(tmp_path):
    _, folder = make_hf(tmp_path)
    model = Qwen2ForCausalLM.from_hf(folder)
    ids = ids_for(1, 4)
    assert float(model(ids, labels=np.full_like(ids, -100)).loss) == 0.0


@pytest.mark.parametrize("dtype,tol", [("float16", 5e-2), ("bfloat16", 1e-1)])
def test_half_precision_storage(tmp_path, dtype, tol):
    hf, folder = make_hf(tmp_path)
    model = Qwen2ForCausalLM.from_hf(folder, dtype=dtype)
    assert model.model.embed_tokens.weight.dtype == getattr(ms, dtype)
    assert model.compute_dtype == (ms.float16 if dtype == "float16" else ms.float32)
    ids = ids_for(2, 9)
    ids_mask = np.ones_like(ids)
    ids_mask[1, :4] = 0
    out = model(ids, attention_mask=ids_mask, labels=ids)
    logits = out.logits.asnumpy()
    assert out.logits.dtype == ms.float32 and np.isfinite(logits).all() and np.isfinite(float(out.loss))
    ref = hf_logits(hf, ids[:1]).logits.numpy()
    assert np.abs(logits[0] - ref[0]).max() <= tol * max(1.0, np.abs(ref).max())


def test_random_init_model_and_qwen2model(tmp_path):
    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    a, b = Qwen2ForCausalLM(cfg, seed=3), Qwen2ForCausalLM(cfg, seed=3)
    ids = ids_for(1, 5, vocab=128)
    np.testing.assert_array_equal(a(ids).logits.asnumpy(), b(ids).logits.asnumpy())
    assert a.num_parameters() == cfg.num_parameters()
    hidden, router = Qwen2Model(cfg, seed=3)(ids)
    assert hidden.shape == (1, 5, 32) and router == ()
    last = a(ids, logits_to_keep=1).logits.asnumpy()
    np.testing.assert_allclose(last[:, 0], a(ids).logits.asnumpy()[:, -1], atol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda m: m(np.array([1, 2, 3])), "input_ids must be"),
    (lambda m: m(np.array([[1, 300]])), "vocab_size"),
    (lambda m: m(np.array([[-1, 3]])), "vocab_size"),
    (lambda m: m(np.array([[1.5, 2.0]])), "integers"),
    (lambda m: m(np.array([[1, 2]]), attention_mask=np.ones((1, 3))), "attention_mask"),
    (lambda m: m(np.array([[1, 2]]), labels=np.ones((2, 2), np.int64)), "labels"),
    (lambda m: m(np.array([[1, 2]]), position_ids=np.ones((1, 3), np.int64)), "position_ids"),
    (lambda m: m(np.array([[1, 2]]), segment_ids=np.ones((1, 3), np.int64)), "segment_ids"),
    (lambda m: m(np.array([[1, 2]]), cache_position=0), "without a cache"),
    (lambda m: m(np.array([[1, 2]]), logits_to_keep=-1), "logits_to_keep"),
    (lambda m: m(np.array([[1, 2]]), labels=np.array([[1, 2]]), logits_to_keep=1), "labels need"),
])
def test_bad_inputs_raise(call, match):
    cfg = Qwen2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match=match):
        call(Qwen2ForCausalLM(cfg))


def test_bad_dtype_raises():
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        Qwen2ForCausalLM(cfg, dtype="int8")

