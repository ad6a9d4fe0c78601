"""Peak memory of Qwen2ForCausalLM.from_hf on a random Qwen2-0.5B-shaped bfloat16 checkpoint vs its file size.

Usage: python benchmarks/bench_load.py [--preset qwen2-0.5b] [--dir /tmp/qwen2ms_bench_load] [--shard 300MB]

Each load runs in a fresh subprocess; the peak resident set (VmHWM, i.e. ru_maxrss of this process
image) is measured above the baseline taken after ``import mindspore, qwen2ms``. The reference run in the same script is the
naive route (``safetensors.numpy.load_file`` of every shard, then one MindSpore tensor per array).
Target: ours <= 1.3x the checkpoint size.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("GLOG_v", "3")

CHILD = r"""
import os, resource, sys, time
os.environ.setdefault("GLOG_v", "3")
import mindspore as ms
import qwen2ms
from qwen2ms.modeling import Qwen2ForCausalLM
def hwm_kb():
    # VmHWM: the peak RSS of this process image. ru_maxrss would do, but Linux carries it over from
    # the parent through fork/exec, so a large parent would hide the child's peak.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
base = hwm_kb()
t0 = time.perf_counter()
if sys.argv[1] == "ours":
    model = Qwen2ForCausalLM.from_hf(sys.argv[2])
    n = sum(p.size for p in model.get_parameters())
else:
    from pathlib import Path
    from safetensors.numpy import load_file
    arrays = {}
    for f in sorted(Path(sys.argv[2]).glob("*.safetensors")):
        arrays.update(load_file(str(f)))
    tensors = {k: ms.Tensor(v) for k, v in arrays.items()}
    n = sum(v.size for v in arrays.values())
elapsed = time.perf_counter() - t0
peak = hwm_kb()
print(f"{(peak - base) * 1024} {elapsed} {n}")
"""


def build_checkpoint(folder: Path, preset: str, shard: str) -> int:
    """Write a random bf16 checkpoint of the preset's shapes (one tensor in memory at a time)."""
    import numpy as np

    from qwen2ms import Qwen2Config
    from qwen2ms.modeling import Qwen2ForCausalLM

    config = Qwen2Config.from_preset(preset)
    if (folder / "config.json").is_file():
        return sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    # An unfilled model gives the exact HF keys and shapes; its lazily-zero parameters cost no memory.
    model = Qwen2ForCausalLM(config, dtype="bfloat16", init_weights=False)
    rng = np.random.default_rng(0)
    for p in model.get_parameters():
        bits = (rng.standard_normal(p.shape, dtype=np.float32) * np.float32(0.02)).view(np.uint32) >> 16
        import mindspore as ms

        p.set_data(ms.Tensor.from_numpy(bits.astype(np.uint16).view(ms.dtype_to_nptype(ms.bfloat16))))
        del bits
    model.save_pretrained(folder, max_shard_size=shard)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_child(kind: str, folder: Path):
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(folder)], capture_output=True, text=True, check=True)
    peak, elapsed, n = out.stdout.strip().splitlines()[-1].split()
    return int(peak), float(elapsed), int(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2-0.5b")
    ap.add_argument("--dir", default="/tmp/qwen2ms_bench_load")
    ap.add_argument("--shard", default="5GB", help="max_shard_size of the generated checkpoint")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    folder = Path(args.dir) / f"{args.preset}-bf16-{args.shard}"
    t0 = time.perf_counter()
    size = build_checkpoint(folder, args.preset, args.shard)
    print(f"checkpoint: {folder} ({size / 1e6:.0f} MB, built in {time.perf_counter() - t0:.1f} s)")
    peak, elapsed, n = run_child("ours", folder)
    print(f"qwen2ms from_hf        : peak +{peak / 1e6:7.0f} MB = {peak / size:.2f}x file size, "
          f"{elapsed:.1f} s, {n / 1e6:.0f} M parameters")
    if not args.skip_reference:
        rpeak, relapsed, _ = run_child("naive", folder)
        print(f"naive load_file+Tensor: peak +{rpeak / 1e6:7.0f} MB = {rpeak / size:.2f}x file size, {relapsed:.1f} s")
        print(f"ratio ours/naive peak : {peak / rpeak:.2f}")
    print(f"target <= 1.30x: {'met' if peak / size <= 1.3 else 'NOT met'}")


if __name__ == "__main__":
    main()
