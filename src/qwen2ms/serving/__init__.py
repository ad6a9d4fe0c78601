"""Serving: continuous batching over a paged KV cache with prefix caching (LLMEngine, LLM, SamplingParams)."""
from .block_manager import BlockManager
from .engine import LLMEngine
from .llm import LLM
from .outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from .params import RequestError, SamplingParams, SamplingParamsError

__all__ = [
    "LLM",
    "LLMEngine",
    "SamplingParams",
    "SamplingParamsError",
    "RequestError",
    "RequestOutput",
    "CompletionOutput",
    "RequestMetrics",
    "EngineStats",
    "BlockManager",
]
