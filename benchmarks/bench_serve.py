"""`qwen2ms serve` under load: concurrent streaming clients, multi-turn chat with prefix caching, and a soak.

One server process (started through the real command line) on a random-weight checkpoint written to a
temporary folder (the Qwen2-0.5B shape by default, ``--tiny`` for the demo's 2-layer shape); every
measurement goes through HTTP with the real ``openai`` client (AsyncOpenAI, streaming):
  * single stream: one request at a time, output tokens/s, TTFT and inter-token latency;
  * ``--clients`` concurrent streaming clients (default 16), prompt lengths drawn from 32-1024 tokens and
    output lengths from ``--min-out``-``--max-out``: aggregate output tokens/s vs the single stream,
    p50/p99 TTFT and inter-token latency;
  * static batch: ``model.generate`` in this process on the same prompts as one left-padded batch (every row
    runs until the longest output is done), its useful output tokens/s;
  * multi-turn chat with a ``--system-tokens`` system prompt: turn-2 TTFT when turn 1 is in the prefix cache
    vs a cold conversation of the same length (a first token no earlier request had);
  * ``--soak N``: N requests from ``--clients`` concurrent workers, a third cancelled mid-stream at random:
    errors, KV blocks in use at the end, server RSS before and after.
Every graph bucket is compiled by a warm-up first (not timed). CPU model/flags and load average are printed.

Usage:
    GLOG_v=3 python benchmarks/bench_serve.py --tiny --soak 500        # the tiny shape, a minute or two
    GLOG_v=3 python benchmarks/bench_serve.py --soak 500                # the 0.5B shape (long on 2 cores)
    GLOG_v=3 python benchmarks/bench_serve.py --layers 4 --max-out 64   # the 0.5B width, 4 layers
"""
import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

os.environ.setdefault("GLOG_v", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp import cpu_description  # noqa: E402


def percentile(values: List[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


# ---------------------------------------------------------------------------------------------- the checkpoint
def write_checkpoint(folder: Path, tiny: bool, layers: Optional[int], dtype: Optional[str]) -> Path:
    from qwen2ms import Qwen2Config, Qwen2ForCausalLM
    from qwen2ms.demo import DEMO_MODEL_CONFIG
    from qwen2ms.tokenization import builtin_tokenizer

    if tiny:
        cfg = Qwen2Config(**dict(DEMO_MODEL_CONFIG, max_position_embeddings=4096))
    else:
        over = {"num_hidden_layers": layers} if layers else {}
        cfg = Qwen2Config.from_preset("qwen2-0.5b", **over)
    Qwen2ForCausalLM(cfg, seed=0, dtype=dtype).save_pretrained(folder)
    builtin_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------- the server
class Server:
    def __init__(self, folder: Path, args: argparse.Namespace, log: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "w")
        cmd = [sys.executable, "-m", "qwen2ms.cli", "serve", str(folder), "--port", str(self.port),
               "--served-model-name", "bench", "--max-num-seqs", str(args.max_num_seqs),
               "--max-model-len", str(args.max_model_len), "--log-level", "warning"]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.log_path = log

    def wait(self, timeout: float = 900) -> None:
        import httpx

        start = time.time()
        while time.time() - start < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("the server did not start")

    def metrics(self) -> Dict[str, float]:
        import httpx

        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=30).text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[key.split("{")[0] + ("{" + key.split("{")[1] if "finished_reason" in key else "")] = float(value)
        return out

    def rss_mib(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2 ** 20

    def stop(self) -> int:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


# ---------------------------------------------------------------------------------------------- one streamed request
async def stream(client, prompt, max_tokens: int, chat: bool = False, cancel_after: Optional[int] = None) -> Dict:
    """One streaming request: arrival, first-token and per-chunk times, tokens (from usage) and the text."""
    t0 = time.perf_counter()
    times: List[float] = []
    text, usage = "", None
    kw = dict(model="bench", max_tokens=max_tokens, temperature=0, stream=True,
              stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    if chat:
        it = await client.chat.completions.create(messages=prompt, **kw)
    else:
        it = await client.completions.create(prompt=prompt, **kw)
    async for chunk in it:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = (c.delta.content if chat else c.text) or ""
            if piece:
                times.append(time.perf_counter())
                text += piece
        if cancel_after is not None and len(times) >= cancel_after:
            await it.close()
            return {"cancelled": True}
    tokens = usage.completion_tokens if usage else len(times)
    itl = [b - a for a, b in zip(times, times[1:])]
    return {"ttft": times[0] - t0 if times else float("nan"), "itl": itl, "tokens": tokens,
            "elapsed": time.perf_counter() - t0, "text": text, "end": time.perf_counter()}


def random_prompt(rng: random.Random, n: int, vocab: int = 150000) -> List[int]:
    return [rng.randrange(200, vocab) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- measurements
async def warm_up(client, args, workload) -> None:
    """Compile the graphs the measurements use: prefill graphs are keyed by (padded length, block-table width),
    decode graphs by batch bucket. The workload's prompt lengths are replayed with other random ids (so the
    timed run gets no prefix-cache hits), then every decode batch bucket runs once."""
    rng = random.Random(99)
    for prompt, _ in workload:
        await stream(client, random_prompt(rng, len(prompt)), 2)
    batch = 1
    while True:
        await asyncio.gather(*(stream(client, random_prompt(rng, 8), 4) for _ in range(batch)))
        if batch == args.max_num_seqs:
            break
        batch = min(2 * batch, args.max_num_seqs)


def summarize(name: str, results: List[Dict], wall: float) -> Dict:
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    row = {"name": name, "requests": len(results), "output_tokens": tokens, "wall_s": round(wall, 2),
           "output_tok_s": round(tokens / wall, 2), "ttft_p50_s": round(percentile(ttft, 50), 3),
           "ttft_p99_s": round(percentile(ttft, 99), 3), "itl_p50_ms": round(1000 * percentile(itl, 50), 1),
           "itl_p99_ms": round(1000 * percentile(itl, 99), 1)}
    print(f"  {name}: {len(results)} requests, {tokens} output tokens in {wall:.1f} s = {tokens / wall:.1f} tok/s; "
          f"TTFT p50 {row['ttft_p50_s']} s p99 {row['ttft_p99_s']} s; inter-token p50 {row['itl_p50_ms']} ms "
          f"p99 {row['itl_p99_ms']} ms")
    return row


async def single_and_concurrent(client, args, workload) -> Dict:
    single = []
    rng = random.Random(7)
    start = time.perf_counter()
    for prompt, out in workload[:args.single]:
        # other ids of the same length: the concurrent run below must not find these prompts in the prefix cache
        single.append(await stream(client, random_prompt(rng, len(prompt)), out))
    one = summarize("single stream", single, time.perf_counter() - start)
    start = time.perf_counter()
    many = await asyncio.gather(*(stream(client, p, o) for p, o in workload))
    conc = summarize(f"{len(workload)} concurrent streams", list(many), time.perf_counter() - start)
    conc["speedup_vs_single"] = round(conc["output_tok_s"] / one["output_tok_s"], 2)
    print(f"  aggregate output tokens/s: {conc['speedup_vs_single']}x the single stream")
    # Where the time goes. Prefill is compute-bound (batching prompts does not make it cheaper per token), so the
    # prompt tokens bound the speed-up: at the single stream's prefill rate, even free decode steps could not
    # beat output tokens / prefill time of the concurrent workload.
    prefill_rate = sum(len(p) for p, _ in workload[:args.single]) / max(1e-9, sum(r["ttft"] for r in single))
    prefill_16 = sum(len(p) for p, _ in workload) / prefill_rate
    conc["single_prefill_share"] = round(sum(r["ttft"] for r in single) / one["wall_s"], 3)
    conc["bound_if_decode_were_free"] = round(conc["output_tokens"] / prefill_16 / one["output_tok_s"], 2)
    # Decode steps alone: each running sequence gets one token per step.
    conc["decode_step_speedup"] = round(len(workload) * one["itl_p50_ms"] / max(1e-9, conc["itl_p50_ms"]), 2)
    print(f"  where the time goes: prefill (TTFT) is {100 * conc['single_prefill_share']:.0f}% of the single stream's "
          f"time at {prefill_rate:.0f} prompt tok/s; with free decode the concurrent run could reach at most "
          f"{conc['bound_if_decode_were_free']}x; decode steps alone: {len(workload)} sequences per step (while all run) at p50 "
          f"{conc['itl_p50_ms']} ms vs 1 at {one['itl_p50_ms']} ms = {conc['decode_step_speedup']}x the tokens/s")
    return {"single": one, "concurrent": conc}


def static_batch(folder: Path, workload, dtype: Optional[str]) -> Dict:
    """model.generate on the same prompts as one left-padded batch; decode steps timed by a stopping criterion."""
    import numpy as np

    from qwen2ms import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_hf(folder, dtype=dtype)
    prompts = [p for p, _ in workload]
    longest = max(o for _, o in workload)
    times: List[float] = []

    def clock(input_ids, scores=None):
        times.append(time.perf_counter())
        return np.zeros(input_ids.shape[0], dtype=bool)

    kw = dict(max_new_tokens=longest, do_sample=False, eos_token_id=[], stopping_criteria=[clock])
    start = time.perf_counter()
    model.generate(prompts, **kw)  # compiles this shape's graphs
    first = time.perf_counter() - start
    times.clear()
    start = time.perf_counter()
    model.generate(prompts, **kw)
    wall = time.perf_counter() - start
    useful = sum(o for _, o in workload)
    steps = [b - a for a, b in zip(times, times[1:])]
    step = statistics.median(steps) if steps else float("nan")
    row = {"wall_s": round(wall, 2), "first_call_s_incl_compile": round(first, 2),
           "prefill_s": round(times[0] - start, 2), "decode_step_ms": round(1000 * step, 1), "batch": len(prompts),
           "steps": longest, "useful_tokens": useful, "useful_tok_s": round(useful / wall, 2)}
    print(f"  static batch generate ({len(prompts)} left-padded rows, {longest} steps, {useful} useful tokens): "
          f"{wall:.1f} s warm (prefill {row['prefill_s']} s, decode step {row['decode_step_ms']} ms) = "
          f"{useful / wall:.1f} useful tok/s (first call {first:.1f} s incl. compile)")
    return row


async def multi_turn(client, server: Server, args, tokenizer) -> Dict:
    """Turn-2 TTFT with turn 1 in the prefix cache vs the same-length conversation with a cold prefix."""
    rng = random.Random(5)
    words = [tokenizer.decode([i]) for i in random_prompt(rng, 4 * args.system_tokens)]
    system = ""
    for w in words:
        if len(tokenizer.encode(system + w)) > args.system_tokens:
            break
        system += w

    def conversation(tag: str):
        return [{"role": "system", "content": f"[{tag}] " + system},
                {"role": "user", "content": "Tell me about the weather today in some detail please."}]

    warm, cold = [], []
    for i in range(-1, args.turn_repeats):  # round -1 compiles the graphs of these shapes, untimed
        msgs = conversation(f"warm {i}")
        first = await stream(client, msgs, 16, chat=True)
        msgs2 = msgs + [{"role": "assistant", "content": first["text"]},
                        {"role": "user", "content": "And tomorrow, will it rain or not?"}]
        before = server.metrics().get("qwen2ms_prefix_cache_hit_tokens_total", 0.0)
        warm.append(await stream(client, msgs2, 8, chat=True))
        hits = server.metrics().get("qwen2ms_prefix_cache_hit_tokens_total", 0.0) - before
        # the same turn-2 conversation shape behind a system prompt no request has used: nothing cached
        cold_msgs = [dict(msgs2[0], content=f"[cold {i}] " + system)] + msgs2[1:]
        cold.append(await stream(client, cold_msgs, 8, chat=True))
        if i < 0:
            warm.clear()
            cold.clear()
            continue
        print(f"  turn 2 #{i}: {hits:.0f} prompt tokens from the prefix cache; TTFT warm {warm[-1]['ttft']:.3f} s, "
              f"cold {cold[-1]['ttft']:.3f} s")
    prompt_len = len(tokenizer.apply_chat_template(msgs2, add_generation_prompt=True, tokenize=True))
    w = statistics.median(r["ttft"] for r in warm)
    c = statistics.median(r["ttft"] for r in cold)
    print(f"  multi-turn ({args.system_tokens}-token system prompt, turn-2 prompt {prompt_len} tokens): "
          f"turn-2 TTFT {w:.3f} s with prefix caching vs {c:.3f} s without = {c / w:.1f}x faster")
    return {"turn2_prompt_tokens": prompt_len, "ttft_cached_s": round(w, 4), "ttft_cold_s": round(c, 4),
            "speedup": round(c / w, 2)}


async def soak(client, server: Server, args) -> Dict:
    rng = random.Random(11)
    rss0 = server.rss_mib()
    errors: List[str] = []
    done = {"finished": 0, "cancelled": 0}
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(args.soak):
        n = rng.randint(8, min(256, args.max_prompt))
        out = rng.randint(4, 48)
        cancel = rng.randint(1, max(1, out - 1)) if rng.random() < 1 / 3 else None
        queue.put_nowait((random_prompt(rng, n), out, cancel))

    rss_tenth: List[float] = []

    async def worker():
        while not queue.empty():
            if not rss_tenth and queue.qsize() <= args.soak * 0.9:
                rss_tenth.append(server.rss_mib())
            prompt, out, cancel = queue.get_nowait()
            try:
                r = await stream(client, prompt, out, cancel_after=cancel)
                if r.get("cancelled"):
                    done["cancelled"] += 1
                elif r["tokens"] != out:
                    errors.append(f"{r['tokens']} tokens instead of {out}")
                else:
                    done["finished"] += 1
            except Exception as e:  # noqa: BLE001 - counted, the soak goes on
                errors.append(f"{type(e).__name__}: {e}")

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.clients)))
    wall = time.perf_counter() - start
    deadline = time.time() + 30
    m = server.metrics()
    while (m.get("qwen2ms_num_requests_running", 0) or m.get("qwen2ms_num_requests_waiting", 0)) and \
            time.time() < deadline:
        await asyncio.sleep(0.2)
        m = server.metrics()
    rss1 = server.rss_mib()
    row = {"requests": args.soak, "finished": done["finished"], "cancelled": done["cancelled"],
           "errors": len(errors), "kv_blocks_used_at_end": m.get("qwen2ms_kv_blocks_used"),
           "running_at_end": m.get("qwen2ms_num_requests_running"), "rss_start_mib": round(rss0),
           "rss_after_tenth_mib": round(rss_tenth[0]) if rss_tenth else None,
           "rss_end_mib": round(rss1), "wall_s": round(wall, 1)}
    print(f"  soak: {args.soak} requests in {wall:.0f} s ({done['finished']} finished, {done['cancelled']} "
          f"cancelled mid-stream), {len(errors)} errors; KV blocks in use at the end "
          f"{row['kv_blocks_used_at_end']:.0f}; server RSS {rss0:.0f} MiB at the start, "
          f"{row['rss_after_tenth_mib']} MiB after a tenth, {rss1:.0f} MiB at the end")
    for e in errors[:5]:
        print(f"    error: {e}")
    return row


def make_workload(args) -> List:
    """(prompt ids, output length) per client: prompt lengths 32..max_prompt, outputs min_out..max_out."""
    rng = random.Random(0)
    return [(random_prompt(rng, rng.randint(32, args.max_prompt)), rng.randint(args.min_out, args.max_out))
            for _ in range(args.clients)]


async def run(args, server: Server, folder: Path, workload: List) -> Dict:
    import openai

    from qwen2ms.tokenization import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer.from_pretrained(folder)
    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", timeout=3600, max_retries=0)
    t = time.perf_counter()
    await warm_up(client, args, workload)
    print(f"warm-up (compiles every prefill and decode bucket): {time.perf_counter() - t:.0f} s; "
          f"server RSS {server.rss_mib():.0f} MiB")
    out: Dict = {}
    if not args.skip_throughput:
        print("throughput (completions, random prompt ids, greedy, ignore_eos):")
        out.update(await single_and_concurrent(client, args, workload))
    if not args.skip_chat:
        print("multi-turn chat:")
        out["multi_turn"] = await multi_turn(client, server, args, tokenizer)
    if args.soak:
        print("soak:")
        out["soak"] = await soak(client, server, args)
    await client.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the demo's 2-layer, hidden-64 shape (quick)")
    p.add_argument("--layers", type=int, default=None, help="0.5B shape with fewer layers")
    p.add_argument("--dtype", default=None, help="weight dtype (default float32)")
    p.add_argument("--model", default=None, help="an existing checkpoint folder instead of a random one")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--single", type=int, default=4, help="requests of the workload run one at a time (default 4)")
    p.add_argument("--max-prompt", type=int, default=1024)
    p.add_argument("--min-out", type=int, default=32)
    p.add_argument("--max-out", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--system-tokens", type=int, default=500)
    p.add_argument("--turn-repeats", type=int, default=3)
    p.add_argument("--soak", type=int, default=0, help="requests of the soak (0: no soak)")
    p.add_argument("--skip-static", action="store_true", help="no static-batch generate comparison")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-chat", action="store_true")
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args()

    cpu = cpu_description()
    print(f"CPU: {cpu['model']} ({os.cpu_count()} logical cores); flags: {cpu['flags']}")
    print(f"load average at start: {load()} (1/5/15 min; other processes share the cores)")
    tmp = Path(tempfile.mkdtemp(prefix="qwen2ms_bench_serve_"))
    try:
        folder = Path(args.model) if args.model else write_checkpoint(tmp / "model", args.tiny, args.layers,
                                                                      args.dtype)
        shape = "tiny (2 layers, hidden 64)" if args.tiny else f"0.5B shape ({args.layers or 24} layers)"
        print(f"checkpoint: {folder if args.model else shape + ', random weights'}; max_num_seqs "
              f"{args.max_num_seqs}, max_model_len {args.max_model_len}")
        workload = make_workload(args)
        server = Server(folder, args, tmp / "server.log")
        t = time.perf_counter()
        server.wait()
        print(f"server up in {time.perf_counter() - t:.0f} s (MindSpore import, model load)")
        try:
            results = asyncio.run(run(args, server, folder, workload))
        finally:
            code = server.stop()
            print(f"server stopped by SIGTERM, exit code {code}")
        if not args.skip_static and not args.skip_throughput:
            print("static batch (model.generate in this process, after the server stopped):")
            results["static_batch"] = static_batch(folder, workload, args.dtype)
            conc = results["concurrent"]["output_tok_s"]
            print(f"  continuous batching {conc} tok/s vs static batch "
                  f"{results['static_batch']['useful_tok_s']} useful tok/s")
        results.update(cpu=cpu, load_end=load())
        print(f"load average at end: {load()}")
        if args.json:
            part = Path(args.json + ".part")
            part.write_text(json.dumps(results, indent=2))
            os.replace(part, args.json)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
