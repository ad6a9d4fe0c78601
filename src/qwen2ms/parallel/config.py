"""ParallelConfig: how a Qwen2 run is split across devices (data, tensor, pipeline, sequence, expert), and its checks."""
from __future__ import annotations

import dataclasses
import difflib
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from ..config import Qwen2Config
from ..errors import Qwen2msError

__all__ = ["ParallelConfig", "ParallelConfigError", "UPSTREAM_NOOP_KEYS"]


class ParallelConfigError(Qwen2msError, ValueError):
    """A ParallelConfig cannot be used with the given model, world size or sequence length."""


#: Upstream (MindFormers) keys that tune Ascend graph compilation and have no meaning here. They are
#: accepted so an upstream YAML loads, and a warning says they were not applied.
UPSTREAM_NOOP_KEYS = frozenset({
    "gradient_aggregation_group", "micro_batch_interleave_num", "use_seq_parallel_for_lm_head",
})

_warned_noop: set = set()

# Upstream spellings that map onto a field of ours with another name.
_ALIASES = {
    "enable_parallel_optimizer": "optimizer_shard",
    "tensor_parallel": "model_parallel",
    "pipeline_parallel": "pipeline_stage",
}

# Top-level keys of an upstream run YAML that may hold parallel settings.
_RUN_YAML_SECTIONS = ("parallel_config", "parallel", "recompute_config")


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ParallelConfig:
    """Degrees of parallelism for one run; their product ``dp * mp * pp`` is the number of devices.

    Field names are the upstream's (MindFormers ``parallel_config``) so a run YAML carries over.

    Args:
        data_parallel: replicas that each see a different slice of the global batch; gradients are averaged.
        model_parallel: tensor-parallel degree: attention heads, MLP columns and (unless ``vocab_emb_dp``)
            the vocabulary are split across this many devices.
        pipeline_stage: number of pipeline stages; decoder layers are split by index, names unchanged.
        micro_batch_num: micro-batches per step with pipeline stages (must be >= ``pipeline_stage`` to
            keep every stage busy).
        use_seq_parallel: inside the tensor-parallel group, shard norms and residuals along the sequence
            (saves activation memory; needs ``model_parallel > 1`` to have an effect).
        expert_parallel: devices that split the experts of each MoE layer; it divides ``data_parallel``
            (the expert group is carved out of the data-parallel group).
        vocab_emb_dp: True keeps the embedding and lm_head whole on every device (data parallel only);
            False (default) splits them by vocabulary rows across the tensor-parallel group.
        optimizer_shard: shard optimizer state across the data-parallel group (upstream
            ``parallel.enable_parallel_optimizer``).
        recompute: recompute each decoder layer's activations in the backward pass (upstream
            ``recompute_config.recompute``).

    Example:
        >>> pc = ParallelConfig(data_parallel=2, model_parallel=4)
        >>> pc.world_size
        8
        >>> pc.validate(Qwen2Config.from_preset("qwen2-7b"), world_size=8)
    """

    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    micro_batch_num: int = 1
    use_seq_parallel: bool = False
    expert_parallel: int = 1
    vocab_emb_dp: bool = False
    optimizer_shard: bool = False
    recompute: bool = False

    def __post_init__(self) -> None:
        for name in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num", "expert_parallel"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParallelConfigError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("use_seq_parallel", "vocab_emb_dp", "optimizer_shard", "recompute"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ParallelConfigError(f"{name} must be true or false, got {value!r}")
        if self.data_parallel % self.expert_parallel:
            raise ParallelConfigError(
                f"expert_parallel ({self.expert_parallel}) must divide data_parallel ({self.data_parallel}): "
                f"the expert group is part of the data-parallel group; values that fit: "
                f"{_divisors(self.data_parallel)}"
            )

    # ------------------------------------------------------------------ derived
    @property
    def world_size(self) -> int:
        """Devices this layout needs: ``data_parallel * model_parallel * pipeline_stage``."""
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    def rank_coords(self, rank: int) -> Tuple[int, int, int]:
        """``(pipeline_rank, data_rank, model_rank)`` of a global rank.

        Ranks are laid out with the tensor-parallel index fastest, then data parallel, then pipeline
        stage: ``rank = pp_rank * dp * mp + dp_rank * mp + mp_rank``. Tensor-parallel peers are
        neighbours (on one node their traffic stays on the fastest links).
        """
        if not 0 <= rank < self.world_size:
            raise ParallelConfigError(f"rank {rank} is outside [0, {self.world_size}) for this layout")
        mp, dp = self.model_parallel, self.data_parallel
        return rank // (dp * mp), (rank // mp) % dp, rank % mp

    def group_ranks(self, kind: str, rank: int) -> List[int]:
        """The global ranks of ``rank``'s group of the given kind.

        Args:
            kind: "model" (tensor parallel), "data", "pipeline" or "expert".
            rank: a global rank.

        Returns:
            Sorted global ranks, including ``rank``.

        Example:
            >>> ParallelConfig(data_parallel=2, model_parallel=2).group_ranks("data", 1)
            [1, 3]
        """
        pp_r, dp_r, mp_r = self.rank_coords(rank)
        mp, dp, pp = self.model_parallel, self.data_parallel, self.pipeline_stage

        def at(p: int, d: int, m: int) -> int:
            return p * dp * mp + d * mp + m

        if kind == "model":
            return [at(pp_r, dp_r, m) for m in range(mp)]
        if kind == "data":
            return [at(pp_r, d, mp_r) for d in range(dp)]
        if kind == "pipeline":
            return [at(p, dp_r, mp_r) for p in range(pp)]
        if kind == "expert":
            ep = self.expert_parallel
            first = (dp_r // ep) * ep
            return [at(pp_r, d, mp_r) for d in range(first, first + ep)]
        raise ParallelConfigError(f"unknown group kind {kind!r}; use 'model', 'data', 'pipeline' or 'expert'")

    def stage_layers(self, num_layers: int) -> List[range]:
        """Decoder layer indices owned by each pipeline stage (contiguous; earlier stages take the remainder).

        Example:
            >>> ParallelConfig(pipeline_stage=3).stage_layers(8)
            [range(0, 3), range(3, 6), range(6, 8)]
        """
        pp = self.pipeline_stage
        if num_layers < pp:
            raise ParallelConfigError(
                f"pipeline_stage={pp} needs at least {pp} decoder layers, the model has {num_layers}"
            )
        base, extra = divmod(num_layers, pp)
        out, start = [], 0
        for s in range(pp):
            n = base + (1 if s < extra else 0)
            out.append(range(start, start + n))
            start += n
        return out

    # ------------------------------------------------------------------ checks
    def validate(self, model_config: Optional[Qwen2Config] = None, world_size: Optional[int] = None,
                 seq_length: Optional[int] = None) -> None:
        """Check the layout against the device count, the model and the sequence length.

        Args:
            model_config: the model to split; checks heads, kv heads, MLP width, vocabulary, layers, experts.
            world_size: the number of devices; ``dp * mp * pp`` must equal it.
            seq_length: the training/prefill length; with ``use_seq_parallel`` it must divide by ``model_parallel``.

        Raises:
            ParallelConfigError: naming the first constraint that fails and the values that would fit.
        """
        mp, pp = self.model_parallel, self.pipeline_stage
        if world_size is not None and self.world_size != world_size:
            fits = [f"dp={d} mp={m} pp={p}" for d, m, p in
                    self.candidate_layouts(world_size, model_config)][:8]
            raise ParallelConfigError(
                f"data_parallel*model_parallel*pipeline_stage = {self.data_parallel}*{mp}*{pp} = "
                f"{self.world_size}, but the world size is {world_size}; layouts that fit: "
                f"{', '.join(fits) if fits else 'none'}"
            )
        if pp > 1 and self.micro_batch_num < pp:
            raise ParallelConfigError(
                f"micro_batch_num ({self.micro_batch_num}) must be >= pipeline_stage ({pp}) so every stage has "
                f"work; use micro_batch_num >= {pp}"
            )
        if seq_length is not None and self.use_seq_parallel and seq_length % mp:
            raise ParallelConfigError(
                f"use_seq_parallel splits the sequence over model_parallel={mp} devices, but seq_length "
                f"{seq_length} is not divisible by {mp}; use a seq_length that is a multiple of {mp}"
            )
        if model_config is None:
            return
        if self.use_seq_parallel and mp > 1 and model_config.is_moe:
            raise ParallelConfigError("use_seq_parallel is supported for dense models only (the MoE router runs on "
                                      "whole sequences); set use_seq_parallel: false for Qwen2-MoE")
        problem = self._model_problem(model_config)
        if problem:
            ws = world_size if world_size is not None else self.world_size
            fits = [m for m in _divisors(ws) if self.replace(model_parallel=m)._model_problem(model_config) is None]
            raise ParallelConfigError(f"{problem}; model_parallel values that fit this model and {ws} devices: "
                                      f"{fits}")

    def _model_problem(self, cfg: Qwen2Config) -> Optional[str]:
        """The first reason this layout cannot split ``cfg``, or None."""
        mp, pp, ep = self.model_parallel, self.pipeline_stage, self.expert_parallel
        if cfg.num_attention_heads % mp:
            return f"model_parallel={mp} does not divide num_attention_heads={cfg.num_attention_heads}"
        kv = cfg.num_key_value_heads
        if kv % mp and mp % kv:
            return (f"model_parallel={mp} neither divides num_key_value_heads={kv} nor is a multiple of it "
                    f"(kv heads are split when mp divides them, replicated when kv divides mp)")
        if not cfg.is_moe or cfg.mlp_only_layers or cfg.decoder_sparse_step > 1:
            if cfg.intermediate_size % mp:
                return f"model_parallel={mp} does not divide intermediate_size={cfg.intermediate_size}"
        if cfg.is_moe:
            if cfg.moe_intermediate_size % mp:
                return f"model_parallel={mp} does not divide moe_intermediate_size={cfg.moe_intermediate_size}"
            if cfg.shared_expert_intermediate_size % mp:
                return (f"model_parallel={mp} does not divide "
                        f"shared_expert_intermediate_size={cfg.shared_expert_intermediate_size}")
            if cfg.num_experts % ep:
                return (f"expert_parallel={ep} does not divide num_experts={cfg.num_experts}; "
                        f"expert_parallel values that divide it: {_divisors(cfg.num_experts)}")
        elif ep > 1:
            return f"expert_parallel={ep} needs an MoE model (num_experts > 0); use expert_parallel=1"
        if not self.vocab_emb_dp and cfg.vocab_size % mp:
            return (f"model_parallel={mp} does not divide vocab_size={cfg.vocab_size} "
                    f"(set vocab_emb_dp: true to keep the embedding whole)")
        if cfg.num_hidden_layers < pp:
            return (f"pipeline_stage={pp} is more than num_hidden_layers={cfg.num_hidden_layers}; "
                    f"use pipeline_stage <= {cfg.num_hidden_layers}")
        return None

    def candidate_layouts(self, world_size: int, model_config: Optional[Qwen2Config] = None
                          ) -> List[Tuple[int, int, int]]:
        """Every ``(dp, mp, pp)`` with product ``world_size`` that this model can be split into.

        Other fields (seq parallel, expert parallel, vocab_emb_dp...) are kept from ``self``; an
        ``expert_parallel`` that no longer divides ``dp`` is reduced to the largest divisor that does.
        Ordered by tensor-parallel degree, then pipeline depth (least communication first).
        """
        out = []
        for mp in _divisors(world_size):
            for pp in _divisors(world_size // mp):
                dp = world_size // (mp * pp)
                ep = max(e for e in _divisors(dp) if e <= self.expert_parallel)
                try:
                    cand = self.replace(data_parallel=dp, model_parallel=mp, pipeline_stage=pp, expert_parallel=ep,
                                        micro_batch_num=max(self.micro_batch_num, pp))
                except ParallelConfigError:
                    continue
                if model_config is not None and cand._model_problem(model_config) is not None:
                    continue
                out.append((dp, mp, pp))
        return sorted(out, key=lambda t: (t[1], t[2]))

    # ------------------------------------------------------------------ I/O
    def replace(self, **changes: Any) -> "ParallelConfig":
        """A copy with some fields changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a plain dict (upstream key names; ``ParallelConfig.from_dict`` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ParallelConfig":
        """Build from a ``parallel_config`` mapping or from a whole upstream run config.

        Accepts our field names and the upstream's: a run YAML with top-level ``parallel_config``,
        ``parallel`` (``enable_parallel_optimizer``) and ``recompute_config`` (``recompute``) sections
        works as it is. Upstream keys that only tune Ascend compilation (:data:`UPSTREAM_NOOP_KEYS`) are
        accepted with a warning; any other unknown key is an error that suggests the closest name.

        Example:
            >>> ParallelConfig.from_dict({"parallel_config": {"data_parallel": 2, "model_parallel": 4,
            ...     "use_seq_parallel": True}, "parallel": {"enable_parallel_optimizer": True}}).optimizer_shard
            True
        """
        if not isinstance(data, Mapping):
            raise ParallelConfigError(f"parallel config must be a mapping, got {type(data).__name__}")
        flat: Dict[str, Any] = {}
        if any(k in data for k in _RUN_YAML_SECTIONS):
            # A whole run config: take the parallel sections, ignore the rest (model, dataset, ...).
            sec = data.get("parallel_config") or {}
            if not isinstance(sec, Mapping):
                raise ParallelConfigError("'parallel_config' must be a mapping of degrees")
            flat.update(sec)
            par = data.get("parallel") or {}
            if isinstance(par, Mapping) and "enable_parallel_optimizer" in par:
                flat["optimizer_shard"] = par["enable_parallel_optimizer"]
            rec = data.get("recompute_config")
            if isinstance(rec, Mapping) and "recompute" in rec:
                flat["recompute"] = rec["recompute"]
            if "micro_batch_interleave_num" in data:
                flat["micro_batch_interleave_num"] = data["micro_batch_interleave_num"]
        else:
            flat.update(data)
        return cls._from_flat(flat)

    @classmethod
    def _from_flat(cls, flat: Dict[str, Any]) -> "ParallelConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs: Dict[str, Any] = {}
        for key, value in flat.items():
            key = _ALIASES.get(key, key)
            if key in names:
                kwargs[key] = value
            elif key == "context_parallel":
                if value not in (None, 1):
                    raise ParallelConfigError(
                        f"context_parallel={value} is not supported; use use_seq_parallel: true with "
                        f"model_parallel > 1 to split activations along the sequence")
            elif key in UPSTREAM_NOOP_KEYS:
                if key not in _warned_noop:
                    _warned_noop.add(key)
                    warnings.warn(f"ParallelConfig: upstream key {key!r} tunes Ascend graph compilation; it is "
                                  f"accepted but has no effect in qwen2ms", stacklevel=3)
            else:
                close = difflib.get_close_matches(key, names + list(_ALIASES), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {names}"
                raise ParallelConfigError(f"unknown parallel config key {key!r}{hint}")
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: Union[str, os.PathLike]) -> "ParallelConfig":
        """Read a YAML file: a bare ``parallel_config`` mapping or a whole upstream run config."""
        import yaml

        if not os.path.isfile(path):
            raise ParallelConfigError(f"no YAML file at {os.fspath(path)!r}")
        with open(path, "r", encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as e:
                raise ParallelConfigError(f"{os.fspath(path)!r} is not valid YAML: {e}") from e
        return cls.from_dict(data or {})

