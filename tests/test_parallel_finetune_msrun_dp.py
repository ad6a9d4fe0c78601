"""`qwen2ms finetune` and `generate` in a real 2-process msrun job, through the CLI: DP=2 with gradient accumulation
and resume, TP=2 with sequence parallel, and TP=2 generation. Each must equal one process training on the combined
batch (or generating), step by step."""
import pytest

pytest.importorskip("mindspore")
pytest.importorskip("yaml")

from finetune_cases import (PROMPT, WORKERS, check_against_reference, launch_with_retry,  # noqa: E402
                           write_config, write_predict_config)


@pytest.fixture(scope="module")
def msrun_runs(tmp_path_factory, finetune_reference):
    from qwen2ms.parallel.launch import run_msrun

    def launch(out):
        write_config(out, "dp2", {"data_parallel": 2}, per_device_train_batch_size=1, gradient_accumulation_steps=2)
        write_config(out, "tp2_sp", {"model_parallel": 2, "use_seq_parallel": True}, per_device_train_batch_size=4)
        write_predict_config(out, "predict_tp2", {"model_parallel": 2})
        run_msrun(WORKERS / "finetune_layouts.py", [str(out), PROMPT], worker_num=2, log_dir=out / "logs",
                  timeout=900, cwd=str(out))

    return launch_with_retry(tmp_path_factory, "finetune_msrun", launch), finetune_reference


@pytest.mark.slow
def test_msrun_data_parallel_finetune_with_accumulation_and_resume_equals_one_process(msrun_runs):
    out, ref = msrun_runs
    check_against_reference(out / "dp2", ref, {"data_parallel": 2})
    # only rank 0 logged (one line per step and evaluation), and the resumed run appended to it
    lines = (out / "dp2" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 6 + 3


@pytest.mark.slow
def test_msrun_tensor_sequence_parallel_finetune_equals_one_process(msrun_runs):
    out, ref = msrun_runs
    check_against_reference(out / "tp2_sp", ref, {"model_parallel": 2, "use_seq_parallel": True})


@pytest.mark.slow
def test_msrun_tensor_parallel_generate_from_a_run_config_equals_one_process(msrun_runs, tmp_path, capsys):
    from qwen2ms.cli import main

    out, _ = msrun_runs
    assert main(["generate", "--config", str(write_predict_config(tmp_path, "single", {})), "--prompt", PROMPT,
                 "--greedy"]) == 0
    want = capsys.readouterr().out
    assert len(want.strip()) > 0
    assert (out / "generate_rank0.txt").read_text(encoding="utf-8") == want
    assert (out / "generate_rank1.txt").read_text(encoding="utf-8") == ""  # only rank 0 prints
