"""Optimizer-state sharding across the data-parallel group (ZeRO stage 1, upstream ``enable_parallel_optimizer``).

Each data-parallel rank owns a contiguous ``1/dp`` slice of every parameter (flattened, zero-padded
to a multiple of ``dp``): it keeps a float copy of that slice and the optimizer's state for it
only. A step takes the synchronised gradients, updates the owned slices with any MindSpore
optimizer (built by the caller's factory over the slice Parameters), then all-gathers the slices
back into the full parameters. Element-wise optimizers (SGD, Adam, AdamW) give exactly the
unsharded result; the optimizer state shrinks ``dp`` times, as :mod:`qwen2ms.parallel.planner`
assumes for ``optimizer_shard``.

:class:`ZeroOptimizer` is the same idea as a Cell for compiled train steps (the Trainer's
``optimizer_shard``): slicing, the wrapped optimizer's update and the all-gather all run inside the
caller's ``ms.jit`` graph.

Example::

    opt = make_optimizer(pmodel, lambda ps: nn.AdamWeightDecay(ps, learning_rate=1e-5, weight_decay=0.1))
    loss, grads = value_and_grad(...)
    opt(pmodel.grad_sync(grads))
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from .comm import AllGather, Group

__all__ = ["ShardedOptimizer", "ZeroOptimizer", "make_optimizer", "shard_groups"]


def _state_bytes(shards, optimizer) -> int:
    """Bytes of ``shards`` plus the optimizer's own state (its parameters other than the shards)."""
    ids = {id(s) for s in shards}
    own = sum(int(np.prod(s.shape)) * s.itemsize for s in shards)
    state = sum(int(np.prod(p.shape)) * p.itemsize for p in optimizer.get_parameters()
                if id(p) not in ids and p.shape)
    return own + state

class ShardedOptimizer:
    """Run an optimizer on this rank's slice of every parameter and all-gather the updates (ZeRO-1).

    Args:
        params: the model's trainable parameters (the order the gradients come in).
        make_optimizer: builds the optimizer over a list of Parameters (the slices; each slice
            Parameter carries its parameter's name, so name-based groups such as "no decay for
            biases" still apply).
        groups: per parameter, the :class:`~qwen2ms.parallel.comm.Group` of ranks holding identical copies of
            it (the data-parallel group; for expert weights under expert parallel, the ranks that hold
            the same experts), or one Group for all.

    Attributes:
        shards: the slice Parameters this rank owns, in ``params`` order.
        optimizer: the wrapped optimizer.
    """

    def __init__(self, params: Sequence[Parameter], make_optimizer: Callable[[List[Parameter]], nn.Cell],
                 groups) -> None:
        self.params = list(params)
        self.groups: List[Group] = list(groups) if isinstance(groups, (list, tuple)) else [groups] * len(self.params)
        if len(self.groups) != len(self.params):
            raise ValueError(f"got {len(self.groups)} groups for {len(self.params)} parameters")
        self._chunks: List[int] = []
        self.shards: List[Parameter] = []
        gathers = {}
        self._gathers = []
        for p, g in zip(self.params, self.groups):
            numel = int(np.prod(p.shape)) if p.shape else 1
            chunk = -(-numel // g.size)
            flat = np.zeros(chunk * g.size, dtype=np.float32)
            flat[:numel] = p.asnumpy().astype(np.float32).reshape(-1)
            self._chunks.append(chunk)
            self.shards.append(Parameter(Tensor(flat[g.rank * chunk:(g.rank + 1) * chunk]), name=p.name))
            if g.ranks not in gathers:
                gathers[g.ranks] = AllGather(g, 0)
            self._gathers.append(gathers[g.ranks])
        self.optimizer = make_optimizer(self.shards)

    @staticmethod
    def _slice(grad: Tensor, chunk: int, group: Group) -> Tensor:
        flat = grad.astype(ms.float32).reshape(-1)
        pad = chunk * group.size - flat.shape[0]
        if pad:
            flat = ops.concat([flat, ops.zeros((pad,), ms.float32)])
        return flat[group.rank * chunk:(group.rank + 1) * chunk]

    def __call__(self, grads: Sequence[Tensor]) -> None:
        """Apply one step given the (data-parallel synchronised) gradients of ``params``."""
        if len(grads) != len(self.params):
            raise ValueError(f"got {len(grads)} gradients for {len(self.params)} parameters")
        self.optimizer(tuple(self._slice(g, c, grp) for g, c, grp in zip(grads, self._chunks, self.groups)))
        for p, s, grp, gather in zip(self.params, self.shards, self.groups, self._gathers):
            full = gather(s.value()) if grp.size > 1 else s.value()
            numel = int(np.prod(p.shape)) if p.shape else 1
            p.set_data(full[:numel].reshape(p.shape).astype(p.dtype))

    def state_bytes(self) -> int:
        """Bytes of the slice copies and the optimizer's own state on this rank."""
        return _state_bytes(self.shards, self.optimizer)


class ZeroOptimizer(nn.Cell):
    """ZeRO-1 as a Cell for a compiled step: ``opt(grads, *args)`` updates this rank's slices, then all-gathers them.

    Each parameter is flattened, zero-padded to a multiple of its group's size and cut into equal
    slices; this rank keeps a float32 copy of its slice (named ``zero_shard.<parameter name>``), and
    the wrapped optimizer, built over those slices, holds state for them only. A call slices the
    (synchronised) gradients the same way, runs the wrapped optimizer on them with ``*args`` (e.g.
    the learning rate of the Trainer's :class:`~qwen2ms.training.optim.AdamW`), all-gathers the
    slices over the group and writes the full parameters (cast to their dtype: the slices act as
    float32 masters for low-precision parameters). Element-wise optimizers give exactly the
    unsharded update.

    Args:
        params: the model's trainable parameters (the order the gradients come in).
        make_optimizer: builds the optimizer over the list of slice Parameters (same order as ``params``).
        groups: per parameter, the :class:`~qwen2ms.parallel.comm.Group` holding identical copies of it
            (see :func:`shard_groups`), or one Group for all.

    Attributes:
        params: ``params``.
        shards: this rank's slice Parameters.
        optimizer: the wrapped optimizer.

    Example:
        >>> opt = ZeroOptimizer(pm.trainable_params(), lambda ps: AdamW(ps), shard_groups(pm))  # doctest: +SKIP
        >>> ms.jit(lambda g, lr: opt(g, lr))(grads, lr)  # doctest: +SKIP
    """

    def __init__(self, params: Sequence[Parameter], make_optimizer: Callable[[List[Parameter]], nn.Cell],
                 groups) -> None:
        super().__init__(auto_prefix=False)
        params = list(params)
        groups = list(groups) if isinstance(groups, (list, tuple)) else [groups] * len(params)
        if len(groups) != len(params):
            raise ValueError(f"got {len(groups)} groups for {len(params)} parameters")
        self.params = ParameterTuple(params)
        shards, gathers, cache = [], [], {}
        self._numel, self._chunk, self._start, self._pad, self._shape = [], [], [], [], []
        for p, g in zip(params, groups):
            numel = int(np.prod(p.shape)) if p.shape else 1
            chunk = -(-numel // g.size)
            flat = np.zeros(chunk * g.size, dtype=np.float32)
            flat[:numel] = p.asnumpy().astype(np.float32).reshape(-1)
            shards.append(Parameter(Tensor(flat[g.rank * chunk:(g.rank + 1) * chunk]), name=f"zero_shard.{p.name}",
                                    requires_grad=False))
            if g.ranks not in cache:
                cache[g.ranks] = AllGather(g, 0)
            gathers.append(cache[g.ranks])
            self._numel.append(numel)
            self._chunk.append(chunk)
            self._start.append(g.rank * chunk)
            self._pad.append(chunk * g.size - numel)
            self._shape.append(tuple(p.shape))
        self.shards = ParameterTuple(shards)
        self.gathers = nn.CellList(gathers)
        self.n = len(params)
        self.optimizer = make_optimizer(list(self.shards))

    def construct(self, grads, *args):
        slices = ()
        for i in range(self.n):
            flat = grads[i].astype(ms.float32).reshape(-1)
            if self._pad[i]:
                flat = ops.concat([flat, ops.zeros((self._pad[i],), ms.float32)])
            slices = slices + (flat[self._start[i]:self._start[i] + self._chunk[i]],)
        out = self.optimizer(slices, *args)
        for i in range(self.n):
            full = self.gathers[i](self.shards[i])
            # Only a padded (hence gathered, computed) tensor is sliced: slicing the Parameter itself in a
            # MindSpore 2.10 graph read its value from before the optimizer's update above.
            if self._pad[i]:
                full = full[:self._numel[i]]
            p = self.params[i]
            ops.assign(p, full.reshape(self._shape[i]).astype(p.dtype))
        return out

    def state_tensors(self) -> Dict[str, Parameter]:
        """This rank's slices and the wrapped optimizer's state by name (for per-rank checkpoints)."""
        out: Dict[str, Parameter] = {s.name: s for s in self.shards}
        if hasattr(self.optimizer, "state_tensors"):
            out.update(self.optimizer.state_tensors())
        return out

    def state_bytes(self) -> int:
        """Bytes of the slice copies and the wrapped optimizer's own state on this rank."""
        return _state_bytes(self.shards, self.optimizer)


def shard_groups(pmodel) -> list:
    """Per trainable parameter of a parallelized model, the group whose ranks hold identical copies of it.

    The data-parallel group; for expert weights under expert parallel, the ranks holding the same experts.
    """
    from .plans import PARAM_PLAN, match

    groups = pmodel.groups
    out = []
    for p in pmodel.trainable_params():
        split = match(PARAM_PLAN, p.name)
        expert = split is not None and split.expert_dim is not None and groups.ep.size > 1
        out.append(groups.expert_dp if expert else groups.dp)
    return out


def make_optimizer(pmodel, make: Callable[[List[Parameter]], nn.Cell]):
    """The optimizer for a parallelized model: sharded over data parallel when its layout asks for it.

    Args:
        pmodel: a :class:`~qwen2ms.parallel.apply.ParallelCausalLM` (or pipeline stage).
        make: builds an optimizer from a list of Parameters.

    Returns:
        ``make(pmodel.trainable_params())``, or a :class:`ShardedOptimizer` when
        ``optimizer_shard`` is set and ``data_parallel > 1``. Both are called as ``opt(grads)``.
    """
    params = pmodel.trainable_params()
    pc, groups = pmodel.parallel_config, pmodel.groups
    if not (pc.optimizer_shard and groups.dp.size > 1):
        return make(params)
    return ShardedOptimizer(params, make, shard_groups(pmodel))
