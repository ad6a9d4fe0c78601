"""End-to-end generate() speed on a random-weight Qwen2-0.5B-shaped model (fp32): qwen2ms vs transformers+torch.

Measured in one script run on the same machine state:
  * prefill: a ``--prefill``-token prompt (batch 1), the time to the first token's logits;
  * decode: ``--new``-token greedy generation at batch 1 and batch ``--batch`` from a ``--prompt``-token
    prompt, timed between the first and the last generated token (so prefill is excluded); both sides run
    their full generate loop (processors, selection, stopping), timestamps come from a stopping criterion;
  * compile time: our first call minus a warm call of the same shape (graphs are cached per shape).
Both models live in one process and the runs alternate (ours, theirs, ours, ...), so a change in
machine load affects both sides; the best of ``--repeats`` timed runs is reported per measurement.

Usage:
    GLOG_v=3 python benchmarks/bench_generate.py                 # 0.5B shape, 24 layers
    GLOG_v=3 python benchmarks/bench_generate.py --layers 4 --new 32 --repeats 1   # quick look
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Dict, List

os.environ.setdefault("GLOG_v", "3")

import numpy as np


class Clock:
    """A stopping criterion that never stops and records when each new token arrived."""

    def __init__(self):
        self.times: List[float] = []

    def __call__(self, input_ids, scores=None):
        self.times.append(time.perf_counter())
        return np.zeros(input_ids.shape[0], dtype=bool)

    def step_compile_s(self) -> float:
        """The first decode step's extra time over the median step: the decode graph's compile time."""
        steps = np.diff(self.times)
        return float(steps[0] - np.median(steps[1:]))

    def decode_rate(self, batch: int) -> float:
        steps = len(self.times) - 1
        return batch * steps / (self.times[-1] - self.times[0])


def config(layers: int):
    from qwen2ms.config import Qwen2Config

    cfg = Qwen2Config.from_preset("qwen2-0.5b", max_position_embeddings=4096)
    if layers:
        cfg = cfg.replace(num_hidden_layers=layers, max_window_layers=layers)
    return cfg


def rss_gb() -> float:
    """Peak resident memory of this process so far, in GB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


class Ours:
    """qwen2ms: CachedDecoder for prefill, generate() for decoding."""

    name = "qwen2ms"

    def __init__(self, cfg):
        from qwen2ms.modeling import Qwen2ForCausalLM

        self.model = Qwen2ForCausalLM(cfg, dtype="float32", seed=0)
        self.model.set_train(False)

    def prefill(self, ids: np.ndarray) -> float:
        from qwen2ms.generation.engine import CachedDecoder

        dec = CachedDecoder(self.model, ids.shape[0], ids.shape[1], 1)
        t0 = time.perf_counter()
        dec.prefill(ids, np.ones_like(ids))
        return time.perf_counter() - t0

    def decode(self, ids: np.ndarray, new: int, clock: Clock) -> None:
        from qwen2ms.generation.generate import generate

        # eos_token_id=[]: no eos stopping, every run generates exactly `new` tokens (as transformers here).
        generate(self.model, ids, max_new_tokens=new, do_sample=False, eos_token_id=[], pad_token_id=0,
                 stopping_criteria=[clock])


class Torch:
    """transformers + torch, fp32, its own generate()."""

    name = "transformers"

    def __init__(self, cfg):
        import torch
        import transformers

        self.torch, self.transformers = torch, transformers
        torch.set_num_threads(os.cpu_count() or 2)
        hf_cfg = transformers.Qwen2Config(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads, tie_word_embeddings=cfg.tie_word_embeddings,
            max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=cfg.rope_theta)  # eos/bos unset: generation runs the full length
        torch.manual_seed(0)
        self.model = transformers.Qwen2ForCausalLM(hf_cfg).float().eval()

    def prefill(self, ids: np.ndarray) -> float:
        with self.torch.inference_mode():
            t = self.torch.tensor(ids, dtype=self.torch.long)
            t0 = time.perf_counter()
            self.model(input_ids=t, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - t0

    def decode(self, ids: np.ndarray, new: int, clock: Clock) -> None:
        torch, transformers = self.torch, self.transformers

        class Crit(transformers.StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                clock(input_ids)
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        with torch.inference_mode():
            t = torch.tensor(ids, dtype=torch.long)
            self.model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=new, do_sample=False,
                                pad_token_id=0, stopping_criteria=transformers.StoppingCriteriaList([Crit()]))


def measure(impls, prompts: Dict[str, np.ndarray], new: int, repeats: int) -> Dict[str, Dict[str, float]]:
    """Alternate the implementations run by run (so a change in machine load hits both); best of the timed runs."""
    res: Dict[str, Dict[str, float]] = {impl.name: {} for impl in impls}
    ids = prompts["prefill"]
    for r in range(repeats + 1):  # run 0 compiles (ours) / warms up (torch)
        for impl in impls:
            dt = impl.prefill(ids)
            out = res[impl.name]
            if r == 0:
                out["prefill_first_s"] = dt
            else:
                out["prefill"] = max(out.get("prefill", 0.0), ids.shape[1] / dt)
                out["prefill_warm_s"] = min(out.get("prefill_warm_s", 1e9), dt)
            print(f"    {impl.name} prefill run {r}: {dt:.2f} s", flush=True)
    for name in ("decode_b1", "decode_bN"):
        ids = prompts[name]
        for r in range(repeats + 1):
            for impl in impls:
                clock = Clock()
                t0 = time.perf_counter()
                impl.decode(ids, new, clock)
                total = time.perf_counter() - t0
                out = res[impl.name]
                if r == 0:
                    out[name + "_first_s"] = total
                    out[name + "_step_compile_s"] = clock.step_compile_s()
                else:
                    out[name] = max(out.get(name, 0.0), clock.decode_rate(ids.shape[0]))
                    out[name + "_warm_s"] = min(out.get(name + "_warm_s", 1e9), total)
                print(f"    {impl.name} {name} run {r}: {total:.1f} s, {clock.decode_rate(ids.shape[0]):.2f} tok/s",
                      flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=0, help="override the layer count (0: the real 24)")
    ap.add_argument("--prefill", type=int, default=512, help="prompt length of the prefill measurement")
    ap.add_argument("--prompt", type=int, default=32, help="prompt length of the decode measurements")
    ap.add_argument("--new", type=int, default=128, help="new tokens per decode measurement")
    ap.add_argument("--batch", type=int, default=8, help="the larger decode batch")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs after the warm-up run; best reported")
    args = ap.parse_args(argv)

    cfg = config(args.layers)
    rng = np.random.default_rng(0)
    prompts = {
        "prefill": rng.integers(0, 151643, (1, args.prefill)),
        "decode_b1": rng.integers(0, 151643, (1, args.prompt)),
        "decode_bN": rng.integers(0, 151643, (args.batch, args.prompt)),
    }
    print(f"Qwen2-0.5B shape, {cfg.num_hidden_layers} layers, random fp32 weights; prefill {args.prefill} tokens; "
          f"decode {args.new} new tokens from {args.prompt}-token prompts at batch 1 and {args.batch}; "
          f"best of {args.repeats}; {os.cpu_count()} CPU cores", flush=True)
    ours_impl = Ours(cfg)
    print(f"  qwen2ms model built; peak RSS {rss_gb():.1f} GB", flush=True)
    torch_impl = Torch(cfg)
    print(f"  transformers model built; peak RSS {rss_gb():.1f} GB", flush=True)
    res = measure([ours_impl, torch_impl], prompts, args.new, args.repeats)
    ours, ref = res["qwen2ms"], res["transformers"]
    print(f"  peak RSS of both models and all runs: {rss_gb():.1f} GB\n", flush=True)

    rows = [("prefill", f"prefill {args.prefill} (tok/s)"), ("decode_b1", "decode batch 1 (tok/s)"),
            ("decode_bN", f"decode batch {args.batch} (tok/s)")]
    print(f"{'measurement':28s} {'qwen2ms':>9s} {'transformers':>13s} {'ratio':>7s}")
    for key, label in rows:
        print(f"{label:28s} {ours[key]:9.2f} {ref[key]:13.2f} {ours[key] / ref[key]:6.2f}x")
    compile_prefill = ours["prefill_first_s"] - ours["prefill_warm_s"]
    print(f"\nqwen2ms compile time: prefill graph ({args.prefill} tokens) {compile_prefill:.1f} s (first minus warm "
          f"call); decode step graph {ours['decode_b1_step_compile_s']:.1f} s at batch 1, "
          f"{ours['decode_bN_step_compile_s']:.1f} s at batch {args.batch} (first step minus the median step)")
    backend = next((getattr(c.ops_impl, "name", "?") for _, c in ours_impl.model.cells_and_names()
                    if hasattr(c, "ops_impl")), "reference")
    print(f"qwen2ms ops backend: {backend}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
