"""What the engine returns: RequestOutput (per request, per step) with its CompletionOutputs, and EngineStats."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

__all__ = ["CompletionOutput", "RequestMetrics", "RequestOutput", "EngineStats"]


@dataclass
class CompletionOutput:
    """One completion of a request so far (vLLM's names).

    Attributes:
        index: its index among the request's ``n`` completions.
        text: the text generated so far (special tokens skipped per the request, cut before a stop string;
            while running, the characters that could still start a stop string are held back).
        token_ids: the generated ids (an eos or stop token id that ended it included).
        finish_reason: "stop" (eos, a stop string or stop token), "length" (max_tokens or the context is
            full), "abort", or None while running.
        stop_reason: the stop string or stop token id that ended it; None otherwise (eos included).
    """

    index: int
    text: str
    token_ids: List[int]
    finish_reason: Optional[str] = None
    stop_reason: Union[int, str, None] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Times of a request (``time.time()`` seconds): arrival, first generated token, end (None until then)."""

    arrival_time: float
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None


@dataclass
class RequestOutput:
    """A request's state after an engine step (cumulative: the full text and ids so far, not a delta).

    Attributes:
        request_id: as given to ``add_request``.
        prompt: the prompt text (None when the prompt was token ids).
        prompt_token_ids: the prompt's ids.
        outputs: one :class:`CompletionOutput` per completion, by index.
        finished: True once every completion ended (reported exactly once).
        num_cached_tokens: prompt tokens served from the prefix cache at the first admission.
        metrics: arrival / first token / finish times.
    """

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: List[int]
    outputs: List[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: Optional[RequestMetrics] = None


@dataclass
class EngineStats:
    """A snapshot of the engine's load and counters (the server's /metrics reads it).

    Attributes:
        num_waiting: sequences queued (new or preempted).
        num_running: sequences in the running batch.
        num_blocks_used: KV blocks held by sequences.
        num_blocks_total: the pool size.
        num_blocks_cached: unowned blocks kept for prefix hits (free for reuse).
        num_preemptions: sequences preempted so far (their KV freed, recomputed later).
        prefix_cache_hit_tokens: prompt tokens whose KV came from the prefix cache, so far.
        prompt_tokens: prompt tokens of admitted requests, so far (each request counted once).
        generation_tokens: tokens generated so far.
        num_requests_finished: requests finished (aborted ones included), so far.
    """

    num_waiting: int = 0
    num_running: int = 0
    num_blocks_used: int = 0
    num_blocks_total: int = 0
    num_blocks_cached: int = 0
    num_preemptions: int = 0
    prefix_cache_hit_tokens: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_requests_finished: int = 0
