"""Collective communication over ``mindspore.communication``: native ops where the backend has them, exact compositions where not.

Which primitive runs is decided once per group from the device target, never by trying and
falling back (a failed collective can leave ranks out of step):

============== ======================================= ==============================================
collective     Ascend / GPU                            CPU (MindSpore 2.10 "mccl" backend)
============== ======================================= ==============================================
all_reduce     ``ops.AllReduce`` (sum/max/min/prod)    sum: ``ops.AllReduce``; max/min/prod:
                                                       all_gather, then reduce locally
all_gather     ``ops.AllGather``                       world group: ``ops.AllGather``; sub-groups
                                                       (CPU AllGather only takes the world group):
                                                       each rank writes its tensor into its slot of
                                                       a zero buffer ``[n, ...]`` and the buffers
                                                       are summed with AllReduce (integer tensors
                                                       travel as float32: exact below 2**24)
reduce_scatter ``ops.ReduceScatter``                   all_reduce, then keep this rank's chunk
all_to_all     ``ops.AlltoAll``                        all_gather, then take chunk ``r`` of every
                                                       rank's tensor
send / recv    all_reduce of the payload in a group    same: the sender contributes the tensor, every
                                                       other member zeros, so the sum *is* the payload
============== ======================================= ==============================================

The CPU compositions give the same values as the native collectives (sums of exact zeros are
exact), at the cost of ``n`` times the traffic for all_gather/all_to_all in sub-groups and twice
the traffic for reduce_scatter and point-to-point. Point-to-point goes through all_reduce on every
backend: both sides of a pipeline transfer then call one collective at the same point of the
schedule, and no tag bookkeeping is needed (``ops.Send``/``ops.Receive`` exist on Ascend/GPU but
not on CPU, and this project can only test CPU).

The module has two layers:

* functions (``all_reduce``, ``all_gather``, ``reduce_scatter``, ``all_to_all``, ``send``,
  ``recv``, ``send_recv``, ``broadcast``) for eager (PyNative) use;
* Cells with a custom backward for tensor/sequence parallel regions (``CopyToGroup``,
  ``ReduceFromGroup``, ``GatherFromGroup``, ``ScatterToGroup``, ``ReduceScatterToGroup``,
  ``GatherToGroup``), which also compile under ``ms.jit``.

Example (under ``msrun --worker_num=2``):
    >>> from mindspore.communication import init
    >>> init()
    >>> g = world_group()
    >>> y = all_gather(ms.Tensor(np.ones((2, 3), np.float32)), dim=1, group=g)   # [2, 6]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

__all__ = [
    "Group", "world_group", "new_group", "single_group", "is_initialized",
    "all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "send", "recv", "send_recv",
    "AllReduce", "AllGather", "ReduceScatter", "AllToAll",
    "CopyToGroup", "ReduceFromGroup", "GatherFromGroup", "ScatterToGroup", "ReduceScatterToGroup",
    "GatherToGroup",
]


@dataclass(frozen=True)
class Group:
    """A communication group: its global ranks, the MindSpore group name, and this process's index in it.

    Attributes:
        ranks: global ranks of the members, sorted.
        name: the name MindSpore knows the group by ("" for a one-member group, which needs no backend).
        rank: index of this process in ``ranks`` (its group rank).
        is_world: whether the group is MindSpore's world group.
    """

    ranks: Tuple[int, ...]
    name: str
    rank: int
    is_world: bool = False

    @property
    def size(self) -> int:
        """Number of members."""
        return len(self.ranks)


_groups: Dict[Tuple[int, ...], Group] = {}


def is_initialized() -> bool:
    """Whether ``mindspore.communication.init()`` has run in this process."""
    from mindspore.communication._comm_helper import _is_initialized

    return bool(_is_initialized())


def _world() -> Tuple[int, int]:
    from mindspore.communication import get_group_size, get_rank

    return get_rank(), get_group_size()


def single_group(rank: int = 0) -> Group:
    """A one-member group: every collective is the identity (no backend needed)."""
    return Group(ranks=(rank,), name="", rank=0)


def world_group() -> Group:
    """All processes of the job (after ``init()``), or a one-member group when not initialised."""
    if not is_initialized():
        return single_group()
    from mindspore.communication import GlobalComm

    me, n = _world()
    if n == 1:
        return single_group(me)
    return Group(ranks=tuple(range(n)), name=GlobalComm.WORLD_COMM_GROUP, rank=me, is_world=True)


def new_group(ranks: Sequence[int]) -> Group:
    """The group of the given global ranks, created with ``mindspore.communication.create_group`` once.

    Only members may call it (MindSpore creates a group on its members only). A group of one rank
    needs no backend; a group of every rank is the world group.

    Args:
        ranks: global ranks; must include this process.

    Returns:
        The :class:`Group`.

    Raises:
        ValueError: this process is not in ``ranks``, or ranks repeat.
    """
    key = tuple(sorted(int(r) for r in ranks))
    if len(set(key)) != len(key) or not key:
        raise ValueError(f"group ranks must be distinct and non-empty, got {list(ranks)}")
    if len(key) == 1:
        if is_initialized() and _world()[0] != key[0]:
            raise ValueError(f"this process (rank {_world()[0]}) is not in group {list(key)}")
        return single_group(key[0])
    me, n = _world()
    if me not in key:
        raise ValueError(f"this process (rank {me}) is not in group {list(key)}; only members create a group")
    if key == tuple(range(n)):
        return world_group()
    if key not in _groups:
        from mindspore.communication import create_group

        name = "qwen2ms_" + "_".join(str(r) for r in key)
        create_group(name, list(key))
        _groups[key] = Group(ranks=key, name=name, rank=key.index(me))
    return _groups[key]


def _on_cpu() -> bool:
    return ms.get_context("device_target") == "CPU"


# ---------------------------------------------------------------------------------------------
# Primitive Cells (compile under ms.jit; the composition is fixed at construction)
# ---------------------------------------------------------------------------------------------
class AllReduce(nn.Cell):
    """Element-wise reduction over the group; every member gets the result.

    Args:
        group: the :class:`Group`.
        op: "sum", "max", "min" or "prod".
    """

    def __init__(self, group: Group, op: str = "sum") -> None:
        super().__init__()
        if op not in ("sum", "max", "min", "prod"):
            raise ValueError(f"all_reduce op must be 'sum', 'max', 'min' or 'prod', got {op!r}")
        self.n = group.size
        self.op = op
        self.composite = self.n > 1 and op != "sum" and _on_cpu()
        self.cpu = _on_cpu()
        if self.n > 1 and not self.composite:
            red = {"sum": ops.ReduceOp.SUM, "max": ops.ReduceOp.MAX, "min": ops.ReduceOp.MIN,
                   "prod": ops.ReduceOp.PROD}[op]
            self.ar = ops.AllReduce(red, group.name)
        if self.composite:
            self.gather = _Stack(group)

    def construct(self, x: Tensor) -> Tensor:
        if self.n == 1:
            return x
        if not self.composite:
            if self.cpu and not x.is_floating_point():
                # CPU AllReduce takes float16/float32 only; integers below 2**24 pass float32 exactly.
                return self.ar(x.astype(ms.float32)).astype(x.dtype)
            return self.ar(x)
        stacked = self.gather(x)  # [n, ...]
        if self.op == "max":
            return ops.amax(stacked, 0)
        if self.op == "min":
            return ops.amin(stacked, 0)
        return ops.prod(stacked, 0)


class _Stack(nn.Cell):
    """``[n, *x.shape]``: every member's tensor, in group-rank order."""

    def __init__(self, group: Group) -> None:
        super().__init__()
        self.n = group.size
        self.native = self.n > 1 and (group.is_world or not _on_cpu())
        if self.n > 1:
            if self.native:
                self.ag = ops.AllGather(group.name)
            else:
                self.ar = ops.AllReduce(ops.ReduceOp.SUM, group.name)
                onehot = np.zeros((self.n,), np.float32)
                onehot[group.rank] = 1.0
                self.onehot = Tensor(onehot)

    def construct(self, x: Tensor) -> Tensor:
        if self.n == 1:
            return x.expand_dims(0)
        if self.native:
            return self.ag(x.expand_dims(0))  # AllGather concatenates along dim 0
        if not x.is_floating_point():
            # CPU AllReduce takes float16/float32 only; integers below 2**24 pass float32 exactly.
            sel = self.onehot.reshape((self.n,) + (1,) * x.ndim)
            return self.ar(sel * x.astype(ms.float32).expand_dims(0)).astype(x.dtype)
        sel = self.onehot.astype(x.dtype).reshape((self.n,) + (1,) * x.ndim)
        # Exact: every slot but one is x * 0 summed with the owner's x * 1.
        return self.ar(sel * x.expand_dims(0))


class AllGather(nn.Cell):
    """Concatenate every member's tensor along ``dim`` (group-rank order)."""

    def __init__(self, group: Group, dim: int = 0) -> None:
        super().__init__()
        self.n = group.size
        self.dim = dim
        self.stack = _Stack(group)

    def construct(self, x: Tensor) -> Tensor:
        if self.n == 1:
            return x
        stacked = self.stack(x)
        dim = self.dim % x.ndim
        return ops.concat([stacked[i] for i in range(self.n)], dim)


class ReduceScatter(nn.Cell):
    """Sum over the group, then member ``r`` keeps chunk ``r`` of ``dim`` (size must divide by the group)."""

    def __init__(self, group: Group, dim: int = 0) -> None:
        super().__init__()
        self.n = group.size
        self.r = group.rank
        self.dim = dim
        self.native = self.n > 1 and not _on_cpu()
        if self.n > 1:
            if self.native:
                self.rs = ops.ReduceScatter(ops.ReduceOp.SUM, group.name)
            else:
                self.ar = ops.AllReduce(ops.ReduceOp.SUM, group.name)

    def construct(self, x: Tensor) -> Tensor:
        if self.n == 1:
            return x
        dim = self.dim % x.ndim
        if self.native:
            if dim == 0:
                return self.rs(x)
            moved = ops.moveaxis(x, dim, 0)
            return ops.moveaxis(self.rs(moved), 0, dim)
        total = self.ar(x)
        return ops.split(total, x.shape[dim] // self.n, dim)[self.r]


class AllToAll(nn.Cell):
    """Split ``x`` into ``n`` chunks along ``split_dim``; member ``r`` receives chunk ``r`` of every member,
    concatenated along ``concat_dim`` in group-rank order."""

    def __init__(self, group: Group, split_dim: int = 0, concat_dim: int = 0) -> None:
        super().__init__()
        self.n = group.size
        self.r = group.rank
        self.split_dim, self.concat_dim = split_dim, concat_dim
        self.native = self.n > 1 and not _on_cpu()
        if self.n > 1:
            if self.native:
                self.a2a = ops.AlltoAll(self.n, split_dim, concat_dim, group.name)
            else:
                self.stack = _Stack(group)

    def construct(self, x: Tensor) -> Tensor:
        if self.n == 1:
            return x
        if self.native:
            return self.a2a(x)
        sd = self.split_dim % x.ndim
        cd = self.concat_dim % x.ndim
        stacked = self.stack(x)  # [n, ...]
        step = x.shape[sd] // self.n
        parts = [ops.split(stacked[j], step, sd)[self.r] for j in range(self.n)]
        return ops.concat(parts, cd)


class _SendRecv(nn.Cell):
    """Every member returns ``src``'s tensor (an all_reduce where only ``src`` contributes)."""

    def __init__(self, group: Group, src_group_rank: int) -> None:
        super().__init__()
        self.n = group.size
        self.is_src = group.rank == src_group_rank
        if self.n > 1:
            self.ar = ops.AllReduce(ops.ReduceOp.SUM, group.name)

    def construct(self, x: Tensor) -> Tensor:
        if self.n == 1:
            return x
        if self.is_src:
            return self.ar(x)
        return self.ar(ops.zeros_like(x))


# ---------------------------------------------------------------------------------------------
# Functional API (eager)
# ---------------------------------------------------------------------------------------------
_cells: Dict[Tuple, nn.Cell] = {}


def _cell(kind: str, group: Group, *args) -> nn.Cell:
    key = (kind, group.ranks, group.name) + args
    cell = _cells.get(key)
    if cell is None:
        cls = {"all_reduce": AllReduce, "all_gather": AllGather, "reduce_scatter": ReduceScatter,
               "all_to_all": AllToAll, "send_recv": _SendRecv}[kind]
        cell = cls(group, *args)
        _cells[key] = cell
    return cell


def _grp(group: Optional[Group]) -> Group:
    return world_group() if group is None else group


def all_reduce(x: Tensor, op: str = "sum", group: Optional[Group] = None) -> Tensor:
    """Element-wise ``op`` ("sum", "max", "min", "prod") of ``x`` over the group (default: world).

    Example:
        >>> all_reduce(Tensor([1.0, 2.0]))   # on 2 ranks with equal inputs: [2., 4.]
    """
    return _cell("all_reduce", _grp(group), op)(x)


def all_gather(x: Tensor, dim: int = 0, group: Optional[Group] = None) -> Tensor:
    """Every member's ``x`` concatenated along ``dim``, in group-rank order."""
    return _cell("all_gather", _grp(group), dim)(x)


def reduce_scatter(x: Tensor, dim: int = 0, group: Optional[Group] = None) -> Tensor:
    """Chunk ``r`` (along ``dim``) of the group sum of ``x``, on group rank ``r``."""
    g = _grp(group)
    if x.shape[dim] % g.size:
        raise ValueError(f"reduce_scatter: dim {dim} of shape {tuple(x.shape)} must divide by the group size "
                         f"{g.size}")
    return _cell("reduce_scatter", g, dim)(x)


def all_to_all(x: Tensor, split_dim: int = 0, concat_dim: int = 0, group: Optional[Group] = None) -> Tensor:
    """Exchange chunks: group rank ``r`` gets chunk ``r`` (along ``split_dim``) of every member's ``x``,
    concatenated along ``concat_dim``."""
    g = _grp(group)
    if x.shape[split_dim] % g.size:
        raise ValueError(f"all_to_all: split dim {split_dim} of shape {tuple(x.shape)} must divide by the group "
                         f"size {g.size}")
    return _cell("all_to_all", g, split_dim, concat_dim)(x)


def broadcast(x: Tensor, src: int = 0, group: Optional[Group] = None) -> Tensor:
    """``x`` of group rank ``src`` on every member (every member passes a tensor of that shape and dtype)."""
    g = _grp(group)
    if not 0 <= src < g.size:
        raise ValueError(f"broadcast src {src} is not a group rank of a group of {g.size}")
    return _cell("send_recv", g, src)(x)


def send_recv(x: Tensor, src: int, dst: int, group: Optional[Group] = None) -> Tensor:
    """Point-to-point transfer inside a group: returns ``src``'s ``x`` on ``dst`` (and on ``src`` itself).

    Every member of ``group`` calls it at the same point (it is one collective); members other than
    ``src`` pass a tensor of the payload's shape and dtype (its values are ignored). Use a two-member
    group (e.g. adjacent pipeline stages) so no other process takes part.
    """
    g = _grp(group)
    for name, v in (("src", src), ("dst", dst)):
        if not 0 <= v < g.size:
            raise ValueError(f"send_recv {name} {v} is not a group rank of a group of {g.size}")
    return _cell("send_recv", g, src)(x)


def send(x: Tensor, dst: int, group: Optional[Group] = None) -> None:
    """Send ``x`` to group rank ``dst``; the receiver calls :func:`recv` at the same point."""
    g = _grp(group)
    if g.size != 2 or dst == g.rank:
        raise ValueError(f"send needs a two-member group holding this process and dst={dst}; got ranks "
                         f"{list(g.ranks)} (use new_group([me, peer]))")
    send_recv(x, g.rank, dst, g)


def recv(shape: Sequence[int], dtype, src: int, group: Optional[Group] = None) -> Tensor:
    """Receive a tensor of ``shape``/``dtype`` sent by group rank ``src`` with :func:`send`."""
    g = _grp(group)
    if g.size != 2 or src == g.rank:
        raise ValueError(f"recv needs a two-member group holding this process and src={src}; got ranks "
                         f"{list(g.ranks)} (use new_group([me, peer]))")
    return send_recv(ops.zeros(tuple(shape), dtype), src, g.rank, g)


# ---------------------------------------------------------------------------------------------
# Differentiable region markers for tensor and sequence parallelism (custom backward)
# ---------------------------------------------------------------------------------------------
class CopyToGroup(nn.Cell):
    """Enter a tensor-parallel region: identity forward, all-reduce (sum) of the gradient backward.

    The input is replicated; each member's region computes a partial gradient of it, and the true
    gradient is their sum.
    """

    def __init__(self, group: Group) -> None:
        super().__init__()
        self.reduce = AllReduce(group)

    def construct(self, x):
        return x

    def bprop(self, x, out, dout):
        return (self.reduce(dout),)


class ReduceFromGroup(nn.Cell):
    """Leave a tensor-parallel region: all-reduce (sum) forward, identity backward.

    Every member continues with the same full value, so each member's gradient of the partial sum
    is the gradient of the result.
    """

    def __init__(self, group: Group) -> None:
        super().__init__()
        self.reduce = AllReduce(group)

    def construct(self, x):
        return self.reduce(x)

    def bprop(self, x, out, dout):
        return (dout,)


class GatherFromGroup(nn.Cell):
    """All-gather along ``dim`` forward; backward keeps this member's chunk of the (replicated) gradient."""

    def __init__(self, group: Group, dim: int = -1) -> None:
        super().__init__()
        self.gather = AllGather(group, dim)
        self.n, self.r, self.dim = group.size, group.rank, dim

    def construct(self, x):
        return self.gather(x)

    def bprop(self, x, out, dout):
        return (ops.split(dout, dout.shape[self.dim] // self.n, self.dim)[self.r],)


class ScatterToGroup(nn.Cell):
    """Keep this member's chunk along ``dim`` forward; backward all-gathers the gradient."""

    def __init__(self, group: Group, dim: int = -1) -> None:
        super().__init__()
        self.gather = AllGather(group, dim)
        self.n, self.r, self.dim = group.size, group.rank, dim

    def construct(self, x):
        return ops.split(x, x.shape[self.dim] // self.n, self.dim)[self.r]

    def bprop(self, x, out, dout):
        return (self.gather(dout),)


class ReduceScatterToGroup(nn.Cell):
    """Sequence parallel exit of a region: reduce-scatter along ``dim`` forward, all-gather backward."""

    def __init__(self, group: Group, dim: int = 1) -> None:
        super().__init__()
        self.rs = ReduceScatter(group, dim)
        self.gather = AllGather(group, dim)

    def construct(self, x):
        return self.rs(x)

    def bprop(self, x, out, dout):
        return (self.gather(dout),)


class GatherToGroup(nn.Cell):
    """Sequence parallel entry of a region: all-gather along ``dim`` forward, reduce-scatter backward.

    Each member's region computes a partial gradient of the whole gathered tensor; summing them and
    keeping this member's chunk gives the gradient of its shard.
    """

    def __init__(self, group: Group, dim: int = 1) -> None:
        super().__init__()
        self.gather = AllGather(group, dim)
        self.rs = ReduceScatter(group, dim)

    def construct(self, x):
        return self.gather(x)

    def bprop(self, x, out, dout):
        return (self.rs(dout),)
