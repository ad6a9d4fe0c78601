"""TrainingArguments: every knob of a fine-tuning run, with Hugging Face field names and validation."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

__all__ = ["TrainingArguments", "SCHEDULER_TYPES", "PRECISIONS"]

SCHEDULER_TYPES = ("linear", "cosine", "constant", "constant_with_warmup")
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class TrainingArguments:
    """Settings of a fine-tuning run. Names and defaults follow ``transformers.TrainingArguments``.

    Args:
        output_dir: folder for checkpoints (``checkpoint-<step>``), ``log.jsonl`` and the final model.
        learning_rate: peak learning rate of AdamW.
        weight_decay: decoupled weight decay (torch ``AdamW`` semantics). Like the HF Trainer, it is
            not applied to biases and norm weights (see :func:`qwen2ms.training.decay_parameter_names`).
        adam_beta1, adam_beta2, adam_epsilon: AdamW's betas and epsilon.
        max_grad_norm: clip the global gradient norm to this value; ``0`` or ``None`` disables clipping
            (the norm is still computed and logged).
        num_train_epochs: passes over the training set (fractions allowed); ignored when ``max_steps > 0``.
        max_steps: total optimizer steps; ``-1`` derives it from ``num_train_epochs``.
        per_device_train_batch_size: samples per micro-batch.
        per_device_eval_batch_size: samples per evaluation batch.
        gradient_accumulation_steps: micro-batches per optimizer step. The loss is normalised by the
            number of trained tokens over all micro-batches of the step, so ``N x b`` equals ``1 x N*b``.
        lr_scheduler_type: ``"linear"``, ``"cosine"``, ``"constant"`` or ``"constant_with_warmup"``
            (the same curves as ``transformers.get_scheduler``).
        warmup_steps: linear warm-up steps; when 0, ``ceil(warmup_ratio * max_steps)`` is used.
        warmup_ratio: fraction of the run spent warming up (used when ``warmup_steps`` is 0).
        logging_steps: log loss, learning rate, grad norm and tokens/s every this many steps.
        save_steps: write a checkpoint every this many steps and at the end; ``0`` disables checkpoints.
        save_total_limit: keep at most this many checkpoints; the newest and the best (lowest eval loss)
            are never deleted. ``None`` keeps all.
        eval_steps: evaluate every this many steps when an eval dataset is given. ``None`` evaluates
            before each checkpoint is written and at the end, so the best checkpoint is always known.
        seed: seeds parameter-free randomness: data shuffling, dropout and MindSpore's global RNG.
        precision: ``"fp32"``; ``"fp16"`` (fp32 master weights, fp16 compute, dynamic loss scaling that
            skips overflowing steps); ``"bf16"`` only on devices that compute in bf16 (not CPU).
        resume_from_checkpoint: a checkpoint folder, or ``True`` (or ``"latest"``) for the newest in ``output_dir``.
        lora_r: LoRA rank; ``0`` trains all weights.
        lora_alpha: LoRA scaling numerator (the update is scaled by ``lora_alpha / lora_r``).
        lora_dropout: dropout on the LoRA input path.
        lora_target_modules: linear layers to adapt, matched by the last component(s) of their
            module path (``"q_proj"`` matches ``model.layers.3.self_attn.q_proj``).
        loss_scale_init, loss_scale_factor, loss_scale_window: fp16 dynamic loss scaling: start value,
            growth/backoff factor, and finite steps before growing.
        shuffle: shuffle the training set each epoch (a permutation seeded by ``seed`` and the epoch).
        dataloader_drop_last: drop a last incomplete micro-batch of each epoch.
        disable_tqdm: no progress bar.

    Example:
        >>> args = TrainingArguments(output_dir="runs/demo", learning_rate=1e-4, max_steps=100)
        >>> args.get_warmup_steps(100)
        0
    """

    output_dir: str
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: Optional[float] = 1.0
    num_train_epochs: float = 3.0
    max_steps: int = -1
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: Optional[int] = None
    eval_steps: Optional[int] = None
    seed: int = 42
    precision: str = "fp32"
    resume_from_checkpoint: Optional[Union[str, bool]] = None
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    loss_scale_init: float = 2.0 ** 16
    loss_scale_factor: int = 2
    loss_scale_window: int = 1000
    shuffle: bool = True
    dataloader_drop_last: bool = False
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        elif isinstance(self.lora_target_modules, tuple):
            self.lora_target_modules = list(self.lora_target_modules)
        self.validate()

    def validate(self) -> None:
        """Check every field's type (strictly: no ``"10"`` for an int, no ``1.5`` steps, no ``"no"`` for a
        bool; an int is fine where a float is expected), then its value.

        Raises:
            TypeError: a field of the wrong type, naming it, the value and the expected type.
            ValueError: a field whose value cannot be used, naming it and what would be right.
        """
        from .typecheck import field_types, matches, type_problem

        types = field_types(type(self))
        types["output_dir"] = Union[str, os.PathLike]
        types["resume_from_checkpoint"] = Optional[Union[str, bool, os.PathLike]]
        for name in _FIELD_NAMES:
            problem = type_problem(getattr(self, name), types[name])
            if problem:
                error = ValueError if matches(getattr(self, name), types[name]) else TypeError  # NaN is a float
                raise error(f"TrainingArguments.{name}: {problem}")

        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"TrainingArguments.{name}={getattr(self, name)!r} is invalid: {want}")

        if not os.fspath(self.output_dir):
            raise bad("output_dir", "give a folder path for checkpoints and logs")
        self.output_dir = os.fspath(self.output_dir)
        for name in ("learning_rate", "weight_decay", "adam_epsilon", "warmup_ratio", "lora_dropout"):
            v = getattr(self, name)
            if v < 0:
                raise bad(name, "must be a finite number >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise bad(name, "must be in [0, 1)")
        if self.warmup_ratio > 1.0:
            raise bad("warmup_ratio", "must be in [0, 1]")
        if self.lora_dropout >= 1.0:
            raise bad("lora_dropout", "must be in [0, 1)")
        if self.max_grad_norm is not None and (not isinstance(self.max_grad_norm, (int, float)) or self.max_grad_norm < 0):
            raise bad("max_grad_norm", "must be >= 0 (0 or None disables clipping)")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "loss_scale_factor", "loss_scale_window"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise bad(name, "must be an integer >= 1")
        for name in ("warmup_steps", "save_steps", "lora_r", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, "must be an integer >= 0")
        if not isinstance(self.max_steps, int) or self.max_steps == 0 or self.max_steps < -1:
            raise bad("max_steps", "must be a positive integer, or -1 to use num_train_epochs")
        if self.max_steps == -1 and (not isinstance(self.num_train_epochs, (int, float)) or self.num_train_epochs <= 0):
            raise bad("num_train_epochs", "must be > 0 when max_steps is -1")
        if self.save_total_limit is not None and (not isinstance(self.save_total_limit, int) or self.save_total_limit < 1):
            raise bad("save_total_limit", "must be an integer >= 1, or None to keep every checkpoint")
        if self.eval_steps is not None and (not isinstance(self.eval_steps, int) or self.eval_steps < 1):
            raise bad("eval_steps", "must be an integer >= 1, or None")
        if self.lr_scheduler_type not in SCHEDULER_TYPES:
            raise bad("lr_scheduler_type", f"choose one of {list(SCHEDULER_TYPES)}")
        if self.precision not in PRECISIONS:
            raise bad("precision", f"choose one of {list(PRECISIONS)}")
        if self.loss_scale_init < 1:
            raise bad("loss_scale_init", "must be >= 1")
        if self.lora_r and not self.lora_target_modules:
            raise bad("lora_target_modules", "name at least one linear layer (for example ['q_proj', 'v_proj'])")
        if self.lora_r and self.lora_alpha <= 0:
            raise bad("lora_alpha", "must be > 0")
        if self.resume_from_checkpoint == "":
            raise bad("resume_from_checkpoint", "give a checkpoint folder, True (or 'latest') for the newest, or None")

    def get_warmup_steps(self, num_training_steps: int) -> int:
        """Warm-up length for a run of ``num_training_steps`` optimizer steps.

        Args:
            num_training_steps: total optimizer steps.

        Returns:
            ``warmup_steps`` if set, else ``ceil(warmup_ratio * num_training_steps)``.
        """
        if self.warmup_steps > 0:
            return self.warmup_steps
        return int(math.ceil(num_training_steps * self.warmup_ratio))

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    def to_json_string(self) -> str:
        """The fields as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "TrainingArguments":
        """Build from a dict (for example a YAML ``training:`` section); unknown keys are an error.

        Args:
            data: field name -> value.

        Returns:
            The validated arguments.

        Raises:
            ValueError: a key that is not a field (the message lists the nearest valid names).
        """
        import difflib

        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            hints = {k: difflib.get_close_matches(k, names, n=2) for k in unknown}
            raise ValueError(f"unknown TrainingArguments field(s) {unknown}; did you mean {hints}? "
                             f"Valid fields: {sorted(names)}")
        return cls(**data)


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainingArguments))
