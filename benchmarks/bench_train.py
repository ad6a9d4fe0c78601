"""Training throughput: qwen2ms's compiled Trainer step against a plain torch loop over transformers' Qwen2, same model and batch.

Both sides start from the same weights (written by transformers, read by our loader) and train on the
same fixed-shape batches with AdamW (weight decay on, gradient clipping 1.0). Warm-up steps (our
graph compile, torch's first allocations) are excluded; the timed steps are interleaved in rounds so
machine load affects both alike. Prints tokens/s for each side and the ratio.

    python benchmarks/bench_train.py [--layers 4 --hidden 256 --batch 4 --seq 256 --steps 10] [--ops-backend reference]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("GLOG_v", "3")

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ops-backend", default=None,
                    help="qwen2ms ops backend for our model (reference, cpu, ascend; default: by device)")
    a = ap.parse_args()
    if a.ops_backend:
        os.environ["QWEN2MS_OPS_BACKEND"] = a.ops_backend

    import torch
    import transformers

    from qwen2ms.modeling import Qwen2ForCausalLM
    from qwen2ms.training import Trainer, TrainingArguments
    from qwen2ms.training.trainer import _count_targets

    heads = max(2, a.hidden // 64)
    cfg = transformers.Qwen2Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 3,
                                   num_hidden_layers=a.layers, num_attention_heads=heads,
                                   num_key_value_heads=max(1, heads // 2), max_position_embeddings=a.seq,
                                   tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg)
    tmp = tempfile.mkdtemp()
    hf.save_pretrained(os.path.join(tmp, "hf"))
    ours = Qwen2ForCausalLM.from_hf(os.path.join(tmp, "hf"))

    rng = np.random.default_rng(0)
    n_batches = 4
    rows = [rng.integers(1, a.vocab, a.seq).tolist() for _ in range(a.batch * n_batches)]
    data = [{"input_ids": r, "labels": [-100] * 16 + r[16:]} for r in rows]
    tokens_per_step = a.batch * a.seq

    args = TrainingArguments(os.path.join(tmp, "run"), learning_rate=1e-4, weight_decay=0.01, max_grad_norm=1.0,
                             per_device_train_batch_size=a.batch, max_steps=10 ** 9, save_steps=0,
                             logging_steps=10 ** 9, disable_tqdm=True, shuffle=False,
                             lr_scheduler_type="constant")
    trainer = Trainer(ours, args, train_dataset=data)
    trainer._build(10 ** 9)
    ours.set_train(True)
    dl = trainer.get_train_dataloader()
    batches = list(dl.iter_epoch(0))

    def ms_steps(k: int) -> float:
        t0 = time.perf_counter()
        for i in range(k):
            b = batches[i % len(batches)]
            trainer._micro_position = (True, True)
            trainer.training_step(ours, b, _count_targets(b))
        return time.perf_counter() - t0

    decay = [p for n, p in hf.named_parameters() if "bias" not in n and "norm" not in n]
    no_decay = [p for n, p in hf.named_parameters() if "bias" in n or "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4)
    t_batches = [{k: torch.tensor(v, dtype=torch.long) for k, v in b.items()} for b in batches]
    hf.train()

    def torch_steps(k: int) -> float:
        t0 = time.perf_counter()
        for i in range(k):
            b = t_batches[i % len(t_batches)]
            loss = hf(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    t = time.perf_counter()
    ms_steps(2)
    compile_s = time.perf_counter() - t
    torch_steps(2)
    ms_time = torch_time = 0.0
    for _ in range(a.rounds):
        ms_time += ms_steps(a.steps)
        torch_time += torch_steps(a.steps)
    n = a.rounds * a.steps * tokens_per_step
    ours_tps, torch_tps = n / ms_time, n / torch_time
    backend = type(ours.model.embed_tokens.ops_impl).__name__ if hasattr(ours.model.embed_tokens, "ops_impl") else "?"
    print(f"config: {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}, batch {a.batch} x seq {a.seq}, "
          f"torch threads {torch.get_num_threads()}, qwen2ms ops backend {backend}")
    print(f"qwen2ms compiled step: {ours_tps:8.0f} tokens/s  (first 2 steps incl. compile: {compile_s:.1f} s)")
    print(f"transformers + torch : {torch_tps:8.0f} tokens/s")
    print(f"ratio qwen2ms / torch: {ours_tps / torch_tps:.2f}x")


if __name__ == "__main__":
    main()
