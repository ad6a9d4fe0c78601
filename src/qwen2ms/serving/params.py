"""SamplingParams (vLLM's names) and the per-sequence sampler built on generation's processors and samplers."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Union

import numpy as np

from ..generation.config import GenerationConfig, GenerationConfigError, _is_int, _is_number
from ..generation.processors import apply_processors, build_processors
from ..generation.sampling import greedy, make_rng, sample
from ..generation.stopping import RowText, StopStrings
from ..generation.streamers import make_detokenizer

__all__ = ["SamplingParams", "SamplingParamsError", "RequestError", "OutputPenalties", "SequenceSampler",
           "CompletionText", "vocab_limit_of"]


class SamplingParamsError(GenerationConfigError):
    """A SamplingParams field has a value that cannot be sampled with (the message names the field and range)."""


class RequestError(GenerationConfigError):
    """A request the engine cannot serve as given: empty or over-long prompt, ids outside the vocabulary, a
    duplicate request id (the message names the value and the limit)."""


@dataclass
class SamplingParams:
    """How to sample one request; field names and meanings follow vLLM's ``SamplingParams``.

    ``temperature == 0`` is greedy decoding (the other sampling fields are then ignored). A request with a
    ``seed`` samples from its own ``numpy.random.Generator``, so its tokens do not depend on the other
    requests in the batch; with ``n == 1`` they equal ``model.generate(..., do_sample=True, seed=seed)``.

    Attributes:
        n: completions to return for the prompt (> 1 needs temperature > 0).
        temperature: logits are divided by it (>= 0; 0 = greedy).
        top_p: nucleus mass in (0, 1] (1 disables).
        top_k: keep the k most likely tokens (-1 or 0 disables).
        repetition_penalty: CTRL penalty on prompt and generated ids (> 0; 1 disables).
        presence_penalty: subtracted once from the logit of every id already generated ([-2, 2]; OpenAI's).
        frequency_penalty: subtracted from an id's logit per time it was generated ([-2, 2]; OpenAI's).
        max_tokens: most tokens to generate (>= 1); None: until the engine's ``max_model_len``.
        min_tokens: eos and ``stop_token_ids`` are suppressed until this many tokens were generated.
        stop: a string or strings; generation stops when the text contains one, and the returned text ends
            just before it (OpenAI's and vLLM's rule).
        stop_token_ids: ids that end generation besides eos (the id stays in ``token_ids``).
        ignore_eos: keep generating after eos (for benchmarks).
        seed: seeds this request's generator (>= 0); None draws fresh entropy.
        skip_special_tokens: drop special tokens from the text.

    Example:
        >>> SamplingParams(temperature=0.7, top_p=0.8, max_tokens=64, stop=["\\n\\n"], seed=0).is_greedy
        False
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    stop: Optional[Union[str, List[str]]] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: bool = False
    seed: Optional[int] = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        if isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids)
        for name in ("temperature", "presence_penalty", "frequency_penalty"):
            if _is_int(getattr(self, name)):
                setattr(self, name, float(getattr(self, name)))
        self.validate()

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0)."""
        return self.temperature == 0

    @property
    def stop_list(self) -> List[str]:
        """``stop`` as a list (empty when unset)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def validate(self) -> None:
        """Raise :class:`SamplingParamsError` naming the first field that cannot work and its allowed range."""
        err = SamplingParamsError
        if not _is_int(self.n) or self.n < 1:
            raise err(f"n must be an integer >= 1, got {self.n!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise err(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise err(f"top_p must be in (0, 1] (1 disables nucleus sampling), got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise err(f"top_k must be an integer >= 1, or -1 or 0 to disable top-k, got {self.top_k!r}")
        if not _is_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            raise err(f"repetition_penalty must be a finite number > 0 (1.0 disables it), "
                      f"got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise err(f"{name} must be a number in [-2, 2] (0 disables it), got {value!r}")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise err(f"max_tokens must be an integer >= 1 or None (up to the context length), got {self.max_tokens!r}")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise err(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise err(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if self.n > 1 and self.is_greedy:
            raise err(f"n={self.n} needs sampling (temperature > 0): greedy decoding would return identical copies")
        stop = self.stop
        if stop is not None:
            items = [stop] if isinstance(stop, str) else stop
            if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
                raise err(f"stop must be a non-empty string or a list of non-empty strings, got {stop!r}")
        ids = self.stop_token_ids
        if ids is not None and (not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids)):
            raise err(f"stop_token_ids must be a list of non-negative token ids, got {ids!r}")
        for name in ("ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise err(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise err(f"seed must be a non-negative int or None, got {self.seed!r}")

    def clone(self, **changes: Any) -> "SamplingParams":
        """A validated deep copy with some fields replaced.

        Example:
            >>> SamplingParams().clone(max_tokens=4).max_tokens
            4
        """
        return dataclasses.replace(copy.deepcopy(self), **changes)

    def to_generation_config(self, max_new_tokens: int, eos_token_ids: Sequence[int]) -> GenerationConfig:
        """The equivalent :class:`GenerationConfig` (HF names), used to build the logits processors.

        ``eos_token_ids`` are the ids ``min_tokens`` suppresses (eos unless ignored, plus ``stop_token_ids``).
        """
        return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min(self.min_tokens, max_new_tokens),
                                do_sample=not self.is_greedy, temperature=self.temperature,
                                top_k=max(self.top_k, 0), top_p=self.top_p,
                                repetition_penalty=self.repetition_penalty,
                                eos_token_id=[int(i) for i in eos_token_ids], seed=self.seed)


class OutputPenalties:
    """OpenAI's presence and frequency penalties on the generated ids (vLLM's arithmetic), a logits processor.

    ``score[id] -= frequency * count(id) + presence * (count(id) > 0)`` with counts over ``input_ids[:,
    prompt_len:]``; like the repetition penalty it runs before temperature, top-k and top-p.

    Example:
        >>> OutputPenalties(1, presence=0.5, frequency=1.0)(np.array([[0, 2, 2]]), np.zeros((1, 3), np.float32))
        array([[ 0. ,  0. , -2.5]], dtype=float32)
    """

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len = int(prompt_len)
        self.presence = np.float32(presence)
        self.frequency = np.float32(frequency)

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        out = np.array(scores, dtype=np.float32, copy=True)
        vocab = out.shape[-1]
        for b in range(out.shape[0]):
            ids, counts = np.unique(np.asarray(input_ids[b, self.prompt_len:], dtype=np.int64), return_counts=True)
            keep = (ids >= 0) & (ids < vocab)
            ids, counts = ids[keep], counts[keep]
            out[b, ids] -= self.frequency * counts.astype(np.float32) + self.presence
        return out


class SequenceSampler:
    """Picks one sequence's next tokens: generation's processors in HF's order, then greedy or seeded sampling.

    Each sequence owns its generator, and :func:`~qwen2ms.generation.sampling.sample` draws exactly one number
    per call, so a seeded sequence's tokens depend only on its own logits.

    Args:
        params: the request's settings.
        prompt_len: its prompt length (``min_tokens`` counts from there).
        max_new_tokens: the budget resolved against the context length.
        eos_token_ids: the engine's eos ids.
        vocab_limit: ``len(tokenizer)``; ids at or above it are never produced (None: no limit).
        index: the completion's index among ``n``: completion 0 uses ``seed`` itself, completion i ``(seed, i)``.
    """

    def __init__(self, params: SamplingParams, prompt_len: int, max_new_tokens: int, eos_token_ids: Sequence[int],
                 vocab_limit: Optional[int] = None, index: int = 0):
        blocked = ([] if params.ignore_eos else list(eos_token_ids)) + list(params.stop_token_ids or [])
        config = params.to_generation_config(max_new_tokens, list(dict.fromkeys(blocked)))
        extra = []
        if params.presence_penalty or params.frequency_penalty:
            extra.append(OutputPenalties(prompt_len, params.presence_penalty, params.frequency_penalty))
        self.processors = build_processors(config, prompt_len, vocab_limit, extra=extra)
        self.is_greedy = params.is_greedy
        seed = params.seed
        self.rng = make_rng(seed if seed is None or index == 0 else [seed, index])

    def __call__(self, token_ids: Sequence[int], logits: np.ndarray) -> int:
        """The next id after ``token_ids`` (prompt and generated so far) given its float32 ``logits`` [V]."""
        scores = np.asarray(logits, dtype=np.float32).reshape(1, -1)
        if self.processors:
            scores = apply_processors(self.processors, np.asarray(token_ids, dtype=np.int64)[None, :], scores)
        pick = greedy(scores) if self.is_greedy else sample(scores, self.rng)
        return int(pick[0])


class CompletionText(RowText):
    """A completion's text grown token by token: :class:`~qwen2ms.generation.stopping.RowText` with the
    request's ``skip_special_tokens`` and vLLM's stop rule (the stop string itself is cut off)."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], skip_special_tokens: bool = True):
        super().__init__(tokenizer, StopStrings(list(stop)) if stop else None)
        self.decoder = make_detokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        self.stop_reason: Optional[str] = None

    def _add(self, piece: str) -> str:
        out = super()._add(piece)
        if self.stopped and self.stop_reason is None:
            # RowText keeps the text up to the end of the earliest-ending stop string; several may end there
            # ("ab" and "b" in "xab"): cutting the longest leaves no stop string in the text.
            found = max((s for s in self.stop.strings if self.text.endswith(s)), key=len)
            self.stop_reason = found
            self.text = self.text[:len(self.text) - len(found)]
        return out

    def visible(self, finished: bool) -> str:
        """The text that can be shown now: while running, the last characters that could still begin a stop
        string are held back, so streamed text never has to be taken back."""
        if finished or self.stop is None:
            return self.text
        return self.text[:max(0, len(self.text) - (self.stop.max_len - 1))]


def vocab_limit_of(tokenizer: Any, vocab_size: int) -> Optional[int]:
    """``len(tokenizer)`` when below the model's vocabulary size (padded embedding rows are never produced, as
    in ``generate``), else None."""
    if tokenizer is not None and hasattr(tokenizer, "__len__"):
        limit = len(tokenizer)
        if 1 <= limit < vocab_size:
            return limit
    return None
