"""Batch-1 greedy decode speed of a random-weight Qwen2-0.5B-shaped model: our ops backends vs transformers+torch.

Paths (one script run, same machine state): the reference ops with fp32 weights, the CPU kernels with
fp32, bf16, int8 and int4 (groups of 32 or 128) weight-only weights, and transformers+torch in fp32 and bf16. Each path prefills a
prompt, then times the compiled decode step (``Qwen2ForCausalLM.forward_step``) token by token; each path's
best of ``--repeats`` runs is reported, because the machine is shared (``--interleave`` runs the paths
round-robin instead, all models loaded at once: ~13 GB at the 0.5B shape). The roofline is the weight bytes read
per token over the memory bandwidth (``--bandwidth``, 36 GB/s measured on the development machine).

``--profile`` times every kernel call (``$QWEN2MS_KERNEL_PROFILE``) and prints, per path, a decode step's
wall time against the time spent inside our kernels, kernel by kernel; the rest is MindSpore (graph launch,
its own ops) and Python.

Usage:
    GLOG_v=3 python benchmarks/bench_decode.py                   # all paths, 0.5B shape
    GLOG_v=3 python benchmarks/bench_decode.py --layers 4 --paths cpu-bf16,torch-bf16   # quick look
    GLOG_v=3 python benchmarks/bench_decode.py --paths cpu-int8 --profile               # where a step's time goes
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

os.environ.setdefault("GLOG_v", "3")

import numpy as np

PATHS = ("reference-fp32", "cpu-fp32", "cpu-bf16", "cpu-int8", "cpu-int4g32", "cpu-int4g128", "torch-fp32",
         "torch-bf16")
#: Int4 group size of each int4 path.
INT4_GROUPS = {"int4g32": 32, "int4g128": 128}


def qwen2_05b_config(layers: int):
    from qwen2ms.config import Qwen2Config

    cfg = Qwen2Config.from_preset("qwen2-0.5b")
    if layers:
        cfg.num_hidden_layers = layers
    return cfg


def weight_bytes_per_token(cfg, bytes_per_weight: float, int8: bool = False, group: int = 0,
                           int4_group: int = 0) -> float:
    """Bytes of weights one decode step reads: every projection plus the lm_head (the embedding row is negligible).

    int8 adds float32 scales: one per row, or one per ``group`` inputs of the projections it divides (the tied
    lm_head keeps one per row). ``int4_group``: the projections are int4 (half a byte per weight, a float32 scale
    per group) and the tied lm_head int8 with one scale per row.
    """
    if int4_group:
        h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        proj = cfg.num_hidden_layers * sum(a * b for a, b in [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)])
        small = cfg.num_hidden_layers * (2 * h + q + 2 * kv) * 4
        return proj * (0.5 + 4 / int4_group) + cfg.vocab_size * (h + 4) + small
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    per_layer_rows = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    elems = cfg.num_hidden_layers * sum(a * b for a, b in per_layer_rows) + cfg.vocab_size * h
    rows = cfg.num_hidden_layers * sum(a for a, _ in per_layer_rows) + cfg.vocab_size
    small = cfg.num_hidden_layers * (2 * h + q + 2 * kv) * 4  # norms and biases
    scales = 0
    if int8:
        per_layer = sum(a * (b // group if group and b % group == 0 else 1) for a, b in per_layer_rows)
        scales = (cfg.num_hidden_layers * per_layer + cfg.vocab_size) * 4
    return elems * bytes_per_weight + scales + small


def setup_ours(cfg, path: str, prompt: np.ndarray, new_tokens: int, int8_group: int = 128,
               profile: Optional[dict] = None) -> Callable[[], Tuple[float, List[int]]]:
    """Build our model for ``path``; returns a function that prefills, decodes and returns (tok/s, tokens).

    With ``profile`` (a dict), the fastest run's decode-step wall time and per-kernel times are stored in it.
    """
    from qwen2ms.ops.cpu import kernel_profile

    import mindspore as ms
    from mindspore import Tensor

    from qwen2ms.modeling.model import Qwen2ForCausalLM
    from qwen2ms.modeling.quantize import quantize_int8_weights, quantize_weights

    backend, wdt = path.split("-")
    dtype = "float32" if wdt == "fp32" else "bfloat16"
    model = Qwen2ForCausalLM(cfg, dtype=dtype, seed=0, ops_backend=backend)
    if wdt == "int8":
        quantize_int8_weights(model, group_size=int8_group or None)
    elif wdt in INT4_GROUPS:
        quantize_weights(model, bits=4, group_size=INT4_GROUPS[wdt])
    model.set_train(False)
    t = prompt.shape[1]

    def one_run() -> Tuple[float, List[int]]:
        cache = model.new_cache(batch_size=1, max_length=t + new_tokens + 1)
        logits = model.forward_step(prompt, None, None, cache, 0, logits_to_keep=1)
        tok = int(np.argmax(logits.asnumpy()[0, -1]))
        out = [tok]
        step_times = []
        for j in range(new_tokens):
            if j == 1 and profile is not None:
                kernel_profile(reset=True)
            t0 = time.perf_counter()
            logits = model.forward_step(np.array([[tok]], np.int32), None, None, cache, Tensor(t + j, ms.int32))
            tok = int(np.argmax(logits.asnumpy()[0, -1]))
            step_times.append(time.perf_counter() - t0)
            out.append(tok)
        # The first decode step of the first run compiles the graph: leave the first step out.
        rate = (len(step_times) - 1) / sum(step_times[1:])
        if profile is not None and backend == "cpu" and (not profile or rate > profile["rate"]):
            profile.update(rate=rate, steps=len(step_times) - 1, step_s=sum(step_times[1:]),
                           kernels=kernel_profile(reset=True))
        return rate, out

    return one_run


def setup_torch(cfg, path: str, prompt: np.ndarray, new_tokens: int) -> Callable[[], Tuple[float, List[int]]]:
    """Build the transformers model for ``path``; returns a function like :func:`setup_ours`'s."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 2)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps)
    torch.manual_seed(0)
    dtype = torch.float32 if path.endswith("fp32") else torch.bfloat16
    model = transformers.Qwen2ForCausalLM(hf_cfg).to(dtype).eval()
    ids = torch.tensor(prompt, dtype=torch.long)

    def one_run() -> Tuple[float, List[int]]:
        with torch.inference_mode():
            out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
            tok = int(out.logits[0, -1].argmax())
            res, step_times = [tok], []
            for _ in range(new_tokens):
                t0 = time.perf_counter()
                out = model(input_ids=torch.tensor([[tok]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = int(out.logits[0, -1].argmax())
                step_times.append(time.perf_counter() - t0)
                res.append(tok)
        return (len(step_times) - 1) / sum(step_times[1:]), res

    return one_run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {', '.join(PATHS)}")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per run")
    ap.add_argument("--prompt", type=int, default=16, help="prompt length")
    ap.add_argument("--repeats", type=int, default=3, help="runs per path; the best is reported")
    ap.add_argument("--layers", type=int, default=0, help="override the layer count (0: the real 24)")
    ap.add_argument("--bandwidth", type=float, default=36.0, help="memory read bandwidth in GB/s for the roofline")
    ap.add_argument("--interleave", action="store_true",
                    help="keep every path's model loaded and run the paths round-robin (~13 GB peak at the 0.5B shape)")
    ap.add_argument("--int8-group", type=int, default=128,
                    help="int8 scale group size along the inputs (0: one scale per output channel)")
    ap.add_argument("--profile", action="store_true",
                    help="time every kernel call and print a decode step's kernel time against its wall time")
    args = ap.parse_args(argv)
    if args.profile:
        os.environ["QWEN2MS_KERNEL_PROFILE"] = "1"  # read by the kernel library at its first call
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if bad:
        ap.error(f"unknown path(s) {bad}; choose from {', '.join(PATHS)}")

    cfg = qwen2_05b_config(args.layers)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    prompt = np.random.default_rng(0).integers(0, 151643, size=(1, args.prompt)).astype(np.int32)
    print(f"Qwen2-0.5B shape, {cfg.num_hidden_layers} layers, random weights; prompt {args.prompt}, "
          f"{args.tokens} decode tokens, best of {args.repeats}; {os.cpu_count()} CPU cores, "
          f"load average {load:.1f} at start (other processes share the cores: compare ratios)")
    profiles: Dict[str, dict] = {}

    def setup(path):
        if path.startswith("torch"):
            return setup_torch(cfg, path, prompt, args.tokens)
        profile = profiles.setdefault(path, {}) if args.profile else None
        return setup_ours(cfg, path, prompt, args.tokens, args.int8_group, profile)

    rates: Dict[str, float] = {}
    toks: Dict[str, List[int]] = {}

    def record(path, label, rate_tokens):
        rate, toks[path] = rate_tokens
        rates[path] = max(rates.get(path, 0.0), rate)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"  {label}{path:15s} {rate:7.2f} tok/s   (load average {load:.1f})", flush=True)

    if args.interleave:
        # Every path runs once per round, so each path's best run comes from the same stretch of machine
        # load (on a shared machine the load can change several-fold within minutes).
        runs = {path: setup(path) for path in paths}
        for r in range(args.repeats):
            for path in paths:
                record(path, f"round {r + 1}: ", runs[path]())
        del runs
    else:
        for path in paths:
            run = setup(path)
            for _ in range(args.repeats):
                record(path, "", run())
            del run
            gc.collect()
    gc.collect()

    bpw = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4g32": 0.5, "int4g128": 0.5}
    print(f"\n{'path':15s} {'tok/s':>7s} {'GB/token':>9s} {'roofline':>9s} {'fraction':>9s} "
          f"{'vs torch-bf16':>13s} {'vs torch-fp32':>13s}")
    for path in paths:
        w = path.split("-")[1]
        nbytes = weight_bytes_per_token(cfg, bpw[w], int8=(w == "int8"), group=args.int8_group,
                                        int4_group=INT4_GROUPS.get(w, 0))
        roof = args.bandwidth * 1e9 / nbytes
        vs_bf16 = f"{rates[path] / rates['torch-bf16']:.2f}x" if "torch-bf16" in rates else "-"
        vs_fp32 = f"{rates[path] / rates['torch-fp32']:.2f}x" if "torch-fp32" in rates else "-"
        print(f"{path:15s} {rates[path]:7.2f} {nbytes / 1e9:9.3f} {roof:9.1f} {rates[path] / roof:9.0%} "
              f"{vs_bf16:>13s} {vs_fp32:>13s}")
    if "cpu-int8" in toks and "cpu-bf16" in toks:
        a, b = toks["cpu-int8"], toks["cpu-bf16"]
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        print(f"\ngreedy tokens, int8 (group {args.int8_group or 'per channel'}) vs bf16 weights: first {same} of "
              f"{len(a)} identical (random weights: near-tie logits; see tests/test_ops_model.py for the "
              f"teacher-forced check)")
    for path, prof in profiles.items():
        if not prof:
            continue
        step_ms = prof["step_s"] / prof["steps"] * 1e3
        kern = {name: (calls / prof["steps"], sec / prof["steps"] * 1e3) for name, (calls, sec) in prof["kernels"].items()}
        total = sum(ms_ for _, ms_ in kern.values())
        calls = sum(c for c, _ in kern.values())
        print(f"\nprofile of {path} (fastest run, {prof['steps']} steps): decode step {step_ms:.2f} ms wall "
              f"(forward_step + logits to numpy + argmax); inside our kernels {total:.2f} ms ({total / step_ms:.0%}) "
              f"in {calls:.0f} calls; outside them {step_ms - total:.2f} ms ({1 - total / step_ms:.0%}: MindSpore "
              f"launch and its own ops, Python)")
        for name, (c, ms_) in sorted(kern.items(), key=lambda kv: -kv[1][1]):
            print(f"  {name:20s} {c:5.0f} calls/step {ms_:7.3f} ms/step {ms_ / step_ms:6.1%} {ms_ / c * 1e3:8.1f} us/call")
    if "cpu-fp32" in toks and "reference-fp32" in toks:
        print(f"greedy tokens, cpu-fp32 vs reference-fp32 identical: {toks['cpu-fp32'] == toks['reference-fp32']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
