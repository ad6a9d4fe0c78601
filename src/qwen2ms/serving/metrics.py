"""The server's Prometheus metrics: engine queue, running sequences, KV blocks, token rates and latencies."""
from __future__ import annotations

import collections
import time
from typing import Any, Deque, Optional, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ServerMetrics", "CONTENT_TYPE_LATEST"]

# Seconds; TTFT on CPU spans a few ms (a short prompt, tiny model) to tens of seconds (long prompts, 7B).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """Prometheus metrics of one server, in a registry of its own (several servers in one process do not clash).

    The engine thread calls :meth:`update` after each step with the engine's stats; the HTTP
    side renders :meth:`render` on ``GET /metrics``. prometheus_client's metrics are thread-safe.

    Args:
        model_name: the ``model_name`` label of every metric (the served model name).
        rate_window: seconds over which ``qwen2ms_generation_tokens_per_second`` is averaged.
    """

    def __init__(self, model_name: str, rate_window: float = 5.0):
        self.registry = CollectorRegistry(auto_describe=True)
        r, labels = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Any:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Any:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        self.waiting = gauge("qwen2ms_num_requests_waiting", "Requests queued for the engine (not yet prefilled).")
        self.running = gauge("qwen2ms_num_requests_running", "Sequences in the running decode batch.")
        self.blocks_used = gauge("qwen2ms_kv_blocks_used", "KV-cache blocks held by sequences (or the prefix cache "
                                                           "while referenced).")
        self.blocks_cached = gauge("qwen2ms_kv_blocks_cached", "Unowned KV blocks kept for prefix-cache hits "
                                                               "(reusable at once).")
        self.blocks_total = gauge("qwen2ms_kv_blocks_total", "KV-cache blocks in the pool.")
        self.kv_usage = gauge("qwen2ms_kv_cache_usage_ratio", "Fraction of the KV-cache pool in use (0 to 1).")
        self.tokens_per_second = gauge("qwen2ms_generation_tokens_per_second",
                                       f"Generated tokens per second over the last {rate_window:g} s.")
        self.prompt_tokens = counter("qwen2ms_prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("qwen2ms_generation_tokens", "Generated tokens.")
        self.prefix_hit_tokens = counter("qwen2ms_prefix_cache_hit_tokens",
                                         "Prompt tokens served from the prefix cache (not prefilled again).")
        self.preemptions = counter("qwen2ms_num_preemptions", "Sequences preempted when the KV pool was full.")
        self.engine_errors = counter("qwen2ms_engine_errors", "Engine steps that raised (their requests failed).")
        self._finished = Counter("qwen2ms_request_success", "Finished requests by finish reason.",
                                 ["model_name", "finished_reason"], registry=r)
        self.ttft = Histogram("qwen2ms_time_to_first_token_seconds", "Arrival to first generated token.", labels,
                              buckets=_TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram("qwen2ms_inter_token_latency_seconds", "Time between consecutive generated tokens.",
                             labels, buckets=_ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram("qwen2ms_e2e_request_latency_seconds", "Arrival to the last token.", labels,
                             buckets=_E2E_BUCKETS, registry=r).labels(model_name)
        self._model_name = model_name
        self._window = float(rate_window)
        self._samples: Deque[Tuple[float, int]] = collections.deque()
        self._last = {"prompt": 0, "generation": 0, "hits": 0, "preemptions": 0}

    def finished(self, reason: Optional[str]) -> None:
        self._finished.labels(self._model_name, str(reason)).inc()

    def update(self, stats: Any, now: Optional[float] = None) -> None:
        """Mirror an ``EngineStats`` (cumulative token counts become counter increments)."""
        now = time.monotonic() if now is None else now
        self.waiting.set(stats.num_waiting)
        self.running.set(stats.num_running)
        self.blocks_used.set(stats.num_blocks_used)
        self.blocks_total.set(stats.num_blocks_total)
        self.blocks_cached.set(getattr(stats, "num_blocks_cached", 0))
        self.kv_usage.set(stats.num_blocks_used / stats.num_blocks_total if stats.num_blocks_total else 0.0)
        for key, counter, value in (("prompt", self.prompt_tokens, stats.prompt_tokens),
                                    ("generation", self.generation_tokens, stats.generation_tokens),
                                    ("hits", self.prefix_hit_tokens, stats.prefix_cache_hit_tokens),
                                    ("preemptions", self.preemptions, stats.num_preemptions)):
            if value > self._last[key]:
                counter.inc(value - self._last[key])
            self._last[key] = value
        self._samples.append((now, int(stats.generation_tokens)))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self._window:
            self._samples.popleft()
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        self.tokens_per_second.set((n1 - n0) / (t1 - t0) if t1 > t0 else 0.0)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
