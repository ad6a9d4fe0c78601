"""Pipeline parallelism: each rank keeps its stage's decoder layers (names and indices unchanged) and runs a GPipe schedule.

:func:`~qwen2ms.parallel.apply.parallelize` calls :func:`prune_to_stage` when ``pipeline_stage > 1``:
layers outside the stage become pass-through Cells (their parameters leave this rank), the
embedding stays on the first stage only (the last stage also keeps it when the lm_head is tied),
the final norm and lm_head on the last stage only, and later stages read their input from the
previous stage instead of the embedding. The model's own ``construct`` still runs unchanged.

:class:`PipelineCausalLM` drives the micro-batches (GPipe): every micro-batch's activations go
forward stage by stage, then its gradients come back in reverse. A stage's backward recomputes its
forward (activations are not kept between the two passes, like full recompute). Transfers between
adjacent stages use :func:`qwen2ms.parallel.comm.send_recv` in a two-member group, so both sides
make the same collective call at the same point of the schedule. The loss is the token mean over the
whole batch (every micro-batch's summed loss divided by the batch's token count), so it and the
gradients equal the single-device step on the same batch.

Example (msrun with 2 workers)::

    pm = parallelize(model, ParallelConfig(pipeline_stage=2, micro_batch_num=2))
    loss, grads = pm.forward_backward(input_ids, labels)      # grads for pm.trainable_params()
    optimizer(grads)
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from .comm import Group, broadcast, new_group, send_recv
from .config import ParallelConfig, ParallelConfigError
from .regions import Identity, replace_child

__all__ = ["prune_to_stage", "PipelineCausalLM", "merge_stage_checkpoints", "micro_batch_weights"]


def micro_batch_weights(labels: List[np.ndarray], num_items: Optional[float] = None) -> List[float]:
    """Per micro-batch, the factor of its mean token loss in the step loss: its trained tokens / ``num_items``.

    Args:
        labels: each micro-batch's ``[b, T]`` labels (shifted inside: position 0 never counts; -100 ignored).
        num_items: the step's token count (default: the micro-batches' own total, i.e. the batch mean).

    Returns:
        The factors; their weighted sum of micro-batch means is the summed token loss over ``num_items``.

    Raises:
        ValueError: ``num_items`` is not positive.

    Example:
        >>> micro_batch_weights([np.array([[5, 6, 7]]), np.array([[5, -100, 7]])])
        [0.6666666666666666, 0.3333333333333333]
    """
    counts = [float((np.asarray(lab)[:, 1:] != -100).sum()) for lab in labels]
    if num_items is None:
        total = max(sum(counts), 1.0)
    else:
        total = float(num_items)
        if not total > 0:
            raise ValueError(f"num_items must be a positive token count, got {num_items!r}")
    return [c / total for c in counts]


class _PassThrough(nn.Cell):
    """A decoder layer that lives on another stage: returns its input unchanged."""

    def construct(self, x, cos, sin, mask, cache=None, cache_position=0):
        return x, None


class _StageInput(nn.Cell):
    """Stands in for the embedding on later stages: returns the activation received from the previous stage.

    ``inner`` keeps the embedding table on the last stage of a tied model (the lm_head uses it).
    """

    def __init__(self, inner: Optional[nn.Cell] = None) -> None:
        super().__init__(auto_prefix=False)
        if inner is not None:
            self.inner = inner
        self.value: Optional[Tensor] = None

    def construct(self, input_ids):
        return self.value


def prune_to_stage(lm: nn.Cell, pc: ParallelConfig, stage: int) -> range:
    """Keep only ``stage``'s part of a (possibly tensor-parallel) Qwen2ForCausalLM, in place.

    Returns:
        The decoder layer indices this stage runs.
    """
    cfg = lm.config
    if cfg.is_moe and cfg.output_router_logits:
        raise ParallelConfigError("the MoE load-balancing loss pools router statistics over all layers; it is not "
                                  "available with pipeline_stage > 1 (set output_router_logits: false)")
    layers = pc.stage_layers(cfg.num_hidden_layers)[stage]
    last = stage == pc.pipeline_stage - 1
    for i in range(cfg.num_hidden_layers):
        if i not in layers:
            lm.model.layers[i] = _PassThrough()
    if stage > 0:
        keep = lm.model.embed_tokens if (last and lm.tied) else None
        replace_child(lm.model, "embed_tokens", _StageInput(keep))
    if not last:
        lm.model.norm = Identity()
        if not lm.tied:
            lm.lm_head = Identity()
    return layers


class PipelineCausalLM(nn.Cell):
    """One pipeline stage of a parallelized Qwen2ForCausalLM and the GPipe schedule that connects the stages.

    Built by :func:`~qwen2ms.parallel.apply.parallelize`; ``head`` is the
    :class:`~qwen2ms.parallel.apply.ParallelCausalLM` of the pruned model (it computes the last
    stage's logits and loss).

    Attributes:
        stage: this rank's stage index.
        layers: the decoder layer indices it runs.
        grad_sync: gradient synchronisation for ``trainable_params()`` (data parallel, tied embedding).
    """

    def __init__(self, head: nn.Cell, pc: ParallelConfig, stage: int, layers: range) -> None:
        super().__init__(auto_prefix=False)
        self.head = head
        self.parallel_config = pc
        self.groups = head.groups
        self.config = head.config
        self.stage, self.layers = stage, layers
        self.num_stages = pc.pipeline_stage
        self.is_first, self.is_last = stage == 0, stage == pc.pipeline_stage - 1
        rank = self.groups.rank
        pp_ranks = pc.group_ranks("pipeline", rank)
        self._prev: Optional[Group] = new_group([pp_ranks[stage - 1], rank]) if stage > 0 else None
        self._next: Optional[Group] = new_group([rank, pp_ranks[stage + 1]]) if not self.is_last else None
        self.grad_sync = head.grad_sync
        self.grad_norm = head.grad_norm

    # --------------------------------------------------------------------- helpers
    def _hidden_shape(self, batch: int, seq: int) -> Tuple[int, int, int]:
        mp = self.groups.tp.size
        if self.head.seq:
            seq //= mp
        return batch, seq, self.config.hidden_size

    def _stage_input(self) -> _StageInput:
        return self.head.model.embed_tokens

    def _split(self, input_ids, *others):
        """``input_ids`` and each of ``others`` (None passes through) as ``micro_batch_num`` NumPy row chunks."""
        m = self.parallel_config.micro_batch_num
        ids = np.asarray(input_ids.asnumpy() if isinstance(input_ids, Tensor) else input_ids)
        if ids.ndim != 2 or ids.shape[0] % m:
            raise ValueError(f"the batch ({ids.shape[0] if ids.ndim else '?'} rows) must divide into "
                             f"micro_batch_num={m} micro-batches")

        def split(a):
            if a is None:
                return [None] * m
            return np.split(np.asarray(a.asnumpy() if isinstance(a, Tensor) else a), m, 0)

        return (split(ids),) + tuple(split(a) for a in others)

    def _stage_out(self, ids, mask, pos=None, seg=None):
        hidden, _ = self.head.model(ids, mask, pos, seg)
        return hidden

    # --------------------------------------------------------------------- schedules
    def forward_backward(self, input_ids, labels, attention_mask=None, position_ids=None, segment_ids=None, *,
                         num_items: Optional[float] = None, sync: bool = True
                         ) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """One GPipe step over ``micro_batch_num`` micro-batches of the batch.

        Every rank of the pipeline calls it with the same (data-parallel rank's) batch.

        Args:
            input_ids: ``[B, T]`` token ids (``B`` divisible by ``micro_batch_num``).
            labels: ``[B, T]`` (shifted inside, ``-100`` ignored), as for the model.
            attention_mask: optional ``[B, T]``.
            position_ids: optional ``[B, T]`` (packed rows).
            segment_ids: optional ``[B, T]`` (packed rows: attention stays inside a segment).
            num_items: divide the summed token loss by this count instead of the batch's own trained
                tokens (e.g. the tokens of a whole accumulated optimizer step, or of the global batch).
            sync: apply ``grad_sync`` (data-parallel mean, tied embedding) to the gradients; False
                returns this rank's raw gradients (to accumulate several calls and sync once).

        Returns:
            ``(loss, grads)``: the summed token loss over ``num_items`` (default: the batch's mean token
            loss), on every stage, and the gradients of this stage's ``trainable_params()``.

        Example:
            >>> loss, grads = pm.forward_backward(ids, labels, num_items=n_step_tokens, sync=False)  # doctest: +SKIP
        """
        ids_mb, lab_mb, mask_mb, pos_mb, seg_mb = self._split(input_ids, labels, attention_mask, position_ids,
                                                              segment_ids)
        if lab_mb[0] is None:
            raise ValueError("forward_backward needs labels")
        weights = micro_batch_weights(lab_mb, num_items)
        params = self.trainable_params()
        dtype = self.head.compute_dtype
        received: List[Tensor] = []
        # forward: send each micro-batch's activations on
        for i, ids in enumerate(ids_mb):
            shape = self._hidden_shape(*ids.shape)
            if not self.is_first:
                h = send_recv(ops.zeros(shape, dtype), 0, 1, self._prev)
                received.append(h)
                self._stage_input().value = h
            if not self.is_last:
                out = self._stage_out(ids, mask_mb[i], pos_mb[i], seg_mb[i])
                send_recv(out, 0, 1, self._next)
        # backward, in the same micro-batch order
        grads = None
        loss_sum = ops.zeros((), ms.float32)
        for i, ids in enumerate(ids_mb):
            shape = self._hidden_shape(*ids.shape)
            weight = weights[i]
            mask, pos, seg = mask_mb[i], pos_mb[i], seg_mb[i]
            if self.is_last:
                def fn(h, ids=ids, lab=lab_mb[i], mask=mask, pos=pos, seg=seg):
                    self._stage_input().value = h
                    return self.head(ids, mask, pos, labels=lab, segment_ids=seg).loss * weight
                loss_i, (dh, g) = ms.value_and_grad(fn, 0, params)(received[i])
                loss_sum = loss_sum + loss_i
            else:
                dout = send_recv(ops.zeros(shape, dtype), 1, 0, self._next)
                if self.is_first:
                    def fn0(ids=ids, mask=mask, pos=pos, seg=seg, dout=dout):
                        return (self._stage_out(ids, mask, pos, seg) * dout).sum()
                    _, g = ms.value_and_grad(fn0, None, params)()
                    dh = None
                else:
                    def fnm(h, ids=ids, mask=mask, pos=pos, seg=seg, dout=dout):
                        self._stage_input().value = h
                        return (self._stage_out(ids, mask, pos, seg) * dout).sum()
                    _, (dh, g) = ms.value_and_grad(fnm, 0, params)(received[i])
            if not self.is_first:
                send_recv(dh, 1, 0, self._prev)
            grads = tuple(g) if grads is None else tuple(a + b for a, b in zip(grads, g))
        loss = broadcast(loss_sum, self.num_stages - 1, self.groups.pp)
        self._stage_input_reset()
        return loss, (self.grad_sync(grads) if sync else grads)

    def evaluate(self, input_ids, labels=None, attention_mask=None, position_ids=None, segment_ids=None
                 ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """Forward through the pipeline: ``(loss on every stage or None without labels, logits on the last stage)``.

        The loss is the mean over the batch's trained tokens; the arguments are those of :meth:`forward_backward`.
        """
        ids_mb, lab_mb, mask_mb, pos_mb, seg_mb = self._split(input_ids, labels, attention_mask, position_ids,
                                                              segment_ids)
        dtype = self.head.compute_dtype
        logits, loss_sum, total = [], ops.zeros((), ms.float32), 0.0
        for i, ids in enumerate(ids_mb):
            if not self.is_first:
                self._stage_input().value = send_recv(ops.zeros(self._hidden_shape(*ids.shape), dtype), 0, 1,
                                                      self._prev)
            if self.is_last:
                out = self.head(ids, mask_mb[i], pos_mb[i], labels=lab_mb[i], segment_ids=seg_mb[i])
                logits.append(out.logits)
                if out.loss is not None:
                    n = float((lab_mb[i][:, 1:] != -100).sum())
                    loss_sum = loss_sum + out.loss * n
                    total += n
            else:
                send_recv(self._stage_out(ids, mask_mb[i], pos_mb[i], seg_mb[i]), 0, 1, self._next)
        self._stage_input_reset()
        loss = None
        if labels is not None:
            loss = broadcast(loss_sum / max(total, 1.0), self.num_stages - 1, self.groups.pp)
        return loss, (ops.concat(logits, 0) if self.is_last else None)

    def _stage_input_reset(self) -> None:
        if not self.is_first:
            self._stage_input().value = None

    def construct(self, *args):
        raise TypeError("a pipeline stage is not called directly: use forward_backward(...) to train or "
                        "evaluate(...) for the loss and logits")


def merge_stage_checkpoints(shard_dir: Union[str, os.PathLike], out_ckpt: Union[str, os.PathLike], config,
                            pc: ParallelConfig) -> Path:
    """Merge the per-rank shards of a pipeline layout (``rank_<r>/*.ckpt``) into one single-device checkpoint.

    Each stage holds its own parameters (the names of the single-device model): within a stage the
    ``data_parallel x model_parallel`` ranks are merged like a layout without stages
    (:func:`qwen2ms.parallel.merge_checkpoints`), then the stages' tensors are put together (a tied
    embedding, kept by the first and the last stage, is identical on both).

    Args:
        shard_dir: folder with one ``rank_<r>`` folder per rank (:func:`qwen2ms.parallel.save_rank_checkpoint`).
        out_ckpt: the merged ``.ckpt`` to write (atomically).
        config: the model's Qwen2Config.
        pc: the layout the shards were written with (``pipeline_stage >= 1``).

    Returns:
        ``out_ckpt``.

    Example:
        >>> pc = ParallelConfig(pipeline_stage=2, micro_batch_num=2)
        >>> merge_stage_checkpoints("run/final", "merged.ckpt", config, pc)  # doctest: +SKIP
    """
    from .strategy import _load_arrays, _only_ckpt, _save_arrays, merge_checkpoints

    shard_dir = Path(shard_dir)
    per_stage = pc.data_parallel * pc.model_parallel
    inner = pc.replace(pipeline_stage=1, micro_batch_num=1)
    missing = [r for r in range(pc.world_size) if not (shard_dir / f"rank_{r}").is_dir()]
    if missing:
        raise FileNotFoundError(f"missing shard folder(s) {[f'rank_{r}' for r in missing]} under "
                                f"{os.fspath(shard_dir)!r} for a layout of {pc.world_size} ranks")
    merged = {}
    for stage in range(pc.pipeline_stage):
        ranks = range(stage * per_stage, (stage + 1) * per_stage)  # rank_coords: the stage index is outermost
        if per_stage == 1:
            merged.update(_load_arrays(_only_ckpt(shard_dir / f"rank_{ranks[0]}")))
            continue
        with tempfile.TemporaryDirectory(dir=shard_dir) as tmp:
            for local, r in enumerate(ranks):
                os.symlink((shard_dir / f"rank_{r}").resolve(), Path(tmp) / f"rank_{local}")
            merged.update(_load_arrays(merge_checkpoints(tmp, Path(tmp) / "stage.ckpt", config, inner)))
    _save_arrays(merged, out_ckpt)
    return Path(out_ckpt)
