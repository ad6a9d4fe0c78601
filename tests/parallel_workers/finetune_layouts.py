"""msrun worker (2 processes): `qwen2ms finetune` on the run configs the test wrote, through the CLI's own entry point.

Runs ``<out_dir>/dp2.yaml`` for 4 steps, resumes it to 6 (``--resume``), then ``<out_dir>/tp2_sp.yaml``
for 6 steps. tests/test_parallel_finetune.py compares the logs, checkpoints and saved models with a
single-process run on the combined batch. Usage: msrun --worker_num=2 ... this.py OUT_DIR
"""
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
print("finetune layouts done", flush=True)
