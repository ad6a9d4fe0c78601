"""The Cells :func:`~qwen2ms.parallel.apply.parallelize` puts around a model's modules, and the swap that keeps names.

A region holds the original module as ``inner`` and adds the tensor/expert-parallel communication at
its edges (Megatron-style: copy in / all-reduce out; with sequence parallel all-gather in /
reduce-scatter out along the sequence). :func:`replace_child` puts a wrapper (or a stand-in such as
:class:`Identity`) where a module was, keeping every parameter's Hugging Face name. Both
:mod:`qwen2ms.parallel.apply` and :mod:`qwen2ms.parallel.pipeline` use them; this module imports
neither.
"""
from __future__ import annotations

from mindspore import nn, ops

from .comm import (AllGather, CopyToGroup, GatherToGroup, Group, ReduceFromGroup, ReduceScatterToGroup,
                   ScatterToGroup)

__all__ = ["Identity", "AttentionRegion", "MLPRegion", "ExpertsRegion", "VocabParallelEmbedding",
           "SeqScatterEmbedding", "replace_child"]


class Identity(nn.Cell):
    """Returns its input: a region edge without communication, a module that lives on another stage."""

    def construct(self, x):
        return x


class AttentionRegion(nn.Cell):
    """A tensor-parallel attention: local heads inside, communication at the edges."""

    def __init__(self, inner: nn.Cell, enter: nn.Cell, exit_: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.inner, self.enter, self.exit = inner, enter, exit_

    def construct(self, x, cos, sin, mask, cache=None, cache_position=0):
        return self.exit(self.inner(self.enter(x), cos, sin, mask, cache, cache_position))


class MLPRegion(nn.Cell):
    """A tensor-parallel SwiGLU MLP: column-split gate/up, row-split down."""

    def __init__(self, inner: nn.Cell, enter: nn.Cell, exit_: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.inner, self.enter, self.exit = inner, enter, exit_

    def construct(self, x):
        return self.exit(self.inner(self.enter(x)))


class ExpertsRegion(nn.Cell):
    """Routed experts split by expert parallel (token all-gather in, reduce-scatter out) and tensor parallel.

    Expert parallel uses the all-gather dispatch: every member of the expert group sees all the
    group's tokens, computes the contribution of the experts it holds (tokens routed elsewhere get
    weight 0), and a reduce-scatter sums the contributions and returns each member its own tokens.
    The result equals all-to-all dispatch to the owning experts.
    """

    def __init__(self, inner: nn.Cell, ep: Group, tp: Group, num_experts: int) -> None:
        super().__init__(auto_prefix=False)
        self.inner = inner
        self.use_ep = ep.size > 1
        self.local = num_experts // ep.size
        self.first = ep.rank * self.local
        if self.use_ep:
            self.gather_x = GatherToGroup(ep, 0)
            self.gather_w = GatherToGroup(ep, 0)
            self.gather_i = AllGather(ep, 0)
            self.scatter_out = ReduceScatterToGroup(ep, 0)
        self.use_tp = tp.size > 1
        if self.use_tp:
            self.copy_x = CopyToGroup(tp)
            self.copy_w = CopyToGroup(tp)
            self.reduce = ReduceFromGroup(tp)

    def construct(self, x, top_index, top_weights):
        if self.use_ep:
            x = self.gather_x(x)  # [N * ep, H]
            top_weights = self.gather_w(top_weights)
            top_index = self.gather_i(top_index)
            local = top_index - self.first
            mine = ops.logical_and(local >= 0, local < self.local)
            top_index = ops.where(mine, local, ops.zeros_like(local))
            top_weights = top_weights * mine.astype(top_weights.dtype)
        if self.use_tp:
            x = self.copy_x(x)
            top_weights = self.copy_w(top_weights)
        out = self.inner(x, top_index, top_weights)
        if self.use_tp:
            out = self.reduce(out)
        if self.use_ep:
            out = self.scatter_out(out)
        return out


class VocabParallelEmbedding(nn.Cell):
    """Embedding whose rows are split by vocabulary: look up local ids, zero the rest, sum over the group."""

    def __init__(self, inner: nn.Cell, tp: Group, vocab_size: int, seq: bool) -> None:
        super().__init__(auto_prefix=False)
        self.inner = inner
        self.per = vocab_size // tp.size
        self.start = tp.rank * self.per
        self.exit = ReduceScatterToGroup(tp, 1) if seq else ReduceFromGroup(tp)

    def construct(self, input_ids):
        local = input_ids - self.start
        mine = ops.logical_and(local >= 0, local < self.per)
        emb = self.inner(ops.where(mine, local, ops.zeros_like(local)))  # [B, T, H]
        emb = emb * mine.expand_dims(-1).astype(emb.dtype)
        return self.exit(emb)


class SeqScatterEmbedding(nn.Cell):
    """A whole (replicated) embedding under sequence parallel: keep this rank's sequence chunk."""

    def __init__(self, inner: nn.Cell, group: Group) -> None:
        super().__init__(auto_prefix=False)
        self.inner = inner
        self.scatter = ScatterToGroup(group, 1)

    def construct(self, input_ids):
        return self.scatter(self.inner(input_ids))


def replace_child(parent: nn.Cell, attr: str, new: nn.Cell) -> None:
    """Swap a child Cell keeping every parameter's name (MindSpore would prefix the wrapper's attribute)."""
    names = {id(p): p.name for p in new.get_parameters()}
    if isinstance(parent, nn.CellList):
        parent[int(attr)] = new
    else:
        setattr(parent, attr, new)
    for p in new.get_parameters():
        p.name = names[id(p)]
