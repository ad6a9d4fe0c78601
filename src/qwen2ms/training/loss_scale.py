"""Dynamic loss scaling for fp16 training as a Cell, so its state lives in the compiled step and in checkpoints."""
from __future__ import annotations

from typing import Tuple

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

__all__ = ["DynamicLossScale"]


class DynamicLossScale(nn.Cell):
    """The loss-scale rule of ``mindspore.amp.DynamicLossScaler`` (and torch's ``GradScaler``).

    The loss is multiplied by ``scale`` before the backward pass. After a step whose gradients are
    all finite, a counter grows; after ``window`` finite steps in a row the scale is multiplied by
    ``factor``. A step with an inf/NaN gradient is skipped by the trainer and the scale is divided
    by ``factor`` (never below 1).

    Args:
        init_scale: starting scale (``2**16`` by default in :class:`TrainingArguments`).
        factor: growth and back-off factor.
        window: finite steps before growing.

    Example:
        >>> s = DynamicLossScale(1024.0, 2, 1)
        >>> _ = s.adjust(Tensor(False))
        >>> float(s.scale.asnumpy())
        512.0
    """

    def __init__(self, init_scale: float = 2.0 ** 16, factor: int = 2, window: int = 1000) -> None:
        super().__init__(auto_prefix=False)
        if init_scale < 1 or factor < 1 or window < 1:
            raise ValueError(f"need init_scale >= 1, factor >= 1, window >= 1; got {init_scale}, {factor}, {window}")
        self.scale = Parameter(Tensor(float(init_scale), ms.float32), name="loss_scale.value", requires_grad=False)
        self.counter = Parameter(Tensor(0, ms.int32), name="loss_scale.counter", requires_grad=False)
        self.factor = float(factor)
        self.window = int(window)

    def adjust(self, finite: Tensor) -> Tensor:
        """Update the scale after a step; ``finite`` is a bool scalar. Returns the new scale."""
        grown = self.scale * self.factor
        grow_now = ops.logical_and(self.counter == self.window - 1, ops.isfinite(grown))
        new_scale = ops.select(finite, ops.select(grow_now, grown, self.scale),
                               ops.maximum(self.scale / self.factor, ops.ones((), ms.float32)))
        new_counter = ops.select(finite, (self.counter + 1) % self.window, ops.zeros((), ms.int32))
        ops.assign(self.scale, new_scale)
        ops.assign(self.counter, new_counter)
        return new_scale

    def state_tensors(self) -> Tuple[Parameter, Parameter]:
        """``(scale, counter)`` for checkpoints."""
        return self.scale, self.counter
