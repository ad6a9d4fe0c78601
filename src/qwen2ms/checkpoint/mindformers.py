"""The rename table between Hugging Face Qwen2 parameter names and the upstream MindFormers names, both directions.

Everything here is a pure function on ``dict[str, numpy.ndarray]`` in the *released* HF layout
(one key per expert: ``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``), so it does not depend
on how the model stores experts in memory.

The MindFormers side follows the upstream converters ``research/qwen2/convert_weight.py`` (dense),
``research/qwen2/convert_moe_weight.py`` (Qwen2-57B-A14B) and ``mindformers/utils/convert_utils.py``
(``qkv_concat``):

=================================================  ==================================================
Hugging Face                                        MindFormers
=================================================  ==================================================
``model.embed_tokens.weight``                       ``model.tok_embeddings.embedding_weight``
``model.norm.weight``                               ``model.norm_out.weight``
``lm_head.weight``                                  ``lm_head.weight``
``…self_attn.{q,k,v,o}_proj.{weight,bias}``         ``…attention.{wq,wk,wv,wo}.{weight,bias}``
``…mlp.{gate,down,up}_proj.weight``                 ``…feed_forward.{w1,w2,w3}.weight``
``…input_layernorm.weight``                         ``…attention_norm.weight``
``…post_attention_layernorm.weight``                ``…ffn_norm.weight``
``…mlp.gate.weight`` (router)                       ``…feed_forward.routed_experts.router.dense.weight``
``…mlp.experts.{e}.{gate,down,up}_proj.weight``     ``…feed_forward.routed_experts.ffn.{w1,w2,w3}.weight``
                                                    stacked over experts
``…mlp.shared_expert.{gate,down,up}_proj.weight``   ``…feed_forward.shared_experts.{w1,w2,w3}.weight``
``…mlp.shared_expert_gate.weight``                  ``…feed_forward.shared_experts_gate.weight``
q/k/v (optional fusion)                             ``…attention.w_qkv.{weight,bias}``
gate/up of dense MLPs (optional fusion)             ``…feed_forward.w_gate_hidden.weight``
=================================================  ==================================================

Layouts (all weights keep HF's ``[out, in]``):

* Routed experts: ``"out_in"`` stacks to ``[E, out, in]`` (upstream ``use_gmm=False``);
  ``"in_out"`` is ``[E, in, out]``, what the upstream's MoE converter writes by default
  (``use_gmm=True``, for GroupedMatmul). Import detects which one it got.
* ``w_qkv``: the upstream's grouped ("megatron") order: for each KV group, that group's
  ``n_rep`` query heads, then its key head, then its value head.
* ``w_gate_hidden``: rows interleaved, gate row ``j`` then up row ``j`` (upstream ``ffn_concat_hf2mg``).
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..errors import CheckpointError

__all__ = [
    "CheckpointNamingError",
    "HF",
    "MINDFORMERS",
    "to_mindformers",
    "from_mindformers",
    "detect_naming",
    "hf_key_to_mindformers",
    "mindformers_key_to_hf",
    "concat_qkv_grouped",
    "split_qkv_grouped",
    "interleave_gate_up",
    "split_gate_up",
    "hf_parameter_shapes",
    "split_training_state",
    "detect_expert_layout",
    "mindformers_shapes_to_hf",
    "model_order_key",
    "conversion_groups",
]

HF = "hf"
MINDFORMERS = "mindformers"
NAMINGS = (HF, MINDFORMERS)
EXPERT_LAYOUTS = ("out_in", "in_out")


class CheckpointNamingError(CheckpointError):
    """A checkpoint's keys or tensors do not fit the naming (or layout) they are being converted from."""


# ---------------------------------------------------------------------------------------------
# The one rename table. Keys outside decoder layers are mapped whole; keys inside
# ``model.layers.{i}.`` are mapped by their suffix.
_TOP_LEVEL: Dict[str, str] = {
    "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
    "model.norm.weight": "model.norm_out.weight",
    "lm_head.weight": "lm_head.weight",
}


def _layer_table() -> Dict[str, str]:
    table: Dict[str, str] = {}
    for hf, mf in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("o_proj", "wo")):
        for kind in ("weight", "bias"):
            table[f"self_attn.{hf}.{kind}"] = f"attention.{mf}.{kind}"
    for hf, mf in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
        table[f"mlp.{hf}.weight"] = f"feed_forward.{mf}.weight"
        table[f"mlp.shared_expert.{hf}.weight"] = f"feed_forward.shared_experts.{mf}.weight"
    table["input_layernorm.weight"] = "attention_norm.weight"
    table["post_attention_layernorm.weight"] = "ffn_norm.weight"
    table["mlp.gate.weight"] = "feed_forward.routed_experts.router.dense.weight"
    table["mlp.shared_expert_gate.weight"] = "feed_forward.shared_experts_gate.weight"
    return table


_LAYER: Dict[str, str] = _layer_table()
_TOP_LEVEL_REV: Dict[str, str] = {v: k for k, v in _TOP_LEVEL.items()}
_LAYER_REV: Dict[str, str] = {v: k for k, v in _LAYER.items()}

_EXPERT_PROJ = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_EXPERT_PROJ_REV = {v: k for k, v in _EXPERT_PROJ.items()}

_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|down_proj|up_proj)\.weight$")
_MF_EXPERT = re.compile(r"^feed_forward\.routed_experts\.ffn\.(w1|w2|w3)\.weight$")
_MF_QKV = re.compile(r"^attention\.w_qkv\.(weight|bias)$")
_MF_GATE_HIDDEN = "feed_forward.w_gate_hidden.weight"
_QKV_SUFFIX = re.compile(r"^self_attn\.(q|k|v)_proj\.(weight|bias)$")
_ROUTER_MF = "feed_forward.routed_experts.router.dense.weight"

# What an upstream *training* checkpoint carries besides the weights (AdamW moments, loss-scale
# and step counters); they are not part of the model and are set aside on import.
_TRAINING_PREFIXES = ("adam_m.", "adam_v.", "accu_grads.", "moments.", "moment1.", "moment2.")
_TRAINING_KEYS = frozenset({
    "global_step", "scale_sense", "current_iterator_step", "last_overflow_iterator_step",
    "epoch_num", "step_num", "loss_scale", "learning_rate",
})


# ---------------------------------------------------------------------------------------------
# Single keys
def hf_key_to_mindformers(key: str) -> str:
    """The MindFormers name of one HF key (not for per-expert keys, which stack into one tensor).

    Args:
        key: an HF parameter name such as ``"model.layers.0.self_attn.q_proj.weight"``.

    Returns:
        The upstream name, e.g. ``"model.layers.0.attention.wq.weight"``.

    Raises:
        CheckpointNamingError: ``key`` is not a Qwen2 HF parameter name (or is a per-expert key).

    Example:
        >>> hf_key_to_mindformers("model.embed_tokens.weight")
        'model.tok_embeddings.embedding_weight'
    """
    if key in _TOP_LEVEL:
        return _TOP_LEVEL[key]
    m = _LAYER_KEY.match(key)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    if m and _HF_EXPERT.match(m.group(2)):
        raise CheckpointNamingError(
            f"{key!r} is a per-expert key: experts are stacked into one MindFormers tensor; "
            "use to_mindformers() on the whole layer")
    raise CheckpointNamingError(f"{key!r} is not a Qwen2 Hugging Face parameter name")


def mindformers_key_to_hf(key: str) -> str:
    """The HF name of one MindFormers key (not for stacked experts or fused tensors).

    Args:
        key: an upstream name such as ``"model.layers.0.attention.wq.weight"``.

    Returns:
        The HF name, e.g. ``"model.layers.0.self_attn.q_proj.weight"``.

    Raises:
        CheckpointNamingError: ``key`` is not a MindFormers Qwen2 name, or names a stacked/fused
            tensor that maps to several HF keys.

    Example:
        >>> mindformers_key_to_hf("model.norm_out.weight")
        'model.norm.weight'
    """
    if key in _TOP_LEVEL_REV:
        return _TOP_LEVEL_REV[key]
    m = _LAYER_KEY.match(key)
    if m and m.group(2) in _LAYER_REV:
        return f"model.layers.{m.group(1)}.{_LAYER_REV[m.group(2)]}"
    if m and (_MF_EXPERT.match(m.group(2)) or _MF_QKV.match(m.group(2)) or m.group(2) == _MF_GATE_HIDDEN):
        raise CheckpointNamingError(
            f"{key!r} holds several HF tensors (stacked experts or a fused projection); "
            "use from_mindformers() on the whole layer")
    raise CheckpointNamingError(f"{key!r} is not a MindFormers Qwen2 parameter name")


def _is_hf_key(key: str) -> bool:
    if key in _TOP_LEVEL:
        return True
    m = _LAYER_KEY.match(key)
    return bool(m) and (m.group(2) in _LAYER or bool(_HF_EXPERT.match(m.group(2))))


def _is_mf_key(key: str) -> bool:
    if key in _TOP_LEVEL_REV:
        return True
    m = _LAYER_KEY.match(key)
    if not m:
        return False
    s = m.group(2)
    return s in _LAYER_REV or bool(_MF_EXPERT.match(s) or _MF_QKV.match(s)) or s == _MF_GATE_HIDDEN


def split_training_state(keys: Iterable[str]) -> Tuple[List[str], List[str]]:
    """Separate model weights from the optimizer/loss-scale entries of a training checkpoint.

    Args:
        keys: checkpoint keys.

    Returns:
        ``(model_keys, training_keys)``, each in input order. Training keys are AdamW moments
        (``adam_m.*``, ``adam_v.*``), gradient accumulators and step/loss-scale counters.

    Example:
        >>> split_training_state(["model.norm_out.weight", "adam_m.model.norm_out.weight", "global_step"])
        (['model.norm_out.weight'], ['adam_m.model.norm_out.weight', 'global_step'])
    """
    model, training = [], []
    for k in keys:
        (training if k in _TRAINING_KEYS or k.startswith(_TRAINING_PREFIXES) else model).append(k)
    return model, training


def detect_naming(keys: Iterable[str]) -> str:
    """Tell whether checkpoint keys use HF names or MindFormers names.

    Training-state keys (see :func:`split_training_state`) are ignored.

    Args:
        keys: the checkpoint's keys.

    Returns:
        ``"hf"`` or ``"mindformers"``.

    Raises:
        CheckpointNamingError: the keys fit neither naming (the message lists the keys that do
            not fit the closer one), or are empty, or are only ``lm_head.weight``.

    Example:
        >>> detect_naming(["model.tok_embeddings.embedding_weight", "lm_head.weight"])
        'mindformers'
    """
    model_keys, _ = split_training_state(keys)
    if not model_keys:
        raise CheckpointNamingError("the checkpoint holds no model weights (no keys, or only optimizer state)")
    bad_hf = [k for k in model_keys if not _is_hf_key(k)]
    bad_mf = [k for k in model_keys if not _is_mf_key(k)]
    if not bad_hf and not bad_mf:
        raise CheckpointNamingError(
            f"cannot tell the naming from {model_keys!r} alone (valid in both); pass naming='hf' or 'mindformers'")
    if not bad_hf:
        return HF
    if not bad_mf:
        return MINDFORMERS
    closer, bad = (HF, bad_hf) if len(bad_hf) <= len(bad_mf) else (MINDFORMERS, bad_mf)
    raise CheckpointNamingError(
        f"{len(bad)} of {len(model_keys)} keys are neither Hugging Face nor MindFormers Qwen2 names "
        f"(closest: {closer}); for example {bad[:8]!r}")


def model_order_key(key: str) -> Tuple[Any, ...]:
    """Sort key putting checkpoint names in model order: embeddings, layers 0..N (numerically), norm, lm_head.

    Example:
        >>> sorted(["lm_head.weight", "model.layers.10.x", "model.layers.2.x", "model.embed_tokens.weight"],
        ...        key=model_order_key)
        ['model.embed_tokens.weight', 'model.layers.2.x', 'model.layers.10.x', 'lm_head.weight']
    """
    rank = 0 if "embed" in key else 2 if key.startswith("model.norm") else 3 if key.startswith("lm_head") else 1
    return (rank,) + tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key))


_UNIT = re.compile(r"^model\.layers\.(\d+)\.(?:"
                   r"mlp\.experts\.\d+\.(?P<expert>gate_proj|down_proj|up_proj)\.weight"
                   r"|self_attn\.[qkv]_proj\.(?P<qkv>weight|bias)"
                   r"|mlp\.(?P<mlp>gate_proj|up_proj)\.weight)$")


def conversion_groups(keys: Iterable[str], fuse_qkv: bool = False) -> List[List[str]]:
    """Split HF keys into the smallest groups :func:`to_mindformers` can convert on their own.

    A group is one projection of one layer's experts (they stack into one tensor), a layer's q/k/v
    weights or biases and its dense gate/up pair when fusing, and otherwise a single key. Streaming
    converters load one group at a time, so memory stays near the largest group.

    Args:
        keys: HF keys (released per-expert layout).
        fuse_qkv: group q/k/v and gate/up for fusion.

    Returns:
        Groups of keys, in model order.

    Example:
        >>> conversion_groups(["model.layers.0.mlp.experts.1.up_proj.weight", "model.norm.weight",
        ...                    "model.layers.0.mlp.experts.0.up_proj.weight"])
        [['model.layers.0.mlp.experts.0.up_proj.weight', 'model.layers.0.mlp.experts.1.up_proj.weight'], ['model.norm.weight']]
    """
    groups: Dict[str, List[str]] = {}
    for key in sorted(keys, key=model_order_key):
        m = _UNIT.match(key)
        unit = key
        if m and m.group("expert"):
            unit = f"{m.group(1)}/experts/{m.group('expert')}"
        elif m and fuse_qkv and m.group("qkv"):
            unit = f"{m.group(1)}/qkv/{m.group('qkv')}"
        elif m and fuse_qkv and m.group("mlp"):
            unit = f"{m.group(1)}/gate_up"
        groups.setdefault(unit, []).append(key)
    return list(groups.values())


# ---------------------------------------------------------------------------------------------
# Fused tensors
def _heads(config: Any, what: str) -> Tuple[int, int, int]:
    if config is None:
        raise CheckpointNamingError(
            f"{what} needs the model config (num_attention_heads, num_key_value_heads); pass config=Qwen2Config")
    n, kv = int(config.num_attention_heads), int(config.num_key_value_heads)
    return n, kv, int(config.head_dim)


def concat_qkv_grouped(q: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int, num_kv_heads: int) -> np.ndarray:
    """Concatenate q/k/v projections (weights ``[out, in]`` or biases ``[out]``) in the upstream's grouped order.

    For each of the ``num_kv_heads`` groups the output holds the group's ``num_heads // num_kv_heads``
    query heads, then its key head, then its value head.

    Args:
        q: ``[num_heads * D, ...]``.
        k: ``[num_kv_heads * D, ...]``.
        v: ``[num_kv_heads * D, ...]``.
        num_heads: query heads.
        num_kv_heads: key/value heads.

    Returns:
        ``[(num_heads + 2 * num_kv_heads) * D, ...]``.

    Example:
        >>> concat_qkv_grouped(np.arange(4), np.array([10, 11]), np.array([20, 21]), 4, 2).tolist()
        [0, 1, 10, 20, 2, 3, 11, 21]
    """
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise CheckpointNamingError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
    if q.shape[0] % num_heads or k.shape != v.shape or q.shape[1:] != k.shape[1:]:
        raise CheckpointNamingError(f"q/k/v shapes {q.shape}/{k.shape}/{v.shape} do not fit {num_heads} query "
                                    f"and {num_kv_heads} key/value heads")
    d = q.shape[0] // num_heads
    if k.shape[0] != num_kv_heads * d:
        raise CheckpointNamingError(f"k has {k.shape[0]} rows; expected num_kv_heads*head_dim = {num_kv_heads * d}")
    rest = q.shape[1:]
    qg = q.reshape((num_kv_heads, (num_heads // num_kv_heads) * d) + rest)
    kg = k.reshape((num_kv_heads, d) + rest)
    vg = v.reshape((num_kv_heads, d) + rest)
    return np.concatenate([qg, kg, vg], axis=1).reshape((-1,) + rest)


def split_qkv_grouped(qkv: np.ndarray, num_heads: int, num_kv_heads: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`concat_qkv_grouped`: split a grouped-order ``w_qkv`` back into HF q, k, v.

    Args:
        qkv: ``[(num_heads + 2 * num_kv_heads) * D, ...]``.
        num_heads: query heads.
        num_kv_heads: key/value heads.

    Returns:
        ``(q, k, v)`` with ``[num_heads * D, ...]``, ``[num_kv_heads * D, ...]`` twice.

    Example:
        >>> [a.tolist() for a in split_qkv_grouped(np.array([0, 1, 10, 20, 2, 3, 11, 21]), 4, 2)]
        [[0, 1, 2, 3], [10, 11], [20, 21]]
    """
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise CheckpointNamingError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
    total = num_heads + 2 * num_kv_heads
    if qkv.shape[0] % total:
        raise CheckpointNamingError(
            f"w_qkv has {qkv.shape[0]} rows, not a multiple of num_heads + 2*num_kv_heads = {total}")
    d = qkv.shape[0] // total
    rest = qkv.shape[1:]
    n_rep = num_heads // num_kv_heads
    g = qkv.reshape((num_kv_heads, (n_rep + 2) * d) + rest)
    q = np.ascontiguousarray(g[:, : n_rep * d]).reshape((num_heads * d,) + rest)
    k = np.ascontiguousarray(g[:, n_rep * d: (n_rep + 1) * d]).reshape((num_kv_heads * d,) + rest)
    v = np.ascontiguousarray(g[:, (n_rep + 1) * d:]).reshape((num_kv_heads * d,) + rest)
    return q, k, v


def interleave_gate_up(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """The upstream's ``w_gate_hidden``: rows of ``gate`` ([I, H]) and ``up`` ([I, H]) interleaved.

    Example:
        >>> interleave_gate_up(np.array([[1], [2]]), np.array([[10], [20]])).ravel().tolist()
        [1, 10, 2, 20]
    """
    if gate.shape != up.shape or gate.ndim != 2:
        raise CheckpointNamingError(f"gate {gate.shape} and up {up.shape} must be equal 2-D shapes")
    return np.stack([gate, up], axis=1).reshape(2 * gate.shape[0], gate.shape[1])


def split_gate_up(w: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`interleave_gate_up`: ``(gate, up)`` from an interleaved ``[2I, H]`` tensor."""
    if w.ndim != 2 or w.shape[0] % 2:
        raise CheckpointNamingError(f"w_gate_hidden must be [2*intermediate, hidden], got {w.shape}")
    g = w.reshape(w.shape[0] // 2, 2, w.shape[1])
    return np.ascontiguousarray(g[:, 0]), np.ascontiguousarray(g[:, 1])


# ---------------------------------------------------------------------------------------------
# Whole state dicts
def to_mindformers(
    state_dict: Mapping[str, np.ndarray],
    config: Any = None,
    *,
    fuse_qkv: bool = False,
    fuse_gate_up: Optional[bool] = None,
    expert_layout: str = "out_in",
) -> Dict[str, np.ndarray]:
    """Rename an HF-named state dict (released per-expert layout) to MindFormers names.

    Args:
        state_dict: HF key -> array. Per-expert keys of a layer must all be present.
        config: a :class:`~qwen2ms.Qwen2Config`; needed for ``fuse_qkv`` and used to check the
            expert count.
        fuse_qkv: write ``attention.w_qkv`` (grouped order) instead of ``wq``/``wk``/``wv``.
        fuse_gate_up: write ``feed_forward.w_gate_hidden`` for dense MLPs. ``None`` follows
            ``fuse_qkv``, as the upstream's single ``qkv_concat`` switch does.
        expert_layout: ``"out_in"`` stacks experts as ``[E, out, in]``; ``"in_out"`` as ``[E, in, out]``.

    Returns:
        A new dict with MindFormers keys (arrays are shared where no reshaping was needed).

    Raises:
        CheckpointNamingError: unknown keys (all listed), incomplete expert or q/k/v groups.

    Example:
        >>> sd = {"model.norm.weight": np.ones(4, np.float32)}
        >>> list(to_mindformers(sd))
        ['model.norm_out.weight']
    """
    if expert_layout not in EXPERT_LAYOUTS:
        raise CheckpointNamingError(f"expert_layout must be one of {EXPERT_LAYOUTS}, got {expert_layout!r}")
    fuse_ffn = fuse_qkv if fuse_gate_up is None else fuse_gate_up
    n_heads, n_kv, _ = _heads(config, "fuse_qkv") if fuse_qkv else (0, 0, 0)

    out: Dict[str, np.ndarray] = {}
    experts: Dict[Tuple[str, str], Dict[int, np.ndarray]] = defaultdict(dict)
    qkv: Dict[Tuple[str, str], Dict[str, np.ndarray]] = defaultdict(dict)
    gate_up: Dict[str, Dict[str, np.ndarray]] = defaultdict(dict)
    unknown: List[str] = []
    for key, value in state_dict.items():
        if key in _TOP_LEVEL:
            out[_TOP_LEVEL[key]] = value
            continue
        m = _LAYER_KEY.match(key)
        if not m:
            unknown.append(key)
            continue
        layer, suffix = m.group(1), m.group(2)
        em = _HF_EXPERT.match(suffix)
        if em:
            experts[(layer, _EXPERT_PROJ[em.group(2)])][int(em.group(1))] = value
            continue
        qm = _QKV_SUFFIX.match(suffix)
        if fuse_qkv and qm:
            qkv[(layer, qm.group(2))][qm.group(1)] = value
            continue
        if fuse_ffn and suffix in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
            gate_up[layer][suffix] = value
            continue
        if suffix not in _LAYER:
            unknown.append(key)
            continue
        out[f"model.layers.{layer}.{_LAYER[suffix]}"] = value
    if unknown:
        raise CheckpointNamingError(
            f"{len(unknown)} keys are not Qwen2 Hugging Face parameter names, e.g. {unknown[:8]!r}")

    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointNamingError(
                f"layer {layer}: fusing q/k/v {kind} needs all three; only {sorted(parts)} present")
        out[f"model.layers.{layer}.attention.w_qkv.{kind}"] = concat_qkv_grouped(
            parts["q"], parts["k"], parts["v"], n_heads, n_kv)
    for layer, parts in gate_up.items():
        if len(parts) != 2:
            raise CheckpointNamingError(f"layer {layer}: fusing the MLP needs gate_proj and up_proj; "
                                        f"only {sorted(parts)} present")
        out[f"model.layers.{layer}.{_MF_GATE_HIDDEN}"] = interleave_gate_up(parts["mlp.gate_proj.weight"],
                                                                            parts["mlp.up_proj.weight"])
    for (layer, proj), per_expert in experts.items():
        n = len(per_expert)
        if sorted(per_expert) != list(range(n)):
            missing = sorted(set(range(max(per_expert) + 1)) - set(per_expert))
            raise CheckpointNamingError(f"layer {layer}: expert {proj} weights missing for experts {missing}")
        if config is not None and getattr(config, "num_experts", 0) and n != config.num_experts:
            raise CheckpointNamingError(
                f"layer {layer}: {n} experts in the state dict but config.num_experts = {config.num_experts}")
        stacked = np.stack([per_expert[e] for e in range(n)])
        if expert_layout == "in_out":
            stacked = np.ascontiguousarray(stacked.transpose(0, 2, 1))
        out[f"model.layers.{layer}.feed_forward.routed_experts.ffn.{proj}.weight"] = stacked
    return out


def _expert_layout_of(w1_shape: Sequence[int], hidden: int, key: str) -> str:
    if len(w1_shape) != 3:
        raise CheckpointNamingError(f"{key} must be a 3-D stacked expert tensor, got shape {tuple(w1_shape)}")
    inner_in, inner_out = w1_shape[2] == hidden, w1_shape[1] == hidden
    if inner_in and not inner_out:
        return "out_in"
    if inner_out and not inner_in:
        return "in_out"
    if inner_in and inner_out:
        raise CheckpointNamingError(
            f"{key}: expert intermediate size equals hidden size ({hidden}), so [E, out, in] and [E, in, out] "
            "look alike; pass expert_layout='out_in' or 'in_out'")
    raise CheckpointNamingError(f"{key}: shape {tuple(w1_shape)} has no axis of the hidden size {hidden}")


def detect_expert_layout(shapes: Mapping[str, Sequence[int]], config: Any = None) -> Optional[str]:
    """Which way a MindFormers checkpoint stacks its routed experts, from tensor shapes alone.

    The hidden size comes from ``config``, else from the router (``[E, hidden]``), the final norm
    (``[hidden]``) or the embedding (``[vocab, hidden]``).

    Args:
        shapes: MindFormers key -> shape.
        config: optional :class:`~qwen2ms.Qwen2Config`.

    Returns:
        ``"out_in"`` (``[E, out, in]``), ``"in_out"`` (``[E, in, out]``), or ``None`` when there
        are no stacked experts.

    Raises:
        CheckpointNamingError: the hidden size cannot be found, the layouts disagree between
            tensors, or the expert size equals the hidden size (ambiguous).

    Example:
        >>> detect_expert_layout({"model.norm_out.weight": (16,),
        ...                       "model.layers.0.feed_forward.routed_experts.ffn.w1.weight": (4, 8, 16)})
        'out_in'
    """
    experts = {}
    for key, shape in shapes.items():
        m = _LAYER_KEY.match(key)
        em = _MF_EXPERT.match(m.group(2)) if m else None
        if em:
            shape = tuple(shape)
            experts[key] = shape if em.group(1) != "w2" else shape[:1] + shape[:0:-1]
    if not experts:
        return None
    hidden = getattr(config, "hidden_size", None) if config is not None else None
    if hidden is None:
        for key, shape in shapes.items():
            m = _LAYER_KEY.match(key)
            if m and m.group(2) == _ROUTER_MF:
                hidden = tuple(shape)[1]
                break
        else:
            if "model.norm_out.weight" in shapes:
                hidden = tuple(shapes["model.norm_out.weight"])[0]
            elif "model.tok_embeddings.embedding_weight" in shapes:
                hidden = tuple(shapes["model.tok_embeddings.embedding_weight"])[1]
    if hidden is None:
        raise CheckpointNamingError(
            "cannot tell whether the experts are [E, out, in] or [E, in, out]: no router, norm or embedding "
            "weight to read the hidden size from; pass config= or expert_layout=")
    layouts = {key: _expert_layout_of(shape, int(hidden), key) for key, shape in experts.items()}
    if len(set(layouts.values())) > 1:
        raise CheckpointNamingError(f"stacked experts mix [E, out, in] and [E, in, out] layouts: {layouts}")
    return next(iter(layouts.values()))


def from_mindformers(
    state_dict: Mapping[str, np.ndarray],
    config: Any = None,
    *,
    expert_layout: Optional[str] = None,
) -> Dict[str, np.ndarray]:
    """Rename a MindFormers state dict to HF names in the released per-expert layout.

    Training-state entries (optimizer moments, step counters) must be removed first
    (:func:`split_training_state`).

    Args:
        state_dict: MindFormers key -> array.
        config: a :class:`~qwen2ms.Qwen2Config`; needed to split ``w_qkv`` and used to tell the
            stacked-expert layout apart.
        expert_layout: ``"out_in"`` or ``"in_out"``; ``None`` detects it with
            :func:`detect_expert_layout` from this dict's shapes and ``config``.

    Returns:
        A new dict with HF keys.

    Raises:
        CheckpointNamingError: unknown keys (all listed), or a fused/stacked tensor that cannot be
            split (no config, wrong shape, ambiguous layout).

    Example:
        >>> from_mindformers({"model.tok_embeddings.embedding_weight": np.zeros((8, 4))}).keys()
        dict_keys(['model.embed_tokens.weight'])
    """
    if expert_layout is not None and expert_layout not in EXPERT_LAYOUTS:
        raise CheckpointNamingError(f"expert_layout must be one of {EXPERT_LAYOUTS} or None, got {expert_layout!r}")
    layout = expert_layout
    if layout is None and any(".routed_experts.ffn." in k for k in state_dict):
        layout = detect_expert_layout({k: v.shape for k, v in state_dict.items()}, config)
    out: Dict[str, np.ndarray] = {}
    unknown: List[str] = []
    for key, value in state_dict.items():
        if key in _TOP_LEVEL_REV:
            out[_TOP_LEVEL_REV[key]] = value
            continue
        m = _LAYER_KEY.match(key)
        if not m:
            unknown.append(key)
            continue
        layer, suffix = m.group(1), m.group(2)
        prefix = f"model.layers.{layer}."
        if suffix in _LAYER_REV:
            out[prefix + _LAYER_REV[suffix]] = value
            continue
        qm = _MF_QKV.match(suffix)
        if qm:
            n, kv, _ = _heads(config, f"splitting {key}")
            for name, part in zip("qkv", split_qkv_grouped(value, n, kv)):
                out[f"{prefix}self_attn.{name}_proj.{qm.group(1)}"] = part
            continue
        if suffix == _MF_GATE_HIDDEN:
            gate, up = split_gate_up(value)
            out[prefix + "mlp.gate_proj.weight"] = gate
            out[prefix + "mlp.up_proj.weight"] = up
            continue
        em = _MF_EXPERT.match(suffix)
        if em:
            proj = em.group(1)
            stacked = value if layout == "out_in" else value.transpose(0, 2, 1)
            for e in range(stacked.shape[0]):
                out[f"{prefix}mlp.experts.{e}.{_EXPERT_PROJ_REV[proj]}.weight"] = np.ascontiguousarray(stacked[e])
            continue
        unknown.append(key)
    if unknown:
        raise CheckpointNamingError(
            f"{len(unknown)} keys are not MindFormers Qwen2 parameter names, e.g. {unknown[:8]!r}")
    return out


def mindformers_shapes_to_hf(
    shapes: Mapping[str, Sequence[int]],
    config: Any = None,
    *,
    expert_layout: Optional[str] = None,
) -> Dict[str, Tuple[int, ...]]:
    """The HF keys and shapes :func:`from_mindformers` would produce, computed from shapes alone.

    Lets a converter check a whole checkpoint against a config before reading any tensor data.

    Args:
        shapes: MindFormers key -> shape (training-state keys removed).
        config: a :class:`~qwen2ms.Qwen2Config`; required when ``w_qkv`` is present.
        expert_layout: as in :func:`from_mindformers`.

    Returns:
        HF key -> shape.

    Raises:
        CheckpointNamingError: as :func:`from_mindformers` would.

    Example:
        >>> mindformers_shapes_to_hf({"model.layers.0.feed_forward.w_gate_hidden.weight": (8, 4)})
        {'model.layers.0.mlp.gate_proj.weight': (4, 4), 'model.layers.0.mlp.up_proj.weight': (4, 4)}
    """
    layout = expert_layout
    if layout is None:
        layout = detect_expert_layout(shapes, config)
    out: Dict[str, Tuple[int, ...]] = {}
    unknown: List[str] = []
    for key, shape in shapes.items():
        shape = tuple(int(d) for d in shape)
        if key in _TOP_LEVEL_REV:
            out[_TOP_LEVEL_REV[key]] = shape
            continue
        m = _LAYER_KEY.match(key)
        if not m:
            unknown.append(key)
            continue
        prefix, suffix = f"model.layers.{m.group(1)}.", m.group(2)
        qm, em = _MF_QKV.match(suffix), _MF_EXPERT.match(suffix)
        if suffix in _LAYER_REV:
            out[prefix + _LAYER_REV[suffix]] = shape
        elif qm:
            n, kv, _ = _heads(config, f"splitting {key}")
            if not shape or shape[0] % (n + 2 * kv):
                raise CheckpointNamingError(f"{key}: {shape[0] if shape else 0} rows, not a multiple of "
                                            f"num_heads + 2*num_kv_heads = {n + 2 * kv}")
            d = shape[0] // (n + 2 * kv)
            out[f"{prefix}self_attn.q_proj.{qm.group(1)}"] = (n * d,) + shape[1:]
            out[f"{prefix}self_attn.k_proj.{qm.group(1)}"] = (kv * d,) + shape[1:]
            out[f"{prefix}self_attn.v_proj.{qm.group(1)}"] = (kv * d,) + shape[1:]
        elif suffix == _MF_GATE_HIDDEN:
            if len(shape) != 2 or shape[0] % 2:
                raise CheckpointNamingError(f"{key} must be [2*intermediate, hidden], got {shape}")
            out[prefix + "mlp.gate_proj.weight"] = (shape[0] // 2, shape[1])
            out[prefix + "mlp.up_proj.weight"] = (shape[0] // 2, shape[1])
        elif em:
            if len(shape) != 3:
                raise CheckpointNamingError(f"{key} must be a 3-D stacked expert tensor, got {shape}")
            each = shape[1:] if layout == "out_in" else shape[:0:-1]
            for e in range(shape[0]):
                out[f"{prefix}mlp.experts.{e}.{_EXPERT_PROJ_REV[em.group(1)]}.weight"] = each
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointNamingError(
            f"{len(unknown)} keys are not MindFormers Qwen2 parameter names, e.g. {unknown[:8]!r}")
    return out


# ---------------------------------------------------------------------------------------------
def hf_parameter_shapes(config: Any, include_tied_lm_head: bool = False) -> Dict[str, Tuple[int, ...]]:
    """Every HF key (released per-expert layout) a checkpoint of ``config`` holds, with its shape.

    Args:
        config: a :class:`~qwen2ms.Qwen2Config`.
        include_tied_lm_head: list ``lm_head.weight`` even when the embeddings are tied.

    Returns:
        key -> shape, in the order HF's ``state_dict()`` lists them.

    Example:
        >>> from qwen2ms import Qwen2Config
        >>> shapes = hf_parameter_shapes(Qwen2Config.from_preset("qwen2-0.5b"))
        >>> shapes["model.layers.0.self_attn.k_proj.weight"]
        (128, 896)
    """
    h, d = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes: Dict[str, Tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[f"{p}self_attn.{name}.weight"] = (rows, h)
            if getattr(config, "qkv_bias", True):
                shapes[f"{p}self_attn.{name}.bias"] = (rows,)
        shapes[f"{p}self_attn.o_proj.weight"] = (h, q)
        if config.is_sparse_layer(i):
            shapes[f"{p}mlp.gate.weight"] = (config.num_experts, h)
            mi = config.moe_intermediate_size
            for e in range(config.num_experts):
                shapes[f"{p}mlp.experts.{e}.gate_proj.weight"] = (mi, h)
                shapes[f"{p}mlp.experts.{e}.up_proj.weight"] = (mi, h)
                shapes[f"{p}mlp.experts.{e}.down_proj.weight"] = (h, mi)
            si = config.shared_expert_intermediate_size
            if si:
                shapes[f"{p}mlp.shared_expert.gate_proj.weight"] = (si, h)
                shapes[f"{p}mlp.shared_expert.up_proj.weight"] = (si, h)
                shapes[f"{p}mlp.shared_expert.down_proj.weight"] = (h, si)
                shapes[f"{p}mlp.shared_expert_gate.weight"] = (1, h)
        else:
            it = config.intermediate_size
            shapes[f"{p}mlp.gate_proj.weight"] = (it, h)
            shapes[f"{p}mlp.up_proj.weight"] = (it, h)
            shapes[f"{p}mlp.down_proj.weight"] = (h, it)
        shapes[f"{p}input_layernorm.weight"] = (h,)
        shapes[f"{p}post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if include_tied_lm_head or not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes
