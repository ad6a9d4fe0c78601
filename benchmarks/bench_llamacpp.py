"""qwen2ms against llama.cpp on the same GGUF files: batch-1 decode and 512-token prefill, BF16/Q8_0/Q4_0 (and F32).

One run builds (or reuses) llama.cpp (benchmarks/llamacpp.py), makes a random-weight Qwen2-0.5B-shaped model
with transformers, converts it to an F32 GGUF with llama.cpp's converter and quantises that with llama-quantize
(kept in ``$QWEN2MS_CACHE/llama.cpp/<version>/bench-<layers>``). For each format it runs ``llama-bench`` (pp512,
tg128, 2 threads) and qwen2ms on ``Qwen2ForCausalLM.from_gguf`` of the same file: BF16 loads as our bf16 weights,
Q8_0 as int8 and Q4_0 as int4 weights with one scale per group of 32 (the blocks as they are). Our decode rate is
the best of ``--repeats`` runs of ``--tokens`` steps of the compiled decode step, after a warm-up that compiles it;
prefill is the best of ``--repeats`` timed 512-token prefills after a compiling one. With ``--profile`` each of our
rows also says how much of a decode step ran inside our kernels (the rest is MindSpore's launch and ops, Python).
Prints the CPU, its flags, the load average around each row and the ratio table: on a shared machine the
absolute rates move with the load, the ratios much less.

Usage:
    GLOG_v=3 python benchmarks/bench_llamacpp.py                 # 24 layers (the 0.5B shape): BF16, Q8_0, Q4_0
    GLOG_v=3 python benchmarks/bench_llamacpp.py --formats F32,BF16,Q8_0,Q4_0 --profile
    GLOG_v=3 python benchmarks/bench_llamacpp.py --layers 4 --formats Q8_0   # quick look
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
DEFAULT_FORMATS = ("BF16", "Q8_0", "Q4_0")
OUR_DTYPE = {"F32": "float32", "BF16": "bfloat16", "Q8_0": "bfloat16", "Q4_0": "bfloat16"}
#: What our model holds for each format (from_gguf keeps Q8_0/Q4_0 blocks as int8/int4 weights).
OUR_WEIGHTS = {"F32": "fp32", "BF16": "bf16", "Q8_0": "int8 g32", "Q4_0": "int4 g32"}


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


def ours(path: Path, kind: str, new_tokens: int, repeats: int, profile: bool,
         activations: str = "int8") -> Dict[str, float]:
    """Our decode tokens/s (best of ``repeats`` runs of ``new_tokens`` steps) and 512-token prefill tokens/s.

    One cache serves every run, so the prefill and decode graphs compile once (in the untimed warm-up).
    With ``profile``, also the kernel share of the fastest run's decode steps (``kernel_ms``, ``step_ms``).
    ``activations``: how int8/int4 layers read their input (:func:`qwen2ms.modeling.quantize.set_activations`).
    """
    import mindspore as ms
    from mindspore import Tensor

    from qwen2ms import Qwen2ForCausalLM
    from qwen2ms.modeling.quantize import set_activations
    from qwen2ms.ops.cpu import kernel_profile

    model = Qwen2ForCausalLM.from_gguf(path, dtype=OUR_DTYPE[kind])
    set_activations(model, activations)
    model.set_train(False)
    prompt = np.random.default_rng(0).integers(0, 151643, size=(1, 512)).astype(np.int32)
    cache = model.new_cache(batch_size=1, max_length=512 + new_tokens + 1)

    def prefill() -> int:
        logits = model.forward_step(prompt, None, None, cache, 0, logits_to_keep=1)
        return int(np.argmax(logits.asnumpy()[0, -1]))

    def decode(tok: int, steps: int) -> List[float]:
        times = []
        for j in range(steps):
            t0 = time.perf_counter()
            logits = model.forward_step(np.array([[tok]], np.int32), None, None, cache, Tensor(512 + j, ms.int32))
            tok = int(np.argmax(logits.asnumpy()[0, -1]))
            times.append(time.perf_counter() - t0)
        return times

    decode(prefill(), 2)  # compiles both graphs
    out = {"pp512": 0.0, "tg128": 0.0}
    for _ in range(repeats):
        t0 = time.perf_counter()
        tok = prefill()
        out["pp512"] = max(out["pp512"], 512 / (time.perf_counter() - t0))
        if profile:
            kernel_profile(reset=True, enable=True)
        steps = decode(tok, new_tokens)
        rate = len(steps) / sum(steps)
        if profile:
            calls = kernel_profile(reset=True, enable=False)
            if rate > out["tg128"]:
                out["step_ms"] = sum(steps) / len(steps) * 1e3
                out["kernel_ms"] = sum(sec for _, sec in calls.values()) / len(steps) * 1e3
                out["calls"] = sum(n for n, _ in calls.values()) / len(steps)
        out["tg128"] = max(out["tg128"], rate)
    return out


def ours_in_child(path: Path, kind: str, new_tokens: int, repeats: int, profile: bool,
                  activations: str = "int8") -> Dict[str, float]:
    """:func:`ours` in a fresh process: each format's model and compiled graphs are freed with it (a 24-layer
    run holding the earlier formats' models was killed for memory on a shared 23 GB machine)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(path), "--tokens", str(new_tokens),
           "--repeats", str(repeats), "--activations", activations] + (["--profile"] if profile else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"our {kind} run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("FORMAT", "GGUF"), help=argparse.SUPPRESS)
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (24: Qwen2-0.5B)")
    ap.add_argument("--formats", default=",".join(DEFAULT_FORMATS), help=f"comma-separated subset of {', '.join(FORMATS)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="our decode steps per run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="also time our kernels inside each decode step")
    ap.add_argument("--activations", choices=("int8", "float32"), default="int8",
                    help="how our int8/int4 layers read activations (default int8: rounded per block of 32)")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(ours(Path(args.child[1]), args.child[0], args.tokens, args.repeats, args.profile,
                              args.activations)))
        return 0
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
    print(f"load average at start: {' '.join(f'{v:.1f}' for v in os.getloadavg())} (1/5/15 min; other processes "
          f"share the cores, so compare the ratios)", flush=True)
    files = make_ggufs(args.layers, formats)
    rows = []
    for kind in formats:
        load0 = load_average()
        theirs = llama_bench(files[kind], args.threads, args.repeats)
        mine = ours_in_child(files[kind], kind, args.tokens, args.repeats, args.profile, args.activations)
        rows.append((kind, mine, theirs, load0, load_average()))
        print(f"  {kind}: qwen2ms ({OUR_WEIGHTS[kind]}) tg {mine['tg128']:.1f} pp512 {mine['pp512']:.0f}; llama.cpp "
              f"tg128 {theirs['tg128']:.1f} pp512 {theirs['pp512']:.0f} (load average {load0:.1f} -> "
              f"{load_average():.1f})", flush=True)
    print(f"\nQwen2-0.5B shape, {args.layers} layers, random weights, {args.threads} threads, batch 1; decode: ours "
          f"best of {args.repeats} x {args.tokens} steps, llama-bench tg128 mean of {args.repeats}; our int8/int4 "
          f"layers read {args.activations} activations")
    print(f"{'format':7s} {'ours':>9s} {'ours tg':>8s} {'llama tg':>9s} {'ratio':>6s} {'ours pp512':>11s} "
          f"{'llama pp512':>12s} {'ratio':>6s} {'load':>9s}")
    for kind, mine, theirs, l0, l1 in rows:
        print(f"{kind:7s} {OUR_WEIGHTS[kind]:>9s} {mine['tg128']:8.1f} {theirs['tg128']:9.1f} "
              f"{mine['tg128'] / theirs['tg128']:5.2f}x {mine['pp512']:11.0f} {theirs['pp512']:12.0f} "
              f"{mine['pp512'] / theirs['pp512']:5.2f}x {l0:4.1f}-{l1:<4.1f}")
    if args.profile:
        print("\nour decode step (fastest run): wall time, time inside our kernels, kernel calls per step")
        for kind, mine, _, _, _ in rows:
            k, w = mine["kernel_ms"], mine["step_ms"]
            print(f"  {kind:7s} {w:7.1f} ms/step, kernels {k:7.1f} ms ({k / w:.0%}) in {mine['calls']:.0f} calls, "
                  f"outside {w - k:6.1f} ms (MindSpore launch and ops, Python)")
    print(f"load average at end: {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
