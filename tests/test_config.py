"""Qwen2Config: presets, analytic parameter counts, config.json round trip, validation."""
import json
import warnings

import pytest

from qwen2ms import PRESETS, ConfigError, Qwen2Config

HF_COUNTS = {
    "qwen2-0.5b": 494_032_768,
    "qwen2-1.5b": 1_543_714_304,
    "qwen2-7b": 7_615_616_512,
    "qwen2-57b-a14b": 57_408_658_944,
    "qwen2-72b": 72_706_203_648,
}


@pytest.mark.parametrize("name", sorted(HF_COUNTS))
def test_preset_parameter_counts_equal_hf(name):
    assert Qwen2Config.from_preset(name).num_parameters() == HF_COUNTS[name]


def test_every_preset_is_counted():
    assert set(PRESETS) == set(HF_COUNTS)


def _tiny(**kw):
    base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base.update(kw)
    return base


def _torch_count(cfg_dict, moe=False):
    import torch
    from transformers import Qwen2Config as HFC, Qwen2ForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    if moe:
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**cfg_dict))
    else:
        model = Qwen2ForCausalLM(HFC(**cfg_dict))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tied", [True, False])
def test_num_parameters_matches_transformers_dense(tied):
    d = _tiny(tie_word_embeddings=tied)
    assert Qwen2Config(**d).num_parameters() == _torch_count(d)


def test_num_parameters_matches_transformers_moe():
    d = _tiny(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
              shared_expert_intermediate_size=48, decoder_sparse_step=2, mlp_only_layers=[1])
    ours = Qwen2Config(model_type="qwen2_moe", **d)
    assert [ours.is_sparse_layer(i) for i in range(3)] == [False, False, False]
    d2 = dict(d, decoder_sparse_step=1, mlp_only_layers=[1])
    ours2 = Qwen2Config(model_type="qwen2_moe", **d2)
    assert [ours2.is_sparse_layer(i) for i in range(3)] == [True, False, True]
    assert ours.num_parameters() == _torch_count(d, moe=True)
    assert ours2.num_parameters() == _torch_count(d2, moe=True)


def test_hf_config_json_round_trip(tmp_path):
    hf = {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24,
        "model_type": "qwen2", "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    cfg = Qwen2Config.from_json(tmp_path)
    assert cfg.num_parameters() == HF_COUNTS["qwen2-0.5b"]
    out = cfg.to_dict()
    for k, v in hf.items():
        assert out[k] == v, k
    cfg.to_json(tmp_path / "again.json")
    again = Qwen2Config.from_json(tmp_path / "again.json")
    assert again == cfg and again.to_dict() == out


def test_moe_round_trip_and_transformers_reads_ours(tmp_path):
    from transformers import AutoConfig

    cfg = Qwen2Config.from_preset("qwen2-57b-a14b")
    cfg.to_json(tmp_path / "config.json")
    assert Qwen2Config.from_json(tmp_path) == cfg
    hf = AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == "Qwen2MoeConfig"
    assert hf.num_experts == 64 and hf.num_experts_per_tok == 8 and hf.shared_expert_intermediate_size == 20480
    assert hf.rope_parameters["rope_theta"] == 1000000.0


def test_rope_parameters_of_newer_configs_are_read():
    cfg = Qwen2Config.from_dict(dict(_tiny(), rope_parameters={"rope_theta": 5e5, "rope_type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 32}))
    assert cfg.rope_theta == 5e5 and cfg.rope_type == "yarn" and cfg.rope_scaling["factor"] == 4.0
    plain = Qwen2Config.from_dict(dict(_tiny(), rope_parameters={"rope_theta": 7.0, "rope_type": "default"}))
    assert plain.rope_theta == 7.0 and plain.rope_scaling is None


def test_unknown_keys_kept_and_warned_once():
    data = dict(_tiny(), my_custom_field=3)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        cfg = Qwen2Config.from_dict(data)
        Qwen2Config.from_dict(data)
    assert sum("my_custom_field" in str(w.message) for w in rec) == 1
    assert cfg.to_dict()["my_custom_field"] == 3


@pytest.mark.parametrize("bad, message", [
    (dict(hidden_size=30), "must divide hidden_size"),
    (dict(num_key_value_heads=3), "must divide num_attention_heads"),
    (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
    (dict(vocab_size=-1), "vocab_size"),
    (dict(hidden_act="tanhh"), "hidden_act 'tanhh'"),
    (dict(rope_scaling={"type": "ntk-magic", "factor": 2.0}), "rope_scaling type 'ntk-magic'"),
    (dict(rope_scaling={"rope_type": "linear"}), "factor"),
    (dict(use_sliding_window=True, sliding_window=0), "sliding_window"),
    (dict(num_experts=4, num_experts_per_tok=5, moe_intermediate_size=8), "num_experts_per_tok"),
    (dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, mlp_only_layers=[7]), "mlp_only_layers"),
])
def test_validation_errors_name_the_field(bad, message):
    with pytest.raises(ConfigError, match=message):
        Qwen2Config(**_tiny(**bad))


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no config file"):
        Qwen2Config.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Qwen2Config.from_json(tmp_path)
    with pytest.raises(ConfigError, match="unknown preset"):
        Qwen2Config.from_preset("qwen2-3b")


def test_sliding_window_layer_rule_matches_transformers():
    from transformers import Qwen2Config as HFC, Qwen2MoeConfig

    d = _tiny(num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    assert Qwen2Config(**d).layer_attention_types() == HFC(**d).layer_types
    m = dict(d, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, shared_expert_intermediate_size=8,
             max_window_layers=3)
    assert Qwen2Config(model_type="qwen2_moe", **m).layer_attention_types() == Qwen2MoeConfig(**m).layer_types


def test_preset_overrides_and_instruct_alias():
    cfg = Qwen2Config.from_preset("Qwen2-0.5B-Instruct", num_hidden_layers=2)
    assert cfg.num_hidden_layers == 2 and cfg.hidden_size == 896
