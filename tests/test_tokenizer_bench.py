"""Smoke test: benchmarks/bench_tokenizer.py runs on a tiny corpus and reports parity and ratios."""
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_tokenizer.py"


def test_bench_tokenizer_runs_and_reports(qwen2_tokenizer_dir):
    out = subprocess.run(
        [sys.executable, str(BENCH), "--mb", "0.03", "--repeat", "1", "--long-mb", "0.02",
         "--tokenizer-dir", str(qwen2_tokenizer_dir)],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"parity: 0 of \d+ documents differ", out.stdout), out.stdout
    for label in ("cold per call", "warm per call", "cold batched", "warm batched"):
        assert re.search(rf"{label}\s+\d+\.\d\dx\s+\d+\.\d\dx", out.stdout), out.stdout
    assert "HF tokenizers, batched" in out.stdout and "qwen2ms warm, batched" in out.stdout
    long_rows = re.findall(r"^  (.+?)\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+\.\d\d  (True|False)$", out.stdout, re.M)
    assert len(long_rows) == 8 and all(equal == "True" for _, equal in long_rows), out.stdout
