"""AdamW with torch semantics as a graph-compilable MindSpore Cell, and the HF learning-rate schedules."""
from __future__ import annotations

import math
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

__all__ = [
    "AdamW",
    "LRSchedule",
    "get_scheduler",
    "decay_parameter_names",
    "global_grad_norm",
    "clip_grads_by_norm",
]

# The patterns transformers' Trainer.get_decay_parameter_names excludes from weight decay, matched
# against the lower-cased full parameter path. Qwen2's RMSNorms are caught by "layernorm" and
# "(^|.)norm(.|$)" (model.norm.weight); q/k/v biases by "bias".
_NO_DECAY_PATTERNS = [re.compile(p) for p in
                      (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")]


def decay_parameter_names(names: Iterable[str]) -> List[str]:
    """The parameter names weight decay applies to: all but biases and norm weights.

    This matches ``transformers.Trainer.get_decay_parameter_names`` (the same name patterns; Qwen2
    has no ``nn.LayerNorm`` modules, whose parameters HF also excludes by type).

    Args:
        names: full parameter paths such as ``"model.layers.0.self_attn.q_proj.bias"``.

    Returns:
        The subset of ``names`` (in order) that receives weight decay.

    Example:
        >>> decay_parameter_names(["model.norm.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.bias"])
        ['lm_head.weight']
    """
    return [n for n in names if not any(p.search(n.lower()) for p in _NO_DECAY_PATTERNS)]


def global_grad_norm(grads: Sequence[Tensor]) -> Tensor:
    """The L2 norm of all gradients together, in float32 (``torch.nn.utils.clip_grad_norm_``'s total norm)."""
    total = ops.zeros((), ms.float32)
    for g in grads:
        g32 = g.astype(ms.float32)
        total = total + (g32 * g32).sum()
    return ops.sqrt(total)


def clip_grads_by_norm(grads: Sequence[Tensor], norm: Tensor, max_norm: float) -> Tuple[Tensor, ...]:
    """Scale ``grads`` by ``min(1, max_norm / (norm + 1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` does."""
    coef = ops.minimum(max_norm / (norm + 1e-6), ops.ones((), ms.float32))
    return tuple(g * coef.astype(g.dtype) for g in grads)


class AdamW(nn.Cell):
    """AdamW whose update is exactly ``torch.optim.AdamW``'s, written with ``ops.assign`` so it compiles.

    (``mindspore.mint.optim.AdamW`` is broken on CPU and in-place tensor methods do not update in
    PyNative there; this cell is meant to be called inside an ``ms.jit`` train step.)

    Per step ``t`` with gradient ``g``: ``p <- p * (1 - lr * wd)`` (only for parameters with decay),
    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
    ``p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``.

    Parameters stored in a low precision (float16/bfloat16) get a float32 master copy: the update is
    done on the master and cast back, so small updates are not lost to rounding.

    Args:
        params: the trainable parameters.
        betas: ``(beta1, beta2)``.
        eps: added to the denominator.
        weight_decay: decoupled weight decay coefficient.
        decay_mask: per parameter, whether weight decay applies (default: all).

    Example:
        >>> opt = AdamW(model.trainable_params(), weight_decay=0.01)  # doctest: +SKIP
        >>> opt(grads, Tensor(1e-3, ms.float32))  # inside a jitted train step  # doctest: +SKIP
    """

    def __init__(
        self,
        params: Sequence[Parameter],
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decay_mask: Optional[Sequence[bool]] = None,
    ) -> None:
        super().__init__(auto_prefix=False)
        params = list(params)
        if not params:
            raise ValueError("AdamW got no parameters to optimise (are all of them frozen?)")
        if decay_mask is None:
            decay_mask = [True] * len(params)
        if len(decay_mask) != len(params):
            raise ValueError(f"decay_mask has {len(decay_mask)} entries for {len(params)} parameters")
        self.beta1, self.beta2 = float(betas[0]), float(betas[1])
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.decay_mask = tuple(bool(d) and self.weight_decay > 0 for d in decay_mask)
        self.params = ParameterTuple(params)
        self.has_master = tuple(p.dtype != ms.float32 for p in params)
        masters = []
        for p, low in zip(params, self.has_master):
            if low:
                masters.append(Parameter(p.value().astype(ms.float32), name=f"master.{p.name}", requires_grad=False))
            else:
                masters.append(p)
        self.master = ParameterTuple(masters) if any(self.has_master) else self.params
        self.exp_avg = ParameterTuple(
            [Parameter(ops.zeros(p.shape, ms.float32), name=f"exp_avg.{p.name}", requires_grad=False) for p in params])
        self.exp_avg_sq = ParameterTuple(
            [Parameter(ops.zeros(p.shape, ms.float32), name=f"exp_avg_sq.{p.name}", requires_grad=False)
             for p in params])
        self.step_count = Parameter(Tensor(0, ms.int32), name="adamw_step", requires_grad=False)
        # Per-parameter decay rate instead of a branch: the compiled loop must not branch per item.
        self.decay_rates = tuple(self.weight_decay if d else 0.0 for d in self.decay_mask)
        self.low_params = ParameterTuple([p for p, low in zip(params, self.has_master) if low])
        self.low_masters = ParameterTuple([w for w, low in zip(masters, self.has_master) if low])

    def construct(self, grads: Tuple[Tensor, ...], lr: Tensor) -> Tensor:
        step = self.step_count + 1
        ops.assign(self.step_count, step)
        t = step.astype(ms.float32)
        bias_correction1 = 1.0 - ops.pow(Tensor(self.beta1, ms.float32), t)
        bias_correction2 = 1.0 - ops.pow(Tensor(self.beta2, ms.float32), t)
        step_size = lr / bias_correction1
        bc2_sqrt = ops.sqrt(bias_correction2)
        for w, m, v, g, wd in zip(self.master, self.exp_avg, self.exp_avg_sq, grads, self.decay_rates):
            g32 = g.astype(ms.float32)
            w_new = w * (1.0 - lr * wd)
            m_new = m * self.beta1 + g32 * (1.0 - self.beta1)
            v_new = v * self.beta2 + g32 * g32 * (1.0 - self.beta2)
            denom = ops.sqrt(v_new) / bc2_sqrt + self.eps
            w_new = w_new - step_size * (m_new / denom)
            ops.assign(m, m_new)
            ops.assign(v, v_new)
            ops.assign(w, w_new)
        for p, w in zip(self.low_params, self.low_masters):
            ops.assign(p, w.astype(p.dtype))
        return step

    def state_tensors(self) -> Dict[str, Parameter]:
        """The optimizer state by name (moments, step count, fp32 masters) for checkpoints."""
        out: Dict[str, Parameter] = {"adamw_step": self.step_count}
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            out[m.name] = m
            out[v.name] = v
        for w, low in zip(self.master, self.has_master):
            if low:
                out[w.name] = w
        return out

    def sync_masters_from_params(self) -> None:
        """Reset the fp32 masters from the (low-precision) parameters, e.g. after loading new weights."""
        for p, w, low in zip(self.params, self.master, self.has_master):
            if low:
                w.set_data(p.value().astype(ms.float32))


class LRSchedule:
    """A learning rate as a function of the optimizer step, with torch ``LambdaLR`` stepping semantics.

    Optimizer step ``k`` (1-based) uses ``base_lr * factor(k - 1)``: the first step of a warm-up
    has learning rate 0, exactly as with ``transformers.get_scheduler`` + ``torch`` optimizers.

    Args:
        base_lr: peak learning rate.
        factor: step -> multiplier.
        name: the schedule's name (stored in checkpoints).

    Example:
        >>> s = get_scheduler("linear", 1.0, num_warmup_steps=2, num_training_steps=10)
        >>> [round(s.lr_at(k), 3) for k in range(4)]
        [0.0, 0.5, 1.0, 0.875]
    """

    def __init__(self, base_lr: float, factor: Callable[[int], float], name: str = "custom") -> None:
        self.base_lr = float(base_lr)
        self.factor = factor
        self.name = name
        self.last_step = 0

    def lr_at(self, step: int) -> float:
        """Learning rate after ``step`` completed scheduler steps."""
        return self.base_lr * float(self.factor(int(step)))

    def get_last_lr(self) -> float:
        """The learning rate the next optimizer step uses."""
        return self.lr_at(self.last_step)

    def step(self) -> None:
        """Advance by one optimizer step."""
        self.last_step += 1

    def state_dict(self) -> Dict[str, object]:
        """``{"name", "last_step", "base_lr"}`` for checkpoints."""
        return {"name": self.name, "last_step": self.last_step, "base_lr": self.base_lr}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restore the step count saved by :meth:`state_dict`."""
        self.last_step = int(state["last_step"])  # type: ignore[arg-type]


def get_scheduler(name: str, learning_rate: float, num_warmup_steps: int, num_training_steps: int,
                  num_cycles: float = 0.5) -> LRSchedule:
    """The learning-rate schedules of ``transformers.get_scheduler``, same formulas.

    Args:
        name: ``"linear"``, ``"cosine"``, ``"constant"`` (no warm-up) or ``"constant_with_warmup"``.
        learning_rate: peak learning rate.
        num_warmup_steps: linear warm-up from 0 over this many steps.
        num_training_steps: total optimizer steps (the decay reaches 0 there).
        num_cycles: cosine waves over the decay (0.5: from peak down to 0).

    Returns:
        An :class:`LRSchedule`.

    Raises:
        ValueError: unknown name or negative step counts.

    Example:
        >>> get_scheduler("cosine", 1e-4, 10, 100).lr_at(55)
        5e-05
    """
    if num_warmup_steps < 0 or num_training_steps < 0:
        raise ValueError(f"step counts must be >= 0, got warmup={num_warmup_steps}, total={num_training_steps}")
    w, n = int(num_warmup_steps), int(num_training_steps)

    def warm(k: int) -> float:
        return float(k) / float(max(1, w))

    if name == "constant":
        return LRSchedule(learning_rate, lambda k: 1.0, name)
    if name == "constant_with_warmup":
        return LRSchedule(learning_rate, lambda k: warm(k) if k < w else 1.0, name)
    if name == "linear":
        return LRSchedule(learning_rate,
                          lambda k: warm(k) if k < w else max(0.0, float(n - k) / float(max(1, n - w))), name)
    if name == "cosine":
        def cosine(k: int) -> float:
            if k < w:
                return warm(k)
            progress = float(k - w) / float(max(1, n - w))
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))
        return LRSchedule(learning_rate, cosine, name)
    raise ValueError(f"unknown lr_scheduler_type {name!r}; choose linear, cosine, constant or constant_with_warmup")
