"""HF <-> MindFormers renaming: the table, fused q/k/v and gate/up orders, stacked experts, round trips, errors."""
import numpy as np
import pytest

from qwen2ms.checkpoint.mindformers import (
    CheckpointNamingError,
    concat_qkv_grouped,
    detect_expert_layout,
    detect_naming,
    from_mindformers,
    hf_key_to_mindformers,
    hf_parameter_shapes,
    interleave_gate_up,
    mindformers_key_to_hf,
    mindformers_shapes_to_hf,
    split_gate_up,
    split_qkv_grouped,
    split_training_state,
    to_mindformers,
)
from qwen2ms.config import Qwen2Config


def dense_config(**kw):
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False)
    base.update(kw)
    return Qwen2Config(**base)


def moe_config(**kw):
    base = dict(model_type="qwen2_moe", vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, num_experts=3, num_experts_per_tok=2,
                moe_intermediate_size=8, shared_expert_intermediate_size=12, mlp_only_layers=[1])
    base.update(kw)
    return Qwen2Config(**base)


def random_state(config, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32).astype(dtype)
            for k, s in hf_parameter_shapes(config).items()}


def assert_same(a, b):
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def test_dense_names_follow_upstream_table():
    mf = to_mindformers(random_state(dense_config()))
    layer0 = sorted(k for k in mf if k.startswith("model.layers.0."))
    assert layer0 == sorted("model.layers.0." + s for s in [
        "attention.wq.weight", "attention.wq.bias", "attention.wk.weight", "attention.wk.bias",
        "attention.wv.weight", "attention.wv.bias", "attention.wo.weight",
        "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
        "attention_norm.weight", "ffn_norm.weight"])
    assert {"model.tok_embeddings.embedding_weight", "model.norm_out.weight", "lm_head.weight"} <= set(mf)
    assert hf_key_to_mindformers("model.layers.7.mlp.up_proj.weight") == "model.layers.7.feed_forward.w3.weight"
    assert mindformers_key_to_hf("model.layers.7.feed_forward.w2.weight") == "model.layers.7.mlp.down_proj.weight"
    assert mindformers_key_to_hf("model.layers.3.attention_norm.weight") == "model.layers.3.input_layernorm.weight"


def test_moe_names_and_stacked_layout():
    cfg = moe_config()
    hf = random_state(cfg)
    mf = to_mindformers(hf, cfg)
    p = "model.layers.0.feed_forward."
    assert mf[p + "routed_experts.router.dense.weight"] is hf["model.layers.0.mlp.gate.weight"]
    assert mf[p + "shared_experts.w1.weight"] is hf["model.layers.0.mlp.shared_expert.gate_proj.weight"]
    assert mf[p + "shared_experts.w2.weight"] is hf["model.layers.0.mlp.shared_expert.down_proj.weight"]
    assert mf[p + "shared_experts.w3.weight"] is hf["model.layers.0.mlp.shared_expert.up_proj.weight"]
    assert mf[p + "shared_experts_gate.weight"] is hf["model.layers.0.mlp.shared_expert_gate.weight"]
    w1, w2, w3 = (mf[p + f"routed_experts.ffn.w{i}.weight"] for i in (1, 2, 3))
    assert w1.shape == w3.shape == (3, 8, 16) and w2.shape == (3, 16, 8)  # [E, out, in]
    for e in range(3):
        np.testing.assert_array_equal(w1[e], hf[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"])
        np.testing.assert_array_equal(w2[e], hf[f"model.layers.0.mlp.experts.{e}.down_proj.weight"])
        np.testing.assert_array_equal(w3[e], hf[f"model.layers.0.mlp.experts.{e}.up_proj.weight"])
    # layer 1 is in mlp_only_layers: a dense MLP with the dense names
    assert "model.layers.1.feed_forward.w1.weight" in mf
    assert not any(".mlp." in k for k in mf)


def test_gmm_layout_is_transposed_and_detected_on_import():
    cfg = moe_config()
    hf = random_state(cfg)
    gmm = to_mindformers(hf, cfg, expert_layout="in_out")
    w1 = gmm["model.layers.2.feed_forward.routed_experts.ffn.w1.weight"]
    assert w1.shape == (3, 16, 8)
    np.testing.assert_array_equal(w1[1], hf["model.layers.2.mlp.experts.1.gate_proj.weight"].T)
    assert_same(from_mindformers(gmm), hf)  # detected from the router shape
    assert mindformers_shapes_to_hf({k: v.shape for k, v in gmm.items()}) == {k: v.shape for k, v in hf.items()}
    no_router = {k: v for k, v in gmm.items() if "router" not in k}
    back = from_mindformers(no_router, cfg)  # detected from config.hidden_size
    assert back["model.layers.2.mlp.experts.1.down_proj.weight"].tobytes() == \
        hf["model.layers.2.mlp.experts.1.down_proj.weight"].tobytes()
    assert detect_expert_layout({k: v.shape for k, v in no_router.items()}) == "in_out"  # hidden from the norm
    bare = {k: v for k, v in no_router.items() if "experts.ffn" in k}
    with pytest.raises(CheckpointNamingError, match="expert_layout"):
        from_mindformers(bare)
    assert detect_expert_layout({k: v.shape for k, v in to_mindformers(hf).items()}) == "out_in"
    assert detect_expert_layout({"model.norm_out.weight": (16,)}) is None


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("make", [dense_config, moe_config, lambda: dense_config(num_key_value_heads=1)])
def test_round_trip_is_identity(make, fuse):
    import mindspore  # noqa: F401  registers numpy's bfloat16
    from mindspore.common import np_dtype

    cfg = make()
    for dtype in (np.float32, np_dtype.bfloat16):
        hf = random_state(cfg, dtype)
        mf = to_mindformers(hf, cfg, fuse_qkv=fuse)
        assert any("w_qkv" in k for k in mf) == fuse
        assert any("w_gate_hidden" in k for k in mf) == fuse
        assert_same(from_mindformers(mf, cfg), hf)
        assert mindformers_shapes_to_hf({k: v.shape for k, v in mf.items()}, cfg) == {k: v.shape for k, v in hf.items()}


def test_fused_qkv_grouped_order_by_hand():
    # 4 query heads, 2 kv heads, head_dim 2, hidden 3: each row is filled with a label.
    q = np.repeat(np.arange(8, dtype=np.float32)[:, None], 3, axis=1)  # q head h has rows 2h, 2h+1
    k = np.repeat(100 + np.arange(4, dtype=np.float32)[:, None], 3, axis=1)
    v = np.repeat(200 + np.arange(4, dtype=np.float32)[:, None], 3, axis=1)
    fused = concat_qkv_grouped(q, k, v, num_heads=4, num_kv_heads=2)
    expected = [0, 1, 2, 3, 100, 101, 200, 201,   # group 0: q heads 0-1, k head 0, v head 0
                4, 5, 6, 7, 102, 103, 202, 203]   # group 1: q heads 2-3, k head 1, v head 1
    assert fused.shape == (16, 3)
    assert fused[:, 0].tolist() == expected and fused[:, 2].tolist() == expected
    bias = concat_qkv_grouped(q[:, 0], k[:, 0], v[:, 0], 4, 2)
    assert bias.tolist() == expected
    for got, want in zip(split_qkv_grouped(fused, 4, 2), (q, k, v)):
        np.testing.assert_array_equal(got, want)
    # MQA: one group holding every query head
    assert concat_qkv_grouped(q[:, 0], k[:2, 0], v[:2, 0], 4, 1).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 100, 101, 200, 201]


def test_fused_qkv_in_state_dict_and_gate_hidden_by_hand():
    cfg = dense_config()
    hf = random_state(cfg)
    mf = to_mindformers(hf, cfg, fuse_qkv=True)
    p = "model.layers.0."
    assert not any(f"{p}attention.w{x}." in k for k in mf for x in "qkv")
    w = mf[p + "attention.w_qkv.weight"]
    d = cfg.head_dim
    q, k = hf[p + "self_attn.q_proj.weight"], hf[p + "self_attn.k_proj.weight"]
    np.testing.assert_array_equal(w[: 2 * d], q[: 2 * d])            # group 0's two query heads
    np.testing.assert_array_equal(w[2 * d: 3 * d], k[:d])             # then its key head
    np.testing.assert_array_equal(mf[p + "attention.w_qkv.bias"][2 * d: 3 * d], hf[p + "self_attn.k_proj.bias"][:d])
    gh = mf[p + "feed_forward.w_gate_hidden.weight"]
    assert gh.shape == (48, 16)
    np.testing.assert_array_equal(gh[0::2], hf[p + "mlp.gate_proj.weight"])
    np.testing.assert_array_equal(gh[1::2], hf[p + "mlp.up_proj.weight"])
    assert interleave_gate_up(np.array([[1], [2]]), np.array([[10], [20]])).ravel().tolist() == [1, 10, 2, 20]
    g, u = split_gate_up(np.array([[1], [10], [2], [20]]))
    assert g.ravel().tolist() == [1, 2] and u.ravel().tolist() == [10, 20]
    only_qkv = to_mindformers(hf, cfg, fuse_qkv=True, fuse_gate_up=False)
    assert p + "feed_forward.w1.weight" in only_qkv and p + "attention.w_qkv.weight" in only_qkv


def test_detect_naming_and_training_state():
    cfg = moe_config()
    hf = random_state(cfg)
    mf = to_mindformers(hf, cfg, fuse_qkv=True)
    assert detect_naming(hf) == "hf"
    assert detect_naming(mf) == "mindformers"
    keys = list(mf) + ["adam_m.model.norm_out.weight", "adam_v.lm_head.weight", "global_step", "scale_sense"]
    model, training = split_training_state(keys)
    assert model == list(mf) and len(training) == 4
    assert detect_naming(keys) == "mindformers"
    with pytest.raises(CheckpointNamingError, match="transformer.h.0.attn"):
        detect_naming(list(hf) + ["transformer.h.0.attn.weight"])
    with pytest.raises(CheckpointNamingError, match="both"):
        detect_naming(["lm_head.weight"])
    with pytest.raises(CheckpointNamingError, match="no model weights"):
        detect_naming(["global_step"])


def test_bad_inputs_raise_clear_errors():
    cfg = moe_config()
    hf = random_state(cfg)
    with pytest.raises(CheckpointNamingError, match="model.layers.0.attn.c_attn.weight"):
        to_mindformers({**hf, "model.layers.0.attn.c_attn.weight": np.zeros(1)})
    with pytest.raises(CheckpointNamingError, match="model.tok_embeddings.embedding_weight"):
        to_mindformers({"model.tok_embeddings.embedding_weight": np.zeros(1)})  # already MindFormers
    with pytest.raises(CheckpointNamingError, match="wte.weight"):
        from_mindformers({"model.norm_out.weight": np.zeros(1), "wte.weight": np.zeros(1)})
    missing = {k: v for k, v in hf.items() if k != "model.layers.0.mlp.experts.1.up_proj.weight"}
    with pytest.raises(CheckpointNamingError, match=r"experts \[1\]"):
        to_mindformers(missing)
    with pytest.raises(CheckpointNamingError, match="num_experts"):
        to_mindformers(hf, moe_config(num_experts=4))
    with pytest.raises(CheckpointNamingError, match="config"):
        to_mindformers(hf, None, fuse_qkv=True)
    fused = to_mindformers(hf, cfg, fuse_qkv=True)
    with pytest.raises(CheckpointNamingError, match="config"):
        from_mindformers(fused)
    no_k = {k: v for k, v in hf.items() if k != "model.layers.0.self_attn.k_proj.bias"}
    with pytest.raises(CheckpointNamingError, match=r"layer 0.*\['q', 'v'\]"):
        to_mindformers(no_k, cfg, fuse_qkv=True)
    with pytest.raises(CheckpointNamingError, match="multiple"):
        split_qkv_grouped(np.zeros((10, 3)), 4, 2)
    with pytest.raises(CheckpointNamingError, match="multiple"):
        mindformers_shapes_to_hf({"model.layers.0.attention.w_qkv.weight": (10, 16)}, cfg)
    with pytest.raises(CheckpointNamingError, match="config"):
        mindformers_shapes_to_hf({"model.layers.0.attention.w_qkv.weight": (16, 16)})
    with pytest.raises(CheckpointNamingError, match="wte"):
        mindformers_shapes_to_hf({"wte": (1,)})
    with pytest.raises(CheckpointNamingError, match="per-expert"):
        hf_key_to_mindformers("model.layers.0.mlp.experts.3.up_proj.weight")
    with pytest.raises(CheckpointNamingError, match="several HF tensors"):
        mindformers_key_to_hf("model.layers.0.attention.w_qkv.weight")
    with pytest.raises(CheckpointNamingError, match="expert_layout"):
        to_mindformers(hf, cfg, expert_layout="gmm")
    square = moe_config(moe_intermediate_size=16)
    gmm = to_mindformers(random_state(square), square, expert_layout="in_out")
    with pytest.raises(CheckpointNamingError, match="look alike"):
        from_mindformers(gmm, square)
    assert "model.layers.0.mlp.experts.2.up_proj.weight" in from_mindformers(gmm, square, expert_layout="in_out")


def test_hf_parameter_shapes_match_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    torch.manual_seed(0)
    cases = [
        (dense_config(tie_word_embeddings=True), transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        (moe_config(), transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
    ]
    for i, (cfg, hf_cfg_cls, hf_model_cls) in enumerate(cases):
        d = {k: v for k, v in cfg.to_dict().items() if k != "architectures"}
        hf_model_cls(hf_cfg_cls(**d)).save_pretrained(tmp_path / str(i))
        with safe_open(str(tmp_path / str(i) / "model.safetensors"), "np") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        assert saved == hf_parameter_shapes(cfg)


def test_hf_parameter_shapes_count_every_released_size():
    from qwen2ms.config import PRESETS

    for name in PRESETS:
        cfg = Qwen2Config.from_preset(name)
        shapes = hf_parameter_shapes(cfg)
        assert sum(int(np.prod(s)) for s in shapes.values()) == cfg.num_parameters(), name
        names = to_mindformers({k: np.empty((0,)) for k in shapes if ".experts." not in k})
        assert len(names) == len([k for k in shapes if ".experts." not in k])
