"""The Trainer's compiled units: the train step and its parallel and pipeline variants, and the eval step.

The train step runs forward, backward, gradient accumulation, clipping, the AdamW update and the fp16
loss-scale update of one micro-batch. Each is a Cell whose ``construct`` the
:class:`~qwen2ms.training.trainer.Trainer` compiles once with ``ms.jit`` (PyNative would be ~70x
slower on CPU). They call the trainer's :meth:`~qwen2ms.training.trainer.Trainer.compute_loss` hook
on an unchanging stand-in of the trainer (:func:`frozen_view`), so per-step trainer state never
forces a recompile.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import mindspore as ms
from mindspore import Parameter, ParameterTuple, nn, ops

from .loss_scale import DynamicLossScale
from .optim import clip_grads_by_norm, global_grad_norm

__all__ = ["frozen_view", "TrainStep", "ParallelTrainStep", "PipelineUpdate", "EvalStep"]


def frozen_view(trainer: Any) -> Any:
    """An instance of the trainer's class holding only ``args``: what the compiled graph may see.

    Compiled graphs treat the Python objects they reference as constants and recompile when any of
    their attributes change; the real trainer changes every step (state, timings), so the graphs
    call ``compute_loss`` on this unchanging stand-in. Overrides of ``compute_loss`` therefore see
    ``self.args`` but no per-step state.
    """
    view = object.__new__(type(trainer))
    view.__dict__["args"] = trainer.args
    return view


class _OptimizerStep(nn.Cell):
    """What ends every compiled optimizer step: global-norm clipping, the update (skipped when the gradients are
    not finite) and the fp16 loss-scale adjustment."""

    def __init__(self, optimizer: nn.Cell, loss_scale: Optional[DynamicLossScale], max_grad_norm: float) -> None:
        super().__init__(auto_prefix=False)  # keep the model's parameter names
        self.optimizer = optimizer
        self.use_scale = loss_scale is not None
        self.loss_scale = loss_scale if loss_scale is not None else DynamicLossScale(1.0, 1, 1)
        self.max_grad_norm = float(max_grad_norm or 0.0)

    def apply_update(self, grads, norm, finite, lr):
        """Clip ``grads`` to ``max_grad_norm`` by their global ``norm``, step the optimizer if ``finite``, adjust the
        loss scale; returns ``finite``."""
        if self.max_grad_norm > 0:
            grads = clip_grads_by_norm(grads, norm, self.max_grad_norm)
        if finite:
            self.optimizer(grads, lr)
        if self.use_scale:
            self.loss_scale.adjust(finite)
        return finite


class TrainStep(_OptimizerStep):
    """The compiled unit: forward + backward of one micro-batch, accumulation, clip, update."""

    def __init__(self, trainer: Any, model: nn.Cell, params: Sequence[Parameter], optimizer: nn.Cell,
                 loss_scale: Optional[DynamicLossScale], max_grad_norm: float, accumulate: bool) -> None:
        _OptimizerStep.__init__(self, optimizer, loss_scale, max_grad_norm)
        self.trainer = frozen_view(trainer)
        self.model = model
        self.weights = ParameterTuple(params)
        self.accumulate = accumulate
        if accumulate:
            self.acc = ParameterTuple([Parameter(ops.zeros(p.shape, ms.float32), name=f"grad_acc.{p.name}",
                                                 requires_grad=False) for p in params])
        else:
            self.acc = ParameterTuple([])
        self.grad_fn = ms.value_and_grad(self.scaled_loss, None, self.weights)

    def scaled_loss(self, inputs, num_items, scale):
        return self.trainer.compute_loss(self.model, inputs, num_items) * scale

    def reported_loss(self, loss, scale):
        """The step loss as logged, from the differentiated (scaled) one."""
        return loss / scale if self.use_scale else loss

    def final_grads(self, grads):
        """The optimizer step's gradients and their global norm (after accumulation, before clipping)."""
        return grads, global_grad_norm(grads)

    def construct(self, inputs, num_items, lr, first, last):
        scale = self.loss_scale.scale
        if not self.use_scale:
            scale = ops.ones((), ms.float32)
        loss, grads = self.grad_fn(inputs, num_items, scale)
        grads = tuple(g.astype(ms.float32) for g in grads)
        loss = self.reported_loss(loss, scale)
        if self.use_scale:
            inv = 1.0 / scale
            grads = tuple(g * inv for g in grads)
        if not first:
            grads = tuple(a + g for a, g in zip(self.acc, grads))
        zero = ops.zeros((), ms.float32)
        if not last:
            for a, g in zip(self.acc, grads):
                ops.assign(a, g)
            return loss, zero, ops.isfinite(loss)
        grads, norm = self.final_grads(grads)
        finite = self.apply_update(grads, norm, ops.logical_and(ops.isfinite(norm), ops.isfinite(loss)), lr)
        return loss, norm, finite


class ParallelTrainStep(TrainStep):
    """The compiled unit for a model built by ``parallelize``: as :class:`TrainStep`, plus the model's collectives.

    Every rank's loss is its rows' summed cross-entropy over the token count of the *global* batch,
    so the job's objective is the sum over data-parallel replicas; ``grad_sync`` averages over them,
    hence the ``data_parallel`` factor on the differentiated loss. Gradients are synchronised once per
    optimizer step (after accumulation: the sync is linear) and clipped with the global norm. The
    returned loss is summed over the replicas, so every rank reports the global step loss.
    """

    def __init__(self, trainer: Any, model: nn.Cell, params: Sequence[Parameter], optimizer: nn.Cell,
                 loss_scale: Optional[DynamicLossScale], max_grad_norm: float, accumulate: bool) -> None:
        TrainStep.__init__(self, trainer, model, params, optimizer, loss_scale, max_grad_norm, accumulate)
        from ..parallel.comm import AllReduce

        self.dp = float(model.parallel_config.data_parallel)
        self.replica_sum = AllReduce(model.groups.dp)

    def scaled_loss(self, inputs, num_items, scale):
        return self.trainer.compute_loss(self.model, inputs, num_items) * (scale * self.dp)

    def reported_loss(self, loss, scale):
        return self.replica_sum(loss / (scale * self.dp))

    def final_grads(self, grads):
        grads = self.model.grad_sync(grads)
        return grads, self.model.grad_norm(grads)


class PipelineUpdate(_OptimizerStep):
    """The compiled end of a pipeline-parallel optimizer step: unscale, gradient sync, global-norm clip, AdamW.

    The gradients come from :meth:`PipelineCausalLM.forward_backward` accumulated over the step's
    micro-batches, each the gradient of this replica's summed token loss (times the fp16 loss
    scale) over the token count of the whole global step; ``grad_sync`` averages over
    data-parallel replicas, hence the ``data_parallel`` factor (the job's objective is the sum over
    replicas). The norm adds up the squared norms of every stage's (and tensor shard's)
    parameters (the model's ``grad_norm``), so every rank sees the same norm and the same
    finite/overflow decision.
    """

    def __init__(self, model: nn.Cell, optimizer: nn.Cell, loss_scale: Optional[DynamicLossScale],
                 max_grad_norm: float) -> None:
        _OptimizerStep.__init__(self, optimizer, loss_scale, max_grad_norm)
        self.model = model
        self.dp = float(model.parallel_config.data_parallel)

    def construct(self, grads, lr):
        factor = ops.ones((), ms.float32) * self.dp
        if self.use_scale:
            factor = factor / self.loss_scale.scale
        grads = self.model.grad_sync(tuple(g * factor for g in grads))
        norm = self.model.grad_norm(grads)
        return norm, self.apply_update(grads, norm, ops.isfinite(norm), lr)


class EvalStep(nn.Cell):
    """Compiled forward for evaluation: the batch's mean loss via the trainer's compute_loss."""

    def __init__(self, trainer: Any, model: nn.Cell) -> None:
        super().__init__(auto_prefix=False)
        self.trainer = frozen_view(trainer)
        self.model = model

    def construct(self, inputs, num_items):
        return self.trainer.compute_loss(self.model, inputs, num_items)
