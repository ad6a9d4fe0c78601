"""Trainer: compiled supervised fine-tuning with AdamW, schedules, exact gradient accumulation, fp16, resume and hooks.

The train step (forward, backward, gradient accumulation, clipping, the AdamW update and the fp16
loss-scale update) is one ``ms.jit``-compiled call per micro-batch (the Cells in
:mod:`qwen2ms.training.steps`); PyNative would be ~70x slower on CPU. Everything around it (data
order, logging, checkpoints) is plain Python, here.

Override points for subclasses (public API):

- :meth:`Trainer.compute_loss` — traced *inside* the compiled step, so it must use MindSpore ops
  (no NumPy, no Python side effects); it returns this micro-batch's share of the step loss.
- :meth:`Trainer.training_step` — runs one micro-batch through the compiled step.
- :meth:`Trainer.create_optimizer`, :meth:`Trainer.create_scheduler`,
  :meth:`Trainer.get_train_dataloader`, :meth:`Trainer.get_eval_dataloader`, :meth:`Trainer.log`.

Callbacks (:class:`~qwen2ms.training.callbacks.TrainerCallback`) receive on_train_begin, on_step_end,
on_log, on_save, on_evaluate and on_train_end.

A model built by :func:`qwen2ms.parallel.parallelize` (data, tensor, sequence, expert and pipeline parallel;
every process of an ``msrun`` job runs the same Trainer) trains the same way: each data-parallel
replica reads its rows of the global batch, the loss is normalised by the token count of the whole
global batch, gradients go through the model's ``grad_sync`` and are clipped with its global
``grad_norm``, and checkpoints hold one shard per rank plus, from rank 0, the trainer state (and a
merged Hugging Face folder for :meth:`Trainer.save_model`). Pipeline stages (a
:class:`~qwen2ms.parallel.pipeline.PipelineCausalLM`) train through its GPipe ``forward_backward``
instead of the compiled forward/backward; the gradient sync, global-norm clipping, AdamW update and
fp16 loss-scale update after it are still one compiled call. With ``optimizer_shard`` the AdamW
state is sharded over data parallel (:class:`qwen2ms.parallel.optimizer.ZeroOptimizer`, inside the
compiled step). See :func:`check_parallel_layout` for what is not driven by the Trainer.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from ..errors import Qwen2msError
from .arguments import TrainingArguments
from .callbacks import CallbackHandler, JsonlLoggerCallback, ProgressCallback, TrainerCallback, TrainerState
from .checkpointing import (
    CheckpointError,
    assign_parameters,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_tensors,
    publish_checkpoint_dir,
    remove_stale_temporaries,
    restore_rng_state,
    rotate_checkpoints,
    save_tensors,
    staging_dir,
    write_checkpoint_dir,
    write_json,
)
from .loss_scale import DynamicLossScale
from .optim import AdamW, LRSchedule, decay_parameter_names, get_scheduler
from .steps import EvalStep, ParallelTrainStep, PipelineUpdate, TrainStep

__all__ = ["Trainer", "TrainOutput", "SFTDataLoader", "NonFiniteLossError", "IGNORE_INDEX", "check_parallel_layout"]

IGNORE_INDEX = -100
#: fp16: this many overflowing (skipped) steps in a row means the model itself overflows: stop.
MAX_CONSECUTIVE_SKIPPED = 64
_PRECISION_DTYPES = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}
_DTYPE_WORDS = {ms.float32: "float32", ms.float16: "float16", ms.bfloat16: "bfloat16"}


class NonFiniteLossError(Qwen2msError, RuntimeError):
    """Training produced an inf/NaN loss; the message names the step and the last good checkpoint."""


@dataclass
class TrainOutput:
    """What :meth:`Trainer.train` returns.

    Attributes:
        global_step: optimizer steps done in total (including before a resume).
        training_loss: mean step loss over the steps of this call (NaN when none ran).
        metrics: ``train_runtime`` (seconds, compilation included), ``train_steps`` and
            ``train_tokens`` (optimizer steps and trained tokens of this call, not counting those
            before a resume), ``train_tokens_per_second`` (``train_tokens / train_runtime``; 0.0
            when no step ran) and the last ``eval_loss``.
        already_finished: the run had reached ``max_steps`` before this call (a resume of a
            finished run), so no step ran.
    """

    global_step: int
    training_loss: float
    metrics: Dict[str, float] = field(default_factory=dict)
    already_finished: bool = False


class SFTDataLoader:
    """Batches of a map-style dataset in a per-epoch order that can restart at any micro-batch.

    The order of epoch ``e`` is a permutation drawn from ``seed + e`` (or the identity without
    shuffling), so the data position of a checkpoint is just ``(epoch, micro-batch index)``.

    Args:
        dataset: a sequence of samples (dicts with ``input_ids``, ``labels`` and optionally
            ``attention_mask`` / ``position_ids`` / ``segment_ids``).
        batch_size: samples per micro-batch.
        collate_fn: samples -> dict of NumPy arrays (e.g. :class:`qwen2ms.data.DataCollatorForSFT`).
        shuffle: permute each epoch.
        seed: base seed of the permutations.
        drop_last: drop an incomplete last micro-batch.

    Example:
        >>> dl = SFTDataLoader(samples, 4, DataCollatorForSFT(151643))  # doctest: +SKIP
        >>> batch = next(dl.iter_epoch(0, start=2))  # the third micro-batch of epoch 0  # doctest: +SKIP
    """

    def __init__(self, dataset: Sequence[Dict[str, Any]], batch_size: int,
                 collate_fn: Callable[[List[Dict[str, Any]]], Dict[str, np.ndarray]],
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False) -> None:
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"the dataset must support len() and indexing (a list of samples), "
                            f"got {type(dataset).__name__}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.collate_fn = collate_fn
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> List[int]:
        """Sample indices of ``epoch`` in visiting order."""
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        return np.random.default_rng(self.seed + int(epoch)).permutation(n).tolist()

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[Dict[str, np.ndarray]]:
        """Collated micro-batches of ``epoch`` from micro-batch index ``start`` on."""
        order = self.order(epoch)
        for b in range(int(start), len(self)):
            idx = order[b * self.batch_size: (b + 1) * self.batch_size]
            yield self.collate_fn([self.dataset[i] for i in idx])


def _is_pipeline(model: nn.Cell) -> bool:
    """Whether ``model`` is one stage of a pipeline layout (trained with ``forward_backward``)."""
    return hasattr(model, "forward_backward") and getattr(model, "parallel_config", None) is not None


def _parallel_layout(model: nn.Cell):
    """The ParallelConfig of a model built by ``qwen2ms.parallel.parallelize``, or None for a one-device model."""
    pc = getattr(model, "parallel_config", None)
    if pc is None or not hasattr(model, "grad_sync") or not hasattr(model, "groups"):
        return None
    return pc


def check_parallel_layout(parallel_config: Any, lora_r: int = 0) -> None:
    """Refuse what the Trainer does not combine with a parallel layout, naming what works.

    The Trainer trains data, tensor, sequence, expert and pipeline parallel layouts
    (``data_parallel``, ``model_parallel``, ``use_seq_parallel``, ``expert_parallel``,
    ``pipeline_stage`` with ``micro_batch_num``, ``vocab_emb_dp``, ``recompute``), in fp32 or fp16,
    and shards the AdamW state over data parallel with ``optimizer_shard`` (ZeRO-1). LoRA adapters
    are not sharded by the parallel plans.

    Args:
        parallel_config: a :class:`qwen2ms.parallel.ParallelConfig`.
        lora_r: the run's ``TrainingArguments.lora_r``.

    Raises:
        ValueError: ``lora_r > 0``.

    Example:
        >>> from qwen2ms.parallel import ParallelConfig
        >>> check_parallel_layout(ParallelConfig(data_parallel=2, pipeline_stage=2, micro_batch_num=2))
    """
    if lora_r > 0:
        raise ValueError(f"lora_r={lora_r} with a parallel layout ({parallel_config.to_dict()}): LoRA adapters are not "
                         "sharded by the parallel plans; train LoRA on one device (parallel degrees 1) or fully "
                         "fine-tune with the layout (lora_r: 0)")


def _count_targets(batch: Dict[str, np.ndarray]) -> int:
    """Tokens that contribute to the loss: shifted labels that are not -100."""
    labels = np.asarray(batch["labels"])
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _check_batch(batch: Dict[str, np.ndarray], vocab_size: Optional[int], where: str) -> None:
    """Refuse a collated batch with ids the model cannot embed or predict, before it reaches the compiled step.

    The sample-level check (:func:`qwen2ms.data.check_samples`) already covers datasets of token
    samples; this one (two reductions per column) also covers custom collators and samples that
    change after the check.
    """
    from ..data import SampleError

    for key in ("input_ids", "labels"):
        arr = np.asarray(batch[key])
        if arr.dtype.kind not in "iu":
            raise SampleError(f"{where}: {key!r} has dtype {arr.dtype}; token ids must be integers")
        bad = arr < 0 if key == "input_ids" else (arr < 0) & (arr != IGNORE_INDEX)
        if vocab_size is not None:
            bad = bad | (arr >= vocab_size)
        if bad.any():
            row, col = (int(i[0]) for i in np.nonzero(bad))
            what = "ids must be in" if key == "input_ids" else "labels must be -100 or in"
            raise SampleError(f"{where}, row {row}: {key}[{col}] = {int(arr[row, col])} is outside the vocabulary "
                              f"(vocab_size={vocab_size}): {what} [0, {vocab_size - 1 if vocab_size else 'vocab_size'}]")


def _count_input_tokens(batch: Dict[str, np.ndarray]) -> int:
    """Real (non-padding) input tokens of a batch, for tokens/s."""
    if "attention_mask" in batch:
        return int(np.asarray(batch["attention_mask"]).sum())
    if "segment_ids" in batch:
        return int((np.asarray(batch["segment_ids"]) > 0).sum())
    return int(np.asarray(batch["input_ids"]).size)


def _make_output_dir(path: str) -> None:
    """Create the run folder, or say why it cannot be one."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"TrainingArguments.output_dir={path!r} is a file, not a folder; choose a folder path for "
                         f"checkpoints and logs")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ValueError(f"TrainingArguments.output_dir={path!r} cannot be created: {e.strerror or e}; choose a "
                         f"folder you can write to") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"TrainingArguments.output_dir={path!r} is not writable; choose a folder you can write to")


def _round_up(n: int, multiple: int) -> int:
    return int(n) + (-int(n) % int(multiple))


def _pad_rows(batch: Dict[str, np.ndarray], rows: int) -> Dict[str, np.ndarray]:
    """The batch with copies of its first row appended up to ``rows`` rows, each marked as padding.

    A padding row has every label ignored and, when the batch has an ``attention_mask``, every token
    masked: it adds nothing to the cross-entropy or its gradients, nor to an MoE router's
    load-balancing loss (which counts the unmasked tokens). Without an ``attention_mask`` (packed
    rows) that loss would count its tokens. A batch already ``rows`` rows high (or higher) is returned
    as it is.
    """
    have = int(np.asarray(batch["input_ids"]).shape[0])
    extra = int(rows) - have
    if extra <= 0:
        return batch
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        filler = np.repeat(v[:1], extra, axis=0)
        if k == "labels":
            filler = np.full_like(filler, IGNORE_INDEX)
        elif k == "attention_mask":
            filler = np.zeros_like(filler)
        out[k] = np.concatenate([v, filler], axis=0)
    return out


class Trainer:
    """Supervised fine-tuning of a qwen2ms model (full or LoRA) with a compiled train step.

    Args:
        model: a :class:`qwen2ms.Qwen2ForCausalLM`, also as returned by :func:`qwen2ms.parallel.parallelize`
            (:meth:`compute_loss` calls its ``token_loss``). With ``args.lora_r > 0`` LoRA adapters are
            injected into it (base weights frozen) unless it already has them.
        args: the :class:`TrainingArguments`.
        train_dataset: a sequence of tokenised samples (``input_ids``, ``labels`` with -100 on
            untrained tokens; packed rows also ``position_ids`` and ``segment_ids``).
        eval_dataset: samples for :meth:`evaluate` (eval loss, best-checkpoint tracking).
        data_collator: samples -> batch dict; default :class:`qwen2ms.data.DataCollatorForSFT`
            with the model's pad token (dynamic padding to a multiple of 8).
        callbacks: extra :class:`TrainerCallback` instances (a progress bar and the JSONL logger
            are always added).
        optimizers: ``(optimizer, scheduler)`` to use instead of :meth:`create_optimizer` /
            :meth:`create_scheduler`; either may be None.

    With a model from :func:`qwen2ms.parallel.parallelize` (run under ``msrun``, every rank builds the
    same Trainer on the same full dataset), ``per_device_train_batch_size`` is per data-parallel
    replica: the loader draws global batches of ``per_device_train_batch_size * data_parallel`` in the
    order a single process would, and each replica trains on its rows. Only rank 0 writes
    ``log.jsonl``, shows progress and writes the trainer state; LoRA is not combined with a layout.
    A pipeline stage (``pipeline_stage > 1``) runs each micro-batch of the loader through
    ``forward_backward`` in ``micro_batch_num`` pipeline micro-batches (rows padded to a multiple of
    it with ignored rows), so :meth:`compute_loss` is not used there.

    An epoch's last micro-batch, when short, is padded to the full batch with padding rows (labels
    ignored, attention masked): it reuses the compiled step instead of compiling one for its own
    shape, and the loss and gradients are those of its real rows.

    Example:
        >>> args = TrainingArguments("runs/demo", learning_rate=1e-3, max_steps=50, logging_steps=10)
        >>> trainer = Trainer(model, args, train_dataset=samples)  # doctest: +SKIP
        >>> trainer.train().training_loss  # doctest: +SKIP
    """

    def __init__(self, model: nn.Cell, args: TrainingArguments, train_dataset: Optional[Sequence[Dict[str, Any]]] = None,
                 eval_dataset: Optional[Sequence[Dict[str, Any]]] = None, data_collator: Optional[Callable] = None,
                 callbacks: Optional[Sequence[TrainerCallback]] = None,
                 optimizers: Tuple[Optional[nn.Cell], Optional[LRSchedule]] = (None, None)) -> None:
        if not isinstance(args, TrainingArguments):
            raise TypeError(f"args must be a TrainingArguments, got {type(args).__name__}")
        args.validate()  # fields may have been changed after construction
        self.model = model
        self.args = args
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.data_collator = data_collator or self._default_collator()
        self.optimizer, self.lr_scheduler = optimizers
        self.state = TrainerState()
        self.parallel_config = _parallel_layout(model)
        self._pipeline = self.parallel_config is not None and _is_pipeline(model)
        if self.parallel_config is not None:
            check_parallel_layout(self.parallel_config, args.lora_r)
        main = self.is_world_process_zero()
        handlers: List[TrainerCallback] = [JsonlLoggerCallback()] if main else []
        if not args.disable_tqdm and main:
            handlers.append(ProgressCallback())
        self.callback_handler = CallbackHandler(handlers + list(callbacks or []))
        self.lora_config = None
        self._check_device_precision()
        ms.set_seed(args.seed)
        np.random.seed(args.seed)
        if args.lora_r > 0:
            from .lora import LoraConfig, apply_lora, lora_modules

            if not lora_modules(model):
                self.lora_config = LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                              target_modules=list(args.lora_target_modules))
                apply_lora(model, self.lora_config, dtype=_PRECISION_DTYPES[args.precision]
                           if args.precision != "bf16" else ms.float32)
            else:
                self.lora_config = lora_modules(model)[0][1].config
        self._check_param_dtypes()
        if self.parallel_config is not None and len(self._trainable()) != model.grad_sync.n:
            raise ValueError(f"the parallel model has {len(self._trainable())} trainable parameters but its grad_sync "
                             f"was built for {model.grad_sync.n}: freeze or unfreeze parameters before parallelize()")
        self._train_step: Optional[TrainStep] = None
        self._eval_step: Optional[EvalStep] = None
        self._loss_scale: Optional[DynamicLossScale] = None
        self._last_grad_norm = 0.0
        self._last_finite = True
        self._micro_position = (True, True)
        self._pipeline_update: Optional[PipelineUpdate] = None
        self._pipeline_grads: Optional[Tuple[Tensor, ...]] = None
        self._checked: Dict[str, Tuple[Any, int, Any]] = {}
        self._state_data: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ set-up helpers
    def is_world_process_zero(self) -> bool:
        """Whether this process is rank 0 of the job (always True for a one-device model): it logs and saves state."""
        return self.parallel_config is None or self.model.groups.rank == 0

    def _default_collator(self) -> Callable:
        from ..data import DataCollatorForSFT

        cfg = getattr(self.model, "config", None)
        pad = getattr(cfg, "pad_token_id", None)
        if pad is None:
            pad = 151643  # <|endoftext|>, Qwen2's padding token
        vocab = getattr(cfg, "vocab_size", None)
        if vocab is not None and pad >= vocab:
            pad = 0  # a tiny test vocabulary: padded positions are masked out anyway
        return DataCollatorForSFT(pad_token_id=int(pad), pad_to_multiple_of=8)

    def _check_device_precision(self) -> None:
        if self.args.precision == "bf16" and ms.get_context("device_target") == "CPU":
            raise ValueError("precision='bf16' needs a device that computes in bfloat16; MindSpore on CPU can only "
                             "store bfloat16 (matmul/softmax are unsupported). Use precision='fp32' or 'fp16'.")

    def _trainable(self) -> List[Parameter]:
        return [p for p in self.model.trainable_params()]

    def _vocab_size(self) -> Optional[int]:
        v = getattr(getattr(self.model, "config", None), "vocab_size", None)
        return int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else None

    def check_dataset(self, dataset: Sequence[Dict[str, Any]], name: str = "train_dataset") -> Optional[Any]:
        """Check a dataset of token samples once before it is used (:func:`qwen2ms.data.check_samples`).

        Every sample is read once, vectorised (about 0.1 s per 1,000 samples of 1,024 tokens held as
        lists, 0.03 s as arrays), so no bad id reaches the compiled step and a dataset in which
        no token is trained is refused instead of "training" at loss 0.0. The result is remembered
        for the same dataset object and length, so :meth:`evaluate` does not re-read it. Datasets
        whose samples are not token mappings (a custom ``data_collator`` that tokenises) are left to
        the per-batch check of the training loop.

        Args:
            dataset: the samples.
            name: how messages call it (``"train_dataset"``, ``"eval_dataset"``).

        Returns:
            The :class:`qwen2ms.data.DatasetStats`, or None when the samples are not token mappings.

        Raises:
            qwen2ms.data.SampleError: a sample with an id outside the vocabulary, a label that is
                neither -100 nor a token id, non-integer ids or unequal column lengths.
            qwen2ms.data.UntrainedDatasetError: no token of the dataset is trained.
        """
        from ..data import DataCollatorForSFT, check_samples

        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"the {name} must support len() and indexing (a list of samples), got "
                            f"{type(dataset).__name__}")
        seen = self._checked.get(name)
        if seen is not None and seen[0] is dataset and seen[1] == len(dataset):
            return seen[2]
        first = dataset[0] if len(dataset) else None
        tokens = isinstance(first, dict) and "input_ids" in first and "labels" in first
        if not tokens and len(dataset) and not isinstance(self.data_collator, DataCollatorForSFT):
            return None
        stats = check_samples(dataset, self._vocab_size(), name)
        self._checked[name] = (dataset, len(dataset), stats)
        return stats

    def _check_param_dtypes(self) -> None:
        params = self._trainable()
        if not params:
            raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
        want = _PRECISION_DTYPES[self.args.precision]
        bad = [p for p in params if p.dtype != want]
        if bad:
            have = _DTYPE_WORDS.get(bad[0].dtype, str(bad[0].dtype))
            raise ValueError(
                f"precision={self.args.precision!r} trains parameters stored as {_DTYPE_WORDS[want]}, but "
                f"{len(bad)} trainable parameters are {have} (e.g. {bad[0].name!r}). Build or load the model with "
                f"dtype='{_DTYPE_WORDS[want]}' (fp32 master weights are kept by the optimizer for fp16), or choose "
                f"the precision that matches the weights.")

    # ------------------------------------------------------------------ override points
    def get_train_dataloader(self) -> SFTDataLoader:
        """The micro-batch loader over ``train_dataset`` (override to change sampling or batching).

        Returns:
            An object with ``__len__`` (micro-batches per epoch) and ``iter_epoch(epoch, start)``.
        """
        if self.train_dataset is None:
            raise ValueError("Trainer.train() needs a train_dataset")
        if len(self.train_dataset) == 0:
            raise ValueError("the train_dataset is empty")
        batch = self.args.per_device_train_batch_size
        if self.parallel_config is not None:
            batch *= self.parallel_config.data_parallel  # global batches; training_step keeps this replica's rows
        return SFTDataLoader(self.train_dataset, batch, self.data_collator,
                             shuffle=self.args.shuffle, seed=self.args.seed, drop_last=self.args.dataloader_drop_last)

    def get_eval_dataloader(self, eval_dataset: Optional[Sequence[Dict[str, Any]]] = None) -> SFTDataLoader:
        """The evaluation loader (in order, no shuffling)."""
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None:
            raise ValueError("evaluate() needs an eval_dataset (pass it to Trainer or to evaluate())")
        return SFTDataLoader(ds, self.args.per_device_eval_batch_size, self.data_collator, shuffle=False)

    def create_optimizer(self) -> nn.Cell:
        """AdamW over the trainable parameters; weight decay skips biases and norms (HF's rule).

        With a parallel layout whose ``optimizer_shard`` is set and ``data_parallel > 1`` the AdamW
        runs on this rank's slice of every parameter (:class:`qwen2ms.parallel.optimizer.ZeroOptimizer`,
        ZeRO-1: the moments shrink ``data_parallel`` times; the update is the same).

        Returns:
            The optimizer Cell, called inside the compiled step as ``optimizer(grads, lr)``.
        """
        params = self._trainable()
        decay = set(decay_parameter_names([p.name for p in params]))
        mask = [p.name in decay for p in params]
        a = self.args

        def adamw(ps: Sequence[Parameter]) -> AdamW:
            return AdamW(ps, betas=(a.adam_beta1, a.adam_beta2), eps=a.adam_epsilon, weight_decay=a.weight_decay,
                         decay_mask=mask)

        pc = self.parallel_config
        if pc is not None and pc.optimizer_shard and self.model.groups.dp.size > 1:
            from ..parallel.optimizer import ZeroOptimizer, shard_groups

            return ZeroOptimizer(params, adamw, shard_groups(self.model))
        return adamw(params)

    def create_scheduler(self, num_training_steps: int) -> LRSchedule:
        """The learning-rate schedule for a run of ``num_training_steps`` optimizer steps."""
        a = self.args
        return get_scheduler(a.lr_scheduler_type, a.learning_rate, a.get_warmup_steps(num_training_steps),
                             num_training_steps)

    def compute_loss(self, model: nn.Cell, inputs: Dict[str, Tensor], num_items_in_batch: Tensor) -> Tensor:
        """This micro-batch's loss: summed token cross-entropy (fp32) / trained tokens of the whole step.

        Runs inside the compiled train step: use MindSpore ops only, no Python side effects, and
        read only ``self.args`` (the graph sees a stand-in of the trainer holding just ``args``, so
        per-step trainer state cannot force recompiles). Dividing by the token count of
        all accumulated micro-batches, not of this one, is what makes ``N x b`` accumulation equal to
        one batch of ``N*b``. For MoE models with ``output_router_logits`` the weighted aux loss is
        added in proportion to this micro-batch's share of the tokens.

        The summed cross-entropy comes from the model's ``token_loss`` (vocabulary parallel when
        :func:`qwen2ms.parallel.parallelize` split the head). For a parallelized model
        ``num_items_in_batch`` counts the whole global batch, so this is this rank's share of the job's
        loss; under data parallel the MoE aux loss is each replica's own, weighted by its share of the
        tokens.

        Args:
            model: the model Cell.
            inputs: ``input_ids``, ``labels`` and optionally ``attention_mask``, ``position_ids``,
                ``segment_ids`` (int32 tensors ``[B, T]``).
            num_items_in_batch: float32 scalar, trained tokens over the whole optimizer step.

        Returns:
            A float32 scalar.
        """
        attention_mask = None
        position_ids = None
        segment_ids = None
        if "attention_mask" in inputs:
            attention_mask = inputs["attention_mask"]
        if "position_ids" in inputs:
            position_ids = inputs["position_ids"]
        if "segment_ids" in inputs:
            segment_ids = inputs["segment_ids"]
        total, count, aux = model.token_loss(inputs["input_ids"], inputs["labels"], attention_mask, position_ids,
                                             segment_ids)
        loss = total / num_items_in_batch
        if model.is_moe:
            loss = loss + model.router_aux_loss_coef * aux * (count / num_items_in_batch)
        return loss

    def training_step(self, model: nn.Cell, inputs: Dict[str, np.ndarray], num_items_in_batch: int) -> float:
        """Run one micro-batch through the compiled step and return its loss contribution.

        The compiled call does forward and backward, adds the gradients to the accumulation buffers
        and, on the last micro-batch of an optimizer step, clips, applies AdamW (skipped when a
        gradient is inf/NaN) and updates the fp16 loss scale. Which micro-batch of the step this is
        comes from the trainer's loop.

        Args:
            model: the model (the compiled step is bound to ``self.model``).
            inputs: a collated batch of NumPy arrays.
            num_items_in_batch: trained tokens over the whole optimizer step.

        Returns:
            The micro-batch's loss contribution (the step loss is their sum).
        """
        first, last = self._micro_position
        if self._pipeline:
            return self._pipeline_step(self._replica_rows(inputs), num_items_in_batch, first, last)
        if self.parallel_config is not None:
            inputs = self._replica_rows(inputs)
        # mutable(): a plain dict argument is a compile-time constant (a recompile per batch).
        tensors = ms.mutable({k: Tensor(np.asarray(v, dtype=np.int32)) for k, v in inputs.items()})
        lr = Tensor(self.lr_scheduler.get_last_lr(), ms.float32)
        n = Tensor(float(max(1, num_items_in_batch)), ms.float32)
        loss, norm, finite = self._compiled_step(tensors, n, lr, first, last)
        if last:
            self._last_grad_norm = float(norm.asnumpy())
            self._last_finite = bool(finite.asnumpy())
        return float(loss.asnumpy())

    def _pipeline_step(self, inputs: Dict[str, np.ndarray], num_items_in_batch: int, first: bool, last: bool
                       ) -> float:
        """One micro-batch through the GPipe schedule; on the step's last, the compiled sync/clip/update."""
        from ..parallel.comm import all_reduce

        batch = _pad_rows(inputs, _round_up(len(inputs["input_ids"]), self.parallel_config.micro_batch_num))
        # fp16: dividing the token count by the loss scale multiplies the loss (and its gradients) by it
        scale = float(self._loss_scale.scale.asnumpy()) if self._loss_scale is not None else 1.0
        loss, grads = self.model.forward_backward(
            batch["input_ids"], batch["labels"], batch.get("attention_mask"), batch.get("position_ids"),
            batch.get("segment_ids"), num_items=float(max(1, num_items_in_batch)) / scale, sync=False)
        loss = loss / scale
        grads = tuple(g.astype(ms.float32) for g in grads)
        if not first and self._pipeline_grads is not None:
            grads = tuple(a + g for a, g in zip(self._pipeline_grads, grads))
        self._pipeline_grads = grads
        if self.model.groups.dp.size > 1:
            loss = all_reduce(loss, "sum", self.model.groups.dp)  # every replica's share of the global loss
        if last:
            lr = Tensor(self.lr_scheduler.get_last_lr(), ms.float32)
            norm, finite = self._compiled_update(grads, lr)
            self._pipeline_grads = None
            self._last_grad_norm = float(norm.asnumpy())
            self._last_finite = bool(finite.asnumpy())
        return float(loss.asnumpy())

    def _replica_rows(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """This data-parallel replica's rows of a global batch (``ceil(rows / dp)`` each, in rank order).

        A batch whose rows do not split evenly is first padded with padding rows (:func:`_pad_rows`), so
        every replica keeps one shape.
        """
        pc = self.parallel_config
        dp, d = pc.data_parallel, self.model.groups.dp_rank
        per = -(-int(np.asarray(batch["input_ids"]).shape[0]) // dp)
        out = {k: np.asarray(v)[d * per:(d + 1) * per] for k, v in _pad_rows(batch, per * dp).items()}
        width = out["input_ids"].shape[1]
        if pc.use_seq_parallel and pc.model_parallel > 1 and width % pc.model_parallel:
            raise ValueError(f"use_seq_parallel splits the sequence over model_parallel={pc.model_parallel} ranks, but "
                             f"this batch is {width} tokens wide; pad batches to a multiple of {pc.model_parallel} "
                             f"(the collator's pad_to_multiple_of, data.pad_to_multiple_of in a run config)")
        return out

    def _fill_short_batch(self, batch: Dict[str, np.ndarray], rows: int) -> Dict[str, np.ndarray]:
        """``batch`` padded to the loader's ``rows`` with padding rows (:func:`_pad_rows`) when it is shorter.

        An epoch's last micro-batch is usually short; padded, it runs through the step already compiled
        for full batches instead of compiling (and keeping) a second graph for its own shape. The
        padding adds nothing to the loss or its gradients. It is skipped where it would change the loss:
        an MoE model's load-balancing loss over a batch without ``attention_mask`` (packed rows), whose
        tokens that loss counts one by one.
        """
        if not rows:
            return batch
        model = self.model
        moe_aux = bool(getattr(model, "is_moe", False)) and bool(getattr(model, "default_router_logits", False))
        if moe_aux and "attention_mask" not in batch:
            return batch
        return _pad_rows(batch, rows)

    def log(self, logs: Dict[str, Any]) -> None:
        """Record a dict of metrics: adds ``step``, appends to ``state.log_history``, fires ``on_log``."""
        entry = dict(logs)
        entry.setdefault("step", self.state.global_step)
        self.state.log_history.append(entry)
        self.callback_handler.fire("on_log", self.args, self.state, logs=entry, trainer=self)

    # ------------------------------------------------------------------ compiled pieces
    def _build(self, num_training_steps: int) -> None:
        if self.optimizer is None:
            self.optimizer = self.create_optimizer()
        if self.lr_scheduler is None:
            self.lr_scheduler = self.create_scheduler(num_training_steps)
        if self.args.precision == "fp16" and self._loss_scale is None:
            a = self.args
            self._loss_scale = DynamicLossScale(a.loss_scale_init, a.loss_scale_factor, a.loss_scale_window)
        if self._pipeline:
            if self._pipeline_update is None:
                self._pipeline_update = PipelineUpdate(self.model, self.optimizer, self._loss_scale,
                                                        self.args.max_grad_norm or 0.0)
                self._compiled_update = ms.jit(self._pipeline_update.construct)
            return
        if self._train_step is None:
            params = list(getattr(self.optimizer, "params", self._trainable()))
            step_cls = TrainStep if self.parallel_config is None else ParallelTrainStep
            self._train_step = step_cls(self, self.model, params, self.optimizer, self._loss_scale,
                                        self.args.max_grad_norm or 0.0, self.args.gradient_accumulation_steps > 1)
            # One graph per batch shape (ms.jit(dynamic=1) measured no better here: it still
            # recompiled per shape); the collator's pad_to_multiple_of keeps the shapes few.
            self._compiled_step = ms.jit(self._train_step.construct)

    # ------------------------------------------------------------------ training loop
    def train(self, resume_from_checkpoint: Optional[Union[str, bool]] = None) -> TrainOutput:
        """Train until ``max_steps`` (or ``num_train_epochs``) optimizer steps are done.

        Args:
            resume_from_checkpoint: a checkpoint folder, or True for the newest in ``output_dir``
                (default: ``args.resume_from_checkpoint``). The run then continues exactly where the
                checkpoint left off: same weights, optimizer moments, schedule, RNG and data position.

        Returns:
            A :class:`TrainOutput`.

        Raises:
            NonFiniteLossError: the loss became inf/NaN (fp32), or fp16 overflow persisted; the
                message names the step and the last good checkpoint, whose files are kept.
        """
        args = self.args
        dl = self.get_train_dataloader()
        n_micro = len(dl)
        if n_micro == 0:
            raise ValueError(f"the train_dataset has {len(self.train_dataset)} samples: not one micro-batch of "
                             f"{args.per_device_train_batch_size} with dataloader_drop_last=True")
        # Before any compile: a bad id or an all-masked dataset is a data error, found in seconds.
        self.check_dataset(self.train_dataset, "train_dataset")
        if self.eval_dataset is not None:
            self.check_dataset(self.eval_dataset, "eval_dataset")
        vocab = self._vocab_size()
        ga = args.gradient_accumulation_steps
        rows = int(getattr(dl, "batch_size", 0) or 0)  # a custom loader without batch_size: no padding
        steps_per_epoch = max(1, -(-n_micro // ga))
        max_steps = args.max_steps if args.max_steps > 0 else int(math.ceil(args.num_train_epochs * steps_per_epoch))
        self.state = TrainerState(max_steps=max_steps, num_update_steps_per_epoch=steps_per_epoch)
        _make_output_dir(args.output_dir)
        remove_stale_temporaries(args.output_dir)
        resume = resume_from_checkpoint if resume_from_checkpoint is not None else args.resume_from_checkpoint
        if isinstance(resume, str) and resume == "latest":
            resume = True
        self._build(max_steps)
        self.model.set_train(True)
        if resume:
            path = latest_checkpoint(args.output_dir) if resume is True else Path(resume)
            if path is None:
                raise CheckpointError(f"resume_from_checkpoint=True but {args.output_dir!r} has no checkpoint-* folder")
            self._load_checkpoint(Path(path))
            self.state.max_steps = max_steps

        already_finished = self.state.global_step >= max_steps
        self.callback_handler.fire("on_train_begin", args, self.state, trainer=self)
        if already_finished:
            self.log({"message": f"nothing to train: the run is at step {self.state.global_step}, which already "
                                 f"reaches max_steps={max_steps}; raise max_steps to train further"})
        start_time = time.perf_counter()
        start_step = self.state.global_step
        start_tokens = self.state.trained_tokens
        losses: List[float] = []
        window = {"loss": 0.0, "steps": 0, "tokens": 0, "t0": time.perf_counter()}
        skipped_in_row = 0
        skipped_total = 0
        last_saved = None
        it = dl.iter_epoch(self.state.epoch, self.state.step_in_epoch)
        try:
            while self.state.global_step < max_steps:
                group: List[Dict[str, np.ndarray]] = []
                while len(group) < ga:
                    if self.state.step_in_epoch + len(group) >= n_micro:
                        break
                    group.append(next(it))
                if not group:
                    self.state.epoch += 1
                    self.state.step_in_epoch = 0
                    it = dl.iter_epoch(self.state.epoch, 0)
                    continue
                for i, batch in enumerate(group):
                    _check_batch(batch, vocab, f"train_dataset epoch {self.state.epoch} micro-batch "
                                               f"{self.state.step_in_epoch + i}")
                num_items = sum(_count_targets(b) for b in group)
                lr_used = self.lr_scheduler.get_last_lr()
                step_loss = 0.0
                for i, batch in enumerate(group):
                    self._micro_position = (i == 0, i == len(group) - 1)
                    step_loss += self.training_step(self.model, self._fill_short_batch(batch, rows), num_items)
                step_no = self.state.global_step + 1
                if not math.isfinite(step_loss) or (not self._last_finite and args.precision != "fp16"):
                    raise NonFiniteLossError(self._nonfinite_message(step_loss, step_no, len(group)))
                if not self._last_finite:
                    skipped_in_row += 1
                    skipped_total += 1
                    if skipped_in_row >= MAX_CONSECUTIVE_SKIPPED:
                        raise NonFiniteLossError(
                            f"fp16: {skipped_in_row} steps in a row overflowed (up to step {step_no}) even after the "
                            f"loss scale shrank; the model overflows in float16. "
                            + self._last_good_text() + " Train with precision='fp32'.")
                else:
                    skipped_in_row = 0
                self.state.global_step = step_no
                self.state.step_in_epoch += len(group)
                self.state.trained_tokens += num_items
                self.lr_scheduler.step()
                if self.state.step_in_epoch >= n_micro:
                    self.state.epoch += 1
                    self.state.step_in_epoch = 0
                    it = dl.iter_epoch(self.state.epoch, 0)
                losses.append(step_loss)
                window["loss"] += step_loss
                window["steps"] += 1
                window["tokens"] += sum(_count_input_tokens(b) for b in group)

                if step_no % args.logging_steps == 0 or step_no == max_steps:
                    elapsed = max(time.perf_counter() - window["t0"], 1e-9)
                    logs: Dict[str, Any] = {
                        "loss": window["loss"] / window["steps"],
                        "learning_rate": lr_used,
                        "grad_norm": self._last_grad_norm,
                        "tokens_per_second": window["tokens"] / elapsed,
                        "epoch": self.state.epoch_float,
                        "trained_tokens": self.state.trained_tokens,
                    }
                    if self._loss_scale is not None:
                        logs["loss_scale"] = float(self._loss_scale.scale.asnumpy())
                        logs["skipped_steps"] = skipped_total
                    self.log(logs)
                    window = {"loss": 0.0, "steps": 0, "tokens": 0, "t0": time.perf_counter()}

                if self.eval_dataset is not None and args.eval_steps and step_no % args.eval_steps == 0:
                    self.evaluate()
                self.callback_handler.fire("on_step_end", args, self.state, trainer=self, loss=step_loss)
                want_save = (args.save_steps > 0 and step_no % args.save_steps == 0) or self.state.should_save
                if want_save:
                    self._save_with_eval()
                    last_saved = step_no
                    self.state.should_save = False
                if self.state.should_stop:
                    break
            if args.save_steps > 0 and last_saved != self.state.global_step and self.state.global_step > start_step:
                self._save_with_eval()
            elif self.eval_dataset is not None and args.eval_steps is None and args.save_steps == 0:
                self.evaluate()
        finally:
            self.callback_handler.fire("on_train_end", args, self.state, trainer=self)
        runtime = time.perf_counter() - start_time
        steps = self.state.global_step - start_step
        # Only this call's tokens over this call's time: a resumed run's earlier tokens took no time here.
        tokens = self.state.trained_tokens - start_tokens
        metrics = {"train_runtime": runtime, "train_steps": float(steps), "train_tokens": float(tokens),
                   "train_tokens_per_second": tokens / runtime if steps > 0 and runtime > 0 else 0.0}
        if self.state.last_eval_loss is not None:
            metrics["eval_loss"] = self.state.last_eval_loss
        return TrainOutput(self.state.global_step, float(np.mean(losses)) if losses else float("nan"), metrics,
                           already_finished=already_finished)

    def _last_good_text(self) -> str:
        last = latest_checkpoint(self.args.output_dir)
        if last is None:
            return "No checkpoint had been written yet."
        return f"The last good checkpoint is {str(last)!r} (resume with resume_from_checkpoint=True)."

    def _nonfinite_message(self, loss: float, step: int, n_micro: int) -> str:
        what = f"the loss is {loss}" if not math.isfinite(loss) else \
            f"the gradients are not finite (norm {self._last_grad_norm}; loss {loss})"
        return (f"training stopped: {what} at step {step} (epoch {self.state.epoch}, micro-batches "
                f"{self.state.step_in_epoch}..{self.state.step_in_epoch + n_micro - 1} of the epoch); the parameters "
                f"were not updated with this step. {self._last_good_text()} Lower learning_rate or max_grad_norm, "
                f"or check the data.")

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset: Optional[Sequence[Dict[str, Any]]] = None) -> Dict[str, float]:
        """Mean token cross-entropy over an evaluation set (compiled forward, no gradients).

        Args:
            eval_dataset: samples; default the trainer's ``eval_dataset``.

        Returns:
            ``{"eval_loss", "eval_tokens"}``; also logged and passed to ``on_evaluate``.
        """
        dl = self.get_eval_dataloader(eval_dataset)
        self.check_dataset(dl.dataset, "eval_dataset")
        if self._pipeline:
            batch_loss = self._pipeline_eval_loss
        else:
            if self._eval_step is None:
                self._eval_step = EvalStep(self, self.model)
                self._compiled_eval = ms.jit(self._eval_step.construct)
            batch_loss = self._compiled_eval_loss
        self.model.set_train(False)
        total, tokens = 0.0, 0
        try:
            for b, batch in enumerate(dl.iter_epoch(0)):
                n = _count_targets(batch)
                if n == 0:
                    continue
                _check_batch(batch, self._vocab_size(), f"eval_dataset micro-batch {b} (samples from {b * dl.batch_size})")
                total += batch_loss(self._fill_short_batch(batch, dl.batch_size), n) * n
                tokens += n
        finally:
            self.model.set_train(True)
        if tokens == 0:
            from ..data import UntrainedDatasetError

            raise UntrainedDatasetError(f"eval_dataset ({len(dl.dataset)} samples) has no evaluated token: every label "
                                        f"after the first of each sample is -100, so eval_loss would be 0.0")
        return self._record_eval(total, tokens)

    def _compiled_eval_loss(self, batch: Dict[str, np.ndarray], n: int) -> float:
        """Mean token loss of one batch through the compiled forward."""
        tensors = ms.mutable({k: Tensor(np.asarray(v, dtype=np.int32)) for k, v in batch.items()})
        return float(self._compiled_eval(tensors, Tensor(float(n), ms.float32)).asnumpy())

    def _pipeline_eval_loss(self, batch: Dict[str, np.ndarray], n: int) -> float:
        """Mean token loss of one batch through the pipeline (every replica evaluates all batches)."""
        batch = _pad_rows(batch, _round_up(len(batch["input_ids"]), self.parallel_config.micro_batch_num))
        loss, _ = self.model.evaluate(batch["input_ids"], batch["labels"], batch.get("attention_mask"),
                                      batch.get("position_ids"), batch.get("segment_ids"))
        return float(loss.asnumpy())

    def _record_eval(self, total: float, tokens: int) -> Dict[str, float]:
        metrics = {"eval_loss": total / max(tokens, 1), "eval_tokens": float(tokens)}
        self.state.last_eval_loss = metrics["eval_loss"]
        self.log(dict(metrics))
        self.callback_handler.fire("on_evaluate", self.args, self.state, metrics=metrics, trainer=self)
        return metrics

    # ------------------------------------------------------------------ saving
    def save_model(self, output_dir: Optional[str] = None, merge_lora: bool = False) -> str:
        """Save the trained model.

        Full fine-tuning: the HF layout via ``model.save_pretrained``. A parallelized model: every
        rank writes its shard to ``<output_dir>/rank_<r>/`` (:func:`qwen2ms.parallel.save_rank_checkpoint`;
        :func:`qwen2ms.parallel.load_rank_checkpoint` reads it back into the same layout), and rank 0
        merges the shards (:func:`qwen2ms.parallel.merge_checkpoints`) into the HF layout in
        ``output_dir`` itself; every rank must call it. LoRA: the adapter only
        (``adapter_model.safetensors`` + ``adapter_config.json``, PEFT key names), or with
        ``merge_lora=True`` the adapters are merged into the base weights first (the model is
        changed in place and loses its adapters) and the merged model is saved in the HF layout.

        Args:
            output_dir: destination (default ``args.output_dir``).
            merge_lora: see above.

        Returns:
            The folder written.
        """
        out = output_dir or self.args.output_dir
        if self.parallel_config is not None:
            return self._save_parallel_model(out)
        from .lora import lora_modules, merge_and_unload, save_adapter

        if lora_modules(self.model):
            if not merge_lora:
                save_adapter(self.model, out)
                return out
            merge_and_unload(self.model)
            self._train_step = None  # the graph referenced the adapter cells
            self.optimizer = None
        if not hasattr(self.model, "save_pretrained"):
            raise TypeError(f"{type(self.model).__name__} has no save_pretrained(); save its parameters with "
                            "mindspore.save_checkpoint instead")
        self.model.save_pretrained(out)
        return out

    def _save_with_eval(self) -> None:
        if self.eval_dataset is not None and self.args.eval_steps is None:
            self.evaluate()
        self._save_checkpoint()

    def _save_checkpoint(self) -> Path:
        if self.parallel_config is not None:
            return self._save_parallel_checkpoint()
        step = self.state.global_step
        from .lora import lora_modules, save_adapter

        lora = bool(lora_modules(self.model))

        def write(tmp: Path) -> None:
            if lora:
                save_adapter(self.model, tmp)
            elif hasattr(self.model, "save_pretrained"):
                self.model.save_pretrained(tmp)
            else:
                save_tensors(tmp / "model.safetensors", {p.name: p for p in self._trainable()})
            save_tensors(tmp / "optimizer.safetensors", self._optimizer_state())
            self._write_state_files(tmp)

        path = write_checkpoint_dir(self.args.output_dir, step, write)
        return self._after_save(path)

    def _optimizer_state(self) -> Dict[str, Any]:
        opt_state: Dict[str, Any] = dict(self.optimizer.state_tensors()) if hasattr(
            self.optimizer, "state_tensors") else {}
        if self._loss_scale is not None:
            scale, counter = self._loss_scale.state_tensors()
            opt_state[scale.name] = scale
            opt_state[counter.name] = counter
        return opt_state

    def _write_state_files(self, folder: Path) -> None:
        write_json(folder / "trainer_state.json", {
            "state": self.state.to_dict(),
            "scheduler": self.lr_scheduler.state_dict(),
            "rng": capture_rng_state(),
            "data": {"epoch": self.state.epoch, "step_in_epoch": self.state.step_in_epoch,
                     "seed": self.args.seed, "shuffle": self.args.shuffle,
                     "batch_size": self.args.per_device_train_batch_size,
                     "num_samples": len(self.train_dataset) if self.train_dataset is not None else None},
        })
        write_json(folder / "training_args.json", self.args.to_dict())

    def _after_save(self, path: Path) -> Path:
        """Best-checkpoint bookkeeping, rotation and on_save for a checkpoint folder just written."""
        if self.state.last_eval_loss is not None and (self.state.best_metric is None
                                                      or self.state.last_eval_loss < self.state.best_metric):
            self.state.best_metric = self.state.last_eval_loss
            self.state.best_checkpoint = str(path)
            # Record the best in the folder just written too, so a resume from it knows.
            if self.is_world_process_zero():
                self._patch_state_file(path)
        if self.is_world_process_zero():
            rotate_checkpoints(self.args.output_dir, self.args.save_total_limit, self.state.best_checkpoint)
        self.callback_handler.fire("on_save", self.args, self.state, checkpoint_dir=str(path), trainer=self)
        return path

    # ------------------------------------------------------------------ parallel checkpoints
    def _barrier(self) -> None:
        """Wait until every rank of the job gets here (a one-element all-reduce over the world group)."""
        from ..parallel.comm import all_reduce, world_group

        all_reduce(Tensor(np.ones((1,), np.float32)), "sum", world_group()).asnumpy()

    def _save_parallel_checkpoint(self) -> Path:
        """``checkpoint-<step>/rank_<r>/`` (model shard + optimizer state) from every rank, the state from rank 0.

        All ranks fill one staging folder; after a barrier rank 0 adds the trainer state and renames
        it into place, so a crash leaves no partial ``checkpoint-*`` folder.
        """
        from ..parallel.strategy import save_rank_checkpoint

        step, rank = self.state.global_step, self.model.groups.rank
        tmp = staging_dir(self.args.output_dir, step, "parallel")
        save_rank_checkpoint(self.model, tmp)
        save_tensors(tmp / f"rank_{rank}" / "optimizer.safetensors", self._optimizer_state())
        self._barrier()
        final = Path(self.args.output_dir) / f"checkpoint-{step}"
        if self.is_world_process_zero():
            self._write_state_files(tmp)
            write_json(tmp / "parallel_config.json", self.parallel_config.to_dict())
            final = publish_checkpoint_dir(tmp, self.args.output_dir, step)
        self._barrier()
        return self._after_save(final)

    def _save_parallel_model(self, out: str) -> str:
        import tempfile

        from ..modeling.model import Qwen2ForCausalLM
        from ..parallel.pipeline import merge_stage_checkpoints
        from ..parallel.strategy import merge_checkpoints, save_rank_checkpoint

        save_rank_checkpoint(self.model, out)
        self._barrier()
        if self.is_world_process_zero():
            lm = self.model.head if self._pipeline else self.model
            merge = merge_stage_checkpoints if self._pipeline else merge_checkpoints
            with tempfile.TemporaryDirectory(dir=out) as tmp:
                merged = merge(out, Path(tmp) / "merged.ckpt", self.model.config, self.parallel_config)
                full = Qwen2ForCausalLM.from_checkpoint(merged, self.model.config, dtype=lm.storage_dtype)
            full.generation_config_dict = lm.generation_config_dict
            full.save_pretrained(out)
        self._barrier()
        return out

    def _load_parallel_checkpoint(self, path: Path) -> None:
        rank = self.model.groups.rank
        rank_dir = path / f"rank_{rank}"
        saved = path / "parallel_config.json"
        layout = json.loads(saved.read_text(encoding="utf-8")) if saved.is_file() else None
        if layout != self.parallel_config.to_dict() or not rank_dir.is_dir():
            raise CheckpointError(f"{str(path)!r} was not written by this parallel layout ({layout} vs "
                                  f"{self.parallel_config.to_dict()}); resume with the layout it was saved with, or "
                                  f"re-cut its rank shards with qwen2ms.parallel.reshard_checkpoints")
        ckpts = sorted(rank_dir.glob("*.ckpt"))
        if len(ckpts) != 1:
            raise CheckpointError(f"{str(rank_dir)!r} should hold one .ckpt model shard, found {[c.name for c in ckpts]}")
        self._require_files(rank_dir, ["optimizer.safetensors"])
        opt_pairs = self._optimizer_pairs(rank_dir / "optimizer.safetensors", path)
        assign_parameters(self._param_pairs(ms.load_checkpoint(str(ckpts[0])), path) + opt_pairs)
        self._load_state_files(path)

    def _patch_state_file(self, path: Path) -> None:
        from ..hub import atomic_write_text

        f = path / "trainer_state.json"
        data = json.loads(f.read_text(encoding="utf-8"))
        data["state"]["best_metric"] = self.state.best_metric
        data["state"]["best_checkpoint"] = self.state.best_checkpoint
        atomic_write_text(f, json.dumps(data, indent=2, sort_keys=True, default=str))

    def _other_checkpoints_text(self, path: Path) -> str:
        others = [str(p) for _, p in list_checkpoints(self.args.output_dir) if p.resolve() != path.resolve()]
        if not others:
            return "No other checkpoint is in the output folder."
        return f"Resume from another checkpoint instead, e.g. {others[-1]!r}, or delete this folder."

    def _read_state_file(self, path: Path) -> Dict[str, Any]:
        """``trainer_state.json`` of a checkpoint, parsed and checked before any weight is touched."""
        f = path / "trainer_state.json"
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise CheckpointError(f"{str(f)!r} cannot be read ({e}): the checkpoint is truncated or corrupt. "
                                  f"{self._other_checkpoints_text(path)}") from None
        state = data.get("state") if isinstance(data, dict) else None
        ok = (isinstance(state, dict) and isinstance(state.get("global_step"), int)
              and isinstance(data.get("scheduler"), dict))
        if not ok:
            raise CheckpointError(f"{str(f)!r} lacks the trainer state (a 'state' with 'global_step' and a "
                                  f"'scheduler'): it was not written by this Trainer or is damaged. "
                                  f"{self._other_checkpoints_text(path)}")
        return data

    def _require_files(self, path: Path, names: Sequence[str]) -> None:
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {str(path)!r} is incomplete: {missing} missing, so training cannot "
                                  f"continue exactly where it stopped. {self._other_checkpoints_text(path)}")

    def _load_checkpoint(self, path: Path) -> None:
        if not path.is_dir() or not (path / "trainer_state.json").is_file():
            raise CheckpointError(f"{str(path)!r} is not a checkpoint folder (it needs trainer_state.json); "
                                  f"pass a checkpoint-<step> folder from {self.args.output_dir!r} or True")
        self._state_data = self._read_state_file(path)
        if self.parallel_config is not None:
            return self._load_parallel_checkpoint(path)
        from .lora import load_adapter_weights, lora_modules

        lora = bool(lora_modules(self.model))
        hf = not lora and (path / "config.json").is_file() and hasattr(type(self.model), "from_hf")
        weights = [] if lora else ["model.safetensors"]
        if hf and (path / "model.safetensors.index.json").is_file():
            weights = []  # sharded weights: from_hf checks every shard the index names
        self._require_files(path, ["optimizer.safetensors"] + weights)
        # Everything is read and checked before the first parameter changes: a damaged checkpoint
        # leaves the model as it was.
        opt_pairs = self._optimizer_pairs(path / "optimizer.safetensors", path)
        if lora:
            load_adapter_weights(self.model, path)
            assign_parameters(opt_pairs)
        else:
            if hf:
                storage = self._trainable()[0].dtype
                loaded = type(self.model).from_hf(str(path), dtype=storage)
                source: Dict[str, Any] = dict((n, p) for n, p in loaded.parameters_and_names())
            else:
                source = load_tensors(path / "model.safetensors")
            assign_parameters(self._param_pairs(source, path) + opt_pairs)
        self._load_state_files(path)

    def _optimizer_pairs(self, file: Path, path: Path) -> List[Tuple[Parameter, Any]]:
        """(state tensor, saved value) pairs of the optimizer and loss scale, checked against this run's."""
        opt = load_tensors(file)
        targets: Dict[str, Parameter] = dict(self.optimizer.state_tensors()) if hasattr(
            self.optimizer, "state_tensors") else {}
        if self._loss_scale is not None:
            for p in self._loss_scale.state_tensors():
                targets[p.name] = p
        missing = [k for k in targets if k not in opt]
        if missing:
            raise CheckpointError(f"{file} lacks {len(missing)} tensors, e.g. {missing[:3]}: "
                                  "it was written for a different model, LoRA setting or precision")
        pairs = []
        for k, p in targets.items():
            arr = opt[k]
            if arr.size == int(np.prod(p.shape)) and arr.ndim != len(p.shape):
                arr = arr.reshape(p.shape)  # scalars may come back as shape (1,)
            if tuple(arr.shape) != tuple(p.shape):
                raise CheckpointError(f"optimizer tensor {k!r} has shape {arr.shape} in {path}, expected {p.shape}")
            pairs.append((p, arr))
        return pairs

    def _load_state_files(self, path: Path) -> None:
        data = self._state_data or self._read_state_file(path)
        self._state_data = None
        self.state = TrainerState.from_dict(data["state"])
        self.lr_scheduler.load_state_dict(data["scheduler"])
        restore_rng_state(data.get("rng", {}))

    def _param_pairs(self, source: Dict[str, Any], path: Path) -> List[Tuple[Parameter, Any]]:
        """(trainable parameter, saved value) pairs (plus fp32 masters), checked for names and shapes."""
        params = self._trainable()
        missing = [p.name for p in params if p.name not in source]
        if missing:
            raise CheckpointError(f"checkpoint {str(path)!r} lacks {len(missing)} trainable parameters, e.g. "
                                  f"{missing[:3]}: it belongs to a different model")
        masters = {}
        if isinstance(self.optimizer, AdamW):
            masters = {p.name: w for p, w, low in zip(self.optimizer.params, self.optimizer.master,
                                                      self.optimizer.has_master) if low}
        pairs = []
        for p in params:
            src = source[p.name]
            value = src.value() if isinstance(src, Parameter) else Tensor(np.asarray(src))
            if tuple(value.shape) != tuple(p.shape):
                raise CheckpointError(f"parameter {p.name!r} has shape {tuple(value.shape)} in {path}, "
                                      f"the model expects {tuple(p.shape)}")
            pairs.append((p, value))
            if p.name in masters:
                pairs.append((masters[p.name], value))
        return pairs
