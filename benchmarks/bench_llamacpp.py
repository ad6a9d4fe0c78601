"""qwen2ms against llama.cpp on the same GGUF files: batch-1 decode and 512-token prefill, F32/BF16/Q8_0/Q4_0.

One run builds (or reuses) llama.cpp (benchmarks/llamacpp.py), makes a random-weight Qwen2-0.5B-shaped model
with transformers, converts it to an F32 GGUF with llama.cpp's converter and quantises that with llama-quantize
(kept in ``$QWEN2MS_CACHE/llama.cpp/<version>/bench-<layers>``). For each format it runs ``llama-bench`` (pp512,
tg128, 2 threads) and qwen2ms on ``Qwen2ForCausalLM.from_gguf`` of the same file: Q8_0 loads as our int8 weights
(groups of 32), Q4_0 is dequantised to bfloat16 (no int4 kernels yet), so that row compares unlike work.
Prints the CPU, its flags, the load average and the ratio table.

Usage:
    GLOG_v=3 python benchmarks/bench_llamacpp.py                 # 24 layers (the 0.5B shape), all formats
    GLOG_v=3 python benchmarks/bench_llamacpp.py --layers 4 --formats F32,Q8_0   # quick look
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

os.environ.setdefault("GLOG_v", "3")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llamacpp  # noqa: E402

FORMATS = ("F32", "BF16", "Q8_0", "Q4_0")
OUR_DTYPE = {"F32": "float32", "BF16": "bfloat16", "Q8_0": "bfloat16", "Q4_0": "bfloat16"}


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def make_ggufs(layers: int, formats: List[str]) -> Dict[str, Path]:
    """The random 0.5B-shaped model as GGUF files, one per format (made once, then reused)."""
    folder = llamacpp.cache_root() / f"bench-{layers}"
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / "f32.gguf"
    if not f32.is_file():
        import torch
        import transformers

        from qwen2ms.config import Qwen2Config
        from qwen2ms.tokenization import builtin_bpe_dir

        cfg = Qwen2Config.from_preset("qwen2-0.5b").to_dict()
        cfg["num_hidden_layers"] = layers
        cfg.pop("torch_dtype", None)
        cfg.pop("dtype", None)
        torch.manual_seed(0)
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg)).eval()
        src = folder / "hf"
        hf.save_pretrained(src)
        del hf
        transformers.AutoTokenizer.from_pretrained(builtin_bpe_dir()).save_pretrained(src)
        tmp = folder / "f32.gguf.tmp"
        llamacpp.convert_hf_to_gguf([(src, tmp, "f32")])
        os.replace(tmp, f32)
    files = {"F32": f32}
    for kind in formats:
        if kind == "F32":
            continue
        path = folder / f"{kind.lower()}.gguf"
        if not path.is_file():
            tmp = folder / f"{kind.lower()}.gguf.tmp"
            llamacpp.quantize(f32, tmp, kind)
            os.replace(tmp, path)
        files[kind] = path
    return files


def llama_bench(path: Path, threads: int, repeats: int) -> Dict[str, float]:
    """llama-bench's pp512 and tg128 tokens/s (mean over ``repeats``)."""
    tool = llamacpp.build_dir() / "llama-bench"
    proc = subprocess.run([str(tool), "-m", str(path), "-p", "512", "-n", "128", "-t", str(threads),
                           "-r", str(repeats), "-o", "json"], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed: {proc.stderr[-2000:]}")
    out = {}
    for row in json.loads(proc.stdout):
        key = "pp512" if row.get("n_prompt") else "tg128"
        out[key] = float(row["avg_ts"])
    return out


def ours(path: Path, kind: str, new_tokens: int, repeats: int) -> Dict[str, float]:
    """Our decode tokens/s (best of ``repeats`` runs of ``new_tokens`` steps) and 512-token prefill tokens/s."""
    import mindspore as ms
    from mindspore import Tensor

    from qwen2ms import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_gguf(path, dtype=OUR_DTYPE[kind])
    model.set_train(False)
    prompt = np.random.default_rng(0).integers(0, 151643, size=(1, 512)).astype(np.int32)
    best_pp, best_tg = 0.0, 0.0
    for _ in range(repeats):
        cache = model.new_cache(batch_size=1, max_length=512 + new_tokens + 1)
        t0 = time.perf_counter()
        logits = model.forward_step(prompt, None, None, cache, 0, logits_to_keep=1)
        tok = int(np.argmax(logits.asnumpy()[0, -1]))
        best_pp = max(best_pp, 512 / (time.perf_counter() - t0))
        steps = []
        for j in range(new_tokens):
            t0 = time.perf_counter()
            logits = model.forward_step(np.array([[tok]], np.int32), None, None, cache, Tensor(512 + j, ms.int32))
            tok = int(np.argmax(logits.asnumpy()[0, -1]))
            steps.append(time.perf_counter() - t0)
        best_tg = max(best_tg, (len(steps) - 1) / sum(steps[1:]))  # the first step may compile
    return {"pp512": best_pp, "tg128": best_tg}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (24: Qwen2-0.5B)")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {', '.join(FORMATS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="our decode steps per run")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    formats = [f.strip().upper() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        ap.error(f"unknown format(s) {bad}; choose from {', '.join(FORMATS)}")
    cpu = llamacpp.cpu_description()
    start = time.perf_counter()
    lib = llamacpp.build_dir()
    info = llamacpp.build_info()
    print(f"CPU: {cpu['model']} ({os.cpu_count()} cores), flags: {cpu['flags']}")
    print(f"llama.cpp: {lib} (built in {info.get('seconds', '?')} s; this call {time.perf_counter() - start:.0f} s)")
    files = make_ggufs(args.layers, formats)
    rows = []
    for kind in formats:
        load0 = load_average()
        theirs = llama_bench(files[kind], args.threads, args.repeats)
        mine = ours(files[kind], kind, args.tokens, args.repeats)
        rows.append((kind, mine, theirs, load0, load_average()))
        print(f"  {kind}: qwen2ms tg {mine['tg128']:.1f} pp512 {mine['pp512']:.0f}; llama.cpp tg128 "
              f"{theirs['tg128']:.1f} pp512 {theirs['pp512']:.0f} (load average {load0:.1f} -> {load_average():.1f})",
              flush=True)
    print(f"\nQwen2-0.5B shape, {args.layers} layers, random weights, {args.threads} threads, batch 1")
    print(f"{'format':7s} {'ours tg':>8s} {'llama tg':>9s} {'ratio':>6s} {'ours pp512':>11s} {'llama pp512':>12s} "
          f"{'ratio':>6s} {'load':>9s}")
    for kind, mine, theirs, l0, l1 in rows:
        print(f"{kind:7s} {mine['tg128']:8.1f} {theirs['tg128']:9.1f} {mine['tg128'] / theirs['tg128']:5.2f}x "
              f"{mine['pp512']:11.0f} {theirs['pp512']:12.0f} {mine['pp512'] / theirs['pp512']:5.2f}x "
              f"{l0:4.1f}-{l1:<4.1f}")
    if "Q4_0" in formats:
        print("Q4_0: qwen2ms dequantises to bfloat16 (no int4 kernels yet), so it reads 4x the bytes llama.cpp reads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
