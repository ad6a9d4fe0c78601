"""Sharding plans as data: for each Qwen2 parameter and module path pattern, how tensor/expert parallelism splits it.

Two tables, both keyed by ``fnmatch`` patterns over the Hugging Face paths of
:class:`qwen2ms.modeling.model.Qwen2ForCausalLM` (``*`` matches a layer index):

* :data:`PARAM_PLAN` says how each parameter is sliced per rank. A :class:`ParamSplit` names the
  dimension split across the tensor-parallel group (``"heads"``/``"kv_heads"`` add the head
  geometry, ``"halves"`` splits the gate and up halves of a fused ``[.., 2I, ..]`` tensor separately)
  and, for routed experts, the dimension split across the expert-parallel group.
  Parameters that match no entry are replicated (norms, the MoE router, the shared-expert gate).
* :data:`MODULE_PLAN` says which modules become tensor-parallel regions and how activations enter
  and leave them: ``"attention"``/``"mlp"``/``"experts"`` regions (copy in, all-reduce out; with
  sequence parallel all-gather in, reduce-scatter out), the ``"vocab_embedding"`` and the head
  styles ``"vocab_lm_head"``/``"vocab_cross_entropy"`` handled by the wrapper
  :class:`qwen2ms.parallel.apply.ParallelCausalLM`, and ``"sequence_norm"`` norms whose weight
  gradients are summed over the tensor-parallel group under sequence parallel.

:func:`match` finds the entry for a path; :func:`param_shard` applies a :class:`ParamSplit` to a
NumPy array (the same slicing writes checkpoint shards in :mod:`qwen2ms.parallel.strategy`), and
:func:`scale_shard` cuts an int8 weight's ``weight_scale`` to go with its weight's shard.

Example:
    >>> match(PARAM_PLAN, "model.layers.3.self_attn.o_proj.weight").dim
    1
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple, TypeVar

import numpy as np

from ..config import Qwen2Config

__all__ = ["ParamSplit", "ModuleStyle", "PARAM_PLAN", "MODULE_PLAN", "match", "param_shard", "scale_shard",
           "shard_ranges", "local_kv_heads"]


@dataclass(frozen=True)
class ParamSplit:
    """How one parameter is split.

    Attributes:
        dim: the dimension split ``model_parallel`` ways (None: not split by tensor parallelism).
        kind: "even" (equal chunks), "heads" (chunks of whole query heads), "kv_heads" (chunks of
            whole kv heads; when the group is larger than the kv heads each rank keeps the one head
            its query heads use), "halves" (``[gate; up]`` fused along ``dim``: each half chunked,
            the two chunks concatenated), or "vocab" (vocabulary rows; skipped with ``vocab_emb_dp``).
        expert_dim: the dimension split ``expert_parallel`` ways (routed experts), or None.
    """

    dim: Optional[int]
    kind: str = "even"
    expert_dim: Optional[int] = None


@dataclass(frozen=True)
class ModuleStyle:
    """How one module takes part in tensor parallelism.

    Attributes:
        style: "attention", "mlp", "experts", "vocab_embedding", "vocab_lm_head", "sequence_norm".
        requires: a child attribute the module must have for the entry to apply (tells the dense MLP
            from the MoE block, both found at ``layers.*.mlp``), or "".
    """

    style: str
    requires: str = ""


#: Parameter path pattern -> split. Unlisted parameters are replicated.
PARAM_PLAN: Dict[str, ParamSplit] = {
    "model.embed_tokens.weight": ParamSplit(0, "vocab"),
    "model.layers.*.self_attn.q_proj.weight": ParamSplit(0, "heads"),
    "model.layers.*.self_attn.q_proj.bias": ParamSplit(0, "heads"),
    "model.layers.*.self_attn.k_proj.weight": ParamSplit(0, "kv_heads"),
    "model.layers.*.self_attn.k_proj.bias": ParamSplit(0, "kv_heads"),
    "model.layers.*.self_attn.v_proj.weight": ParamSplit(0, "kv_heads"),
    "model.layers.*.self_attn.v_proj.bias": ParamSplit(0, "kv_heads"),
    "model.layers.*.self_attn.o_proj.weight": ParamSplit(1, "heads"),
    "model.layers.*.mlp.gate_proj.weight": ParamSplit(0),
    "model.layers.*.mlp.up_proj.weight": ParamSplit(0),
    "model.layers.*.mlp.down_proj.weight": ParamSplit(1),
    "model.layers.*.mlp.shared_expert.gate_proj.weight": ParamSplit(0),
    "model.layers.*.mlp.shared_expert.up_proj.weight": ParamSplit(0),
    "model.layers.*.mlp.shared_expert.down_proj.weight": ParamSplit(1),
    "model.layers.*.mlp.experts.gate_up_proj": ParamSplit(1, "halves", expert_dim=0),  # [E, 2I, H]
    "model.layers.*.mlp.experts.down_proj": ParamSplit(2, "even", expert_dim=0),  # [E, H, I]
    "lm_head.weight": ParamSplit(0, "vocab"),
}

#: Module path pattern -> role in tensor parallelism.
MODULE_PLAN: Dict[str, ModuleStyle] = {
    "model.embed_tokens": ModuleStyle("vocab_embedding"),
    "model.layers.*.self_attn": ModuleStyle("attention"),
    "model.layers.*.mlp": ModuleStyle("mlp", requires="gate_proj"),
    "model.layers.*.mlp.shared_expert": ModuleStyle("mlp", requires="gate_proj"),
    "model.layers.*.mlp.experts": ModuleStyle("experts"),
    "model.layers.*.input_layernorm": ModuleStyle("sequence_norm"),
    "model.layers.*.post_attention_layernorm": ModuleStyle("sequence_norm"),
    "model.norm": ModuleStyle("sequence_norm"),
    "lm_head": ModuleStyle("vocab_lm_head"),
}

T = TypeVar("T")


def match(plan: Mapping[str, T], path: str) -> Optional[T]:
    """The plan entry whose pattern matches ``path`` exactly (``*`` = one path component), or None."""
    parts = path.split(".")
    for pattern, value in plan.items():
        pat = pattern.split(".")
        if len(pat) == len(parts) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(parts, pat)):
            return value
    return None


def local_kv_heads(config: Qwen2Config, model_parallel: int) -> int:
    """kv heads each tensor-parallel rank holds: split when mp divides them, else one (replicated)."""
    return max(config.num_key_value_heads // model_parallel, 1)


def shard_ranges(split: ParamSplit, size: int, rank: int, n: int, config: Qwen2Config) -> List[Tuple[int, int]]:
    """Index ranges along ``split.dim`` that tensor-parallel rank ``rank`` of ``n`` keeps (concatenated in order).

    Args:
        split: the parameter's split.
        size: the full length of that dimension.
        rank, n: tensor-parallel rank and group size.
        config: the model (head geometry for "kv_heads").

    Returns:
        A list of ``(start, stop)`` ranges.
    """
    if n == 1:
        return [(0, size)]
    if split.kind == "halves":
        half = size // 2
        if size % 2 or half % n:
            raise ValueError(f"cannot split the two halves of a fused dimension of {size} into {n} equal parts")
        step = half // n
        return [(rank * step, (rank + 1) * step), (half + rank * step, half + (rank + 1) * step)]
    if split.kind == "kv_heads" and config.num_key_value_heads < n:
        d = config.head_dim
        head = rank // (n // config.num_key_value_heads)
        return [(head * d, (head + 1) * d)]
    if size % n:
        raise ValueError(f"cannot split a dimension of {size} into {n} equal parts")
    step = size // n
    return [(rank * step, (rank + 1) * step)]


def param_shard(array: np.ndarray, split: Optional[ParamSplit], config: Qwen2Config, mp_rank: int, mp: int,
                ep_rank: int = 0, ep: int = 1, vocab_emb_dp: bool = False) -> np.ndarray:
    """The slice of a full parameter that one rank holds.

    Args:
        array: the full parameter.
        split: its :data:`PARAM_PLAN` entry (None: replicated).
        config: the model.
        mp_rank, mp: tensor-parallel rank and degree.
        ep_rank, ep: expert-parallel rank and degree.
        vocab_emb_dp: keep vocabulary-split parameters whole.

    Returns:
        A contiguous array (the input itself when nothing is split).

    Example:
        >>> cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> param_shard(np.zeros((32, 48)), ParamSplit(1), cfg, mp_rank=1, mp=2).shape
        (32, 24)
    """
    if split is None:
        return array
    out = array
    if split.expert_dim is not None and ep > 1:
        e = out.shape[split.expert_dim]
        if e % ep:
            raise ValueError(f"{e} experts cannot be split over expert_parallel={ep}")
        step = e // ep
        out = np.take(out, np.arange(ep_rank * step, (ep_rank + 1) * step), axis=split.expert_dim)
    if split.dim is not None and mp > 1 and not (split.kind == "vocab" and vocab_emb_dp):
        ranges = shard_ranges(split, out.shape[split.dim], mp_rank, mp, config)
        idx = np.concatenate([np.arange(a, b) for a, b in ranges])
        out = np.take(out, idx, axis=split.dim)
    return np.ascontiguousarray(out)


def scale_shard(scale: np.ndarray, weight_shape: Tuple[int, ...], split: Optional[ParamSplit], config: Qwen2Config,
                mp_rank: int, mp: int, vocab_emb_dp: bool = False) -> np.ndarray:
    """The slice of an int8 weight's ``weight_scale`` that goes with the weight's :func:`param_shard`.

    Scales are per output row ``[out]`` or per row and group of inputs ``[out, G]``: a row split takes the
    same rows; an input split keeps per-row scales whole (they scale each rank's partial sums alike) and
    takes the groups of the kept inputs.

    Args:
        scale: the full scale array.
        weight_shape: the full shape of the weight it scales (``[out, in]``).
        split: the weight's :data:`PARAM_PLAN` entry (None: replicated).
        config, mp_rank, mp, vocab_emb_dp: as for :func:`param_shard`.

    Returns:
        A contiguous array (the input itself when nothing is split).

    Raises:
        ValueError: the kept inputs do not start and end on group boundaries.

    Example:
        >>> cfg = Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> scale_shard(np.ones((64, 2)), (64, 64), ParamSplit(1), cfg, mp_rank=1, mp=2).shape
        (64, 1)
    """
    if split is None or split.dim is None or mp == 1 or (split.kind == "vocab" and vocab_emb_dp):
        return scale
    if split.dim == 0:
        return param_shard(scale, ParamSplit(0, split.kind), config, mp_rank, mp)
    if scale.ndim == 1:
        return scale
    size = weight_shape[split.dim]
    group = size // scale.shape[1]
    ranges = shard_ranges(split, size, mp_rank, mp, config)
    if any(a % group or b % group for a, b in ranges):
        raise ValueError(f"int8 scales of groups of {group} inputs cannot follow a split of {size} inputs into "
                         f"{mp} parts ({ranges[0][1] - ranges[0][0]} each): quantize with a group_size that divides "
                         f"{size // mp}, or group_size=None (one scale per output channel)")
    idx = np.concatenate([np.arange(a // group, b // group) for a, b in ranges])
    return np.ascontiguousarray(np.take(scale, idx, axis=1))
