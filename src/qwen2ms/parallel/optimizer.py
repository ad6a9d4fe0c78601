"""Optimizer-state sharding across the data-parallel group (ZeRO stage 1, upstream ``enable_parallel_optimizer``).

Each data-parallel rank owns a contiguous ``1/dp`` slice of every parameter (flattened, zero-padded
to a multiple of ``dp``): it keeps a float copy of that slice and the optimizer's state for it
only. A step takes the synchronised gradients, updates the owned slices with any MindSpore
optimizer (built by the caller's factory over the slice Parameters), then all-gathers the slices
back into the full parameters. Element-wise optimizers (SGD, Adam, AdamW) give exactly the
unsharded result; the optimizer state shrinks ``dp`` times, as :mod:`qwen2ms.parallel.planner`
assumes for ``optimizer_shard``.

Example::

    opt = make_optimizer(pmodel, lambda ps: nn.AdamWeightDecay(ps, learning_rate=1e-5, weight_decay=0.1))
    loss, grads = value_and_grad(...)
    opt(pmodel.grad_sync(grads))
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from .comm import AllGather, Group

__all__ = ["ShardedOptimizer", "make_optimizer"]


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
        ids = {id(s) for s in self.shards}
        own = sum(int(np.prod(s.shape)) * s.itemsize for s in self.shards)
        state = sum(int(np.prod(p.shape)) * p.itemsize for p in self.optimizer.get_parameters()
                    if id(p) not in ids and p.shape)
        return own + state


def make_optimizer(pmodel, make: Callable[[List[Parameter]], nn.Cell]):
    """The optimizer for a parallelized model: sharded over data parallel when its layout asks for it.

    Args:
        pmodel: a :class:`~qwen2ms.parallel.apply.ParallelCausalLM` (or pipeline stage).
        make: builds an optimizer from a list of Parameters.

    Returns:
        ``make(pmodel.trainable_params())``, or a :class:`ShardedOptimizer` when
        ``optimizer_shard`` is set and ``data_parallel > 1``. Both are called as ``opt(grads)``.
    """
    from .plans import PARAM_PLAN, match

    params = pmodel.trainable_params()
    pc, groups = pmodel.parallel_config, pmodel.groups
    if not (pc.optimizer_shard and groups.dp.size > 1):
        return make(params)
    per_param = []
    for p in params:
        split = match(PARAM_PLAN, p.name)
        expert = split is not None and split.expert_dim is not None and groups.ep.size > 1
        per_param.append(groups.expert_dp if expert else groups.dp)
    return ShardedOptimizer(params, make, per_param)
