"""Peak memory and time of ``qwen2ms convert`` (both directions) on a random Qwen2-0.5B-shaped bf16 checkpoint.

Usage: python benchmarks/bench_convert.py [--preset qwen2-0.5b] [--dir /tmp/qwen2ms_bench_convert]

Each step runs in a fresh subprocess; the peak resident set (ru_maxrss) is measured above the
baseline taken after ``import mindspore, qwen2ms``. Reference runs in the same script:

* HF -> MindSpore the way the upstream converter does it: every tensor loaded, widened to float32,
  turned into a MindSpore tensor, then one ``mindspore.save_checkpoint`` call.
* MindSpore -> HF the naive way: ``mindspore.load_checkpoint`` of the whole file, then one
  ``safetensors.numpy.save_file`` call (the upstream has no such export).
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
import numpy as np
import mindspore as ms
import qwen2ms
from qwen2ms.checkpoint.convert import convert
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
kind, src, dst = sys.argv[1:4]
if kind == "hf2ms":
    convert(src, dst, to="ms", naming="mindformers", fuse_qkv=True, verbose=False)
elif kind == "ms2hf":
    convert(src, dst, to="hf", verbose=False)
elif kind == "from_checkpoint":
    from qwen2ms.modeling.model import Qwen2ForCausalLM
    model = Qwen2ForCausalLM.from_checkpoint(src)
elif kind == "upstream_hf2ms":
    from pathlib import Path
    from safetensors.numpy import load_file
    from mindspore.common import np_dtype
    arrays = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        arrays.update(load_file(str(f)))
    items = []
    for k in list(arrays):
        items.append({"name": k, "data": ms.Tensor(arrays.pop(k).astype(np.float32), dtype=ms.bfloat16)})
    ms.save_checkpoint(items, dst)
elif kind == "naive_ms2hf":
    from safetensors.numpy import save_file
    params = ms.load_checkpoint(src)
    os.makedirs(dst, exist_ok=True)
    save_file({k: v.asnumpy() for k, v in params.items()}, os.path.join(dst, "model.safetensors"),
              metadata={"format": "pt"})
elapsed = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{(peak - base) * 1024} {elapsed}")
"""


def build_checkpoint(folder: Path, preset: str) -> int:
    """A random bf16 HF checkpoint of the preset's shapes, written one tensor at a time."""
    import json

    import numpy as np

    from qwen2ms import Qwen2Config
    from qwen2ms.dtypes import numpy_dtype
    from qwen2ms.checkpoint.mindformers import hf_parameter_shapes
    from qwen2ms.checkpoint.mindspore import SafetensorsWriter

    weights = folder / "model.safetensors"
    if not weights.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        config = Qwen2Config.from_preset(preset)
        bf16 = numpy_dtype("bf16")
        rng = np.random.default_rng(0)
        with SafetensorsWriter(weights, {"format": "pt"}) as w:
            for key, shape in hf_parameter_shapes(config).items():
                bits = (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).view(np.uint32) >> 16
                w.add(key, bits.astype(np.uint16).view(bf16))
        (folder / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return weights.stat().st_size


def run_child(kind: str, src: Path, dst: Path):
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(src), str(dst)],
                         capture_output=True, text=True, check=True)
    peak, elapsed = out.stdout.strip().splitlines()[-1].split()
    return int(peak), float(elapsed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2-0.5b")
    ap.add_argument("--dir", default="/tmp/qwen2ms_bench_convert")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    root = Path(args.dir)
    hf = root / f"{args.preset}-bf16"
    t0 = time.perf_counter()
    size = build_checkpoint(hf, args.preset)
    print(f"checkpoint: {hf} ({size / 1e6:.0f} MB bf16, built in {time.perf_counter() - t0:.1f} s)")

    def show(label, peak, elapsed):
        print(f"{label:34s}: peak +{peak / 1e6:6.0f} MB = {peak / size:.2f}x file size, {elapsed:5.1f} s")

    ckpt = root / "ms" / "model.ckpt"
    p1, t1 = run_child("hf2ms", hf, ckpt)
    show("qwen2ms convert hf -> ms (mf, fused)", p1, t1)
    p2, t2 = run_child("ms2hf", ckpt, root / "back")
    show("qwen2ms convert ms -> hf", p2, t2)
    p3, t3 = run_child("from_checkpoint", ckpt, root / "unused")
    show("Qwen2ForCausalLM.from_checkpoint", p3, t3)
    if not args.skip_reference:
        r1, s1 = run_child("upstream_hf2ms", hf, root / "upstream.ckpt")
        show("upstream-style hf -> ms (fp32)", r1, s1)
        r2, s2 = run_child("naive_ms2hf", ckpt, root / "naive_back")
        show("naive load_checkpoint -> save_file", r2, s2)
        print(f"ratio ours/upstream peak, hf -> ms : {p1 / r1:.2f}  (time {t1 / s1:.2f})")
        print(f"ratio ours/naive peak, ms -> hf    : {p2 / r2:.2f}  (time {t2 / s2:.2f})")


if __name__ == "__main__":
    main()
