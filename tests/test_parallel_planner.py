"""Memory planner: figures against hand-computed values, ranking, and the `qwen2ms plan` command."""
import pytest

from qwen2ms import Qwen2Config
from qwen2ms.cli import main
from qwen2ms.parallel import ParallelConfig
from qwen2ms.parallel.planner import GIB, estimate_memory, plan_memory, stage_parameter_counts


def test_qwen2_72b_predict_tp4_by_hand():
    # h=8192, I=29568, 80 layers, 64 heads, 8 kv heads of 128, vocab 152064, untied, qkv bias.
    # Per layer on one of 4 TP devices:
    q = (8192 * 8192 + 8192) // 4          # 16_779_264
    kv = 2 * (8192 * 2 * 128 + 2 * 128)     # 2 kv heads each for k and v: 4_194_816
    o = 8192 * 8192 // 4                    # 16_777_216
    norms = 2 * 8192
    mlp = 3 * 8192 * (29568 // 4)           # 181_665_792
    layer = q + kv + o + norms + mlp
    assert layer == 219_433_472
    vocab = (152064 // 4) * 8192            # embedding rows on this device; lm_head the same
    params = 80 * layer + 2 * vocab + 8192
    assert params == 18_177_540_096
    kv_cache = 2 * 80 * 1 * 32768 * 2 * 128 * 2       # k and v, 80 layers, 2 local heads, bf16
    assert kv_cache == int(2.5 * GIB)
    # prefill workspace, elements per token with sequence parallel over 4: norms/residual 4h/4, q h/4,
    # k+v 2*2*128, attention out h/4, MLP 4*I/4; then last-position fp32 logits over 38016 rows.
    per_token = 8192 + 2048 + 512 + 2048 + 29568
    workspace = per_token * 32768 * 2 + 38016 * 4
    est = estimate_memory(Qwen2Config.from_preset("qwen2-72b"),
                          ParallelConfig(model_parallel=4, use_seq_parallel=True),
                          mode="predict", seq_length=32768, device_memory_gib=64)
    assert est.parameter_count == params
    assert est.parameters == params * 2
    assert est.kv_cache == kv_cache
    assert est.activations == workspace
    assert est.gradients == est.optimizer_state == 0
    assert est.total == params * 2 + kv_cache + workspace == 41_816_216_064
    assert est.fits  # 38.9 GiB of 62


def test_qwen2_7b_finetune_dp2_tp4_sp_by_hand():
    # h=3584, I=18944, 28 layers, 28 heads, 4 kv heads (one per device), vocab 152064 untied.
    q = (3584 * 3584 + 3584) // 4
    kv = 2 * (3584 * 128 + 128)
    o = 3584 * 3584 // 4
    mlp = 3 * 3584 * 18944 // 4
    layer = q + kv + o + 2 * 3584 + mlp
    assert layer == 58_269_824
    params = 28 * layer + 2 * (152064 // 4) * 3584 + 3584
    assert params == 1_904_057_344
    weights, grads = 2 * params, 4 * params               # bf16 weights, fp32 gradients
    optim = params * (4 + 4 + 4) // 2                      # fp32 master + 2 moments, sharded over dp=2
    # activations per token per layer (SP over 4): 3584 + 896 + 256 + 896 + 18944 = 24576;
    # last stage adds final-norm/lm_head inputs 2h/4 = 1792 and fp32 logits 38016 rows = 76032 bf16 slots
    elems = 28 * 24576 + 1792 + 38016 * 2
    acts = elems * 4096 * 2
    layout = ParallelConfig(data_parallel=2, model_parallel=4, use_seq_parallel=True, optimizer_shard=True)
    est = estimate_memory(Qwen2Config.from_preset("qwen2-7b"), layout, mode="finetune", seq_length=4096)
    assert (est.parameters, est.gradients, est.optimizer_state, est.activations) == (weights, grads, optim, acts)
    assert est.total == 29_123_366_912


def test_recompute_and_pipeline_activations():
    cfg = Qwen2Config.from_preset("qwen2-7b")
    base = dict(data_parallel=1, model_parallel=1)
    full = estimate_memory(cfg, ParallelConfig(**base), seq_length=1024)
    rec = estimate_memory(cfg, ParallelConfig(recompute=True, **base), seq_length=1024)
    # recompute keeps one h per token per layer plus one layer's full set
    per_layer = 6 * 3584 + 2 * 4 * 128 + 4 * 18944
    tail = 2 * 3584 + 152064 * 2
    assert full.activations == (28 * per_layer + tail) * 1024 * 2
    assert rec.activations == (28 * 3584 + per_layer + tail) * 1024 * 2
    pp = estimate_memory(cfg, ParallelConfig(pipeline_stage=2, micro_batch_num=4), seq_length=1024)
    # stage 0 (14 layers + embedding) keeps 2 micro-batches in flight, stage 1 one: stage 0 is the worst
    assert pp.stage == 0
    assert pp.activations == 14 * per_layer * 1024 * 2 * 2


def test_no_flash_attention_adds_probabilities():
    cfg = Qwen2Config.from_preset("qwen2-0.5b")
    a = estimate_memory(cfg, ParallelConfig(), seq_length=512)
    b = estimate_memory(cfg, ParallelConfig(), seq_length=512, flash_attention=False)
    assert b.activations - a.activations == 24 * 14 * 512 * 512 * 2


def test_stage_counts_sum_to_model():
    for name in ("qwen2-0.5b", "qwen2-7b", "qwen2-57b-a14b"):
        cfg = Qwen2Config.from_preset(name)
        (one,) = stage_parameter_counts(cfg, ParallelConfig())
        assert one["dense"] + one["expert"] == cfg.num_parameters()
    cfg = Qwen2Config.from_preset("qwen2-7b")
    two = stage_parameter_counts(cfg, ParallelConfig(pipeline_stage=2, micro_batch_num=2))
    assert sum(s["dense"] for s in two) == cfg.num_parameters()
    moe = Qwen2Config.from_preset("qwen2-57b-a14b")
    ep = stage_parameter_counts(moe, ParallelConfig(data_parallel=4, expert_parallel=4))[0]
    assert ep["expert"] * 4 == 28 * 64 * 3 * 3584 * 2560


def test_plan_72b_suggests_upstream_layout():
    plan = plan_memory(Qwen2Config.from_preset("qwen2-72b"), 8, mode="predict", seq_length=32768,
                       device_memory_gib=64)
    best = plan.best.layout
    assert (best.data_parallel, best.model_parallel, best.pipeline_stage) == (2, 4, 1)
    assert all(e.fits for e in plan.estimates[: len(plan.fitting)])
    assert all(e.layout.pipeline_stage == 1 for e in plan.estimates)  # generation is tensor-parallel
    # 72B full fine-tuning does not fit 8 x 64 GiB
    ft = plan_memory(Qwen2Config.from_preset("qwen2-72b"), 8, mode="finetune", seq_length=32768)
    assert ft.best is None and ft.estimates[0].total == min(e.total for e in ft.estimates)


def test_bad_inputs():
    cfg = Qwen2Config.from_preset("qwen2-0.5b")
    with pytest.raises(ValueError, match="mode"):
        estimate_memory(cfg, ParallelConfig(), mode="train")
    with pytest.raises(ValueError, match="param_dtype"):
        estimate_memory(cfg, ParallelConfig(), param_dtype="fp8")
    with pytest.raises(ValueError, match="devices"):
        plan_memory(cfg, 0)


def test_cli_plan(capsys):
    rc = main(["plan", "--model", "qwen2-72b", "--devices", "8", "--device-memory", "64", "--seq-length", "32768",
               "--mode", "predict"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "suggested: data_parallel=2 model_parallel=4 pipeline_stage=1" in out
    # 33.86 weights + 2.50 KV cache + prefill workspace without sequence parallel:
    # (4h + h/4 + 2*2*128 + h/4 + 4*I/4) * 32768 tokens * 2 bytes = 4.09 GiB
    assert "40.44" in out
    rc = main(["plan", "--model", "qwen2-72b", "--devices", "8", "--seq-length", "32768", "--mode", "finetune"])
    assert rc == 1 and "nothing fits" in capsys.readouterr().out
    assert main(["plan", "--model", "qwen3-1b", "--devices", "8"]) == 2
    assert "unknown preset" in capsys.readouterr().err


def test_cli_plan_config_json(tmp_path, capsys):
    cfg = Qwen2Config.from_preset("qwen2-0.5b")
    cfg.to_json(tmp_path / "config.json")
    assert main(["plan", "--model", str(tmp_path), "--devices", "1", "--mode", "predict"]) == 0
    assert "suggested: data_parallel=1 model_parallel=1" in capsys.readouterr().out


def test_moe_plan_has_no_sequence_parallel():
    plan = plan_memory(Qwen2Config.from_preset("qwen2-57b-a14b"), 16, mode="finetune", seq_length=4096)
    assert plan.estimates and not any(e.layout.use_seq_parallel for e in plan.estimates)
    assert all(e.layout.expert_parallel == e.layout.data_parallel for e in plan.estimates)
