"""Memory planner: per-device bytes of parameters, gradients, optimizer state, activations and KV cache for a layout.

The estimate is analytic and follows how :func:`qwen2ms.parallel.parallelize` splits the model:

* Parameters: q/k/v/o and gate/up/down are split ``model_parallel`` ways (k/v keep one head per
  device when ``model_parallel`` exceeds the kv heads); norms and the MoE router are whole;
  embedding and lm_head are split by vocabulary rows unless ``vocab_emb_dp``; experts are split
  ``expert_parallel`` ways. Pipeline stages own contiguous decoder layers (earlier stages take the
  remainder), stage 0 the embedding, the last stage the final norm and lm_head (a tied lm_head is a
  second copy there when ``pipeline_stage > 1``). The device reported is the worst stage.
* Fine-tuning (mixed precision AdamW): weights in ``param_dtype``, gradients in ``grad_dtype``,
  optimizer state = two fp32 moments, plus an fp32 master copy when weights are not fp32.
  ``optimizer_shard`` divides the optimizer state by the data-parallel degree (expert weights: by
  the number of their replicas, ``data_parallel / expert_parallel``).
* Activations kept for the backward pass, per token of one micro-batch, in ``param_dtype``
  elements (``mp`` = model_parallel, ``kvl`` = kv heads per device, ``d`` = head size):
  ``4h/s + h/mp (q) + 2*kvl*d (k, v) + h/mp (attention out) + 4*I/mp (gate, up, silu(gate), product)``
  where ``s = mp`` with sequence parallel and 1 without; without flash attention add the
  ``heads/mp * seq`` softmax probabilities. An MoE layer replaces ``4*I/mp`` by the router logits
  (``E`` fp32), ``k`` routed copies of ``h + 4*I_moe/mp`` and the shared expert ``h + 4*I_sh/mp``.
  With ``recompute`` a layer keeps only its input (``h/s``) and one layer's full set is live
  during its recomputation. The last stage adds the final norm and lm_head inputs (``2h/s``) and the
  fp32 logits (``V/mp``, or ``V`` with ``vocab_emb_dp``). With pipeline stages (1F1B), stage ``i``
  holds ``min(pipeline_stage - i, micro_batch_num)`` micro-batches in flight.
* Inference: weights, the KV cache (``2 * layers * batch * seq * kvl * d`` elements in
  ``kv_dtype``) and a prefill workspace of one layer's activation set plus last-position logits.

It fits when the total is at most ``device_memory - reserve`` (the reserve stands for the runtime's
own workspace and fragmentation).

Example:
    >>> from qwen2ms import Qwen2Config
    >>> plan = plan_memory(Qwen2Config.from_preset("qwen2-72b"), devices=8, device_memory_gib=64,
    ...                    seq_length=32768, mode="predict")
    >>> plan.best.layout.model_parallel
    4
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..config import Qwen2Config
from .config import ParallelConfig, ParallelConfigError
from .plans import local_kv_heads

__all__ = ["DTYPE_BYTES", "MemoryEstimate", "MemoryPlan", "stage_parameter_counts", "estimate_memory",
           "plan_memory", "format_plan", "GIB"]

GIB = 1 << 30

#: Bytes per element of the dtype names the planner accepts.
DTYPE_BYTES: Dict[str, int] = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2,
                               "int8": 1}

_MODES = ("finetune", "predict")


def _bytes_of(name: str, what: str) -> int:
    key = str(name).lower()
    if key not in DTYPE_BYTES:
        raise ValueError(f"{what} {name!r} is not known; use one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[key]


def stage_parameter_counts(cfg: Qwen2Config, layout: ParallelConfig) -> List[Dict[str, int]]:
    """Parameters held by one device of each pipeline stage, as ``{"dense": n, "expert": n}``.

    ``dense`` counts everything replicated across the data-parallel group; ``expert`` counts the
    routed-expert weights (replicated only ``data_parallel / expert_parallel`` times).

    Args:
        cfg: the model.
        layout: the parallel layout (validated against ``cfg``).

    Returns:
        One dict per stage.

    Example:
        >>> cfg = Qwen2Config.from_preset("qwen2-0.5b")
        >>> sum(stage_parameter_counts(cfg, ParallelConfig())[0].values()) == cfg.num_parameters()
        True
    """
    layout.validate(cfg)
    h, mp, ep = cfg.hidden_size, layout.model_parallel, layout.expert_parallel
    d = cfg.head_dim
    kvl = local_kv_heads(cfg, mp)
    bias = 1 if cfg.qkv_bias else 0
    attn = (h * h + bias * h) // mp + 2 * (h * kvl * d + bias * kvl * d) + h * h // mp
    norms = 2 * h
    vocab_rows = cfg.vocab_size if layout.vocab_emb_dp else cfg.vocab_size // mp
    out = []
    stages = layout.stage_layers(cfg.num_hidden_layers)
    for s, layers in enumerate(stages):
        dense = expert = 0
        for i in layers:
            dense += attn + norms
            if cfg.is_sparse_layer(i):
                dense += h * cfg.num_experts
                expert += (cfg.num_experts // ep) * 3 * h * cfg.moe_intermediate_size // mp
                if cfg.shared_expert_intermediate_size:
                    dense += 3 * h * cfg.shared_expert_intermediate_size // mp + h
            else:
                dense += 3 * h * cfg.intermediate_size // mp
        if s == 0:
            dense += vocab_rows * h
        if s == len(stages) - 1:
            dense += h
            if not cfg.tie_word_embeddings or len(stages) > 1:
                dense += vocab_rows * h
        out.append({"dense": dense, "expert": expert})
    return out


def _layer_activation_elems(cfg: Qwen2Config, layout: ParallelConfig, layer: int, seq_length: int,
                            flash_attention: bool, router_fp32_factor: float) -> float:
    """Activation elements per token kept by one decoder layer for its backward pass."""
    h, mp = cfg.hidden_size, layout.model_parallel
    s = mp if layout.use_seq_parallel else 1
    d, kvl = cfg.head_dim, local_kv_heads(cfg, mp)
    elems = 4 * h / s + h / mp + 2 * kvl * d + h / mp
    if not flash_attention:
        elems += cfg.num_attention_heads / mp * seq_length
    if cfg.is_sparse_layer(layer):
        elems += cfg.num_experts * router_fp32_factor
        elems += cfg.num_experts_per_tok * (h + 4 * cfg.moe_intermediate_size / mp)
        if cfg.shared_expert_intermediate_size:
            elems += h + 4 * cfg.shared_expert_intermediate_size / mp
    else:
        elems += 4 * cfg.intermediate_size / mp
    return elems


@dataclass
class MemoryEstimate:
    """Per-device memory of one layout (bytes; the worst pipeline stage).

    Attributes:
        layout: the parallel layout.
        mode: "finetune" or "predict".
        stage: the pipeline stage the figures are for (the one that needs the most).
        parameter_count: parameters held by that device.
        parameters, gradients, optimizer_state, activations, kv_cache: bytes.
        total: the sum.
        budget: usable bytes (device memory minus the reserve).
    """

    layout: ParallelConfig
    mode: str
    stage: int
    parameter_count: int
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    kv_cache: int
    budget: int

    @property
    def total(self) -> int:
        """Bytes needed on the device."""
        return self.parameters + self.gradients + self.optimizer_state + self.activations + self.kv_cache

    @property
    def fits(self) -> bool:
        """Whether the total is within the budget."""
        return self.total <= self.budget


def estimate_memory(cfg: Qwen2Config, layout: ParallelConfig, *, mode: str = "finetune", seq_length: int = 4096,
                    micro_batch_size: int = 1, batch_size: int = 1, param_dtype: str = "bfloat16",
                    grad_dtype: str = "float32", kv_dtype: Optional[str] = None, flash_attention: bool = True,
                    device_memory_gib: float = 64.0, reserve_gib: float = 2.0) -> MemoryEstimate:
    """Per-device memory of ``cfg`` under ``layout`` (see the module docstring for the formulas).

    Args:
        cfg: the model.
        layout: the parallel layout; validated against ``cfg`` and ``seq_length``.
        mode: "finetune" (weights, gradients, AdamW state, activations) or "predict" (weights, KV cache,
            prefill workspace).
        seq_length: tokens per sample (training length, or prompt plus generated tokens).
        micro_batch_size: samples per micro-batch on one data-parallel replica (finetune).
        batch_size: sequences decoded together on one replica (predict).
        param_dtype: dtype of the weights and activations.
        grad_dtype: dtype of the gradients (finetune).
        kv_dtype: dtype of the KV cache (defaults to ``param_dtype``).
        flash_attention: False adds the attention probabilities (``heads * seq`` per token) to the activations.
        device_memory_gib: memory of one device, GiB.
        reserve_gib: GiB kept free for the runtime.

    Returns:
        A :class:`MemoryEstimate` for the stage that needs the most memory.

    Example:
        >>> est = estimate_memory(Qwen2Config.from_preset("qwen2-7b"), ParallelConfig(model_parallel=4),
        ...                       mode="predict", seq_length=8192)
        >>> round(est.total / GIB, 1)
        4.2
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    for name, v in (("seq_length", seq_length), ("micro_batch_size", micro_batch_size), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if device_memory_gib <= 0 or reserve_gib < 0:
        raise ValueError(f"device_memory_gib must be > 0 and reserve_gib >= 0, got {device_memory_gib}, "
                         f"{reserve_gib}")
    layout.validate(cfg, seq_length=seq_length)
    pb = _bytes_of(param_dtype, "param_dtype")
    gb = _bytes_of(grad_dtype, "grad_dtype")
    kb = _bytes_of(kv_dtype or param_dtype, "kv_dtype")
    mp, pp, dp, ep = layout.model_parallel, layout.pipeline_stage, layout.data_parallel, layout.expert_parallel
    s = mp if layout.use_seq_parallel else 1
    h = cfg.hidden_size
    vocab_local = cfg.vocab_size if layout.vocab_emb_dp else cfg.vocab_size // mp
    counts = stage_parameter_counts(cfg, layout)
    stages = layout.stage_layers(cfg.num_hidden_layers)
    budget = int(device_memory_gib * GIB - reserve_gib * GIB)
    best: Optional[MemoryEstimate] = None
    for st, layers in enumerate(stages):
        n_dense, n_expert = counts[st]["dense"], counts[st]["expert"]
        n = n_dense + n_expert
        params = n * pb
        grads = opt = act = kv = 0
        if mode == "finetune":
            grads = n * gb
            per_param = 8 + (4 if pb != 4 else 0)
            if layout.optimizer_shard:
                opt = int(n_dense * per_param / dp + n_expert * per_param / (dp // ep))
            else:
                opt = n * per_param
            tokens = micro_batch_size * seq_length
            per_layer = [_layer_activation_elems(cfg, layout, i, seq_length, flash_attention, 4 / pb)
                         for i in layers]
            if layout.recompute:
                elems = len(layers) * h / s + max(per_layer)
            else:
                elems = sum(per_layer)
            if st == len(stages) - 1:
                elems += 2 * h / s + vocab_local * 4 / pb
            in_flight = min(pp - st, layout.micro_batch_num)
            act = int(elems * tokens * pb * in_flight)
        else:
            kvl = max(cfg.num_key_value_heads // mp, 1)
            kv = 2 * len(layers) * batch_size * seq_length * kvl * cfg.head_dim * kb
            tokens = batch_size * seq_length
            one_layer = max(_layer_activation_elems(cfg, layout, i, seq_length, flash_attention, 4 / pb)
                            for i in layers)
            act = int(one_layer * tokens * pb)
            if st == len(stages) - 1:
                act += batch_size * vocab_local * 4
        est = MemoryEstimate(layout=layout, mode=mode, stage=st, parameter_count=n, parameters=params,
                             gradients=grads, optimizer_state=opt, activations=act, kv_cache=kv, budget=budget)
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best


@dataclass
class MemoryPlan:
    """Estimates for every candidate layout, the ones that fit first (the first is the suggestion)."""

    model: str
    devices: int
    mode: str
    estimates: List[MemoryEstimate] = field(default_factory=list)

    @property
    def fitting(self) -> List[MemoryEstimate]:
        """The estimates that fit, in ranked order."""
        return [e for e in self.estimates if e.fits]

    @property
    def best(self) -> Optional[MemoryEstimate]:
        """The suggested layout, or None when nothing fits."""
        fits = self.fitting
        return fits[0] if fits else None


def plan_memory(cfg: Qwen2Config, devices: int, *, mode: str = "finetune", seq_length: int = 4096,
                device_memory_gib: float = 64.0, devices_per_node: int = 8, micro_batch_num: int = 1,
                model_name: str = "", **kwargs) -> MemoryPlan:
    """Estimate every layout of ``devices`` devices and rank them.

    Candidates are all ``(dp, mp, pp)`` the model can be split into with ``mp <= devices_per_node``
    (tensor parallelism across nodes is too slow to be worth listing), and ``pp == 1`` for
    ``predict`` (generation runs tensor-parallel); fine-tuning candidates come
    without and with recompute, with sequence parallel whenever ``mp > 1`` (dense models; not for
    ``predict``, where a decode step has one token) and optimizer sharding
    whenever ``dp > 1`` (both only save memory). Ranking: layouts that fit first; then no recompute
    before recompute (it costs a third more compute), fewer pipeline stages (bubbles, and latency when
    generating), smaller tensor-parallel degree (more replicas, less communication), and less memory;
    layouts that do not fit follow, smallest first.

    Args:
        cfg: the model.
        devices: number of devices.
        mode: "finetune" or "predict".
        seq_length: tokens per sample.
        device_memory_gib: memory of one device.
        devices_per_node: largest tensor-parallel degree to consider.
        micro_batch_num: micro-batches per step (raised to the stage count for pipeline layouts).
        model_name: label for the report.
        **kwargs: passed to :func:`estimate_memory` (micro_batch_size, batch_size, dtypes, reserve_gib, ...).

    Returns:
        A :class:`MemoryPlan`.
    """
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be a positive integer, got {devices!r}")
    ep_max = cfg.num_experts if cfg.is_moe else 1
    out: List[MemoryEstimate] = []
    for dp, mp, pp in ParallelConfig(micro_batch_num=micro_batch_num).candidate_layouts(devices, cfg):
        if mp > devices_per_node or (mode == "predict" and pp > 1):
            # qwen2ms generates tensor-parallel (the KV cache is per rank); pipeline stages are for training.
            continue
        if cfg.is_moe:
            ep = max(e for e in range(1, dp + 1) if dp % e == 0 and ep_max % e == 0)
        else:
            ep = 1
        recomputes = (False, True) if mode == "finetune" else (False,)
        for rec in recomputes:
            try:
                layout = ParallelConfig(data_parallel=dp, model_parallel=mp, pipeline_stage=pp,
                                        micro_batch_num=max(micro_batch_num, pp),
                                        use_seq_parallel=mp > 1 and not cfg.is_moe and mode == "finetune",
                                        expert_parallel=ep, optimizer_shard=mode == "finetune" and dp > 1,
                                        recompute=rec)
                out.append(estimate_memory(cfg, layout, mode=mode, seq_length=seq_length,
                                           device_memory_gib=device_memory_gib, **kwargs))
            except ParallelConfigError:
                continue
    out.sort(key=lambda e: (0, e.layout.recompute, e.layout.pipeline_stage, e.layout.model_parallel, e.total)
             if e.fits else (1, e.total))
    return MemoryPlan(model=model_name, devices=devices, mode=mode, estimates=out)


def format_plan(plan: MemoryPlan, limit: int = 12) -> str:
    """A text table of the plan (GiB per device), best first, and a one-line verdict."""
    head = (f"{'dp':>3} {'mp':>3} {'pp':>3} {'ep':>3} {'sp':>3} {'rc':>3} {'zero':>4} | {'params':>8} {'grads':>8} "
            f"{'optim':>8} {'activ':>8} {'kv':>8} | {'total':>8} {'fits':>4}")
    lines = [f"{plan.model or 'model'} on {plan.devices} device(s), mode={plan.mode}; GiB per device "
             f"(worst pipeline stage)", head, "-" * len(head)]
    for e in plan.estimates[:limit]:
        lo = e.layout
        yn = lambda b: "y" if b else "-"  # noqa: E731
        lines.append(f"{lo.data_parallel:>3} {lo.model_parallel:>3} {lo.pipeline_stage:>3} {lo.expert_parallel:>3} "
                     f"{yn(lo.use_seq_parallel):>3} {yn(lo.recompute):>3} {yn(lo.optimizer_shard):>4} | "
                     f"{e.parameters / GIB:8.2f} {e.gradients / GIB:8.2f} {e.optimizer_state / GIB:8.2f} "
                     f"{e.activations / GIB:8.2f} {e.kv_cache / GIB:8.2f} | {e.total / GIB:8.2f} "
                     f"{'yes' if e.fits else 'no':>4}")
    if len(plan.estimates) > limit:
        lines.append(f"... {len(plan.estimates) - limit} more layouts")
    best = plan.best
    if best is None:
        smallest = min(plan.estimates, key=lambda e: e.total, default=None)
        need = f"; the smallest needs {smallest.total / GIB:.1f} GiB per device" if smallest else ""
        lines.append(f"nothing fits in {plan.estimates[0].budget / GIB:.1f} GiB usable per device{need}: "
                     f"add devices, shorten the sequence, or use a smaller model" if plan.estimates else
                     "no layout of this model fits this device count")
    else:
        lo = best.layout
        lines.append(f"suggested: data_parallel={lo.data_parallel} model_parallel={lo.model_parallel} "
                     f"pipeline_stage={lo.pipeline_stage} micro_batch_num={lo.micro_batch_num} "
                     f"use_seq_parallel={lo.use_seq_parallel} expert_parallel={lo.expert_parallel} "
                     f"optimizer_shard={lo.optimizer_shard} recompute={lo.recompute} "
                     f"({best.total / GIB:.1f} of {best.budget / GIB:.1f} GiB usable)")
    return "\n".join(lines)
