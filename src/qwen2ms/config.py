"""Qwen2Config: the architecture of a dense Qwen2 or Qwen2-MoE model, with Hugging Face field names and presets."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .errors import Qwen2msError

__all__ = ["Qwen2Config", "PRESETS", "ConfigError"]


class ConfigError(Qwen2msError, ValueError):
    """A Qwen2Config field has a value the model cannot be built with."""


_KNOWN_ACTS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")
_ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
# Keys that HF writes into config.json but that say nothing about the architecture: kept for the
# round trip without a warning.
_QUIET_KEYS = {
    "architectures", "torch_dtype", "dtype", "transformers_version", "use_cache", "attention_dropout",
    "_name_or_path", "return_dict", "output_hidden_states", "output_attentions", "id2label", "label2id",
    "problem_type", "chunk_size_feed_forward", "is_encoder_decoder", "tie_encoder_decoder", "auto_map",
    "quantization_config", "use_return_dict",
}
_warned_keys: set = set()


@dataclass
class Qwen2Config:
    """Architecture of a Qwen2 (dense) or Qwen2-MoE model. Field names are Hugging Face's.

    Only architecture lives here: sampling settings belong to ``GenerationConfig``, batch and
    parallel settings to the trainer and ``ParallelConfig``.

    Example:
        >>> cfg = Qwen2Config.from_preset("qwen2-0.5b")
        >>> cfg.num_parameters()
        494032768
    """

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    use_sliding_window: bool = False
    sliding_window: Optional[int] = 4096
    max_window_layers: int = 28
    layer_types: Optional[List[str]] = None
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, List[int]]] = None
    pad_token_id: Optional[int] = None
    model_type: str = "qwen2"
    # Mixture of experts (model_type "qwen2_moe"); num_experts == 0 means dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: List[int] = field(default_factory=list)
    router_aux_loss_coef: float = 0.001
    output_router_logits: bool = False
    qkv_bias: bool = True
    # Keys of the source config.json this class does not model; written back by to_dict().
    extra: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mlp_only_layers is None:
            self.mlp_only_layers = []
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def is_moe(self) -> bool:
        """True for Qwen2-MoE configs (``num_experts > 0``)."""
        return self.num_experts > 0

    @property
    def head_dim(self) -> int:
        """Size of one attention head: ``hidden_size // num_attention_heads``."""
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_type(self) -> str:
        """The RoPE scaling kind: "default", "linear", "dynamic" or "yarn"."""
        if not self.rope_scaling:
            return "default"
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` uses the MoE block (same rule as the reference)."""
        return (
            self.is_moe
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    def layer_attention_types(self) -> List[str]:
        """Per layer "full_attention" or "sliding_attention", following the reference's rule.

        An explicit ``layer_types`` list wins. Otherwise dense Qwen2 slides on layers
        ``>= max_window_layers`` and Qwen2-MoE on even-indexed layers ``< max_window_layers``
        (the rule of the reference implementation, transformers 5); both only when
        ``use_sliding_window`` is true.
        """
        if self.layer_types is not None:
            return list(self.layer_types)
        if not self.use_sliding_window or not self.sliding_window:
            return ["full_attention"] * self.num_hidden_layers
        if self.is_moe:
            rule = lambda i: (i + 1) % 2 == 1 and i < self.max_window_layers  # noqa: E731
        else:
            rule = lambda i: i >= self.max_window_layers  # noqa: E731
        return ["sliding_attention" if rule(i) else "full_attention" for i in range(self.num_hidden_layers)]

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field that cannot work."""
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if not self.is_moe or self.mlp_only_layers or self.decoder_sparse_step > 1:
            if not isinstance(self.intermediate_size, int) or self.intermediate_size <= 0:
                raise ConfigError(f"intermediate_size must be a positive integer, got {self.intermediate_size!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head size hidden_size/num_attention_heads = {self.head_dim} must be even for RoPE")
        if self.hidden_act not in _KNOWN_ACTS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; use one of {_KNOWN_ACTS}")
        if not self.rope_theta or self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if not self.rms_norm_eps or self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if self.rope_scaling:
            kind = self.rope_type
            if kind not in _ROPE_TYPES:
                raise ConfigError(f"rope_scaling type {kind!r} is not supported; use one of {_ROPE_TYPES}")
            if kind != "default":
                factor = self.rope_scaling.get("factor")
                if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0:
                    raise ConfigError(f"rope_scaling['factor'] must be a positive number for {kind!r}, got {factor!r}")
        if self.use_sliding_window and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window must be a positive integer when use_sliding_window is true, "
                              f"got {self.sliding_window!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= {
                    "full_attention", "sliding_attention"}:
                raise ConfigError("layer_types must list 'full_attention'/'sliding_attention' once per layer")
        if self.is_moe:
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ConfigError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                                  f"got {self.num_experts_per_tok}")
            if self.moe_intermediate_size <= 0:
                raise ConfigError(f"moe_intermediate_size must be positive, got {self.moe_intermediate_size}")
            if self.shared_expert_intermediate_size < 0:
                raise ConfigError("shared_expert_intermediate_size must be >= 0 (0 means no shared expert)")
            if self.decoder_sparse_step < 1:
                raise ConfigError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
            bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
            if bad:
                raise ConfigError(f"mlp_only_layers names layers outside [0, {self.num_hidden_layers}): {bad}")

    # ------------------------------------------------------------------ size
    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters, computed analytically (equals the HF model's count).

        Args:
            exclude_embeddings: leave out the input embedding (and the lm_head when untied).
        """
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        attn = (h * h + h) + 2 * (h * kv + kv) + h * h
        if not self.qkv_bias:
            attn -= h + 2 * kv
        total = 0
        for i in range(self.num_hidden_layers):
            total += attn + 2 * h
            if self.is_sparse_layer(i):
                total += h * self.num_experts + self.num_experts * 3 * h * self.moe_intermediate_size
                if self.shared_expert_intermediate_size:
                    total += 3 * h * self.shared_expert_intermediate_size + h
            else:
                total += 3 * h * self.intermediate_size
        total += h
        if not exclude_embeddings:
            total += self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return total

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Qwen2Config":
        """Build from an HF config.json dictionary.

        Unknown keys are kept (and written back by :meth:`to_dict`); a key that is neither a
        field nor a known HF bookkeeping key is warned about once per process. Newer HF configs
        that carry ``rope_parameters`` instead of ``rope_theta``/``rope_scaling`` are accepted.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {type(data).__name__}")
        data = copy.deepcopy(data)
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        rope_params = data.pop("rope_parameters", None)
        if isinstance(rope_params, dict):
            rope_params = dict(rope_params)
            if "rope_theta" in rope_params and "rope_theta" not in data:
                data["rope_theta"] = rope_params.pop("rope_theta")
            else:
                rope_params.pop("rope_theta", None)
            kind = rope_params.get("rope_type", rope_params.get("type", "default"))
            if kind != "default" and not data.get("rope_scaling"):
                data["rope_scaling"] = rope_params
        if data.get("model_type") == "qwen2_moe":
            data.setdefault("num_experts", 60)
            data.setdefault("num_experts_per_tok", 4)
            data.setdefault("moe_intermediate_size", 1408)
            data.setdefault("shared_expert_intermediate_size", 5632)
        # HF stores sliding_window as null when sliding is off; keep it as given.
        kwargs = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        for key in extra:
            if key not in _QUIET_KEYS and key not in _warned_keys:
                _warned_keys.add(key)
                warnings.warn(f"Qwen2Config: unknown config key {key!r} kept as-is but not used", stacklevel=2)
        try:
            cfg = cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"bad config: {e}") from e
        cfg.extra = extra
        return cfg

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "Qwen2Config":
        """Read an HF ``config.json`` (a file, or a folder containing one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config file at {str(path)!r}; expected an HF config.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{str(path)!r} is not valid JSON: {e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{str(path)!r} is not UTF-8 text (byte {e.start}); an HF config.json is UTF-8 JSON") from e
        return cls.from_dict(data)

    def to_dict(self) -> Dict[str, Any]:
        """An HF-style config.json dictionary (``from_dict(to_dict())`` gives an equal config)."""
        out: Dict[str, Any] = dict(copy.deepcopy(self.extra))
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            out[f.name] = copy.deepcopy(getattr(self, f.name))
        if not self.is_moe:
            for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                      "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                      "mlp_only_layers", "router_aux_loss_coef", "output_router_logits", "qkv_bias"):
                out.pop(k, None)
        if out.get("layer_types") is None:
            out.pop("layer_types", None)
        out.setdefault("architectures", ["Qwen2MoeForCausalLM" if self.is_moe else "Qwen2ForCausalLM"])
        return out

    def to_json(self, path: Union[str, os.PathLike]) -> None:
        """Write :meth:`to_dict` as JSON to ``path`` atomically."""
        from .hub import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "Qwen2Config":
        """A released size by name: one of :data:`PRESETS` (``"qwen2-0.5b"`` ... ``"qwen2-72b"``).

        Keyword overrides replace preset fields (e.g. ``num_hidden_layers=2`` for a quick test).
        """
        key = name.lower().replace("_", "-")
        if key.endswith("-instruct"):
            key = key[: -len("-instruct")]
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        data = dict(PRESETS[key])
        data.update(overrides)
        return cls(**data)

    def replace(self, **changes: Any) -> "Qwen2Config":
        """A copy with some fields changed (validated)."""
        new = dataclasses.replace(self, **changes)
        new.extra = copy.deepcopy(self.extra)
        return new


_COMMON = dict(
    max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
    use_sliding_window=False, bos_token_id=151643, eos_token_id=151643,
)

#: The released sizes' architectures (HF config.json values); parameter counts equal HF's.
PRESETS: Dict[str, Dict[str, Any]] = {
    "qwen2-0.5b": dict(_COMMON, vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, max_window_layers=24,
                       sliding_window=32768),
    "qwen2-1.5b": dict(_COMMON, vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True, max_window_layers=28,
                       sliding_window=32768),
    "qwen2-7b": dict(_COMMON, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, max_window_layers=28,
                     sliding_window=32768),
    "qwen2-57b-a14b": dict(_COMMON, model_type="qwen2_moe", vocab_size=151936, hidden_size=3584,
                           intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                           num_key_value_heads=4, tie_word_embeddings=False, max_window_layers=28,
                           sliding_window=32768, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560,
                           shared_expert_intermediate_size=20480, norm_topk_prob=False, decoder_sparse_step=1,
                           router_aux_loss_coef=0.001),
    "qwen2-72b": dict(_COMMON, vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False, max_window_layers=80,
                      sliding_window=32768),
}
