"""ParallelConfig: upstream YAML keys, validation against model and world size, rank layout."""
import warnings

import pytest

from qwen2ms import Qwen2Config
from qwen2ms.parallel import ParallelConfig, ParallelConfigError


def tiny(**kw):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2)
    base.update(kw)
    return Qwen2Config(**base)


def test_defaults_and_world_size():
    pc = ParallelConfig()
    assert pc.world_size == 1
    assert ParallelConfig(data_parallel=2, model_parallel=4, pipeline_stage=2, micro_batch_num=2).world_size == 16


def test_upstream_run_yaml(tmp_path):
    # The upstream 7B fine-tuning YAML's parallel sections, as written in its README.
    text = """
load_checkpoint: './path/qwen2_7b.ckpt'
parallel:
  parallel_mode: 1
  enable_parallel_optimizer: True
recompute_config:
  recompute: True
parallel_config:
  data_parallel: 2
  model_parallel: 4
  pipeline_stage: 1
  use_seq_parallel: True
  micro_batch_num: 1
  vocab_emb_dp: False
  gradient_aggregation_group: 4
micro_batch_interleave_num: 2
"""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pc = ParallelConfig.from_yaml(path)
    assert pc == ParallelConfig(data_parallel=2, model_parallel=4, pipeline_stage=1, use_seq_parallel=True,
                                micro_batch_num=1, vocab_emb_dp=False, optimizer_shard=True, recompute=True)
    pc.validate(Qwen2Config.from_preset("qwen2-7b"), world_size=8, seq_length=32768)
    assert ParallelConfig.from_dict(pc.to_dict()) == pc


def test_bare_mapping_and_aliases():
    pc = ParallelConfig.from_dict({"tensor_parallel": 2, "data_parallel": 3, "context_parallel": 1})
    assert (pc.data_parallel, pc.model_parallel) == (3, 2)


def test_unknown_key_suggests():
    with pytest.raises(ParallelConfigError, match="did you mean 'model_parallel'"):
        ParallelConfig.from_dict({"model_paralel": 2})
    with pytest.raises(ParallelConfigError, match="context_parallel=2 is not supported"):
        ParallelConfig.from_dict({"context_parallel": 2})


def test_noop_upstream_key_warns():
    from qwen2ms.parallel import config as pconf

    pconf._warned_noop.discard("gradient_aggregation_group")
    with pytest.warns(UserWarning, match="gradient_aggregation_group"):
        ParallelConfig.from_dict({"gradient_aggregation_group": 4})


@pytest.mark.parametrize("field,value", [("data_parallel", 0), ("model_parallel", 1.5), ("pipeline_stage", True),
                                         ("use_seq_parallel", 1)])
def test_bad_field_types(field, value):
    with pytest.raises(ParallelConfigError, match=field):
        ParallelConfig(**{field: value})


def test_world_size_mismatch_lists_fitting_layouts():
    with pytest.raises(ParallelConfigError) as e:
        ParallelConfig(data_parallel=2, model_parallel=2).validate(tiny(), world_size=8)
    msg = str(e.value)
    assert "2*2*1 = 4" in msg and "world size is 8" in msg
    assert "dp=8 mp=1 pp=1" in msg and "dp=4 mp=2 pp=1" in msg
    assert "mp=8" not in msg  # 4 heads cannot split 8 ways


def test_heads_must_divide():
    with pytest.raises(ParallelConfigError, match=r"num_attention_heads=28.*fit this model and 8 devices: \[1, 2, 4\]"):
        ParallelConfig(model_parallel=8).validate(Qwen2Config.from_preset("qwen2-7b"), world_size=8)


def test_kv_heads_split_or_replicated():
    cfg = tiny(num_attention_heads=8, num_key_value_heads=2, hidden_size=64)
    ParallelConfig(model_parallel=2).validate(cfg)  # split
    ParallelConfig(model_parallel=4).validate(cfg)  # replicated in pairs
    cfg3 = tiny(num_attention_heads=6, num_key_value_heads=3, hidden_size=48)
    with pytest.raises(ParallelConfigError, match="num_key_value_heads=3"):
        ParallelConfig(model_parallel=2).validate(cfg3)


def test_vocab_and_mlp_divisibility():
    with pytest.raises(ParallelConfigError, match="vocab_size=65.*vocab_emb_dp"):
        ParallelConfig(model_parallel=2).validate(tiny(vocab_size=65))
    ParallelConfig(model_parallel=2, vocab_emb_dp=True).validate(tiny(vocab_size=65))
    with pytest.raises(ParallelConfigError, match="intermediate_size=50"):
        ParallelConfig(model_parallel=4).validate(tiny(intermediate_size=50))


def test_pipeline_checks():
    with pytest.raises(ParallelConfigError, match="micro_batch_num >= 2"):
        ParallelConfig(pipeline_stage=2).validate()
    with pytest.raises(ParallelConfigError, match="pipeline_stage <= 4"):
        ParallelConfig(pipeline_stage=5, micro_batch_num=5).validate(tiny())
    assert ParallelConfig(pipeline_stage=3, micro_batch_num=3).stage_layers(8) == [range(0, 3), range(3, 6),
                                                                                  range(6, 8)]


def test_seq_parallel_length():
    with pytest.raises(ParallelConfigError, match="multiple of 4"):
        ParallelConfig(model_parallel=4, use_seq_parallel=True).validate(seq_length=30)


def test_expert_parallel():
    moe = Qwen2Config.from_preset("qwen2-57b-a14b")
    ParallelConfig(data_parallel=8, expert_parallel=8).validate(moe, world_size=8)
    with pytest.raises(ParallelConfigError, match="must divide data_parallel"):
        ParallelConfig(data_parallel=2, expert_parallel=4)
    with pytest.raises(ParallelConfigError, match="num_experts=64"):
        ParallelConfig(data_parallel=6, expert_parallel=3).validate(moe)
    with pytest.raises(ParallelConfigError, match="dense models only"):
        ParallelConfig(model_parallel=2, use_seq_parallel=True).validate(moe)
    with pytest.raises(ParallelConfigError, match="needs an MoE model"):
        ParallelConfig(data_parallel=2, expert_parallel=2).validate(tiny())


def test_rank_layout_and_groups():
    pc = ParallelConfig(data_parallel=2, model_parallel=2, pipeline_stage=2, micro_batch_num=2)
    assert pc.rank_coords(5) == (1, 0, 1)
    assert pc.group_ranks("model", 5) == [4, 5]
    assert pc.group_ranks("data", 5) == [5, 7]
    assert pc.group_ranks("pipeline", 5) == [1, 5]
    # every rank is in exactly one group of each kind, and groups partition the world
    for kind in ("model", "data", "pipeline"):
        groups = {tuple(pc.group_ranks(kind, r)) for r in range(8)}
        assert sorted(r for g in groups for r in g) == list(range(8))
    ep = ParallelConfig(data_parallel=4, expert_parallel=2)
    assert ep.group_ranks("expert", 3) == [2, 3]
    with pytest.raises(ParallelConfigError, match="outside"):
        pc.rank_coords(8)


def test_candidate_layouts():
    assert ParallelConfig().candidate_layouts(4, tiny()) == [(4, 1, 1), (2, 1, 2), (1, 1, 4), (2, 2, 1), (1, 2, 2), (1, 4, 1)]
    # 6 heads: mp=4 does not divide them
    assert (1, 4, 1) not in ParallelConfig().candidate_layouts(4, tiny(num_attention_heads=6, hidden_size=48, num_key_value_heads=2))
