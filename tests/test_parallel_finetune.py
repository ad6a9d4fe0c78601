"""`qwen2ms finetune` / `generate` and the Trainer with a parallel layout: refusals without msrun, the parallel code
path in one process, and two real 2-process msrun jobs (DP=2 with accumulation and resume; TP=2 with sequence
parallel; TP=2 generation / PP=2 with accumulation and resume; ZeRO-1 DP=2 with resume; PP=2 in fp16) that must
equal one process training on the combined batch, step by step."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mindspore")
yaml = pytest.importorskip("yaml")

from qwen2ms.training import RunConfigError  # noqa: E402
from qwen2ms.training.run_config import run_finetune  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "parallel_workers"

MODEL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "tie_word_embeddings": False}
#: per optimizer step every run sees the same 4 samples (the last step of an epoch: 3)
TRAINING = {"learning_rate": 1e-3, "lr_scheduler_type": "constant", "max_steps": 6, "logging_steps": 1,
            "save_steps": 2, "save_total_limit": 2, "disable_tqdm": True}


def _samples(path: Path) -> None:
    # 10 rows of different lengths; eval_fraction 0.3 keeps 7 for training: batches of 4 and 3 per epoch
    rows = [{"input_ids": [1 + (i * 7 + j * 5) % 62 for j in range(9 + (i * 3) % 7)],
             "labels": [-100] * (2 + i % 3) + [1 + (i * 7 + j * 5) % 62 for j in range(2 + i % 3, 9 + (i * 3) % 7)]}
            for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def _config(folder: Path, name: str, parallel: dict, **training) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "samples.jsonl").exists():
        _samples(folder / "samples.jsonl")
    cfg = {"model": {"config": MODEL, "seed": 3},
           "data": {"train_file": "samples.jsonl", "eval_fraction": 0.3},
           "training": dict(TRAINING, output_dir=str(folder / name), **training),
           "parallel": parallel}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


#: a tiny body over Qwen2's real vocabulary, so the built-in tokenizer's text round-trips
PREDICT_MODEL = {"vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
                 "max_position_embeddings": 4096, "rope_theta": 1000000.0, "bos_token_id": 151643,
                 "eos_token_id": 151645, "pad_token_id": 151643}
PROMPT = "The capital of France is"


def _predict_config(folder: Path, name: str, parallel: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # a strong repetition penalty: random weights otherwise repeat one token; shows the section is honoured too
    cfg = {"model": {"config": PREDICT_MODEL, "seed": 0}, "data": {"tokenizer": "builtin"},
           "generation": {"max_new_tokens": 8, "repetition_penalty": 20.0}, "parallel": parallel}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ----------------------------------------------------------------------------------- refusals (no msrun)
def test_layout_outside_msrun_names_the_msrun_command(tmp_path, monkeypatch):
    monkeypatch.delenv("MS_ROLE", raising=False)
    path = _config(tmp_path, "dp2", {"data_parallel": 2})
    with pytest.raises(RunConfigError) as e:
        run_finetune(path)
    msg = str(e.value)
    assert "needs 2 devices" in msg and "not started by msrun" in msg
    assert "msrun --worker_num=2 --local_worker_num=2" in msg
    assert f"python -m qwen2ms.cli finetune --config {path}" in msg


def test_worker_count_that_does_not_match_the_layout_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    monkeypatch.setenv("MS_WORKER_NUM", "4")
    path = _config(tmp_path, "tp2", {"model_parallel": 2})
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
    path = _config(tmp_path, "bad", parallel, **training)
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
def test_generate_with_a_layout_outside_msrun_is_refused(tmp_path, monkeypatch, parallel, words):
    from qwen2ms.cli import main

    monkeypatch.delenv("MS_ROLE", raising=False)
    with pytest.raises(RunConfigError, match=words):
        main(["generate", "--config", str(_predict_config(tmp_path, "p", parallel)), "--prompt", "hi"])


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
    from qwen2ms.training.trainer import _pad_rows

    batch = {"input_ids": np.arange(6).reshape(3, 2), "labels": np.arange(6).reshape(3, 2) + 10,
             "attention_mask": np.ones((3, 2), np.int64)}
    out = _pad_rows(batch, 2)
    np.testing.assert_array_equal(out["input_ids"], [[0, 1], [2, 3], [4, 5], [0, 1]])
    np.testing.assert_array_equal(out["labels"], [[10, 11], [12, 13], [14, 15], [-100, -100]])
    assert out["attention_mask"].shape == (4, 2)
    assert _pad_rows(batch, 3) is batch
    assert _pad_rows(batch, 1) is batch


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
    from qwen2ms.training.trainer import _ParallelTrainStep

    _samples(tmp_path / "s.jsonl")
    samples = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()][:7]
    cfg = Qwen2Config(**MODEL)
    plain, _ = _train(Qwen2ForCausalLM(cfg, seed=3), tmp_path / "plain", samples)
    pm = parallelize(Qwen2ForCausalLM(cfg, seed=3), ParallelConfig())
    par, _ = _train(pm, tmp_path / "par", samples)
    assert isinstance(par._train_step, _ParallelTrainStep)
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

    _samples(tmp_path / "s.jsonl")
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


# ----------------------------------------------------------------------------------- real msrun (2 processes)
def _logs(folder: Path):
    rows = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}, {r["step"]: r for r in rows if "eval_loss" in r}


def _launch_with_retry(tmp_path_factory, name, launch):
    """Run ``launch(folder)``; retry once in a fresh folder only if the cluster never formed (the machine)."""
    from qwen2ms.parallel.launch import MsrunError

    out = tmp_path_factory.mktemp(name)
    try:
        launch(out)
    except MsrunError as first:
        if any("initialised" in p.read_text(errors="replace") for p in (out / "logs").glob("worker_*.log")):
            raise
        out = tmp_path_factory.mktemp(f"{name}_retry")
        try:
            launch(out)
        except MsrunError as second:
            raise MsrunError(f"{first}\n=== retry ===\n{second}") from second
    return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """One process training on the combined batches (4 samples per step) for 6 steps."""
    ref = tmp_path_factory.mktemp("finetune_reference")
    run_finetune(_config(ref, "single", {}, per_device_train_batch_size=4))
    return ref / "single"


@pytest.fixture(scope="module")
def msrun_runs(tmp_path_factory, reference_run):
    from qwen2ms.parallel.launch import run_msrun

    def launch(out):
        _config(out, "dp2", {"data_parallel": 2}, per_device_train_batch_size=1, gradient_accumulation_steps=2)
        _config(out, "tp2_sp", {"model_parallel": 2, "use_seq_parallel": True}, per_device_train_batch_size=4)
        _predict_config(out, "predict_tp2", {"model_parallel": 2})
        run_msrun(WORKERS / "finetune_layouts.py", [str(out), PROMPT], worker_num=2, log_dir=out / "logs",
                  timeout=900, cwd=str(out))

    return _launch_with_retry(tmp_path_factory, "finetune_msrun", launch), reference_run


#: fp16 with a loss scale that overflows at first (skipped steps) and grows back every 2 finite steps
FP16 = {"precision": "fp16", "loss_scale_init": 2.0 ** 20, "loss_scale_window": 2}


def _fp16_config(folder: Path, name: str, parallel: dict, **training) -> Path:
    path = _config(folder, name, parallel, **FP16, **training)
    data = yaml.safe_load(path.read_text())
    data["model"]["dtype"] = "float16"
    path.write_text(yaml.safe_dump(data))
    return path


def _packed_config(folder: Path, name: str, parallel: dict, **training) -> Path:
    """10 packed rows of 16 tokens, two segments each (position ids restart per segment)."""
    rows = []
    for i in range(10):
        ids, labels, pos, seg = [], [], [], []
        for s, n in enumerate((5 + i % 4, 11 - i % 4)):
            toks = [1 + (i * 7 + s * 13 + j * 5) % 62 for j in range(n)]
            ids += toks
            labels += [-100] + toks[1:]
            pos += list(range(n))
            seg += [s + 1] * n
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos, "segment_ids": seg})
    path = _config(folder, name, parallel, **training)
    (folder / "packed.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = yaml.safe_load(path.read_text())
    data["data"]["train_file"] = "packed.jsonl"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def msrun_pipeline_runs(tmp_path_factory, reference_run):
    """One msrun job: PP=2 and ZeRO-1 (DP=2, optimizer_shard), 4 steps then resumed to 6; PP=2 fp16 and packed: 6."""
    from qwen2ms.parallel.launch import run_msrun

    def launch(out):
        # 2 rows per loader batch, 2 of them per step (4 samples, as the reference); each batch goes through the
        # pipeline as 2 micro-batches of 1 row (the epoch's last step has a 1-row batch: padded with an ignored row)
        _config(out, "pp2", {"pipeline_stage": 2, "micro_batch_num": 2}, per_device_train_batch_size=2,
                gradient_accumulation_steps=2)
        _config(out, "zero_dp2", {"data_parallel": 2, "optimizer_shard": True}, per_device_train_batch_size=2)
        _fp16_config(out, "pp2_fp16", {"pipeline_stage": 2, "micro_batch_num": 2}, per_device_train_batch_size=4)
        _packed_config(out, "pp2_packed", {"pipeline_stage": 2, "micro_batch_num": 2}, per_device_train_batch_size=4)
        run_msrun(WORKERS / "finetune_pp_zero.py", [str(out)], worker_num=2, log_dir=out / "logs",
                  timeout=900, cwd=str(out))

    return _launch_with_retry(tmp_path_factory, "finetune_msrun_pp", launch), reference_run


def _check_against_reference(run: Path, ref: Path, layout: dict):
    from qwen2ms.modeling import Qwen2ForCausalLM

    got_train, got_eval = _logs(run)
    want_train, want_eval = _logs(ref)
    assert sorted(got_train) == sorted(want_train) == [1, 2, 3, 4, 5, 6]
    for step, want in want_train.items():
        assert got_train[step]["loss"] == pytest.approx(want["loss"], abs=1e-5), f"loss at step {step}"
        assert got_train[step]["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), f"grad norm, step {step}"
        assert got_train[step]["trained_tokens"] == want["trained_tokens"]
    assert sorted(got_eval) == sorted(want_eval) == [2, 4, 6]
    for step, want in want_eval.items():
        assert got_eval[step]["eval_loss"] == pytest.approx(want["eval_loss"], abs=1e-5)
    # the merged model in the HF layout loads back and equals the single-process weights
    got = dict(Qwen2ForCausalLM.from_hf(str(run / "final")).parameters_and_names())
    want = dict(Qwen2ForCausalLM.from_hf(str(ref / "final")).parameters_and_names())
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name].asnumpy(), want[name].asnumpy(), atol=1e-4, rtol=1e-4, err_msg=name)
    # per-rank checkpoints: layout recorded, one shard per rank, each loads into that rank's slice
    ckpt = run / "checkpoint-6"
    saved_layout = json.loads((ckpt / "parallel_config.json").read_text())
    for key in ("model_parallel", "pipeline_stage", "data_parallel"):
        assert saved_layout[key] == layout.get(key, 1), key
    assert json.loads((ckpt / "trainer_state.json").read_text())["state"]["global_step"] == 6
    if layout.get("pipeline_stage", 1) > 1:
        return _check_stage_shards(run, ref, ckpt, layout)
    from qwen2ms import Qwen2Config
    from qwen2ms.parallel import ParallelConfig, load_rank_checkpoint
    from qwen2ms.parallel.apply import shard_parameters

    pc = ParallelConfig(**layout)
    for r in range(2):
        assert (ckpt / f"rank_{r}" / "optimizer.safetensors").is_file()
        for folder in (ckpt, run / "final"):
            model = Qwen2ForCausalLM(Qwen2Config(**MODEL), init_weights=False)
            shard_parameters(model, pc, r)
            load_rank_checkpoint(model, folder, rank=r)
            reference = Qwen2ForCausalLM.from_hf(str(ref / "final"))
            shard_parameters(reference, pc, r)
            want_shard = dict(reference.parameters_and_names())
            for name, p in model.parameters_and_names():
                np.testing.assert_allclose(p.asnumpy(), want_shard[name].asnumpy(), atol=1e-4, rtol=1e-4,
                                           err_msg=f"{folder.name} rank {r} {name}")


def _check_stage_shards(run: Path, ref: Path, ckpt: Path, layout: dict):
    """Each rank's files hold exactly its stage's parameters (names of the one-device model), equal to the reference."""
    from mindspore import load_checkpoint

    from qwen2ms import Qwen2Config
    from qwen2ms.modeling import Qwen2ForCausalLM
    from qwen2ms.parallel import ParallelConfig

    pc = ParallelConfig(**layout)
    want = {n: p.asnumpy() for n, p in Qwen2ForCausalLM.from_hf(str(ref / "final")).parameters_and_names()}
    stages = pc.stage_layers(MODEL["num_hidden_layers"])
    assert not Qwen2Config(**MODEL).tie_word_embeddings
    for r in range(pc.world_size):
        stage = pc.rank_coords(r)[0]
        names = {n for n in want if ".layers." in n and int(n.split(".")[2]) in stages[stage]}
        names |= {"model.embed_tokens.weight"} if stage == 0 else set()
        names |= {"model.norm.weight", "lm_head.weight"} if stage == pc.pipeline_stage - 1 else set()
        assert (ckpt / f"rank_{r}" / "optimizer.safetensors").is_file()
        for folder in (ckpt, run / "final"):
            files = sorted((folder / f"rank_{r}").glob("*.ckpt"))
            assert len(files) == 1
            got = {k: v.asnumpy() for k, v in load_checkpoint(str(files[0])).items()}
            assert set(got) == names, f"{folder.name} rank {r} (stage {stage}) holds the wrong parameters"
            for name in names:
                np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=1e-4,
                                           err_msg=f"{folder.name} rank {r} {name}")


@pytest.mark.slow
def test_msrun_data_parallel_finetune_with_accumulation_and_resume_equals_one_process(msrun_runs):
    out, ref = msrun_runs
    _check_against_reference(out / "dp2", ref, {"data_parallel": 2})
    # only rank 0 logged (one line per step and evaluation), and the resumed run appended to it
    lines = (out / "dp2" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 6 + 3


@pytest.mark.slow
def test_msrun_tensor_sequence_parallel_finetune_equals_one_process(msrun_runs):
    out, ref = msrun_runs
    _check_against_reference(out / "tp2_sp", ref, {"model_parallel": 2, "use_seq_parallel": True})


@pytest.mark.slow
def test_msrun_tensor_parallel_generate_from_a_run_config_equals_one_process(msrun_runs, tmp_path, capsys):
    from qwen2ms.cli import main

    out, _ = msrun_runs
    assert main(["generate", "--config", str(_predict_config(tmp_path, "single", {})), "--prompt", PROMPT,
                 "--greedy"]) == 0
    want = capsys.readouterr().out
    assert len(want.strip()) > 0
    assert (out / "generate_rank0.txt").read_text(encoding="utf-8") == want
    assert (out / "generate_rank1.txt").read_text(encoding="utf-8") == ""  # only rank 0 prints


@pytest.mark.slow
def test_msrun_pipeline_finetune_with_accumulation_and_resume_equals_one_process(msrun_pipeline_runs):
    out, ref = msrun_pipeline_runs
    _check_against_reference(out / "pp2", ref, {"pipeline_stage": 2, "micro_batch_num": 2})
    lines = (out / "pp2" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 6 + 3  # rank 0 (stage 0) logged the last stage's loss, once per step and evaluation


@pytest.mark.slow
def test_msrun_zero1_data_parallel_finetune_and_resume_equals_one_process(msrun_pipeline_runs):
    from qwen2ms.modeling import Qwen2ForCausalLM
    from qwen2ms.training.checkpointing import load_tensors

    out, ref = msrun_pipeline_runs
    _check_against_reference(out / "zero_dp2", ref, {"data_parallel": 2, "optimizer_shard": True})
    # each rank keeps the float32 slice and the AdamW moments of half of every parameter (zero-padded when odd)
    want = {n: p.asnumpy() for n, p in Qwen2ForCausalLM.from_hf(str(ref / "final")).parameters_and_names()}
    for r in range(2):
        state = load_tensors(out / "zero_dp2" / "checkpoint-6" / f"rank_{r}" / "optimizer.safetensors")
        assert int(np.asarray(state["adamw_step"]).reshape(-1)[0]) == 6
        for name, full in want.items():
            chunk = -(-full.size // 2)
            flat = np.concatenate([full.reshape(-1), np.zeros(2 * chunk - full.size, np.float32)])
            for key in (f"exp_avg.zero_shard.{name}", f"exp_avg_sq.zero_shard.{name}"):
                assert np.asarray(state[key]).shape == (chunk,), key
            np.testing.assert_allclose(state[f"zero_shard.{name}"], flat[r * chunk:(r + 1) * chunk], atol=1e-4,
                                       rtol=1e-4, err_msg=f"rank {r} slice of {name}")


@pytest.mark.slow
def test_msrun_pipeline_finetune_in_fp16_with_loss_scaling_equals_one_process(msrun_pipeline_runs, tmp_path):
    """Same overflow skips and loss scales as one process; losses and fp16 weights agree to fp16 rounding."""
    import math

    from qwen2ms.modeling import Qwen2ForCausalLM

    out, _ = msrun_pipeline_runs
    ref = tmp_path / "single_fp16"
    run_finetune(_fp16_config(tmp_path, "single_fp16", {}, per_device_train_batch_size=4))
    got_train, got_eval = _logs(out / "pp2_fp16")
    want_train, want_eval = _logs(ref)
    assert sorted(got_train) == sorted(want_train) == [1, 2, 3, 4, 5, 6]
    assert sorted(got_eval) == sorted(want_eval) == [2, 4, 6]
    assert want_train[6]["skipped_steps"] > 0  # the case covers overflowing steps
    for step, want in want_train.items():
        got = got_train[step]
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-4), f"loss at step {step}"
        assert (got["loss_scale"], got["skipped_steps"]) == (want["loss_scale"], want["skipped_steps"]), step
        want_norm, got_norm = float(want["grad_norm"]), float(got["grad_norm"])  # the log writes inf/nan as text
        if math.isfinite(want_norm):
            assert got_norm == pytest.approx(want_norm, rel=1e-3), f"grad norm, step {step}"
        else:
            assert not math.isfinite(got_norm), f"step {step} should have overflowed"
    for step, want in want_eval.items():
        assert got_eval[step]["eval_loss"] == pytest.approx(want["eval_loss"], abs=1e-4)
    got = dict(Qwen2ForCausalLM.from_hf(str(out / "pp2_fp16" / "final")).parameters_and_names())
    want = dict(Qwen2ForCausalLM.from_hf(str(ref / "final")).parameters_and_names())
    for name in want:
        assert got[name].dtype == want[name].dtype
        np.testing.assert_allclose(got[name].asnumpy().astype(np.float32), want[name].asnumpy().astype(np.float32),
                                   atol=2e-3, err_msg=name)


@pytest.mark.slow
def test_msrun_pipeline_finetune_on_packed_rows_equals_one_process(msrun_pipeline_runs, tmp_path):
    """The position and segment ids of packed rows reach every stage (and the last stage's loss)."""
    out, _ = msrun_pipeline_runs
    ref = tmp_path / "single_packed"
    run_finetune(_packed_config(tmp_path, "single_packed", {}, per_device_train_batch_size=4))
    _check_against_reference(out / "pp2_packed", ref, {"pipeline_stage": 2, "micro_batch_num": 2})
