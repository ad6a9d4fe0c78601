"""``parallelize(model, parallel_config)``: shard a built single-device Qwen2 model per rank and insert the collectives.

The model's code is not changed (DESIGN rule 4). After the single-device
:class:`~qwen2ms.modeling.model.Qwen2ForCausalLM` is built (and loaded), :func:`parallelize`

1. slices every parameter listed in :data:`~qwen2ms.parallel.plans.PARAM_PLAN` to this rank's shard
   (``Parameter.set_data``; names stay the Hugging Face keys);
2. replaces each module listed in :data:`~qwen2ms.parallel.plans.MODULE_PLAN` by a region Cell
   (:mod:`qwen2ms.parallel.regions`) that holds the original module and adds the communication
   around it (Megatron-style: copy in / all-reduce out; with sequence parallel all-gather in /
   reduce-scatter out along the sequence), and sets the attention's head counts to the local ones;
3. returns the model as a :class:`ParallelCausalLM`: the same model code, with the vocabulary-parallel
   lm_head and cross-entropy (the full logits are never formed on one device unless asked for), which
   carries :class:`GradientSync` for the training step (data-parallel mean, sums of sequence-parallel
   norm gradients, replicated kv heads and expert replicas) and :class:`GradNorm` (the global
   gradient norm for clipping);
4. with ``pipeline_stage > 1``, keeps only this rank's stage (:mod:`qwen2ms.parallel.pipeline`) and
   returns a :class:`~qwen2ms.parallel.pipeline.PipelineCausalLM`.

Tensor-parallel generation works through ``new_cache``/``forward_step`` (the KV cache holds this
rank's heads), so :func:`qwen2ms.generation.generate.generate` accepts the parallel model.

Example (under ``msrun --worker_num=2``, see :mod:`qwen2ms.parallel.launch`)::

    from mindspore.communication import init
    init()
    model = Qwen2ForCausalLM.from_hf("Qwen/Qwen2-0.5B")
    pmodel = parallelize(model, ParallelConfig(model_parallel=2))
    out = pmodel(input_ids, labels=labels)            # same numbers as the single-device model
    loss, grads = ms.value_and_grad(lambda i, l: pmodel(i, labels=l).loss, None,
                                    pmodel.trainable_params())(input_ids, labels)
    grads = pmodel.grad_sync(grads)                   # then any optimizer step
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ..modeling.model import Qwen2ForCausalLM
from .comm import (AllReduce, CopyToGroup, GatherFromGroup, GatherToGroup, Group, ReduceFromGroup,
                   ReduceScatterToGroup, is_initialized, new_group, single_group)
from .config import ParallelConfig, ParallelConfigError
from .pipeline import PipelineCausalLM, prune_to_stage
from .plans import MODULE_PLAN, PARAM_PLAN, local_kv_heads, match, param_shard, scale_shard
from .regions import (AttentionRegion, ExpertsRegion, Identity, MLPRegion, SeqScatterEmbedding, VocabParallelEmbedding,
                      replace_child)

__all__ = ["parallelize", "shard_parameters", "ParallelCausalLM", "GradientSync", "GradNorm", "ParallelGroups",
           "vocab_parallel_cross_entropy"]


class ParallelGroups:
    """This rank's communication groups for a layout (created on first use, members only).

    Attributes:
        rank: global rank.
        pp_rank, dp_rank, mp_rank: coordinates (see :meth:`ParallelConfig.rank_coords`).
        tp, dp, pp, ep: :class:`~qwen2ms.parallel.comm.Group` objects (tensor, data, pipeline, expert).
        expert_dp: ranks holding the same experts (the data-parallel group divided by the expert group).
    """

    def __init__(self, pc: ParallelConfig, rank: int) -> None:
        self.pc, self.rank = pc, rank
        self.pp_rank, self.dp_rank, self.mp_rank = pc.rank_coords(rank)
        self.ep_rank = self.dp_rank % pc.expert_parallel
        make = new_group
        self.tp = make(pc.group_ranks("model", rank))
        self.dp = make(pc.group_ranks("data", rank))
        self.pp = make(pc.group_ranks("pipeline", rank))
        self.ep = make(pc.group_ranks("expert", rank))
        dp_ranks = pc.group_ranks("data", rank)
        self.expert_dp = make([r for r in dp_ranks
                               if pc.rank_coords(r)[1] % pc.expert_parallel == self.ep_rank])

    def kv_share(self, config) -> Group:
        """Tensor-parallel ranks that hold the same (replicated) kv head as this one."""
        mp, kv = self.pc.model_parallel, config.num_key_value_heads
        if kv >= mp:
            return single_group(self.rank)
        per = mp // kv
        first = (self.mp_rank // per) * per
        base = self.rank - self.mp_rank
        return new_group([base + m for m in range(first, first + per)])


def shard_parameters(model: nn.Cell, parallel_config: ParallelConfig, rank: int) -> Dict[str, Tuple[int, ...]]:
    """Slice the parameters of a single-device model in place to the shards of global ``rank``.

    Needs no communication: use it to measure per-rank memory or to cut a loaded model for one rank.
    Parameters outside this rank's pipeline stage are left untouched (see :func:`parallelize`). The
    ``weight_scale`` of an int8 weight (:func:`qwen2ms.modeling.quantize.quantize_int8_weights`) is cut
    to go with its weight (:func:`~qwen2ms.parallel.plans.scale_shard`).

    Args:
        model: a :class:`~qwen2ms.modeling.model.Qwen2ForCausalLM` (parameter names = HF keys).
        parallel_config: the layout; validated against ``model.config``.
        rank: global rank in ``[0, world_size)``.

    Returns:
        ``{name: new shape}`` for every parameter that was sliced.

    Raises:
        ParallelConfigError: int8 group scales that the layout would split inside a group (nothing is cut).

    Example:
        >>> shapes = shard_parameters(model, ParallelConfig(model_parallel=2), rank=1)
        >>> shapes["model.layers.0.self_attn.o_proj.weight"]   # [H, H/2]
    """
    cfg = model.config
    pc = parallel_config
    pc.validate(cfg)
    _, dp_rank, mp_rank = pc.rank_coords(rank)
    ep_rank = dp_rank % pc.expert_parallel
    changed: Dict[str, Tuple[int, ...]] = {}
    params = list(model.parameters_and_names())
    # The scales of int8 weights (quantize_int8_weights) follow their weight's rows or input groups; they
    # are small, so all are cut before any parameter changes: a layout they do not fit leaves the model whole.
    shapes = {name: tuple(param.shape) for name, param in params}
    scale_parts = {}
    for name, param in params:
        split = match(PARAM_PLAN, name[:-len("_scale")]) if name.endswith(".weight_scale") else None
        if split is not None:
            try:
                scale_parts[name] = scale_shard(param.asnumpy(), shapes[name[:-len("_scale")]], split, cfg, mp_rank,
                                                pc.model_parallel, pc.vocab_emb_dp)
            except ValueError as e:
                raise ParallelConfigError(f"{name}: {e}") from None
    for name, param in params:
        split = match(PARAM_PLAN, name)
        if split is None and name not in scale_parts:
            continue
        full = param.asnumpy()
        if name in scale_parts:
            part = scale_parts[name]
        else:
            part = param_shard(full, split, cfg, mp_rank, pc.model_parallel, ep_rank, pc.expert_parallel,
                               pc.vocab_emb_dp)
        if part.shape != full.shape:
            param.set_data(Tensor(part, dtype=param.dtype))
            changed[name] = tuple(part.shape)
    return changed


# ---------------------------------------------------------------------------------------------
# The vocabulary-parallel loss
# ---------------------------------------------------------------------------------------------
def vocab_parallel_cross_entropy(logits: Tensor, labels: Tensor, vocab_start: int, group_sum: nn.Cell,
                                 group_max: nn.Cell, ignore_index: int = -100) -> Tuple[Tensor, Tensor]:
    """Token cross-entropy over vocabulary-split logits, without gathering them.

    Args:
        logits: ``[N, V/n]`` this rank's slice of the logits (float32).
        labels: ``[N]`` global token ids; ``ignore_index`` entries are skipped.
        vocab_start: first vocabulary id of this rank's slice.
        group_sum: a :class:`~qwen2ms.parallel.comm.ReduceFromGroup` (sum forward, identity backward).
        group_max: an :class:`~qwen2ms.parallel.comm.AllReduce` with ``op="max"`` (no gradient flows).
        ignore_index: label to skip.

    Returns:
        ``(loss_sum, count)`` float32 scalars, equal to :func:`qwen2ms.ops.cross_entropy` on the full logits.
    """
    v_local = logits.shape[-1]
    m = ops.stop_gradient(group_max(ops.amax(ops.stop_gradient(logits), -1)))  # [N] global max, for stability
    z = logits - m.expand_dims(-1)
    sum_exp = group_sum(ops.exp(z).sum(-1))  # [N]
    labels = labels.astype(ms.int32)
    keep = labels != ignore_index
    local = labels - vocab_start
    mine = ops.logical_and(ops.logical_and(local >= 0, local < v_local), keep)
    safe = ops.where(mine, local, ops.zeros_like(local))
    picked = ops.gather_elements(z, 1, safe.reshape(-1, 1)).reshape(-1) * mine.astype(z.dtype)
    target = group_sum(picked)  # [N] the label's shifted logit, from the rank that holds it
    keepf = keep.astype(ms.float32)
    return ((ops.log(sum_exp) - target) * keepf).sum(), keepf.sum()


# ---------------------------------------------------------------------------------------------
# Gradient synchronisation
# ---------------------------------------------------------------------------------------------
class _Reduce(nn.Cell):
    def __init__(self, steps: List[Tuple[Group, float]]) -> None:
        super().__init__()
        # One-member groups need no collective, but their scale (e.g. 1/dp for unreplicated experts) stays.
        self.ops_ = nn.CellList([AllReduce(g) for g, _ in steps if g.size > 1])
        self.scale = float(np.prod([s for _, s in steps])) if steps else 1.0
        self.n = len(self.ops_)

    def construct(self, g):
        for i in range(self.n):
            g = self.ops_[i](g)
        if self.scale != 1.0:
            g = g * self.scale
        return g


class GradientSync(nn.Cell):
    """Turn this rank's gradients into those of the whole job's objective (the mean over data-parallel ranks).

    Per parameter, in ``params`` order: the data-parallel mean (experts: summed over the ranks holding
    the same experts, divided by ``data_parallel``); plus, under sequence parallel, the sum over the
    tensor-parallel group for norm weights (each rank saw a slice of the sequence); plus the sum over
    the ranks that share a replicated kv head.

    Args:
        entries: one ``[(group, scale), ...]`` list per parameter.

    Example:
        >>> grads = pmodel.grad_sync(grads)   # a tuple in pmodel.trainable_params() order
    """

    def __init__(self, entries: List[List[Tuple[Group, float]]]) -> None:
        super().__init__()
        self.reducers = nn.CellList([_Reduce(e) for e in entries])
        self.n = len(entries)

    def construct(self, grads):
        out = ()
        for i in range(self.n):
            out = out + (self.reducers[i](grads[i]),)
        return out


class GradNorm(nn.Cell):
    """The global L2 norm of the whole model's gradients, from this rank's (synchronised) gradients.

    Each rank adds ``|g|^2 / copies`` for its parameters, where ``copies`` counts the ranks of its
    model-parallel block (tensor x expert x pipeline ranks of one data-parallel replica) holding an
    identical copy of that tensor; one all-reduce over the block then sums every distinct shard
    exactly once. Use it for gradient clipping (``clip_grads_by_norm``) instead of a local norm.

    Args:
        weights: per parameter, ``1 / copies``.
        block: the model-parallel block group.
    """

    def __init__(self, weights: List[float], block: Group) -> None:
        super().__init__()
        self.weights = [float(w) for w in weights]
        self.n = len(weights)
        self.reduce = AllReduce(block)

    def construct(self, grads):
        total = ops.zeros((), ms.float32)
        for i in range(self.n):
            g = grads[i].astype(ms.float32)
            total = total + (g * g).sum() * self.weights[i]
        return ops.sqrt(self.reduce(total))


# ---------------------------------------------------------------------------------------------
# The wrapped model
# ---------------------------------------------------------------------------------------------
class ParallelCausalLM(Qwen2ForCausalLM):
    """A :class:`~qwen2ms.modeling.model.Qwen2ForCausalLM` after :func:`parallelize`.

    The model itself, on this rank's shards: it holds the built model's (sharded, wrapped) children and
    runs the model's own ``construct``, ``token_loss`` and generation steps. It replaces only the pieces
    a vocabulary-split head needs: the head's input enters the tensor-parallel group, the head weight is
    this rank's rows, the cross-entropy is vocabulary parallel (the full logits are never formed on one
    device unless asked for) and the logits are gathered for output. Called like the model (same
    arguments, same :class:`~qwen2ms.modeling.model.CausalLMOutput`); parameter names are unchanged (HF keys).

    Attributes:
        parallel_config: the layout.
        groups: this rank's :class:`ParallelGroups`.
        grad_sync: the :class:`GradientSync` for ``trainable_params()``.
        grad_norm: the :class:`GradNorm` for ``trainable_params()`` (global norm for clipping).
        gather_logits: whether ``logits`` are gathered to the full vocabulary (else this rank's slice).
    """

    def __init__(self, lm: Qwen2ForCausalLM, parallel_config: ParallelConfig, groups: ParallelGroups,
                 gather_logits: bool = True) -> None:
        # Qwen2ForCausalLM's __init__ would build a new model; this one adopts lm's children instead.
        # auto_prefix=False: they keep their names (the HF keys).
        nn.Cell.__init__(self, auto_prefix=False)
        self._hold(lm.config, lm.model, None if lm.tied else lm.lm_head)
        # What generation reads from a model, passed through.
        self.generation_config_dict = lm.generation_config_dict
        self.tokenizer = lm.tokenizer
        self.parallel_config = parallel_config
        self.groups = groups
        self.gather_logits = gather_logits
        pc = parallel_config
        tp = groups.tp
        self.seq = pc.use_seq_parallel and tp.size > 1
        self.vocab_split = not pc.vocab_emb_dp and tp.size > 1
        # Region and pipeline wrappers keep the table as `.inner`; count the hops to it once.
        self.embed_depth = 0
        cell = self.model.embed_tokens
        while not hasattr(cell, "weight") and hasattr(cell, "inner"):
            cell, self.embed_depth = cell.inner, self.embed_depth + 1
        v = self.config.vocab_size
        self.vocab_start = tp.rank * (v // tp.size) if self.vocab_split else 0
        if self.vocab_split:
            # The head is a column-parallel region: hidden enters (copy / gather along the sequence).
            self.head_enter = GatherToGroup(tp, 1) if self.seq else CopyToGroup(tp)
            self.ce_sum = ReduceFromGroup(tp)
            self.ce_max = AllReduce(tp, "max")
            self.logits_gather = GatherFromGroup(tp, -1)
        elif self.seq:
            self.head_enter = GatherFromGroup(tp, 1)
        else:
            self.head_enter = Identity()
        self.grad_sync = GradientSync([])
        self.grad_norm = GradNorm([], single_group(groups.rank))

    # ------------------------------------------------------------------ the vocabulary-parallel head
    def _head_parts(self):
        if not self.tied:
            return self.lm_head.weight, self.lm_head.weight_scale
        cell = self.model.embed_tokens
        for _ in range(self.embed_depth):
            cell = cell.inner
        return cell.weight, cell.weight_scale

    def _head_input(self, hidden):
        return self.head_enter(hidden)  # [B, T, H] on every rank

    def _cross_entropy(self, logits, labels):
        if self.vocab_split:
            return vocab_parallel_cross_entropy(logits, labels, self.vocab_start, self.ce_sum, self.ce_max)
        # The parent class named, not super(): MindSpore's graph parser resolves super() from the instance's class.
        return Qwen2ForCausalLM._cross_entropy(self, logits, labels)

    def _full_logits(self, logits):
        if self.vocab_split and self.gather_logits:
            return self.logits_gather(logits)
        return logits

    def _prepare(self, input_ids, attention_mask, position_ids, labels, segment_ids, cache, cache_position,
                 logits_to_keep):
        # The model's argument checks, plus what this rank's shards need.
        if cache is not None:
            self._check_cache(cache)
        args = Qwen2ForCausalLM._prepare(self, input_ids, attention_mask, position_ids, labels, segment_ids, cache,
                                         cache_position, logits_to_keep)
        if self.seq and args[0].shape[1] % self.groups.tp.size:
            raise ValueError(f"use_seq_parallel needs the sequence length ({args[0].shape[1]}) to divide by "
                             f"model_parallel={self.groups.tp.size}; pad the batch to a multiple")
        return args

    # ------------------------------------------------------------------ generation
    def local_config(self):
        """The config of this rank's attention: its query and kv heads (what its KV cache holds)."""
        cfg, n = self.config, self.groups.tp.size
        if n == 1:
            return cfg
        heads = cfg.num_attention_heads // n
        return cfg.replace(num_attention_heads=heads, num_key_value_heads=local_kv_heads(cfg, n),
                           hidden_size=heads * cfg.head_dim)

    def new_cache(self, batch_size: int, max_length: int, dtype: Any = None):
        """A :class:`~qwen2ms.modeling.cache.KVCache` for this rank's heads (see ``Qwen2ForCausalLM.new_cache``).

        Every rank of the tensor-parallel group then calls ``forward_step`` (or generates) with the same inputs.

        Raises:
            ValueError: with sequence parallel (a decode step has one token, which cannot be split).
        """
        from ..modeling.cache import KVCache
        from ..dtypes import resolve_dtype

        if self.seq:
            raise ValueError("use_seq_parallel splits the sequence, which a one-token decode step cannot be; "
                             "parallelize with use_seq_parallel=False for generation")
        full = Qwen2ForCausalLM.new_cache(self, 1, max_length, dtype)  # the model's own checks (length, dtype on CPU)
        dt = full.dtype if dtype is None else resolve_dtype(dtype)
        del full
        return KVCache(self.local_config(), batch_size, max_length, dt)

    def _check_cache(self, cache) -> None:
        want = self.local_config().num_key_value_heads
        got = cache.keys[0].shape[1]
        if got != want:
            raise ValueError(f"this cache holds {got} kv heads per layer but this rank computes {want}; "
                             f"make it with the parallel model's new_cache()")

    # ------------------------------------------------------------------ what a shard cannot do
    def _not_whole(self, what: str):
        raise TypeError(f"{what} needs the whole model, but a parallelized model holds this rank's shards; save them "
                        f"with qwen2ms.parallel.save_rank_checkpoint and merge them with "
                        f"qwen2ms.parallel.merge_checkpoints (Trainer.save_model does both)")

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        """Refused (TypeError): a shard is not the model; see :func:`qwen2ms.parallel.save_rank_checkpoint`."""
        self._not_whole("save_pretrained()")

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        """Refused (TypeError): a shard is not the model; see :func:`qwen2ms.parallel.save_rank_checkpoint`."""
        self._not_whole("save_checkpoint()")

    def named_weights(self) -> List[Tuple[str, Any]]:
        """Refused (TypeError): this rank holds shards, not the architecture's weights."""
        self._not_whole("named_weights()")


def parallelize(model: nn.Cell, parallel_config: ParallelConfig, *, gather_logits: bool = True) -> nn.Cell:
    """Apply the tensor/sequence/expert/data-parallel plans to a built single-device model, for this rank.

    Call it in every process of the job after ``mindspore.communication.init()`` (or with a
    one-device layout). The model is modified in place and returned wrapped.

    Args:
        model: a :class:`~qwen2ms.modeling.model.Qwen2ForCausalLM`, built (and loaded) on one device; an int8
            model (:func:`~qwen2ms.modeling.quantize.quantize_int8_weights` first) is sharded with its scales.
        parallel_config: the layout; validated against the model and the world size.
        gather_logits: return full-vocabulary logits (True) or this rank's vocabulary slice (False,
            saves memory when only the loss is needed).

    Returns:
        A :class:`ParallelCausalLM`, or with ``pipeline_stage > 1`` this rank's
        :class:`~qwen2ms.parallel.pipeline.PipelineCausalLM` (trained with ``forward_backward``).

    Raises:
        ParallelConfigError: the layout does not fit the model or the job.

    Example:
        >>> pmodel = parallelize(model, ParallelConfig(data_parallel=1, model_parallel=2))
        >>> pmodel(ids, labels=ids).loss
    """
    pc = parallel_config
    cfg = model.config
    if is_initialized():
        from mindspore.communication import get_group_size, get_rank

        world, rank = get_group_size(), get_rank()
    else:
        world, rank = 1, 0
    pc.validate(cfg, world_size=world)
    groups = ParallelGroups(pc, rank)
    shard_parameters(model, pc, rank)
    seq = pc.use_seq_parallel and groups.tp.size > 1
    lm = model
    cells = list(lm.cells_and_names())
    for path, cell in cells:
        style = match(MODULE_PLAN, path)
        if style is None or (style.requires and not hasattr(cell, style.requires)):
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = _resolve(lm, parent_path)
        new = _wrap(style.style, cell, groups, cfg, pc, seq)
        if new is not None:
            replace_child(parent, attr, new)
    if pc.recompute:
        for layer in lm.model.layers:
            layer.recompute()
    stage_layers = None
    if pc.pipeline_stage > 1:
        stage_layers = prune_to_stage(lm, pc, groups.pp_rank)
    pm = ParallelCausalLM(lm, pc, groups, gather_logits=gather_logits)
    pm.grad_sync = _build_grad_sync(pm, groups, cfg, pc, seq)
    pm.grad_norm = _build_grad_norm(pm, groups, cfg, pc)
    if stage_layers is None:
        return pm
    return PipelineCausalLM(pm, pc, groups.pp_rank, stage_layers)


def _enter_exit(groups: ParallelGroups, seq: bool) -> Tuple[nn.Cell, nn.Cell]:
    g = groups.tp
    if g.size == 1:
        return Identity(), Identity()
    if seq:
        return GatherToGroup(g, 1), ReduceScatterToGroup(g, 1)
    return CopyToGroup(g), ReduceFromGroup(g)


def _wrap(style: str, cell: nn.Cell, groups: ParallelGroups, cfg, pc: ParallelConfig, seq: bool
          ) -> Optional[nn.Cell]:
    tp = groups.tp
    if style == "attention":
        if tp.size == 1:
            return None
        cell.num_heads = cfg.num_attention_heads // tp.size
        cell.num_kv_heads = local_kv_heads(cfg, tp.size)
        enter, exit_ = _enter_exit(groups, seq)
        return AttentionRegion(cell, enter, exit_)
    if style == "mlp":
        if tp.size == 1:
            return None
        enter, exit_ = _enter_exit(groups, seq)
        return MLPRegion(cell, enter, exit_)
    if style == "experts":
        if tp.size == 1 and groups.ep.size == 1:
            return None
        return ExpertsRegion(cell, groups.ep, tp, cfg.num_experts)
    if style == "vocab_embedding":
        if tp.size == 1:
            return None
        if not pc.vocab_emb_dp:
            return VocabParallelEmbedding(cell, tp, cfg.vocab_size, seq)
        if seq:
            return SeqScatterEmbedding(cell, tp)
        return None
    return None  # norms and the head are handled by GradientSync and ParallelCausalLM


def _resolve(root: nn.Cell, path: str) -> nn.Cell:
    cell = root
    for part in path.split(".") if path else []:
        cell = cell[int(part)] if isinstance(cell, nn.CellList) else getattr(cell, part)
    return cell


def _build_grad_norm(pm: ParallelCausalLM, groups: ParallelGroups, cfg, pc: ParallelConfig) -> GradNorm:
    mp, ep, pp = pc.model_parallel, pc.expert_parallel, pc.pipeline_stage
    block_id = groups.dp_rank // ep
    block = [r for r in range(pc.world_size) if pc.rank_coords(r)[1] // ep == block_id]
    weights = []
    for p in pm.trainable_params():
        split = match(PARAM_PLAN, p.name)
        tp_split = split is not None and split.dim is not None and mp > 1 and not (
            split.kind == "vocab" and pc.vocab_emb_dp)
        if not tp_split:
            tp_copies = mp
        elif split.kind == "kv_heads" and cfg.num_key_value_heads < mp:
            tp_copies = mp // cfg.num_key_value_heads
        else:
            tp_copies = 1
        ep_copies = 1 if (split is not None and split.expert_dim is not None) else ep
        pp_copies = 2 if (pp > 1 and cfg.tie_word_embeddings and p.name == "model.embed_tokens.weight") else 1
        weights.append(1.0 / (tp_copies * ep_copies * pp_copies))
    return GradNorm(weights, new_group(block))


def _build_grad_sync(pm: ParallelCausalLM, groups: ParallelGroups, cfg, pc: ParallelConfig, seq: bool
                     ) -> GradientSync:
    dp = pc.data_parallel
    kv_group = groups.kv_share(cfg) if groups.tp.size > cfg.num_key_value_heads else None
    # A tied table lives on the first stage (lookup) and the last (lm_head): their gradients add up.
    tied_group = None
    if pc.pipeline_stage > 1 and cfg.tie_word_embeddings and groups.pp_rank in (0, pc.pipeline_stage - 1):
        pp_ranks = pc.group_ranks("pipeline", groups.rank)
        tied_group = new_group([pp_ranks[0], pp_ranks[-1]])
    entries = []
    for p in pm.trainable_params():
        name = p.name
        steps: List[Tuple[Group, float]] = []
        is_expert = match(PARAM_PLAN, name) is not None and match(PARAM_PLAN, name).expert_dim is not None
        if is_expert and groups.ep.size > 1:
            steps.append((groups.expert_dp, 1.0 / dp))
        else:
            steps.append((groups.dp, 1.0 / dp))
        if seq and match(MODULE_PLAN, name.rpartition(".")[0]) is not None and \
                match(MODULE_PLAN, name.rpartition(".")[0]).style == "sequence_norm":
            steps.append((groups.tp, 1.0))
        if kv_group is not None and (".k_proj." in name or ".v_proj." in name):
            steps.append((kv_group, 1.0))
        if tied_group is not None and name == "model.embed_tokens.weight":
            steps.append((tied_group, 1.0))
        entries.append(steps)
    return GradientSync(entries)
