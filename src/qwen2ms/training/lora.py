"""LoRA adapters for the model's linear layers: inject, save adapter-only (PEFT key names), load, merge, unload.

Injection replaces each targeted linear Cell (a module with a 2-D ``weight`` ``[out, in]`` and an
optional ``bias``, e.g. ``model.layers.0.self_attn.q_proj``) by a :class:`LoraLinear` that wraps
it (base parameters frozen, their names unchanged) and adds ``lora_A`` ``[r, in]`` and ``lora_B``
``[out, r]``::

    y = x @ W.T + b + (dropout(x) @ A.T @ B.T) * (alpha / r)

``A`` starts as PEFT's Kaiming-uniform (bound ``1/sqrt(in)``), ``B`` as zeros, so an untrained
adapter leaves the model's output unchanged. No model code changes.

Adapter files follow PEFT's layout so tools that read PEFT adapters can read ours:
``adapter_model.safetensors`` with keys ``base_model.model.<module path>.lora_A.weight`` /
``.lora_B.weight``, and ``adapter_config.json`` (``peft_type: "LORA"``, ``r``, ``lora_alpha``,
``lora_dropout``, ``target_modules``, ``bias: "none"``, ``task_type: "CAUSAL_LM"``).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops


__all__ = [
    "LoraConfig",
    "LoraLinear",
    "apply_lora",
    "lora_modules",
    "merge_and_unload",
    "save_adapter",
    "load_adapter",
    "load_adapter_weights",
    "ADAPTER_WEIGHTS_NAME",
    "ADAPTER_CONFIG_NAME",
]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraConfig:
    """LoRA hyper-parameters.

    Args:
        r: rank of the update.
        alpha: the update is scaled by ``alpha / r``.
        dropout: dropout probability on the adapter's input (training only). The masks come from
            MindSpore's Dropout op, whose generator state is not part of a checkpoint: a resumed run
            draws other masks than an uninterrupted one, so resume is loss-identical only at 0.
        target_modules: linear layers to adapt, matched by the end of their module path
            (``"q_proj"`` matches every ``...self_attn.q_proj``; ``"layers.0.self_attn.q_proj"`` one).
        seed: seed of the ``lora_A`` initialisation.

    Example:
        >>> LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]).scaling
        2.0
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be an integer >= 1, got {self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, str):
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        if not self.target_modules:
            raise ValueError("LoraConfig.target_modules must name at least one linear layer, e.g. ['q_proj']")

    @property
    def scaling(self) -> float:
        """``alpha / r``."""
        return float(self.alpha) / float(self.r)

    def to_peft_dict(self, base_model_name_or_path: Optional[str] = None) -> Dict[str, Any]:
        """The ``adapter_config.json`` contents (PEFT field names)."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": list(self.target_modules),
            "bias": "none",
            "fan_in_fan_out": False,
            "init_lora_weights": True,
            "base_model_name_or_path": base_model_name_or_path,
        }

    @classmethod
    def from_peft_dict(cls, data: Dict[str, Any]) -> "LoraConfig":
        """Read an ``adapter_config.json`` dict (only LoRA without bias training is supported)."""
        if data.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter_config.json has peft_type {data.get('peft_type')!r}; only 'LORA' is supported")
        if data.get("bias", "none") != "none":
            raise ValueError(f"adapter_config.json has bias={data.get('bias')!r}; only 'none' is supported")
        targets = data.get("target_modules") or []
        if isinstance(targets, str):
            targets = [targets]
        return cls(r=int(data["r"]), alpha=float(data.get("lora_alpha", data["r"])),
                   dropout=float(data.get("lora_dropout", 0.0)), target_modules=list(targets))


def _is_linear(cell: nn.Cell) -> bool:
    w = getattr(cell, "weight", None)
    return (isinstance(w, Parameter) and len(w.shape) == 2 and hasattr(cell, "bias")
            and not isinstance(cell, LoraLinear) and type(cell).__name__ != "Embedding")


def _matches(path: str, targets: Sequence[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


class LoraLinear(nn.Cell):
    """A linear layer plus a trainable low-rank update; the base layer is kept, unchanged, inside.

    The base Cell is held as ``base`` and called as-is (so any linear implementation works); its
    parameters keep their original names (the HF keys). The adapter adds ``lora_A`` ``[r, in]`` and
    ``lora_B`` ``[out, r]``, named ``<module path>.lora_A`` / ``.lora_B``.

    Args:
        base: the linear Cell being adapted (``weight`` ``[out, in]``, optional ``bias``).
        config: the :class:`LoraConfig`.
        dtype: dtype of ``lora_A``/``lora_B`` (the training precision: float32 or float16).
        rng: generator for ``lora_A``'s initialisation.
    """

    def __init__(self, base: nn.Cell, config: LoraConfig, dtype: Any = ms.float32,
                 rng: Optional[np.random.Generator] = None) -> None:
        super().__init__(auto_prefix=False)
        out_f, in_f = base.weight.shape
        self.base = base
        self.config = config
        self.scaling = config.scaling
        self.dropout = float(config.dropout)
        self.in_features, self.out_features = int(in_f), int(out_f)
        rng = rng or np.random.default_rng(config.seed)
        bound = 1.0 / math.sqrt(in_f)  # kaiming_uniform_(a=sqrt(5)), PEFT's default for lora_A
        a = rng.uniform(-bound, bound, size=(config.r, in_f)).astype(np.float32)
        self.lora_A = Parameter(Tensor(a).astype(dtype), name="lora_A")
        self.lora_B = Parameter(Tensor(np.zeros((out_f, config.r), np.float32)).astype(dtype), name="lora_B")

    @property
    def weight(self) -> Parameter:
        """The base layer's weight."""
        return self.base.weight

    def construct(self, x: Tensor) -> Tensor:
        y = self.base(x)
        h = x
        if self.training and self.dropout > 0:
            h = ops.dropout(h, p=self.dropout)
        lead = h.shape[:-1]
        h2 = h.reshape(-1, self.in_features)
        low = _matmul_tb(h2, self.lora_A.astype(h.dtype))  # [N, r]
        update = _matmul_tb(low, self.lora_B.astype(h.dtype)).reshape(lead + (self.out_features,))
        return y + (update * self.scaling).astype(y.dtype)

    def merged_weight(self) -> Tensor:
        """``W + scaling * B @ A`` computed in float32 and returned in the base weight's dtype."""
        if getattr(self.base, "weight_scale", None) is not None:
            raise ValueError("cannot merge a LoRA adapter into an int8-quantized weight; merge into the float "
                             "model before quantizing")
        w = self.base.weight
        delta = ops.matmul(self.lora_B.astype(ms.float32), self.lora_A.astype(ms.float32)) * self.scaling
        return (w.astype(ms.float32) + delta).astype(w.dtype)


_matmul_tb = ops.MatMul(transpose_b=True)


def _parent_and_attr(model: nn.Cell, path: str) -> Tuple[nn.Cell, str]:
    parts = path.split(".")
    parent = model
    for p in parts[:-1]:
        parent = parent._cells[p]  # CellList children are keyed by their index string too
    return parent, parts[-1]


def _replace(model: nn.Cell, path: str, new: nn.Cell) -> None:
    # Assigning a Cell attribute makes MindSpore re-prefix the parameters below it with only the
    # attribute name ("q_proj.weight"); keep every existing name (the HF keys) as it was.
    names = {id(p): p.name for p in model.get_parameters()}
    parent, attr = _parent_and_attr(model, path)
    setattr(parent, attr, new)
    for p in new.get_parameters():
        if id(p) in names:
            p.name = names[id(p)]


def lora_modules(model: nn.Cell) -> List[Tuple[str, LoraLinear]]:
    """``(module path, LoraLinear)`` for every adapter in ``model``."""
    return [(path, cell) for path, cell in model.cells_and_names() if isinstance(cell, LoraLinear)]


def apply_lora(model: nn.Cell, config: LoraConfig, dtype: Any = ms.float32) -> List[str]:
    """Freeze ``model`` and add LoRA adapters to the linear layers named by ``config.target_modules``.

    Args:
        model: e.g. a :class:`qwen2ms.Qwen2ForCausalLM` (changed in place).
        config: rank, alpha, dropout and targets.
        dtype: adapter dtype (float32, or float16 for fp16 training).

    Returns:
        The module paths that received an adapter.

    Raises:
        ValueError: the model already has adapters, or no linear layer matches the targets (the
            message lists the linear layer names that exist).

    Example:
        >>> paths = apply_lora(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
    """
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters; merge_and_unload() it first or keep training them")
    if any(t == "lm_head" or t.endswith(".lm_head") for t in config.target_modules):
        raise ValueError("lm_head cannot take a LoRA adapter: Qwen2ForCausalLM multiplies by its weight directly "
                         "(it may be tied to the embeddings); adapt the attention/MLP projections instead")
    linears = [(path, cell) for path, cell in model.cells_and_names()
               if path and _is_linear(cell) and path != "lm_head"]
    chosen = [(path, cell) for path, cell in linears if _matches(path, config.target_modules)]
    if not chosen:
        names = sorted({path.rsplit(".", 1)[-1] for path, _ in linears})
        raise ValueError(f"no linear layer matches target_modules={config.target_modules}; the model's linear "
                         f"layers are named {names}")
    for p in model.get_parameters():
        p.requires_grad = False
    rng = np.random.default_rng(config.seed)
    for path, cell in chosen:
        lora = LoraLinear(cell, config, dtype=dtype, rng=rng)
        _replace(model, path, lora)
        lora.lora_A.name = f"{path}.lora_A"
        lora.lora_B.name = f"{path}.lora_B"
    return [path for path, _ in chosen]


def merge_and_unload(model: nn.Cell) -> List[str]:
    """Fold every adapter into its base weight and put plain linear layers back (in place).

    Afterwards the model has exactly its original parameters (HF names), with
    ``W <- W + (alpha / r) * B @ A``, all trainable again, ready for ``save_pretrained``.

    Returns:
        The module paths that were merged.
    """
    merged = []
    for path, cell in lora_modules(model):
        from .checkpointing import assign_parameters

        assign_parameters([(cell.base.weight, cell.merged_weight())])
        _replace(model, path, cell.base)
        merged.append(path)
    for p in model.get_parameters():
        p.requires_grad = True
    return merged


def _adapter_tensors(model: nn.Cell) -> Dict[str, Parameter]:
    out: Dict[str, Parameter] = {}
    for path, cell in lora_modules(model):
        out[f"{_PEFT_PREFIX}{path}.lora_A.weight"] = cell.lora_A
        out[f"{_PEFT_PREFIX}{path}.lora_B.weight"] = cell.lora_B
    return out


def save_adapter(model: nn.Cell, save_directory: Union[str, os.PathLike]) -> None:
    """Write only the adapters: ``adapter_model.safetensors`` + ``adapter_config.json`` (PEFT layout).

    Files are written to temporary names and renamed, so a crash leaves no partial file.

    Raises:
        ValueError: the model has no adapters.
    """
    from ..hub import atomic_write_text
    from .checkpointing import save_tensors

    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to save; use save_pretrained for a full model")
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{ADAPTER_WEIGHTS_NAME}.tmp-{os.getpid()}"
    save_tensors(tmp, _adapter_tensors(model), metadata={"format": "pt"})
    os.replace(tmp, folder / ADAPTER_WEIGHTS_NAME)
    config = mods[0][1].config
    base = getattr(getattr(model, "config", None), "extra", {}) or {}
    cfg = config.to_peft_dict(base.get("_name_or_path"))
    atomic_write_text(folder / ADAPTER_CONFIG_NAME, json.dumps(cfg, indent=2, sort_keys=True))


def load_adapter_weights(model: nn.Cell, folder: Union[str, os.PathLike]) -> None:
    """Load ``adapter_model.safetensors`` from ``folder`` into the model's existing adapters.

    Raises:
        ValueError: missing or unexpected adapter tensors, or shape mismatches (all listed).
    """
    from .checkpointing import load_tensors

    arrays = load_tensors(Path(folder) / ADAPTER_WEIGHTS_NAME)
    targets = _adapter_tensors(model)
    missing = sorted(set(targets) - set(arrays))
    unexpected = sorted(set(arrays) - set(targets))
    wrong = [f"{k}: file {arrays[k].shape} vs model {tuple(targets[k].shape)}" for k in targets
             if k in arrays and tuple(arrays[k].shape) != tuple(targets[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"adapter in {os.fspath(folder)!r} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}")
    from .checkpointing import assign_parameters

    assign_parameters([(p, arrays[k]) for k, p in targets.items()])


def load_adapter(model: nn.Cell, folder: Union[str, os.PathLike], dtype: Any = ms.float32) -> List[str]:
    """Add adapters described by ``folder/adapter_config.json`` to ``model`` and load their weights.

    Args:
        model: the base model (without adapters).
        folder: a folder written by :func:`save_adapter` (or PEFT with the same module names).
        dtype: adapter dtype.

    Returns:
        The adapted module paths.

    Example:
        >>> model = Qwen2ForCausalLM.from_hf("Qwen/Qwen2-0.5B")  # doctest: +SKIP
        >>> load_adapter(model, "runs/lora/checkpoint-100")  # doctest: +SKIP
    """
    path = Path(folder) / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{os.fspath(folder)!r} has no {ADAPTER_CONFIG_NAME}; is it an adapter folder?")
    config = LoraConfig.from_peft_dict(json.loads(path.read_text(encoding="utf-8")))
    paths = apply_lora(model, config, dtype=dtype)
    load_adapter_weights(model, folder)
    return paths
