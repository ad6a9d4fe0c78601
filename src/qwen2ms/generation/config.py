"""GenerationConfig: how to decode (length, sampling, stopping), with Hugging Face field names."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from ..errors import Qwen2msError

__all__ = ["GenerationConfig", "GenerationConfigError", "DEFAULT_MAX_NEW_TOKENS"]

#: Used when neither the caller nor generation_config.json sets ``max_new_tokens``. HF's own
#: default is ``max_length=20`` (prompt included), which truncates almost every chat reply.
DEFAULT_MAX_NEW_TOKENS = 256


class GenerationConfigError(Qwen2msError, ValueError):
    """A GenerationConfig field (or the request it is checked against) cannot be generated with."""


# generation_config.json keys that HF writes for bookkeeping: kept for the round trip, never warned about.
_QUIET_KEYS = {"transformers_version", "_from_model_config", "use_cache", "max_length", "min_length",
               "return_dict_in_generate", "output_scores", "output_logits", "output_attentions",
               "output_hidden_states", "cache_implementation", "decoder_start_token_id"}
# HF decoding features this library does not implement, with HF's neutral values: a file that sets one
# of them to anything else gets a warning (once per key), because it would decode differently in HF.
_NEUTRAL = {"num_beams": 1, "num_beam_groups": 1, "typical_p": 1.0, "min_p": None, "epsilon_cutoff": 0.0,
            "eta_cutoff": 0.0, "no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0,
            "length_penalty": 1.0, "diversity_penalty": 0.0, "bad_words_ids": None, "force_words_ids": None,
            "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
            "forced_eos_token_id": None, "guidance_scale": None, "sequence_bias": None,
            "exponential_decay_length_penalty": None, "renormalize_logits": False, "penalty_alpha": None,
            "early_stopping": False, "remove_invalid_values": False, "top_h": None}
_warned_keys: set = set()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: Scores are float32: a temperature or penalty beyond this overflows when it is applied.
_FLOAT32_MAX = 3.4028234663852886e38


def _is_number(value: Any) -> bool:
    """A finite int or float within float32's range (NaN slips through every ``<``/``>`` check, and
    inf or an overflowing value turns scores into inf/NaN)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and abs(value) <= _FLOAT32_MAX)


@dataclass
class GenerationConfig:
    """Decoding settings; field names and meanings follow Hugging Face's ``GenerationConfig``.

    Defaults equal HF's global defaults except ``max_new_tokens`` (:data:`DEFAULT_MAX_NEW_TOKENS`,
    where HF stops at ``max_length=20`` total tokens). Decoding is greedy unless ``do_sample`` is
    true; ``do_sample`` with ``temperature == 0`` is also greedy (the limit of temperature scaling;
    HF raises instead). Sampling-only fields (temperature, top_k, top_p) are ignored, silently, in
    greedy mode, so a model's generation_config.json (Qwen2-Instruct sets do_sample, temperature
    0.7, top_p 0.8, top_k 20) never makes a greedy call warn. ``repetition_penalty`` applies in both
    modes, as in HF.

    Attributes:
        max_new_tokens: most tokens to generate per sequence (>= 1).
        min_new_tokens: eos ids are suppressed until this many tokens were generated.
        do_sample: sample from the processed distribution instead of taking the argmax.
        temperature: logits are divided by it before sampling (> 0; 0 with do_sample means greedy).
        top_k: sample among the k most likely tokens (0 disables; HF's default is 50).
        top_p: nucleus sampling mass in (0, 1] (1 disables).
        repetition_penalty: CTRL penalty (> 0; 1 disables) on ids of the prompt and generated tokens.
        eos_token_id: an id or a list of ids that end a sequence (Qwen2-Instruct: [151645, 151643]);
            None falls back to the model's/tokenizer's eos, ``[]`` disables eos stopping.
        pad_token_id: written after a sequence ended (defaults to the first eos id when unset).
        bos_token_id: kept for the HF round trip (Qwen2 has no BOS token).
        stop_strings: a string or list of strings; generation of a row stops once its generated
            text contains one.
        num_return_sequences: samples per prompt (rows are repeated; needs do_sample).
        seed: seeds the per-call ``numpy.random.Generator``; None draws fresh entropy.
        extra: keys of the source generation_config.json this class does not model (written back
            by :meth:`to_dict`).

    Example:
        >>> cfg = GenerationConfig(max_new_tokens=32, do_sample=True, top_p=0.9, seed=0)
        >>> cfg.update(temperature=0.7).temperature
        0.7
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: Optional[Union[int, List[int]]] = None
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    stop_strings: Optional[Union[str, List[str]]] = None
    num_return_sequences: int = 1
    seed: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.eos_token_id, tuple):
            self.eos_token_id = list(self.eos_token_id)
        if isinstance(self.stop_strings, tuple):
            self.stop_strings = list(self.stop_strings)
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def eos_token_ids(self) -> List[int]:
        """``eos_token_id`` as a list (empty when unset)."""
        if self.eos_token_id is None:
            return []
        if _is_int(self.eos_token_id):
            return [int(self.eos_token_id)]
        return [int(i) for i in self.eos_token_id]

    @property
    def stop_string_list(self) -> List[str]:
        """``stop_strings`` as a list (empty when unset)."""
        if self.stop_strings is None:
            return []
        if isinstance(self.stop_strings, str):
            return [self.stop_strings]
        return list(self.stop_strings)

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax: ``do_sample`` false, or temperature 0."""
        return not self.do_sample or self.temperature == 0

    # ------------------------------------------------------------------ checks
    def validate(self, prompt_len: Optional[int] = None, max_position_embeddings: Optional[int] = None) -> None:
        """Raise :class:`GenerationConfigError` naming the first field that cannot work.

        Args:
            prompt_len: the (padded) prompt length of the request; 0 is an error (nothing to
                condition on, and Qwen2 has no BOS token to start from).
            max_position_embeddings: the model's context length; ``prompt_len + max_new_tokens``
                must fit in it.

        Example:
            >>> GenerationConfig(max_new_tokens=10).validate(prompt_len=20, max_position_embeddings=32)
            >>> GenerationConfig(max_new_tokens=10).validate(prompt_len=30, max_position_embeddings=32)
            Traceback (most recent call last):
            GenerationConfigError: prompt length 30 + max_new_tokens 10 = 40 exceeds the model's ...
        """
        err = GenerationConfigError
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise err(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise err(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        if not isinstance(self.do_sample, bool):
            raise err(f"do_sample must be True or False, got {self.do_sample!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise err(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise err(f"top_k must be an integer >= 0 (0 disables top-k), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise err(f"top_p must be in (0, 1] (1 disables nucleus sampling), got {self.top_p!r}")
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise err(f"repetition_penalty must be a finite number > 0 (1.0 disables it), "
                      f"got {self.repetition_penalty!r}")
        if not _is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            raise err(f"num_return_sequences must be an integer >= 1, got {self.num_return_sequences!r}")
        if self.num_return_sequences > 1 and self.is_greedy:
            raise err(f"num_return_sequences={self.num_return_sequences} needs sampling (do_sample=True and "
                      "temperature > 0): greedy decoding would return identical copies")
        eos = self.eos_token_id
        if eos is not None:
            ids = [eos] if not isinstance(eos, list) else eos
            if not all(_is_int(i) and i >= 0 for i in ids):
                raise err(f"eos_token_id must be a non-negative int or a list of them ([] disables eos), got {eos!r}")
        for name in ("pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise err(f"{name} must be a non-negative int or None, got {value!r}")
        stops = self.stop_strings
        if stops is not None:
            items = [stops] if isinstance(stops, str) else stops
            if not isinstance(items, list) or not items or not all(isinstance(s, str) and s for s in items):
                raise err(f"stop_strings must be a non-empty string or a non-empty list of them, got {stops!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise err(f"seed must be a non-negative int or None, got {self.seed!r}")
        if prompt_len is not None:
            if prompt_len < 1:
                raise err("the prompt is empty: give at least one token (Qwen2 has no BOS token to start from)")
            limit = max_position_embeddings
            if limit is not None and prompt_len >= limit:
                room = limit - self.max_new_tokens
                fix = (f"shorten the prompt to at most {room} tokens to get max_new_tokens={self.max_new_tokens} new "
                       "ones" if room >= 1 else f"shorten the prompt and lower max_new_tokens so that together they "
                       f"stay within {limit} tokens")
                raise err(f"the prompt is {prompt_len} tokens, but the model's context (max_position_embeddings) is "
                          f"{limit} tokens for prompt and reply together: {fix}")
            if limit is not None and prompt_len + self.max_new_tokens > limit:
                raise err(
                    f"prompt length {prompt_len} + max_new_tokens {self.max_new_tokens} = "
                    f"{prompt_len + self.max_new_tokens} exceeds the model's max_position_embeddings "
                    f"{limit}; lower max_new_tokens to at most {limit - prompt_len} or shorten the prompt"
                )

    # ------------------------------------------------------------------ copies
    def update(self, **overrides: Any) -> "GenerationConfig":
        """A validated copy with some fields replaced; ``None`` values are ignored (HF kwargs style).

        Args:
            **overrides: field names of this class.

        Returns:
            A new GenerationConfig; ``self`` is unchanged.

        Raises:
            TypeError: an override is not a field (the message lists the fields).

        Example:
            >>> GenerationConfig().update(max_new_tokens=8, do_sample=None).max_new_tokens
            8
        """
        names = self._field_names()
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}; valid options are {sorted(names)}")
        changes = {k: copy.deepcopy(v) for k, v in overrides.items() if v is not None}
        new = dataclasses.replace(self, **changes)
        new.extra = copy.deepcopy(self.extra)
        return new

    @classmethod
    def _field_names(cls) -> set:
        return {f.name for f in dataclasses.fields(cls)} - {"extra"}

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "GenerationConfig":
        """Build from a generation_config.json dictionary.

        Keys this class does not model are kept in :attr:`extra` (and written back by
        :meth:`to_dict`). A key for an HF decoding feature this library does not implement (e.g.
        ``num_beams: 4``) is warned about once per process when its value is not HF's neutral one;
        ``None`` values mean "unset" and fall back to the defaults.

        Example:
            >>> GenerationConfig.from_dict({"do_sample": True, "top_k": 20, "transformers_version": "4.37.0"}).top_k
            20
        """
        if not isinstance(data, dict):
            raise GenerationConfigError(f"generation config must be a JSON object, got {type(data).__name__}")
        names = cls._field_names()
        kwargs = {k: copy.deepcopy(v) for k, v in data.items() if k in names and v is not None}
        extra = {k: copy.deepcopy(v) for k, v in data.items() if k not in names}
        for key, value in extra.items():
            if key in _QUIET_KEYS or key.startswith("_") or (key in _NEUTRAL and value == _NEUTRAL[key]):
                continue
            if key not in _warned_keys:
                _warned_keys.add(key)
                warnings.warn(f"GenerationConfig: {key}={value!r} is not supported by qwen2ms and is ignored "
                              "(kept in .extra)", stacklevel=2)
        if _is_number(kwargs.get("temperature")):
            kwargs["temperature"] = float(kwargs["temperature"])
        cfg = cls(**kwargs)
        cfg.extra = extra
        return cfg

    @classmethod
    def from_json(cls, path: Union[str, os.PathLike]) -> "GenerationConfig":
        """Read a ``generation_config.json`` (the file, or a model folder containing one).

        Example:
            >>> GenerationConfig.from_json("/models/Qwen2-0.5B-Instruct")  # doctest: +SKIP
        """
        path = Path(path)
        if path.is_dir():
            path = path / "generation_config.json"
        if not path.is_file():
            raise GenerationConfigError(f"no generation config at {str(path)!r}; expected a generation_config.json")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise GenerationConfigError(f"{str(path)!r} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def to_dict(self) -> Dict[str, Any]:
        """A generation_config.json dictionary (``from_dict(to_dict())`` gives an equal config)."""
        out: Dict[str, Any] = copy.deepcopy(self.extra)
        for name in sorted(self._field_names()):
            value = getattr(self, name)
            if value is not None:
                out[name] = copy.deepcopy(value)
        return out

    def to_json(self, path: Union[str, os.PathLike]) -> None:
        """Write :meth:`to_dict` to ``path`` atomically (temp file + rename)."""
        from ..hub import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
