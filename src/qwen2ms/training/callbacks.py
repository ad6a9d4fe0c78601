"""Trainer state and callbacks: the events a run emits, a progress bar, and the JSONL log."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

__all__ = [
    "TrainerState",
    "TrainerCallback",
    "CallbackHandler",
    "ProgressCallback",
    "JsonlLoggerCallback",
]


@dataclass
class TrainerState:
    """Where a run is; saved in every checkpoint as ``trainer_state.json``.

    Attributes:
        global_step: optimizer steps done.
        max_steps: optimizer steps the run will do.
        epoch: index of the current epoch (0-based).
        step_in_epoch: micro-batches of the current epoch already consumed (the data position).
        num_update_steps_per_epoch: optimizer steps per epoch.
        trained_tokens: label tokens that contributed to the loss so far.
        best_metric: the lowest ``eval_loss`` seen at a checkpoint.
        best_checkpoint: the folder of that checkpoint.
        last_eval_loss: the latest ``eval_loss``.
        log_history: every logged dict.
        should_stop: set by a callback to end training after the current step.
        should_save: set by a callback to write a checkpoint after the current step.
    """

    global_step: int = 0
    max_steps: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    num_update_steps_per_epoch: int = 0
    trained_tokens: int = 0
    best_metric: Optional[float] = None
    best_checkpoint: Optional[str] = None
    last_eval_loss: Optional[float] = None
    log_history: List[Dict[str, Any]] = field(default_factory=list)
    should_stop: bool = False
    should_save: bool = False

    @property
    def epoch_float(self) -> float:
        """Fractional epochs done (for logs)."""
        per = max(1, self.num_update_steps_per_epoch)
        return round(self.global_step / per, 4)

    def to_dict(self) -> Dict[str, Any]:
        """The state as a JSON-serialisable dict (the transient flags are not saved)."""
        d = dataclasses.asdict(self)
        d.pop("should_stop")
        d.pop("should_save")
        return d

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrainerState":
        """Inverse of :meth:`to_dict` (unknown keys are ignored so newer files still load)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class TrainerCallback:
    """Base class for objects that react to training events; override the methods you need.

    Every method receives the :class:`~qwen2ms.training.TrainingArguments`, the
    :class:`TrainerState` and keyword arguments including ``trainer``. Setting
    ``state.should_stop = True`` ends training after the current step; ``state.should_save = True``
    writes a checkpoint after it.

    Example:
        >>> class StopAtLoss(TrainerCallback):
        ...     def on_log(self, args, state, logs, **kwargs):
        ...         if logs.get("loss", 1e9) < 0.5:
        ...             state.should_stop = True
    """

    def on_train_begin(self, args: Any, state: TrainerState, **kwargs: Any) -> None:
        """Called once before the first step (after a resume has restored the state)."""

    def on_step_end(self, args: Any, state: TrainerState, **kwargs: Any) -> None:
        """Called after every optimizer step; ``kwargs['loss']`` is the step's loss (float)."""

    def on_log(self, args: Any, state: TrainerState, logs: Dict[str, Any], **kwargs: Any) -> None:
        """Called with each dict the trainer logs (training metrics, evaluation metrics)."""

    def on_save(self, args: Any, state: TrainerState, checkpoint_dir: str = "", **kwargs: Any) -> None:
        """Called after a checkpoint folder has been written completely."""

    def on_evaluate(self, args: Any, state: TrainerState, metrics: Dict[str, float], **kwargs: Any) -> None:
        """Called after an evaluation with its metrics (``eval_loss``, ``eval_tokens``)."""

    def on_train_end(self, args: Any, state: TrainerState, **kwargs: Any) -> None:
        """Called once when training finishes (also after a stop requested by a callback)."""


class CallbackHandler:
    """Calls each registered callback's method for an event, in registration order."""

    def __init__(self, callbacks: Sequence[TrainerCallback] = ()) -> None:
        self.callbacks: List[TrainerCallback] = []
        for cb in callbacks:
            self.add(cb)

    def add(self, callback: TrainerCallback) -> None:
        """Register a callback instance (a class is instantiated with no arguments)."""
        if isinstance(callback, type):
            callback = callback()
        if not isinstance(callback, TrainerCallback):
            raise TypeError(f"callbacks must be TrainerCallback instances, got {type(callback).__name__}")
        self.callbacks.append(callback)

    def remove(self, kind: type) -> None:
        """Drop every callback of class ``kind``."""
        self.callbacks = [cb for cb in self.callbacks if not isinstance(cb, kind)]

    def fire(self, event: str, args: Any, state: TrainerState, **kwargs: Any) -> None:
        """Call ``event`` (for example ``"on_step_end"``) on every callback."""
        for cb in self.callbacks:
            getattr(cb, event)(args, state, **kwargs)


class ProgressCallback(TrainerCallback):
    """A tqdm progress bar over optimizer steps with the latest loss and learning rate."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_begin(self, args: Any, state: TrainerState, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", dynamic_ncols=True)

    def on_step_end(self, args: Any, state: TrainerState, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: TrainerState, logs: Dict[str, Any], **kwargs: Any) -> None:
        if self.bar is not None and "message" in logs:
            self.bar.write(str(logs["message"]))
        if self.bar is not None and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs.get('learning_rate', 0.0):.2e}")

    def on_train_end(self, args: Any, state: TrainerState, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonlLoggerCallback(TrainerCallback):
    """Appends every logged dict as one JSON line to ``path`` (default ``<output_dir>/log.jsonl``).

    Each line is written with a single ``write`` on a file opened in append mode, so a crash never
    leaves half a line behind another process's line, and a resumed run continues the same file.

    Args:
        path: the JSONL file; ``None`` uses ``<output_dir>/log.jsonl``.
    """

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = path

    def _target(self, args: Any) -> str:
        return self.path or os.path.join(args.output_dir, "log.jsonl")

    def on_log(self, args: Any, state: TrainerState, logs: Dict[str, Any], **kwargs: Any) -> None:
        target = self._target(args)
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        line = json.dumps({k: _json_safe(v) for k, v in logs.items()}, ensure_ascii=False) + "\n"
        fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
