"""Decode tokens/s of the paged runner (block tables, bucketed graphs) against generate()'s static batch, 0.5B shape.

For each batch size, ``B`` random prompts are prefilled and then decoded together for ``--tokens`` steps, greedy,
through :class:`qwen2ms.modeling.paged.PagedModelRunner` (blocks handed out in a shuffled order, tables sized for
``--max-model-len``) and through :class:`qwen2ms.generation.engine.CachedDecoder`, the static left-padded batch
``model.generate`` runs. Only the decode steps are timed (prefill and compiles are not); the best of
``--repeats`` runs is reported because the machine is shared. Both paths also check that they chose the same tokens.

Usage:
    GLOG_v=3 python benchmarks/bench_paged.py                         # batches 1, 4, 16; 24 layers
    GLOG_v=3 python benchmarks/bench_paged.py --layers 4 --batches 1,4   # quick look
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List

os.environ.setdefault("GLOG_v", "3")

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llamacpp import cpu_description  # noqa: E402


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def run_paged(runner, prompts: np.ndarray, tokens: int, block_size: int, seed: int):
    """Prefill every prompt, decode them together; returns (decode tok/s, generated tokens [B, tokens + 2])."""
    b, t = prompts.shape
    per_seq = -(-(t + tokens + 2) // block_size)
    order = np.random.default_rng(seed).permutation(runner.cache.num_blocks)[:b * per_seq]
    tables = order.reshape(b, per_seq).tolist()
    out = [[int(runner.prefill(prompts[i].tolist(), 0, tables[i]).argmax()) for i in range(b)]]
    positions = [t] * b
    for step in range(tokens + 1):
        if step == 1:  # the first step may compile its graph: untimed
            start = time.perf_counter()
        logits = runner.decode(out[-1], positions, tables)
        out.append(logits.argmax(-1).tolist())
        positions = [p + 1 for p in positions]
    elapsed = time.perf_counter() - start
    return b * tokens / elapsed, np.array(out).T


def run_static(model, prompts: np.ndarray, tokens: int):
    """The static batch generate() decodes with: one cache, one compiled step per token for all rows."""
    from qwen2ms.generation.engine import CachedDecoder

    b, t = prompts.shape
    dec = CachedDecoder(model, batch_size=b, prompt_len=t, max_new_tokens=tokens + 2)
    out = [dec.prefill(prompts, np.ones_like(prompts)).argmax(-1)]
    for step in range(tokens + 1):
        if step == 1:  # the first step may compile its graph: untimed
            start = time.perf_counter()
        out.append(dec.step(out[-1]).argmax(-1))
    elapsed = time.perf_counter() - start
    return b * tokens / elapsed, np.array(out).T


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,4,16", help="comma-separated batch sizes")
    ap.add_argument("--prompt", type=int, default=64, help="prompt length")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--repeats", type=int, default=2, help="runs per path and batch; the best is reported")
    ap.add_argument("--layers", type=int, default=0, help="override the layer count (0: the real 24)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-model-len", type=int, default=1024, help="the runner's max_model_len (table width)")
    ap.add_argument("--backend", default="cpu", help="ops backend of the model (cpu or reference)")
    args = ap.parse_args(argv)
    batches: List[int] = [int(x) for x in args.batches.split(",") if x.strip()]

    from qwen2ms.config import Qwen2Config
    from qwen2ms.modeling import Qwen2ForCausalLM
    from qwen2ms.modeling.paged import PagedKVCache, PagedModelRunner

    cfg = Qwen2Config.from_preset("qwen2-0.5b")
    if args.layers:
        cfg.num_hidden_layers = args.layers
    cpu = cpu_description()
    print(f"CPU: {cpu['model']} ({os.cpu_count()} cores), flags: {cpu['flags']}")
    print(f"Qwen2-0.5B shape, {cfg.num_hidden_layers} layers, random fp32 weights, ops backend {args.backend}; "
          f"prompt {args.prompt}, {args.tokens} timed decode steps, best of {args.repeats}; "
          f"paged: block_size {args.block_size}, max_model_len {args.max_model_len}; load average {load_average():.1f}")
    model = Qwen2ForCausalLM(cfg, seed=0, ops_backend=args.backend)
    need = max(batches) * -(-(args.prompt + args.tokens + 2) // args.block_size)
    cache = PagedKVCache(cfg, num_blocks=need, block_size=args.block_size)
    runner = PagedModelRunner(model, cache, max_num_seqs=max(batches), max_model_len=args.max_model_len)
    print(f"KV pool: {need} blocks x {args.block_size} tokens, {cache.nbytes() / 2**20:.0f} MiB")
    rng = np.random.default_rng(0)
    print(f"{'batch':>5} {'paged tok/s':>12} {'static tok/s':>13} {'paged/static':>13} {'same tokens':>12} {'load':>5}")
    for b in batches:
        prompts = rng.integers(0, cfg.vocab_size - 300, size=(b, args.prompt)).astype(np.int32)
        paged = static = 0.0
        for r in range(args.repeats):
            rate_p, toks_p = run_paged(runner, prompts, args.tokens, args.block_size, seed=r)
            rate_s, toks_s = run_static(model, prompts, args.tokens)
            paged, static = max(paged, rate_p), max(static, rate_s)
        same = "yes" if np.array_equal(toks_p, toks_s) else f"{(toks_p == toks_s).mean():.0%}"
        print(f"{b:5d} {paged:12.2f} {static:13.2f} {paged / static:13.2f} {same:>12} {load_average():5.1f}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
