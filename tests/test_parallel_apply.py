"""Single-process checks of the parallel layer: plans, parameter sharding (against the planner's memory figures),
a one-device parallelize, the launch helpers and one-member collectives."""
import numpy as np
import pytest

from qwen2ms import Qwen2Config
from qwen2ms.parallel import ParallelConfig, ParallelConfigError
from qwen2ms.parallel.planner import estimate_memory, stage_parameter_counts
from qwen2ms.parallel.plans import PARAM_PLAN, ParamSplit, match, param_shard, shard_ranges

DENSE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _nbytes(model):
    return sum(int(np.prod(p.shape)) * p.itemsize for p in model.get_parameters())


def test_plan_matching():
    assert match(PARAM_PLAN, "model.layers.11.self_attn.k_proj.bias") == ParamSplit(0, "kv_heads")
    assert match(PARAM_PLAN, "model.layers.0.mlp.shared_expert.down_proj.weight") == ParamSplit(1)
    assert match(PARAM_PLAN, "model.layers.0.input_layernorm.weight") is None
    assert match(PARAM_PLAN, "model.layers.0.mlp.gate.weight") is None  # the MoE router stays whole


def test_param_shard_kinds():
    cfg = Qwen2Config(**DENSE)
    fused = np.arange(2 * 6 * 3).reshape(2, 6, 3)  # [E, 2I, H] with I = 3
    with pytest.raises(ValueError):
        param_shard(fused, ParamSplit(1, "halves"), cfg, 0, 2)  # 3 gate rows cannot split in 2
    fused = np.arange(2 * 8 * 3).reshape(2, 8, 3)  # gate rows 0..3, up rows 4..7
    got = param_shard(fused, ParamSplit(1, "halves", expert_dim=0), cfg, 1, 2, ep_rank=1, ep=2)
    np.testing.assert_array_equal(got, fused[1:2][:, [2, 3, 6, 7]])
    # 2 kv heads of 8 over 4 ranks: ranks 0,1 keep head 0; ranks 2,3 head 1
    assert shard_ranges(ParamSplit(0, "kv_heads"), 16, 1, 4, cfg) == [(0, 8)]
    assert shard_ranges(ParamSplit(0, "kv_heads"), 16, 2, 4, cfg) == [(8, 16)]
    w = np.arange(64 * 4).reshape(64, 4)
    assert param_shard(w, ParamSplit(0, "vocab"), cfg, 1, 2, vocab_emb_dp=True) is w
    np.testing.assert_array_equal(param_shard(w, ParamSplit(0, "vocab"), cfg, 1, 2), w[32:])


@pytest.mark.parametrize("fields,layout", [
    (dict(DENSE), dict(model_parallel=2)),
    (dict(DENSE, tie_word_embeddings=True, num_key_value_heads=1), dict(model_parallel=2)),
    (dict(DENSE, tie_word_embeddings=True), dict(model_parallel=2, vocab_emb_dp=True)),
    (dict(DENSE, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
          shared_expert_intermediate_size=24), dict(data_parallel=2, model_parallel=2, expert_parallel=2)),
])
def test_measured_parameter_memory_matches_planner(fields, layout):
    from qwen2ms.modeling.model import Qwen2ForCausalLM
    from qwen2ms.parallel.apply import shard_parameters

    cfg = Qwen2Config(**fields)
    pc = ParallelConfig(**layout)
    full = Qwen2ForCausalLM(cfg)
    assert _nbytes(full) == estimate_memory(cfg, ParallelConfig(), mode="predict", seq_length=8,
                                            param_dtype="float32").parameters
    for rank in range(pc.world_size):
        m = Qwen2ForCausalLM(cfg)
        shard_parameters(m, pc, rank)
        est = estimate_memory(cfg, pc, mode="predict", seq_length=8, param_dtype="float32")
        assert _nbytes(m) == est.parameters, f"rank {rank}"
        assert sum(stage_parameter_counts(cfg, pc)[0].values()) * 4 == _nbytes(m)


def test_bf16_shard_keeps_dtype():
    import mindspore as ms

    from qwen2ms.modeling.model import Qwen2ForCausalLM
    from qwen2ms.parallel.apply import shard_parameters

    m = Qwen2ForCausalLM(Qwen2Config(**DENSE), dtype="bfloat16")
    full = m.model.layers[0].mlp.down_proj.weight.asnumpy().astype(np.float32)
    shapes = shard_parameters(m, ParallelConfig(model_parallel=2), rank=1)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (32, 24)
    w = m.model.layers[0].mlp.down_proj.weight
    assert w.dtype == ms.bfloat16 and w.name == "model.layers.0.mlp.down_proj.weight"
    np.testing.assert_array_equal(w.asnumpy().astype(np.float32), full[:, 24:])


def test_one_device_parallelize_equals_model():
    from qwen2ms.modeling.model import Qwen2ForCausalLM
    from qwen2ms.parallel.apply import parallelize

    cfg = Qwen2Config(**DENSE)
    ids = np.random.default_rng(0).integers(0, 64, (2, 6))
    ref = Qwen2ForCausalLM(cfg, seed=2)(ids, labels=ids)
    model = Qwen2ForCausalLM(cfg, seed=2)
    names = [p.name for p in model.trainable_params()]
    pm = parallelize(model, ParallelConfig(recompute=True))
    out = pm(ids, labels=ids)
    np.testing.assert_allclose(out.logits.asnumpy(), ref.logits.asnumpy(), atol=1e-6)
    assert float(out.loss.asnumpy()) == pytest.approx(float(ref.loss.asnumpy()), abs=1e-6)
    assert [p.name for p in pm.trainable_params()] == names
    with pytest.raises(ParallelConfigError, match="world size is 1"):
        parallelize(Qwen2ForCausalLM(cfg), ParallelConfig(model_parallel=2))
    import mindspore as ms

    params = pm.trainable_params()
    ids_t = ms.Tensor(ids.astype(np.int32))
    total, count, aux = pm.token_loss(ids_t, ids_t)
    assert float((total / count).asnumpy()) == pytest.approx(float(ref.loss.asnumpy()), abs=1e-6)
    assert float(aux.asnumpy()) == 0.0
    _, grads = ms.value_and_grad(lambda i: pm(i, labels=i).loss, None, params)(ids_t)
    local = np.sqrt(sum(float((g.asnumpy().astype(np.float64) ** 2).sum()) for g in grads))
    assert float(pm.grad_norm(grads).asnumpy()) == pytest.approx(local, rel=1e-6)
    cache = pm.new_cache(2, 8)
    assert cache.keys[0].shape == (2, 2, 8, 8)
    np.testing.assert_allclose(pm.forward_step(ids[:, :3], None, None, cache, 0).asnumpy(),
                               ref.logits.asnumpy()[:, :3], atol=1e-5)


def test_one_member_collectives_are_identity():
    import mindspore as ms

    from qwen2ms.parallel import comm

    g = comm.single_group()
    x = ms.Tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    for y in (comm.all_reduce(x, "max", g), comm.all_gather(x, 1, g), comm.reduce_scatter(x, 0, g),
              comm.all_to_all(x, 1, 0, g), comm.broadcast(x, 0, g)):
        np.testing.assert_array_equal(y.asnumpy(), x.asnumpy())
    with pytest.raises(ValueError, match="two-member group"):
        comm.send(x, 1, g)
    with pytest.raises(ValueError, match="'sum', 'max'"):
        comm.all_reduce(x, "mean", g)


def test_msrun_command_lines():
    from qwen2ms.parallel.launch import msrun_command

    assert msrun_command("train.py", ["--config", "run.yaml"], worker_num=8) == [
        "msrun", "--worker_num=8", "--local_worker_num=8", "--master_addr=127.0.0.1", "--master_port=8118",
        "--log_dir=msrun_log", "--join=True", "train.py", "--config", "run.yaml"]
    multi = msrun_command("train.py", worker_num=16, local_worker_num=8, master_addr="192.0.2.10", node_rank=1,
                          cluster_time_out=600)
    assert "--node_rank=1" in multi and "--cluster_time_out=600" in multi and "--local_worker_num=8" in multi
    with pytest.raises(ValueError, match="multiple of local_worker_num"):
        msrun_command("t.py", worker_num=12, local_worker_num=8)
    with pytest.raises(ValueError, match="master_port"):
        msrun_command("t.py", worker_num=2, master_port=80)


def test_data_shard():
    from qwen2ms.parallel.launch import data_shard

    pc = ParallelConfig(data_parallel=2, model_parallel=2, pipeline_stage=2, micro_batch_num=2)
    assert [data_shard(pc, r) for r in range(8)] == [(2, 0), (2, 0), (2, 1), (2, 1)] * 2


def test_init_distributed_outside_msrun(monkeypatch):
    from qwen2ms.parallel.launch import init_distributed, under_msrun

    monkeypatch.delenv("MS_ROLE", raising=False)
    assert not under_msrun()
    assert init_distributed(ParallelConfig()) == (0, 1)
    with pytest.raises(ParallelConfigError, match="msrun --worker_num=4"):
        init_distributed(ParallelConfig(data_parallel=2, model_parallel=2))


@pytest.mark.parametrize("tied", [False, True])
def test_pipeline_stage_memory_matches_planner(tied):
    from qwen2ms.modeling.model import Qwen2ForCausalLM
    from qwen2ms.parallel.pipeline import prune_to_stage

    cfg = Qwen2Config(**dict(DENSE, num_hidden_layers=3, tie_word_embeddings=tied))
    pc = ParallelConfig(pipeline_stage=2, micro_batch_num=2)
    counts = stage_parameter_counts(cfg, pc)
    for stage, layers in enumerate(([0, 1], [2])):
        m = Qwen2ForCausalLM(cfg)
        assert list(prune_to_stage(m, pc, stage)) == layers
        assert _nbytes(m) == sum(counts[stage].values()) * 4
        names = {p.name for p in m.get_parameters()}
        assert all(int(n.split(".")[2]) in layers for n in names if ".layers." in n)
        assert ("model.norm.weight" in names) == (stage == 1)


def test_pipeline_rejects_moe_aux_loss():
    from qwen2ms.modeling.model import Qwen2ForCausalLM
    from qwen2ms.parallel.pipeline import prune_to_stage

    cfg = Qwen2Config(**dict(DENSE, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=16, output_router_logits=True))
    with pytest.raises(ParallelConfigError, match="output_router_logits"):
        prune_to_stage(Qwen2ForCausalLM(cfg), ParallelConfig(pipeline_stage=2, micro_batch_num=2), 0)


def test_sharded_optimizer_single_member_equals_plain():
    import mindspore as ms
    from mindspore import nn

    from qwen2ms.modeling.model import Qwen2ForCausalLM
    from qwen2ms.parallel import comm
    from qwen2ms.parallel.apply import parallelize
    from qwen2ms.parallel.optimizer import ShardedOptimizer, make_optimizer

    cfg = Qwen2Config(**DENSE)
    ids = ms.Tensor(np.random.default_rng(1).integers(0, 64, (2, 6)).astype(np.int32))
    results = []
    for sharded in (False, True):
        pm = parallelize(Qwen2ForCausalLM(cfg, seed=4), ParallelConfig())
        params = pm.trainable_params()
        _, grads = ms.value_and_grad(lambda i: pm(i, labels=i).loss, None, params)(ids)
        make = lambda ps: nn.AdamWeightDecay(ps, learning_rate=1e-2, weight_decay=0.1)  # noqa: E731
        opt = ShardedOptimizer(params, make, comm.single_group()) if sharded else make_optimizer(pm, make)
        opt(grads)
        results.append([p.asnumpy() for p in params])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, atol=1e-7)
    with pytest.raises(ValueError, match="gradients for"):
        opt(grads[:2])


def _quantize(model, group_size):
    from qwen2ms.modeling.quantize import quantize_int8_weights

    assert quantize_int8_weights(model, group_size=group_size) > 0
    return model


def _dequantised(model):
    """``{weight name: float32 q * scale}`` of every int8 weight of a model."""
    from qwen2ms.ops.cpu import dequantize_int8

    return {cell.weight.name: dequantize_int8(cell.weight, cell.weight_scale).asnumpy()
            for _, cell in model.cells_and_names() if getattr(cell, "weight_scale", None) is not None}


@pytest.mark.parametrize("tied,group_size", [(False, None), (True, 32), (False, 32)])
def test_int8_shards_dequantise_to_slices_of_the_whole_weights(tied, group_size):
    """Each rank's int8 codes with their cut scales are its slice of the one-device int8 weights."""
    from qwen2ms.modeling.model import Qwen2ForCausalLM
    from qwen2ms.parallel.apply import shard_parameters

    # hidden 64: q/k/v/o, gate/up and the head take groups of 32 inputs (o_proj is split by its inputs);
    # down_proj's 48 inputs keep per-channel scales
    cfg = Qwen2Config(**dict(DENSE, hidden_size=64, tie_word_embeddings=tied))
    pc = ParallelConfig(model_parallel=2)
    whole = _dequantised(_quantize(Qwen2ForCausalLM(cfg, seed=1), group_size))
    assert len(whole) == 2 * 7 + (1 if tied else 2)
    for rank in range(2):
        m = _quantize(Qwen2ForCausalLM(cfg, seed=1), group_size)
        shard_parameters(m, pc, rank)
        got = _dequantised(m)
        assert got.keys() == whole.keys()
        for name, w in whole.items():
            want = param_shard(w, match(PARAM_PLAN, name), cfg, rank, 2)
            np.testing.assert_array_equal(got[name], want, err_msg=f"{name} rank {rank}")


def test_int8_group_scales_split_inside_a_group_are_refused():
    from qwen2ms.modeling.model import Qwen2ForCausalLM
    from qwen2ms.parallel.apply import shard_parameters

    # o_proj: two groups of 32 inputs; 4 ranks would keep 16 inputs each
    m = _quantize(Qwen2ForCausalLM(Qwen2Config(**dict(DENSE, hidden_size=64))), 32)
    before = {p.name: tuple(p.shape) for p in m.get_parameters()}
    with pytest.raises(ParallelConfigError, match=r"o_proj\.weight_scale: .*groups of 32 inputs.*group_size=None"):
        shard_parameters(m, ParallelConfig(model_parallel=4), 1)
    assert {p.name: tuple(p.shape) for p in m.get_parameters()} == before  # nothing was cut


@pytest.mark.parametrize("tied", [False, True])
def test_one_device_parallelize_of_int8_model_equals_model(tied):
    """The parallel model's head reads the int8 codes with their scales (it once multiplied by the raw codes)."""
    from qwen2ms.modeling.model import Qwen2ForCausalLM
    from qwen2ms.parallel.apply import parallelize

    cfg = Qwen2Config(**dict(DENSE, tie_word_embeddings=tied))
    ids = np.random.default_rng(0).integers(0, 64, (2, 6))
    ref = _quantize(Qwen2ForCausalLM(cfg, seed=2), None)(ids, labels=ids)
    pm = parallelize(_quantize(Qwen2ForCausalLM(cfg, seed=2), None), ParallelConfig())
    out = pm(ids, labels=ids)
    np.testing.assert_allclose(out.logits.asnumpy(), ref.logits.asnumpy(), atol=1e-5)
    assert float(out.loss.asnumpy()) == pytest.approx(float(ref.loss.asnumpy()), abs=1e-5)


def test_parallel_model_refuses_whole_model_exports(tmp_path):
    from qwen2ms.modeling.model import Qwen2ForCausalLM
    from qwen2ms.parallel.apply import parallelize

    pm = parallelize(Qwen2ForCausalLM(Qwen2Config(**DENSE)), ParallelConfig())
    for call in (lambda: pm.save_pretrained(tmp_path / "hf"), lambda: pm.save_checkpoint(tmp_path / "m.ckpt"),
                 pm.named_weights, pm.num_parameters):
        with pytest.raises(TypeError, match="this rank's shards.*save_rank_checkpoint"):
            call()
    assert not any(tmp_path.iterdir())


def test_parallel_modules_import_each_other_without_a_cycle():
    """Within qwen2ms.parallel, imports (lazy ones too) form no cycle: pipeline.py once imported apply.py's helpers
    back while apply.py imported pipeline.py."""
    import ast
    from pathlib import Path

    import qwen2ms.parallel

    folder = Path(qwen2ms.parallel.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        nodes = ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        graph[path.stem] = {n.module.split(".")[0] for n in nodes
                            if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}
    graph.pop("__init__")  # the package's lazy name table points at every module by design
    done, stack = set(), []

    def visit(mod):
        assert mod not in stack, f"import cycle: {' -> '.join(stack[stack.index(mod):] + [mod])}"
        if mod in done or mod not in graph:
            return
        stack.append(mod)
        for dep in graph[mod]:
            visit(dep)
        stack.pop()
        done.add(mod)

    for mod in graph:
        visit(mod)
    assert "regions" in graph["pipeline"] and "apply" not in graph["pipeline"]
