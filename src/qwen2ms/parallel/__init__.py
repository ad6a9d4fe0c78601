"""The parallel layer: ParallelConfig, sharding plans as data, parallelize, collectives, strategy files, planner, launch."""
from __future__ import annotations

from typing import Any

from .config import ParallelConfig, ParallelConfigError

# Names whose modules import MindSpore (~1.7 s): loaded on first use so `qwen2ms plan` stays fast.
_LAZY = {
    "parallelize": "apply", "shard_parameters": "apply", "ParallelCausalLM": "apply", "GradientSync": "apply",
    "PipelineCausalLM": "pipeline",
    "ShardedOptimizer": "optimizer", "make_optimizer": "optimizer",
    "split_checkpoint": "strategy", "merge_checkpoints": "strategy", "reshard_checkpoints": "strategy",
    "save_rank_checkpoint": "strategy", "load_rank_checkpoint": "strategy", "write_strategy_file": "strategy",
    "init_distributed": "launch", "msrun_command": "launch",
    "estimate_memory": "planner", "plan_memory": "planner",
    "PARAM_PLAN": "plans", "MODULE_PLAN": "plans",
}

__all__ = ["ParallelConfig", "ParallelConfigError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
