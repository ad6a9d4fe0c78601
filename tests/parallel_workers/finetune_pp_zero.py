"""msrun worker (2 processes): `qwen2ms finetune` with pipeline stages (fp32, fp16) and ZeRO-1, through the CLI.

Runs ``<out_dir>/pp2.yaml`` (pipeline_stage 2, GPipe micro-batches, gradient accumulation) for 4 steps and
resumes it to 6 (``--resume``), then ``<out_dir>/zero_dp2.yaml`` (data_parallel 2 with optimizer_shard) the
same way, then ``<out_dir>/pp2_fp16.yaml`` (pipeline stages in fp16 with dynamic loss scaling) and
``<out_dir>/pp2_packed.yaml`` (packed rows: position and segment ids) for 6 steps each.
tests/test_parallel_finetune_msrun_pp.py compares the logs, per-rank checkpoints and the merged models with
a single-process run. Usage: msrun --worker_num=2 ... this.py OUT_DIR
"""
import os
import sys

os.environ.setdefault("GLOG_v", "3")

from qwen2ms.cli import main  # noqa: E402

out = sys.argv[1]
for i, name in enumerate(("pp2", "zero_dp2")):
    config = os.path.join(out, f"{name}.yaml")
    assert main(["finetune", "--config", config, "--no-progress", "--max-steps", "4"]) == 0
    if i == 0:
        print("initialised: pp2 trained 4 steps", flush=True)  # the test retries only jobs that never got here
    assert main(["finetune", "--config", config, "--no-progress", "--resume"]) == 0
for name in ("pp2_fp16", "pp2_packed"):
    assert main(["finetune", "--config", os.path.join(out, f"{name}.yaml"), "--no-progress"]) == 0
print("finetune pipeline and zero done", flush=True)
