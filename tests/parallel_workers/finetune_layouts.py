"""msrun worker (2 processes): `qwen2ms finetune` and `qwen2ms generate` on the run configs the test wrote, through
the CLI's own entry point.

Runs ``<out_dir>/dp2.yaml`` for 4 steps, resumes it to 6 (``--resume``), then ``<out_dir>/tp2_sp.yaml``
for 6 steps, then generates from ``<out_dir>/predict_tp2.yaml`` (each rank's stdout goes to
``generate_rank<r>.txt``). tests/test_parallel_finetune_msrun_dp.py compares the logs, checkpoints, saved
models and text with single-process runs. Usage: msrun --worker_num=2 ... this.py OUT_DIR PROMPT
"""
import contextlib
import os
import sys

os.environ.setdefault("GLOG_v", "3")

from qwen2ms.cli import main  # noqa: E402

out = sys.argv[1]
config = os.path.join(out, "dp2.yaml")
assert main(["finetune", "--config", config, "--no-progress", "--max-steps", "4"]) == 0
print("initialised: dp2 trained 4 steps", flush=True)  # the test retries only jobs that never got here
assert main(["finetune", "--config", config, "--no-progress", "--resume"]) == 0
assert main(["finetune", "--config", os.path.join(out, "tp2_sp.yaml"), "--no-progress"]) == 0

from mindspore.communication import get_rank  # noqa: E402

with open(os.path.join(out, f"generate_rank{get_rank()}.txt"), "w", encoding="utf-8") as f, \
        contextlib.redirect_stdout(f):
    assert main(["generate", "--config", os.path.join(out, "predict_tp2.yaml"), "--prompt", sys.argv[2], "--greedy"]) == 0
print("finetune layouts done", flush=True)
