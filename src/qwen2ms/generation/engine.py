"""The model side of generation: a static KV cache, one prefill, then one compiled decode step per token.

:class:`CachedDecoder` implements the :class:`~qwen2ms.generation.generate.Decoder` protocol on a
:class:`~qwen2ms.modeling.Qwen2ForCausalLM` through its ``new_cache`` / ``forward_step`` API.
Shapes are bucketed so that repeated calls reuse compiled graphs: prompts are left-padded to a
multiple of ``PROMPT_BUCKET`` (extra padding is masked, so results do not change) and the cache
length is rounded up to a multiple of ``CACHE_BUCKET``. The cache is kept on the model and reused
by the next call of the same batch size that fits in it; its decode graph is compiled once and
takes the slot as a Tensor, so nothing recompiles per token.
"""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["CachedDecoder", "PROMPT_BUCKET", "CACHE_BUCKET"]

#: Prompts are left-padded to a multiple of this many tokens (fewer distinct prefill graphs).
PROMPT_BUCKET = 32
#: Cache lengths are rounded up to a multiple of this many slots (fewer distinct decode graphs).
CACHE_BUCKET = 128


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class CachedDecoder:
    """Prefill and decode a Qwen2 model with a preallocated KV cache sized from the request.

    Args:
        model: a ``Qwen2ForCausalLM`` (anything with ``config``, ``new_cache`` and ``forward_step``).
        batch_size: rows generated together.
        prompt_len: the (left-padded) prompt length of the request.
        max_new_tokens: tokens to generate at most.

    Example:
        >>> dec = CachedDecoder(model, batch_size=1, prompt_len=5, max_new_tokens=20)  # doctest: +SKIP
        >>> logits = dec.prefill(ids, mask)            # [1, V] for the token after the prompt  # doctest: +SKIP
        >>> logits = dec.step(np.array([next_id]))     # [1, V] for the token after that  # doctest: +SKIP
    """

    def __init__(self, model: Any, batch_size: int, prompt_len: int, max_new_tokens: int):
        import mindspore as ms

        self._ms = ms
        self.model = model
        limit = int(model.config.max_position_embeddings)
        padded = _round_up(prompt_len, PROMPT_BUCKET)
        if padded + max_new_tokens > limit:
            padded = prompt_len  # bucketing must never make a request that fits stop fitting
        self.padded_len = padded
        need = padded + max_new_tokens
        length = min(_round_up(need, CACHE_BUCKET), max(limit, need))
        self.cache = self._cache_for(batch_size, need, length)
        self.slot = 0
        self._mask = None
        self._next_pos = None

    def _cache_for(self, batch: int, need: int, length: int) -> Any:
        # One cache per model is kept between calls: its compiled decode step is reused when the
        # next request has the same batch size and fits (but is not far smaller).
        cache = getattr(self.model, "_generation_cache", None)
        if (cache is None or cache.batch_size != batch or cache.max_length < need
                or cache.max_length > 2 * length):
            cache = None
            self.model._generation_cache = None  # free the old cache before allocating the new one
            cache = self.model.new_cache(batch_size=batch, max_length=length)
            self.model._generation_cache = cache
        return cache

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Write the prompt into cache slots ``[0, T')`` and return the next-token logits ``[B, V]``."""
        ms = self._ms
        batch, t = input_ids.shape
        extra = self.padded_len - t
        if extra > 0:
            input_ids = np.concatenate([np.zeros((batch, extra), input_ids.dtype), input_ids], axis=1)
            attention_mask = np.concatenate([np.zeros((batch, extra), attention_mask.dtype), attention_mask], axis=1)
        mask = (attention_mask != 0).astype(np.int32)
        # HF's positions: count of real tokens before each one; padding gets 1 (any value works, it is masked).
        positions = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1).astype(np.int32)
        full = np.ones((batch, self.cache.max_length), dtype=np.int32)
        full[:, :self.padded_len] = mask
        # Later slots are hidden causally until written, so one mask serves every decode step.
        self._mask = ms.Tensor(full)
        self._next_pos = mask.sum(axis=1, keepdims=True).astype(np.int32)
        # Ids go in as NumPy: the model range-checks them, which costs a device sync on a Tensor.
        logits = self.model.forward_step(input_ids.astype(np.int32), self._mask, ms.Tensor(positions),
                                         self.cache, 0, logits_to_keep=1)
        self.slot = self.padded_len
        return logits.asnumpy()[:, -1, :]

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Append one token per row at the next slot and return the following logits ``[B, V]``."""
        ms = self._ms
        if self.slot >= self.cache.max_length:
            raise ValueError(f"the KV cache is full ({self.cache.max_length} slots); size it for the request")
        ids = np.asarray(tokens, dtype=np.int32).reshape(-1, 1)
        # The slot goes in as an int: forward_step wraps it in a Tensor (no recompile, and no cast op
        # as an int32 Tensor argument would cost).
        logits = self.model.forward_step(ids, self._mask, ms.Tensor(self._next_pos), self.cache, self.slot)
        self.slot += 1
        self._next_pos = self._next_pos + 1
        return logits.asnumpy()[:, -1, :]
