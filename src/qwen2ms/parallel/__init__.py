"""The parallel layer: ParallelConfig, sharding plans as data, parallelize, collectives, strategy files, planner, launch."""
from __future__ import annotations

from typing import Any

from .config import ParallelConfig, ParallelConfigError

__all__ = ["ParallelConfig", "ParallelConfigError"]

# Names whose modules import MindSpore (~1.7 s): loaded on first use so `qwen2ms plan` stays fast.
_LAZY = {}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
