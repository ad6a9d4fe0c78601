"""`qwen2ms finetune` with pipeline stages and ZeRO-1 in a real 2-process msrun job, through the CLI: PP=2 with
accumulation and resume, ZeRO-1 DP=2 with resume, PP=2 in fp16 with loss scaling, PP=2 on packed rows. Each must equal
one process training on the combined batch, step by step."""
import numpy as np
import pytest

pytest.importorskip("mindspore")
pytest.importorskip("yaml")

from finetune_cases import (WORKERS, check_against_reference, launch_with_retry, read_logs,  # noqa: E402
                           write_config, write_fp16_config, write_packed_config)

from qwen2ms.training.run_config import run_finetune  # noqa: E402


@pytest.fixture(scope="module")
def msrun_pipeline_runs(tmp_path_factory, finetune_reference):
    """One msrun job: PP=2 and ZeRO-1 (DP=2, optimizer_shard), 4 steps then resumed to 6; PP=2 fp16 and packed: 6."""
    from qwen2ms.parallel.launch import run_msrun

    def launch(out):
        # 2 rows per loader batch, 2 of them per step (4 samples, as the reference); each batch goes through the
        # pipeline as 2 micro-batches of 1 row (the epoch's last step has a 1-row batch: padded with an ignored row)
        write_config(out, "pp2", {"pipeline_stage": 2, "micro_batch_num": 2}, per_device_train_batch_size=2,
                     gradient_accumulation_steps=2)
        write_config(out, "zero_dp2", {"data_parallel": 2, "optimizer_shard": True}, per_device_train_batch_size=2)
        write_fp16_config(out, "pp2_fp16", {"pipeline_stage": 2, "micro_batch_num": 2}, per_device_train_batch_size=4)
        write_packed_config(out, "pp2_packed", {"pipeline_stage": 2, "micro_batch_num": 2},
                            per_device_train_batch_size=4)
        run_msrun(WORKERS / "finetune_pp_zero.py", [str(out)], worker_num=2, log_dir=out / "logs",
                  timeout=900, cwd=str(out))

    return launch_with_retry(tmp_path_factory, "finetune_msrun_pp", launch), finetune_reference


@pytest.mark.slow
def test_msrun_pipeline_finetune_with_accumulation_and_resume_equals_one_process(msrun_pipeline_runs):
    out, ref = msrun_pipeline_runs
    check_against_reference(out / "pp2", ref, {"pipeline_stage": 2, "micro_batch_num": 2})
    lines = (out / "pp2" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 6 + 3  # rank 0 (stage 0) logged the last stage's loss, once per step and evaluation


@pytest.mark.slow
def test_msrun_zero1_data_parallel_finetune_and_resume_equals_one_process(msrun_pipeline_runs):
    from qwen2ms.modeling import Qwen2ForCausalLM
    from qwen2ms.training.checkpointing import load_tensors

    out, ref = msrun_pipeline_runs
    check_against_reference(out / "zero_dp2", ref, {"data_parallel": 2, "optimizer_shard": True})
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
    run_finetune(write_fp16_config(tmp_path, "single_fp16", {}, per_device_train_batch_size=4))
    got_train, got_eval = read_logs(out / "pp2_fp16")
    want_train, want_eval = read_logs(ref)
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
    run_finetune(write_packed_config(tmp_path, "single_packed", {}, per_device_train_batch_size=4))
    check_against_reference(out / "pp2_packed", ref, {"pipeline_stage": 2, "micro_batch_num": 2})
