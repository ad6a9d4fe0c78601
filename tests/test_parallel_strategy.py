"""Strategy files and checkpoint split / merge / reshard through mindspore.parallel.transform_checkpoints."""
import numpy as np
import pytest

from qwen2ms import Qwen2Config
from qwen2ms.parallel import ParallelConfig, ParallelConfigError

DENSE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
MOE = dict(DENSE, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
           shared_expert_intermediate_size=24)


def _full_ckpt(tmp_path, cfg, dtype=None):
    import mindspore as ms

    from qwen2ms.modeling.model import Qwen2ForCausalLM

    model = Qwen2ForCausalLM(cfg, seed=5, dtype=dtype)
    path = tmp_path / "full.ckpt"
    ms.save_checkpoint(model, str(path))
    return path, {p.name: p.asnumpy() for p in model.get_parameters()}


def _load(path):
    import mindspore as ms

    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def test_layouts():
    from qwen2ms.parallel.strategy import layout_for

    cfg = Qwen2Config(**dict(DENSE, num_key_value_heads=1))
    pc = ParallelConfig(data_parallel=2, model_parallel=2)
    assert layout_for("model.layers.0.self_attn.q_proj.weight", (32, 32), cfg, pc) == ([2, 1, 2], [0, -1])
    assert layout_for("model.layers.0.self_attn.o_proj.weight", (32, 32), cfg, pc) == ([2, 1, 2], [-1, 0])
    assert layout_for("model.norm.weight", (32,), cfg, pc) == ([2, 1, 2], [-1])
    # one kv head over 2 TP ranks: replicated, split by a kv axis of size 1
    assert layout_for("model.layers.0.self_attn.k_proj.weight", (8, 32), cfg, pc) == ([2, 1, 1, 2], [1, -1])
    assert layout_for("lm_head.weight", (64, 32), cfg, pc.replace(vocab_emb_dp=True)) == ([2, 1, 2], [-1, -1])
    moe = Qwen2Config(**MOE)
    ep = ParallelConfig(data_parallel=2, expert_parallel=2, model_parallel=2)
    assert layout_for("model.layers.1.mlp.experts.down_proj", (4, 32, 16), moe, ep) == ([1, 2, 2], [1, -1, 0])
    with pytest.raises(ParallelConfigError, match="pipeline"):
        layout_for("model.norm.weight", (32,), cfg, ParallelConfig(pipeline_stage=2, micro_batch_num=2))


@pytest.mark.parametrize("fields,layout,dtype", [
    (DENSE, dict(model_parallel=2), None),
    (dict(DENSE, num_key_value_heads=1, tie_word_embeddings=True), dict(data_parallel=2, model_parallel=2), None),
    (MOE, dict(data_parallel=2, expert_parallel=2, model_parallel=2), None),
    (DENSE, dict(model_parallel=2), "bfloat16"),
])
def test_split_then_merge_is_identity(tmp_path, fields, layout, dtype):
    from qwen2ms.modeling.model import Qwen2ForCausalLM
    from qwen2ms.parallel.apply import shard_parameters
    from qwen2ms.parallel.strategy import merge_checkpoints, split_checkpoint

    cfg, pc = Qwen2Config(**fields), ParallelConfig(**layout)
    full_path, full = _full_ckpt(tmp_path, cfg, dtype)
    paths = split_checkpoint(full_path, tmp_path / "shards", cfg, pc)
    assert len(paths) == pc.world_size and (tmp_path / "shards" / "strategy.ckpt").is_file()
    for rank, path in enumerate(paths):
        # each shard holds exactly what parallelize gives that rank
        model = Qwen2ForCausalLM(cfg, seed=5, dtype=dtype)
        shard_parameters(model, pc, rank)
        shard = _load(path)
        assert sorted(shard) == sorted(full)
        for p in model.get_parameters():
            np.testing.assert_array_equal(shard[p.name], p.asnumpy(), err_msg=f"{p.name} rank {rank}")
    merged = _load(merge_checkpoints(tmp_path / "shards", tmp_path / "merged.ckpt", cfg, pc))
    assert sorted(merged) == sorted(full)
    for name, arr in full.items():
        assert merged[name].dtype == arr.dtype
        np.testing.assert_array_equal(merged[name], arr, err_msg=name)


def test_reshard_tp_to_dp_and_tp4(tmp_path):
    from qwen2ms.parallel.strategy import reshard_checkpoints, split_checkpoint

    cfg = Qwen2Config(**dict(DENSE, num_attention_heads=4, num_key_value_heads=4))
    full_path, full = _full_ckpt(tmp_path, cfg)
    split_checkpoint(full_path, tmp_path / "tp2", cfg, ParallelConfig(model_parallel=2))
    dp = reshard_checkpoints(tmp_path / "tp2", tmp_path / "dp2", cfg, ParallelConfig(model_parallel=2),
                             ParallelConfig(data_parallel=2))
    for path in dp:
        shard = _load(path)
        for name, arr in full.items():
            np.testing.assert_array_equal(shard[name], arr)
    tp4 = reshard_checkpoints(tmp_path / "dp2", tmp_path / "tp4", cfg, ParallelConfig(data_parallel=2),
                              ParallelConfig(model_parallel=4))
    q = "model.layers.1.self_attn.q_proj.weight"
    for r, path in enumerate(tp4):
        np.testing.assert_array_equal(_load(path)[q], full[q][r * 8:(r + 1) * 8])


def test_rank_checkpoint_round_trip(tmp_path):
    from qwen2ms.modeling.model import Qwen2ForCausalLM
    from qwen2ms.parallel.apply import parallelize
    from qwen2ms.parallel.strategy import load_rank_checkpoint, merge_checkpoints, save_rank_checkpoint

    cfg = Qwen2Config(**DENSE)
    pm = parallelize(Qwen2ForCausalLM(cfg, seed=5), ParallelConfig())
    path = save_rank_checkpoint(pm, tmp_path / "ck")
    assert path == tmp_path / "ck" / "rank_0" / "qwen2ms0.ckpt"
    other = parallelize(Qwen2ForCausalLM(cfg, seed=9), ParallelConfig())
    load_rank_checkpoint(other, tmp_path / "ck")
    for a, b in zip(pm.get_parameters(), other.get_parameters()):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    merged = _load(merge_checkpoints(tmp_path / "ck", tmp_path / "m.ckpt", cfg, ParallelConfig()))
    assert set(merged) == {p.name for p in pm.get_parameters()}
    small = parallelize(Qwen2ForCausalLM(Qwen2Config(**dict(DENSE, intermediate_size=24)), seed=5),
                        ParallelConfig())
    with pytest.raises(ValueError, match="another layout"):
        load_rank_checkpoint(small, tmp_path / "ck")


def test_lazy_model_loads_only_its_shard(tmp_path):
    from qwen2ms.modeling.model import Qwen2ForCausalLM
    from qwen2ms.parallel.apply import shard_parameters
    from qwen2ms.parallel.plans import PARAM_PLAN, match, param_shard
    from qwen2ms.parallel.strategy import load_rank_checkpoint, split_checkpoint

    cfg, pc = Qwen2Config(**DENSE), ParallelConfig(model_parallel=2)
    full_path, full = _full_ckpt(tmp_path, cfg)
    split_checkpoint(full_path, tmp_path / "shards", cfg, pc)
    lazy = Qwen2ForCausalLM(cfg, init_weights=False)
    shard_parameters(lazy, pc, rank=1)
    with pytest.raises(ValueError, match="pass rank="):
        load_rank_checkpoint(lazy, tmp_path / "shards")
    load_rank_checkpoint(lazy, tmp_path / "shards", rank=1)
    for p in lazy.get_parameters():
        want = param_shard(full[p.name], match(PARAM_PLAN, p.name), cfg, 1, 2)
        np.testing.assert_array_equal(p.asnumpy(), want, err_msg=p.name)
