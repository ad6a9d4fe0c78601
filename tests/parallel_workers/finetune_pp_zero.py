"""msrun worker (2 processes): `qwen2ms finetune` with pipeline stages, through the CLI's own entry point.

Runs ``<out_dir>/pp2.yaml`` (pipeline_stage 2, GPipe micro-batches, gradient accumulation) for 4 steps and
resumes it to 6 (``--resume``). tests/test_parallel_finetune.py compares the logs, per-rank checkpoints and
the merged model with a single-process run. Usage: msrun --worker_num=2 ... this.py OUT_DIR
"""
import os
import sys

os.environ.setdefault("GLOG_v", "3")

from qwen2ms.cli import main  # noqa: E402

out = sys.argv[1]
config = os.path.join(out, "pp2.yaml")
assert main(["finetune", "--config", config, "--no-progress", "--max-steps", "4"]) == 0
print("initialised: pp2 trained 4 steps", flush=True)  # the test retries only jobs that never got here
assert main(["finetune", "--config", config, "--no-progress", "--resume"]) == 0
print("finetune pipeline done", flush=True)
