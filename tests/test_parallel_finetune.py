"""`qwen2ms finetune` / `generate` and the Trainer with a parallel layout, in one process: refusals without msrun,
and the parallel code path on one device. The real 2-process msrun jobs are in test_parallel_finetune_msrun_dp.py
and test_parallel_finetune_msrun_pp.py."""
import json

import numpy as np
import pytest

pytest.importorskip("mindspore")
yaml = pytest.importorskip("yaml")

from finetune_cases import MODEL, TRAINING, write_samples, write_config, write_predict_config  # noqa: E402

from qwen2ms.training import RunConfigError  # noqa: E402
from qwen2ms.training.run_config import run_finetune  # noqa: E402


def test_layout_outside_msrun_names_the_msrun_command(tmp_path, monkeypatch):
    monkeypatch.delenv("MS_ROLE", raising=False)
    path = write_config(tmp_path, "dp2", {"data_parallel": 2})
    with pytest.raises(RunConfigError) as e:
        run_finetune(path)
    msg = str(e.value)
    assert "needs 2 devices" in msg and "not started by msrun" in msg
    assert "msrun --worker_num=2 --local_worker_num=2" in msg
    assert f"python -m qwen2ms.cli finetune --config {path}" in msg


def test_worker_count_that_does_not_match_the_layout_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    monkeypatch.setenv("MS_WORKER_NUM", "4")
    path = write_config(tmp_path, "tp2", {"model_parallel": 2})
    with pytest.raises(RunConfigError, match=r"msrun started 4 workers but this layout needs 2.*--worker_num=2"):
        run_finetune(path)


@pytest.mark.parametrize("parallel,training,words", [
    ({"data_parallel": 1, "pipeline_stage": 2, "micro_batch_num": 2}, {"lora_r": 4},
     r"lora_r=4 with a parallel layout \(\{'data_parallel': 1, .*'pipeline_stage': 2.*train LoRA on one device"),
    ({"model_parallel": 2, "use_seq_parallel": True}, {}, r"pad_to_multiple_of to a multiple of 2 \(it is 3\)"),
])
def test_layouts_the_trainer_does_not_drive_are_refused_before_launch(tmp_path, monkeypatch, parallel, training,
                                                                      words):
    monkeypatch.delenv("MS_ROLE", raising=False)
    path = write_config(tmp_path, "bad", parallel, **training)
    data = yaml.safe_load(path.read_text())
    data["data"]["pad_to_multiple_of"] = 3
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RunConfigError, match=words):
        run_finetune(path)


@pytest.mark.parametrize("parallel,words", [
    ({"model_parallel": 2}, r"(?s)needs 2 devices .*python -m qwen2ms.cli generate --config"),
    ({"pipeline_stage": 2, "micro_batch_num": 2}, "pipeline_stage=2: generation runs tensor-parallel layouts"),
    ({"model_parallel": 2, "use_seq_parallel": True}, "use_seq_parallel=true: generation"),
])
def test_generate_with_a_layout_outside_msrun_is_refused(tmp_path, monkeypatch, capsys, parallel, words):
    import re

    from qwen2ms.cli import main

    monkeypatch.delenv("MS_ROLE", raising=False)
    # the CLI reports the RunConfigError as "qwen2ms generate: error: ..." with exit code 2
    assert main(["generate", "--config", str(write_predict_config(tmp_path, "p", parallel)), "--prompt", "hi"]) == 2
    assert re.search(words, capsys.readouterr().err)


def test_trainer_layout_check_accepts_pipeline_and_zero_and_refuses_lora():
    from qwen2ms.parallel import ParallelConfig
    from qwen2ms.training.trainer import check_parallel_layout

    check_parallel_layout(ParallelConfig(pipeline_stage=2, micro_batch_num=2))
    check_parallel_layout(ParallelConfig(data_parallel=2, pipeline_stage=2, micro_batch_num=4, optimizer_shard=True))
    check_parallel_layout(ParallelConfig(data_parallel=2, model_parallel=2, use_seq_parallel=True), lora_r=0)
    with pytest.raises(ValueError, match="lora_r=8 with a parallel layout.*'pipeline_stage': 2"):
        check_parallel_layout(ParallelConfig(pipeline_stage=2, micro_batch_num=2), lora_r=8)


def test_micro_batch_weights_normalise_by_the_step_token_count():
    from qwen2ms.parallel.pipeline import micro_batch_weights

    labels = [np.array([[1, 2, 3], [4, -100, 6]]), np.array([[1, -100, -100], [1, 2, 3]])]  # 3 and 2 counted
    assert micro_batch_weights(labels) == pytest.approx([0.6, 0.4])
    assert micro_batch_weights(labels, num_items=10) == pytest.approx([0.3, 0.2])
    assert micro_batch_weights([np.full((1, 4), -100)]) == [0.0]
    for bad in (0, -3.0, float("nan")):
        with pytest.raises(ValueError, match="num_items must be a positive token count"):
            micro_batch_weights(labels, num_items=bad)


@pytest.mark.parametrize("layout", [dict(pipeline_stage=2, micro_batch_num=2),
                                    dict(pipeline_stage=2, micro_batch_num=2, model_parallel=2),
                                    dict(pipeline_stage=2, micro_batch_num=2, data_parallel=2)])
def test_merge_stage_checkpoints_rebuilds_the_full_model(tmp_path, layout):
    """Per-rank files as a pipeline layout's ranks write them (their stage's parameters, tensor-parallel slices)."""
    import mindspore as ms

    from qwen2ms import Qwen2Config
    from qwen2ms.modeling import Qwen2ForCausalLM
    from qwen2ms.parallel import ParallelConfig
    from qwen2ms.parallel.apply import shard_parameters
    from qwen2ms.parallel.pipeline import merge_stage_checkpoints

    cfg = Qwen2Config(**dict(MODEL, num_hidden_layers=3))
    pc = ParallelConfig(**layout)
    want = {n: p.asnumpy() for n, p in Qwen2ForCausalLM(cfg, seed=5).parameters_and_names()}
    stages = pc.stage_layers(cfg.num_hidden_layers)
    for r in range(pc.world_size):
        stage = pc.rank_coords(r)[0]
        model = Qwen2ForCausalLM(cfg, seed=5)
        shard_parameters(model, pc, r)
        keep = [(n, p) for n, p in model.parameters_and_names()
                if (".layers." in n and int(n.split(".")[2]) in stages[stage])
                or (stage == 0 and n == "model.embed_tokens.weight")
                or (stage == pc.pipeline_stage - 1 and n in ("model.norm.weight", "lm_head.weight"))]
        (tmp_path / f"rank_{r}").mkdir()
        ms.save_checkpoint([{"name": n, "data": p.value()} for n, p in keep],
                           str(tmp_path / f"rank_{r}" / f"qwen2ms{r}.ckpt"))
    out = merge_stage_checkpoints(tmp_path, tmp_path / "merged.ckpt", cfg, pc)
    got = {k: v.asnumpy() for k, v in ms.load_checkpoint(str(out)).items()}
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"rank_{r}" for r in range(pc.world_size)]
                                                                + ["merged.ckpt"])
    with pytest.raises(FileNotFoundError, match=r"missing shard folder\(s\) \[.*'rank_5'\] under .* layout of 6 ranks"):
        merge_stage_checkpoints(tmp_path, tmp_path / "again.ckpt", cfg,
                                ParallelConfig(pipeline_stage=3, micro_batch_num=3, model_parallel=2))


def test_zero_optimizer_in_a_compiled_step_equals_adamw():
    """ZeroOptimizer inside ms.jit updates like AdamW (one-member groups here; the msrun test splits over 2 ranks)."""
    import mindspore as ms
    from mindspore import Parameter, Tensor

    from qwen2ms.parallel.comm import single_group
    from qwen2ms.parallel.optimizer import ZeroOptimizer
    from qwen2ms.training.optim import AdamW

    rng = np.random.default_rng(0)
    shapes = [(3, 5), (7,), (2, 2)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]

    def params(dtype):
        return [Parameter(Tensor(a, dtype), name=f"layer.{i}.weight") for i, a in enumerate(init)]

    mask = [True, False, True]
    plain = params(ms.float32)
    ref = AdamW(plain, weight_decay=0.1, decay_mask=mask)
    for dtype in (ms.float32, ms.float16):
        sharded = params(dtype)
        zero = ZeroOptimizer(sharded, lambda ps: AdamW(ps, weight_decay=0.1, decay_mask=mask), single_group(0))
        assert all(a is b for a, b in zip(zero.params, sharded)) and len(zero.params) == 3
        names = [f"{k}zero_shard.layer.{i}.weight" for i in range(3) for k in ("", "exp_avg.", "exp_avg_sq.")]
        assert sorted(zero.state_tensors()) == sorted(["adamw_step"] + names)
        step = ms.jit(zero.construct)
        for k in range(3):
            grads = tuple(Tensor(np.full(s, 0.5 * (k + 1), np.float32) * (i + 1)) for i, s in enumerate(shapes))
            step(grads, Tensor(1e-2, ms.float32))
            if dtype == ms.float32:
                ms.jit(ref.construct)(grads, Tensor(1e-2, ms.float32))
        # float16 parameters start from rounded values; their float32 slices act as masters
        tol = 1e-6 if dtype == ms.float32 else 2e-3
        for a, b, s, a0 in zip(plain, sharded, zero.shards, init):
            np.testing.assert_array_equal(b.asnumpy(), s.asnumpy().reshape(b.shape).astype(b.asnumpy().dtype))
            np.testing.assert_allclose(s.asnumpy(), a.asnumpy().reshape(-1), atol=tol, rtol=tol)
            assert not np.allclose(a.asnumpy(), a0)


def test_pad_rows_adds_ignored_copies_up_to_the_micro_batch_multiple():
    from qwen2ms.training.trainer import _pad_rows, _round_up

    batch = {"input_ids": np.arange(6).reshape(3, 2), "labels": np.arange(6).reshape(3, 2) + 10,
             "attention_mask": np.ones((3, 2), np.int64)}
    out = _pad_rows(batch, _round_up(3, 2))
    np.testing.assert_array_equal(out["input_ids"], [[0, 1], [2, 3], [4, 5], [0, 1]])
    np.testing.assert_array_equal(out["labels"], [[10, 11], [12, 13], [14, 15], [-100, -100]])
    np.testing.assert_array_equal(out["attention_mask"], [[1, 1], [1, 1], [1, 1], [0, 0]])
    assert _pad_rows(batch, _round_up(3, 3)) is batch
    assert _pad_rows(batch, _round_up(3, 1)) is batch


# ----------------------------------------------------------------------------------- the parallel path, one process
def _train(model, out, samples, **kw):
    from qwen2ms.data import DataCollatorForSFT
    from qwen2ms.training import Trainer, TrainingArguments

    args = TrainingArguments(str(out), per_device_train_batch_size=4, **dict(TRAINING, **{"max_steps": 3, **kw}))
    trainer = Trainer(model, args, train_dataset=samples, data_collator=DataCollatorForSFT(0, pad_to_multiple_of=8))
    return trainer, trainer.train()


def test_parallel_trainer_path_in_one_process_equals_the_plain_trainer(tmp_path):
    """A one-device parallelize() model runs every parallel branch (token_loss, sync, per-rank checkpoints, merge)."""
    from qwen2ms import Qwen2Config
    from qwen2ms.modeling import Qwen2ForCausalLM
    from qwen2ms.parallel import ParallelConfig, parallelize
    from qwen2ms.training.steps import ParallelTrainStep

    write_samples(tmp_path / "s.jsonl")
    samples = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()][:7]
    cfg = Qwen2Config(**MODEL)
    plain, _ = _train(Qwen2ForCausalLM(cfg, seed=3), tmp_path / "plain", samples)
    pm = parallelize(Qwen2ForCausalLM(cfg, seed=3), ParallelConfig())
    par, _ = _train(pm, tmp_path / "par", samples)
    assert isinstance(par._train_step, ParallelTrainStep)
    for a, b in zip(plain.state.log_history, par.state.log_history):
        assert a["step"] == b["step"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    ckpt = tmp_path / "par" / "checkpoint-2"
    assert sorted(p.name for p in ckpt.iterdir()) == ["parallel_config.json", "rank_0", "trainer_state.json",
                                                      "training_args.json"]
    par.save_model(str(tmp_path / "par" / "final"))
    merged = Qwen2ForCausalLM.from_hf(str(tmp_path / "par" / "final"))
    want = dict(plain.model.parameters_and_names())
    for name, p in merged.parameters_and_names():
        np.testing.assert_allclose(p.asnumpy(), want[name].asnumpy(), atol=1e-5, err_msg=name)
    # resume from the per-rank checkpoint continues exactly
    pm2 = parallelize(Qwen2ForCausalLM(cfg, seed=11), ParallelConfig())
    res, out = _train(pm2, tmp_path / "par", samples, resume_from_checkpoint=str(ckpt))
    assert out.global_step == 3
    for name, p in res.model.parameters_and_names():
        np.testing.assert_allclose(p.asnumpy(), dict(par.model.parameters_and_names())[name].asnumpy(), atol=1e-6)
    with pytest.raises(ValueError, match="lora_r=4 with a parallel layout .*lora_r: 0"):
        _train(parallelize(Qwen2ForCausalLM(cfg, seed=3), ParallelConfig()), tmp_path / "lora", samples, lora_r=4)


def test_parallel_trainer_path_keeps_the_moe_router_aux_loss(tmp_path):
    from qwen2ms import Qwen2Config
    from qwen2ms.modeling import Qwen2ForCausalLM
    from qwen2ms.parallel import ParallelConfig, parallelize

    write_samples(tmp_path / "s.jsonl")
    samples = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()][:4]
    cfg = Qwen2Config(**dict(MODEL, model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=16, shared_expert_intermediate_size=24, decoder_sparse_step=1,
                             output_router_logits=True, router_aux_loss_coef=0.5))
    kw = dict(max_steps=2, save_steps=0)
    plain, _ = _train(Qwen2ForCausalLM(cfg, seed=3), tmp_path / "plain", samples, **kw)
    par, _ = _train(parallelize(Qwen2ForCausalLM(cfg, seed=3), ParallelConfig()), tmp_path / "par", samples, **kw)
    losses = [(a["loss"], b["loss"]) for a, b in zip(plain.state.log_history, par.state.log_history)]
    assert len(losses) == 2
    for want, got in losses:
        assert got == pytest.approx(want, abs=1e-5)
