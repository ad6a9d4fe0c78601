"""End-to-end generate() speed on a random-weight Qwen2-0.5B-shaped model (fp32): qwen2ms vs transformers+torch.

Measured in one script run on the same machine state:
  * prefill: a ``--prefill``-token prompt (batch 1), the time to the first token's logits;
  * decode: ``--new``-token greedy generation at batch 1 and batch ``--batch`` from a ``--prompt``-token
    prompt, timed between the first and the last generated token (so prefill is excluded); both sides run
    their full generate loop (processors, selection, stopping), timestamps come from a stopping criterion;
  * compile time: our first call minus a warm call of the same shape (graphs are cached per shape).
The best of ``--repeats`` runs is reported for each measurement, because the machine may be shared.

Usage:
    GLOG_v=3 python benchmarks/bench_generate.py                 # 0.5B shape, 24 layers
    GLOG_v=3 python benchmarks/bench_generate.py --layers 4 --new 32 --repeats 1   # quick look
"""
from __future__ import annotations

import argparse
import gc
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

    def decode_rate(self, batch: int) -> float:
        steps = len(self.times) - 1
        return batch * steps / (self.times[-1] - self.times[0])


def config(layers: int):
    from qwen2ms.config import Qwen2Config

    cfg = Qwen2Config.from_preset("qwen2-0.5b", max_position_embeddings=4096)
    if layers:
        cfg = cfg.replace(num_hidden_layers=layers, max_window_layers=layers)
    return cfg


def bench_ours(cfg, prompts: Dict[str, np.ndarray], new: int, repeats: int) -> Dict[str, float]:
    from qwen2ms.generation.engine import CachedDecoder
    from qwen2ms.generation.generate import generate
    from qwen2ms.modeling import Qwen2ForCausalLM

    model = Qwen2ForCausalLM(cfg, dtype="float32", seed=0)
    model.set_train(False)
    res: Dict[str, float] = {}
    ids = prompts["prefill"]
    for r in range(repeats + 1):
        dec = CachedDecoder(model, 1, ids.shape[1], 1)
        t0 = time.perf_counter()
        dec.prefill(ids, np.ones_like(ids))
        dt = time.perf_counter() - t0
        if r == 0:
            res["prefill_first_s"] = dt
        else:
            res["prefill"] = max(res.get("prefill", 0.0), ids.shape[1] / dt)
    for name in ("decode_b1", "decode_bN"):
        ids = prompts[name]
        for r in range(repeats + 1):
            clock = Clock()
            t0 = time.perf_counter()
            generate(model, ids, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0,
                     stopping_criteria=[clock])
            total = time.perf_counter() - t0
            if r == 0:
                res[name + "_first_s"] = total
            else:
                res[name] = max(res.get(name, 0.0), clock.decode_rate(ids.shape[0]))
                res[name + "_warm_s"] = min(res.get(name + "_warm_s", 1e9), total)
        res[name + "_compile_s"] = res[name + "_first_s"] - res[name + "_warm_s"]
    res["prefill_compile_s"] = res["prefill_first_s"] - prompts["prefill"].shape[1] / res["prefill"]
    del model
    gc.collect()
    return res


def bench_torch(cfg, prompts: Dict[str, np.ndarray], new: int, repeats: int) -> Dict[str, float]:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 2)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, tie_word_embeddings=cfg.tie_word_embeddings,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(hf_cfg).float().eval()
    res: Dict[str, float] = {}
    with torch.inference_mode():
        ids = torch.tensor(prompts["prefill"], dtype=torch.long)
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            model(input_ids=ids, use_cache=True, logits_to_keep=1)
            dt = time.perf_counter() - t0
            if r:
                res["prefill"] = max(res.get("prefill", 0.0), ids.shape[1] / dt)
        for name in ("decode_b1", "decode_bN"):
            ids = torch.tensor(prompts[name], dtype=torch.long)
            for r in range(repeats + 1):
                clock = Clock()

                class Crit(transformers.StoppingCriteria):
                    def __call__(self, input_ids, scores, **kwargs):
                        clock(input_ids)
                        return torch.zeros(input_ids.shape[0], dtype=torch.bool)

                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                               eos_token_id=None, pad_token_id=0,
                               stopping_criteria=transformers.StoppingCriteriaList([Crit()]))
                if r:
                    res[name] = max(res.get(name, 0.0), clock.decode_rate(ids.shape[0]))
    del model
    gc.collect()
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
    t0 = time.perf_counter()
    ours = bench_ours(cfg, prompts, args.new, args.repeats)
    print(f"  qwen2ms done in {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    ref = bench_torch(cfg, prompts, args.new, args.repeats)
    print(f"  transformers done in {time.perf_counter() - t0:.0f} s\n", flush=True)

    rows = [("prefill", f"prefill {args.prefill} (tok/s)"), ("decode_b1", "decode batch 1 (tok/s)"),
            ("decode_bN", f"decode batch {args.batch} (tok/s)")]
    print(f"{'measurement':28s} {'qwen2ms':>9s} {'transformers':>13s} {'ratio':>7s}")
    for key, label in rows:
        print(f"{label:28s} {ours[key]:9.2f} {ref[key]:13.2f} {ours[key] / ref[key]:6.2f}x")
    print(f"\ncompile time (first call minus a warm call): prefill {ours['prefill_compile_s']:.1f} s, "
          f"generate batch 1 {ours['decode_b1_compile_s']:.1f} s, batch {args.batch} {ours['decode_bN_compile_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
