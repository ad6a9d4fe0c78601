"""LLMEngine: continuous batching of many requests over one paged KV cache, one scheduling round per step()."""
from __future__ import annotations

import itertools
import time
from typing import Any, Dict, List, Optional, Sequence as Seq, Tuple, Union

import numpy as np

from ..errors import Qwen2msError
from ..generation.generate import resolve_config
from .block_manager import BlockManager
from .outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from .params import (CompletionText, RequestError, SamplingParams, SamplingParamsError, SequenceSampler,
                     vocab_limit_of)
from .scheduler import Scheduler, Sequence

__all__ = ["LLMEngine", "EngineStepError", "DEFAULT_KV_CACHE_MEMORY"]



#: The KV pool's default ceiling in bytes when neither ``num_blocks`` nor ``kv_cache_memory`` is given (vLLM's
#: default KV space on CPU).
DEFAULT_KV_CACHE_MEMORY = 4 << 30
#: Prompt tokens a step prefills before it stops admitting: the paged runner's prefill chunk. On a CPU that
#: prefills 100-250 tokens/s at the 0.5B shape, a step then lasts seconds, not the minutes that 16 queued
#: 1k-token prompts took, so first tokens and running decodes are not held back by the whole queue.
DEFAULT_MAX_NUM_BATCHED_TOKENS = 512


def _size(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB" if nbytes >= 1 << 20 else f"{nbytes / 1024:.1f} KiB"


class EngineStepError(Qwen2msError, RuntimeError):
    """The model failed during :meth:`LLMEngine.step`; the requests it was running then are aborted.

    Attributes:
        request_ids: the aborted requests (they produce no further output).
    """

    def __init__(self, message: str, request_ids: List[str]):
        super().__init__(message)
        self.request_ids = request_ids


class _Request:
    """A request's bookkeeping: its sequences (one per completion) and what was reported."""

    def __init__(self, request_id: str, prompt: Optional[str], prompt_ids: List[int], params: SamplingParams,
                 arrival_time: float):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.metrics = RequestMetrics(arrival_time=arrival_time)
        self.seqs: List[Sequence] = []
        self.num_cached_tokens: Optional[int] = None  # set at the first admission
        self.texts: Dict[str, Optional[CompletionText]] = {}
        self.samplers: Dict[str, SequenceSampler] = {}

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


class LLMEngine:
    """Serve many generation requests at once: continuous batching over a paged KV cache with prefix caching.

    Each :meth:`step` is one scheduling round. Waiting sequences are admitted first come first served while
    ``max_num_seqs`` and the KV pool allow and the step's prefills stay under ``max_num_batched_tokens``; each
    is prefilled (only the tokens after its prefix-cache hit) and samples its first token. Then every running
    sequence decodes one token in one batched call. Sequences leave the batch the step they finish and free
    their blocks at once. When a running sequence needs a block and none is free, the latest-arrived running
    sequence is preempted: its blocks are freed and it re-enters the queue at the front, later recomputing its prompt and generated tokens in one prefill (so
    a full pool slows requests down but never fails them). Full blocks of prompts and replies stay cached
    after their sequence ends (until the pool needs them), so a later prompt that starts with the same
    tokens (a system prompt, the earlier turns of a chat) skips their prefill.

    Greedy outputs equal ``model.generate`` on each request alone, token for token; a request with a
    ``seed`` samples the same tokens whatever else is in the batch.

    The engine is not thread-safe: one thread owns it and calls every method.

    Args:
        model: a :class:`~qwen2ms.modeling.Qwen2ForCausalLM`.
        tokenizer: for text prompts, text outputs and stop strings; default ``model.tokenizer`` (may be None:
            then prompts are token ids and outputs carry ids only).
        block_size: tokens per KV block.
        num_blocks: the KV pool size in blocks; default from ``kv_cache_memory``, else enough for
            ``max_num_seqs`` sequences of ``max_model_len`` tokens but at most
            :data:`DEFAULT_KV_CACHE_MEMORY` (4 GiB).
        kv_cache_memory: bytes to give the KV pool (used when ``num_blocks`` is None).
        max_num_seqs: most sequences decoded together.
        max_num_batched_tokens: prompt tokens one step prefills before it stops admitting (a prompt is never
            split, so a step's first admission may exceed it); the running sequences decode and the waiting
            ones stream out their first tokens between these rounds instead of after every queued prompt.
            None: admit all that fit in one step.
        max_model_len: most tokens per sequence (prompt and generated); default the model's
            ``max_position_embeddings``.
        enable_prefix_caching: reuse cached KV blocks of earlier prompts and replies.
        verbose: print the KV pool line at start.
        runner: the model side (``prefill``/``decode`` as :class:`~qwen2ms.modeling.paged.PagedModelRunner`);
            default builds a paged cache and runner for ``model``.

    Raises:
        ValueError: a size that is not a positive integer, or ``max_model_len`` beyond the model's context.

    Example:
        >>> engine = LLMEngine(model, max_num_seqs=8, max_model_len=1024)  # doctest: +SKIP
        >>> engine.add_request("a", "The capital of France is", SamplingParams(temperature=0, max_tokens=8))  # doctest: +SKIP
        >>> while engine.has_unfinished_requests():  # doctest: +SKIP
        ...     for out in engine.step():
        ...         if out.finished:
        ...             print(out.request_id, out.outputs[0].text)
    """

    def __init__(self, model: Any, tokenizer: Any = None, *, block_size: int = 16, num_blocks: Optional[int] = None,
                 kv_cache_memory: Optional[int] = None, max_num_seqs: int = 16, max_model_len: Optional[int] = None,
                 max_num_batched_tokens: Optional[int] = DEFAULT_MAX_NUM_BATCHED_TOKENS,
                 enable_prefix_caching: bool = True, verbose: bool = True, runner: Any = None):
        config = model.config
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("num_blocks", num_blocks), ("kv_cache_memory", kv_cache_memory),
                            ("max_model_len", max_model_len), ("max_num_batched_tokens", max_num_batched_tokens)):
            if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)
                                      or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        context = int(config.max_position_embeddings)
        max_model_len = context if max_model_len is None else int(max_model_len)
        if max_model_len > context:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {context}")
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.block_size = int(block_size)
        self.max_num_seqs = int(max_num_seqs)
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = None if max_num_batched_tokens is None else int(max_num_batched_tokens)
        self.vocab_size = int(config.vocab_size)
        dtype = getattr(model, "compute_dtype", None)
        if runner is None:
            from ..modeling.paged import PagedKVCache

            block_bytes = PagedKVCache.bytes_per_block(config, self.block_size, dtype)
        else:
            block_bytes = int(getattr(runner, "bytes_per_block", 0))
        if num_blocks is None:
            if kv_cache_memory is not None:
                num_blocks = int(kv_cache_memory) // max(block_bytes, 1)
                if num_blocks < 1:
                    raise ValueError(f"kv_cache_memory {kv_cache_memory} bytes holds no KV block: one block of "
                                     f"{self.block_size} tokens takes {block_bytes} bytes")
            else:
                num_blocks = self.max_num_seqs * -(-max_model_len // self.block_size)
                if block_bytes:
                    # Qwen2's 32k context times 16 sequences would be 12 GiB for 0.5B in float32: cap the default.
                    num_blocks = max(1, min(num_blocks, DEFAULT_KV_CACHE_MEMORY // block_bytes))
        self.num_blocks = int(num_blocks)
        if runner is None:
            from ..modeling.paged import PagedKVCache, PagedModelRunner

            cache = PagedKVCache(config, self.num_blocks, self.block_size, dtype)
            runner = PagedModelRunner(model, cache, self.max_num_seqs, max_model_len)
        self.runner = runner
        self.kv_cache_bytes = self.num_blocks * block_bytes
        self.blocks = BlockManager(self.num_blocks, self.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.max_num_seqs)
        resolved = resolve_config(None, model, self.tokenizer)
        self._generation_config = resolved
        self.eos_token_ids: List[int] = resolved.eos_token_ids
        self.vocab_limit = vocab_limit_of(self.tokenizer, self.vocab_size)
        self._requests: Dict[str, _Request] = {}
        self._changed: Dict[str, _Request] = {}
        self._arrivals = itertools.count()
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._finished_requests = 0
        #: The start-up line: the KV pool's size and the batch limits.
        self.summary = (f"qwen2ms serving: KV cache {self.num_blocks} blocks x {self.block_size} tokens = "
                        f"{self.num_blocks * self.block_size} tokens, {_size(self.kv_cache_bytes)}; "
                        f"max_num_seqs {self.max_num_seqs}, max_model_len {self.max_model_len}, "
                        f"max_num_batched_tokens {self.max_num_batched_tokens}, prefix caching "
                        f"{'on' if enable_prefix_caching else 'off'}")
        if verbose:
            print(self.summary)

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        """SamplingParams with the model's own decoding defaults (its generation_config.json, as ``generate``).

        Qwen2-Instruct ships ``do_sample`` with temperature 0.7, top_p 0.8, top_k 20 and repetition_penalty
        1.05-1.1; a config without ``do_sample`` gives greedy decoding (temperature 0), with its repetition
        penalty kept, as in ``model.generate``. Fields vLLM has and the config does not set keep vLLM's
        defaults (``max_tokens=16``).

        Example:
            >>> engine.default_sampling_params(max_tokens=64)  # doctest: +SKIP
            SamplingParams(n=1, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, max_tokens=64, ...)
        """
        cfg = self._generation_config
        values: Dict[str, Any] = dict(temperature=0.0 if cfg.is_greedy else float(cfg.temperature),
                                      repetition_penalty=float(cfg.repetition_penalty))
        if not cfg.is_greedy:
            values.update(top_p=float(cfg.top_p), top_k=int(cfg.top_k) or -1)
        values.update(overrides)
        return SamplingParams(**values)

    # ------------------------------------------------------------------ requests in
    def _prompt_ids(self, prompt: Union[str, Seq[int]]) -> Tuple[Optional[str], List[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer: pass tokenizer= to the engine, or give token ids")
            text, ids = prompt, [int(i) for i in self.tokenizer.encode(prompt)]
        else:
            if isinstance(prompt, np.ndarray):
                prompt = prompt.tolist()
            if not isinstance(prompt, (list, tuple)) or not all(
                    isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in prompt):
                raise RequestError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
            text, ids = None, [int(i) for i in prompt]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the model's vocabulary [0, {self.vocab_size})"
                               + (" (the tokenizer does not match the model)" if text is not None else ""))
        return text, ids

    def add_request(self, request_id: str, prompt: Union[str, Seq[int]], params: Optional[SamplingParams] = None,
                    arrival_time: Optional[float] = None) -> None:
        """Queue a request; it is admitted by a later :meth:`step`.

        Args:
            request_id: unique among the unfinished requests.
            prompt: text (needs a tokenizer) or token ids.
            params: sampling settings; default ``SamplingParams()``.
            arrival_time: ``time.time()`` of its arrival (default now).

        Raises:
            SamplingParamsError: ``params`` is not a SamplingParams or an id in ``stop_token_ids`` is outside
                the vocabulary; stop strings without a tokenizer.
            RequestError (a ValueError): an empty prompt, a prompt plus ``max_tokens`` beyond ``max_model_len``
                or beyond what the whole KV pool holds (both lengths named), a duplicate ``request_id``.
        """
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise SamplingParamsError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()  # fields may have been changed after construction
        if not isinstance(request_id, str) or not request_id:
            raise RequestError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._requests:
            raise RequestError(f"request_id {request_id!r} is already in use by an unfinished request")
        bad_stop = [i for i in params.stop_token_ids or [] if i >= self.vocab_size]
        if bad_stop:
            raise SamplingParamsError(f"stop_token_ids has id {bad_stop[0]}, outside the model's vocabulary "
                                      f"[0, {self.vocab_size})")
        if params.stop_list and self.tokenizer is None:
            raise SamplingParamsError("stop strings need a tokenizer to decode the generated text; pass tokenizer= "
                                      "to the engine or use stop_token_ids")
        text, ids = self._prompt_ids(prompt)
        n = len(ids)
        if n == 0:
            raise RequestError("the prompt is empty: give at least one token (Qwen2 has no BOS token to start from)")
        capacity = self.num_blocks * self.block_size
        if params.max_tokens is None:
            limit = min(self.max_model_len, capacity)
            if n >= limit:
                raise RequestError(f"the prompt is {n} tokens, but at most {limit - 1} fit (max_model_len "
                                   f"{self.max_model_len}, KV pool {capacity} tokens) with room for one new token")
            max_new = limit - n
        else:
            max_new = params.max_tokens
            if n + max_new > self.max_model_len:
                raise RequestError(
                    f"prompt length {n} + max_tokens {max_new} = {n + max_new} exceeds max_model_len "
                    f"{self.max_model_len}; lower max_tokens to at most {max(self.max_model_len - n, 0)} or "
                    "shorten the prompt")
            if n + max_new > capacity:
                raise RequestError(
                    f"prompt length {n} + max_tokens {max_new} = {n + max_new} tokens need "
                    f"{self.blocks.blocks_for(n + max_new)} KV blocks of {self.block_size}, more than the whole "
                    f"pool ({self.num_blocks} blocks, {capacity} tokens); lower max_tokens or shorten the prompt")
        req = _Request(request_id, text, ids, params, time.time() if arrival_time is None else float(arrival_time))
        arrival = next(self._arrivals)
        for index in range(params.n):
            seq = Sequence(f"{request_id}#{index}", (arrival, index), ids, max_new, req)
            req.seqs.append(seq)
            req.samplers[seq.seq_id] = SequenceSampler(params, n, max_new, self.eos_token_ids, self.vocab_limit, index)
            req.texts[seq.seq_id] = (CompletionText(self.tokenizer, params.stop_list, params.skip_special_tokens)
                                     if self.tokenizer is not None else None)
        self._requests[request_id] = req
        for seq in req.seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: Union[str, Seq[str]]) -> None:
        """Stop a request (or several) now and free its KV blocks; no output is reported for it. Unknown ids: no-op."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            req = self._requests.pop(rid, None)
            self._changed.pop(rid, None)
            if req is None:
                continue
            for seq in req.seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq, "abort")
            req.metrics.finished_time = time.time()
            self._finished_requests += 1

    # ------------------------------------------------------------------ the loop
    def has_unfinished_requests(self) -> bool:
        """True while a request is waiting or running."""
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    def _append(self, seq: Sequence, token: int, now: float, changed: Dict[str, _Request]) -> None:
        """Add a sampled token to ``seq`` and end it when a stop rule says so."""
        req: _Request = seq.request
        params = req.params
        seq.output_ids.append(token)
        self._generation_tokens += 1
        if req.metrics.first_token_time is None:
            req.metrics.first_token_time = now
        changed[req.request_id] = req
        count = len(seq.output_ids)
        text = req.texts[seq.seq_id]
        reason, stop_reason = None, None
        if not params.ignore_eos and token in self.eos_token_ids:
            reason = "stop"
        elif params.stop_token_ids and token in params.stop_token_ids:
            reason, stop_reason = "stop", token
        elif text is not None:
            # Stop strings count only from min_tokens on (vLLM's rule); the token must still reach the text.
            if count < params.min_tokens:
                watch, text.stop = text.stop, None
                text.push(token)
                text.stop = watch
            else:
                text.push(token)
                if text.stopped:
                    reason, stop_reason = "stop", text.stop_reason
        if reason is None and (count >= seq.max_new_tokens or seq.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if text is not None:
                text.flush()
            self.scheduler.finish(seq, reason, stop_reason)

    def _sample(self, seq: Sequence, logits: np.ndarray) -> int:
        sampler = seq.request.samplers[seq.seq_id]
        # Only the processors read the ids (repetition penalty, min_tokens): skip the O(length) copy otherwise.
        return sampler(seq.token_ids if sampler.processors else (), logits)

    def _fail(self, seqs: List[Sequence], error: BaseException) -> "EngineStepError":
        """Abort the requests of ``seqs`` after the model failed on them, so that the engine stays usable."""
        ids = list(dict.fromkeys(s.request.request_id for s in seqs))
        self.abort_request(ids)
        return EngineStepError(f"the model failed on request(s) {ids}, which were aborted (their blocks are "
                               f"free; the engine keeps serving the others): {type(error).__name__}: {error}", ids)

    def step(self) -> List[RequestOutput]:
        """Run one scheduling round (admissions with their prefill, then one batched decode).

        Returns:
            A :class:`RequestOutput` for every request that got new tokens or finished in this step, with its
            cumulative text and ids; ``finished`` is True in exactly one of a request's outputs.

        Raises:
            EngineStepError: the model raised; the requests it ran are aborted (named in the error), the
                tokens other requests got earlier in this step are kept and reported by the next step.
        """
        # Kept on the engine: if the model raises, what earlier sequences of this step got is reported next step.
        changed = self._changed
        sched = self.scheduler
        prefilled = 0
        while self.max_num_batched_tokens is None or prefilled < self.max_num_batched_tokens:
            # One at a time: a sequence's prefill registers its full blocks before the next one looks for hits
            # (the n completions of a request, or requests with the same system prompt, admitted together).
            admitted = sched.admit_next()
            if admitted is None:
                break
            seq, cached = admitted
            req: _Request = seq.request
            if req.num_cached_tokens is None:
                req.num_cached_tokens = cached
                self._prompt_tokens += len(req.prompt_ids)
            tokens = seq.token_ids
            try:
                logits = self.runner.prefill(tokens[cached:], cached, self.blocks.block_table(seq.seq_id))
            except Exception as e:
                raise self._fail([seq], e) from e
            prefilled += len(tokens) - cached
            seq.num_computed = len(tokens)
            self.blocks.mark_computed(seq.seq_id, tokens, seq.num_computed)
            self._append(seq, self._sample(seq, logits), time.time(), changed)
        batch = sched.prepare_decode()
        if batch:
            try:
                logits = self.runner.decode([s.output_ids[-1] for s in batch], [s.num_tokens - 1 for s in batch],
                                            [self.blocks.block_table(s.seq_id) for s in batch])
            except Exception as e:
                raise self._fail(batch, e) from e
            now = time.time()
            for row, seq in enumerate(batch):
                seq.num_computed = seq.num_tokens
                if seq.num_computed % self.block_size == 0:  # a block just filled up: it can be cached
                    self.blocks.mark_computed(seq.seq_id, seq.token_ids, seq.num_computed)
                self._append(seq, self._sample(seq, logits[row]), now, changed)
        outputs = []
        self._changed = {}
        for req in changed.values():
            finished = req.finished
            if finished:
                req.metrics.finished_time = time.time()
                self._requests.pop(req.request_id, None)
                self._finished_requests += 1
            outputs.append(self._output(req, finished))
        return outputs

    def _output(self, req: _Request, finished: bool) -> RequestOutput:
        completions = []
        for i, seq in enumerate(req.seqs):
            text = req.texts[seq.seq_id]
            completions.append(CompletionOutput(index=i, text=text.visible(seq.is_finished) if text is not None else "",
                                                token_ids=list(seq.output_ids), finish_reason=seq.finish_reason,
                                                stop_reason=seq.stop_reason))
        metrics = RequestMetrics(req.metrics.arrival_time, req.metrics.first_token_time, req.metrics.finished_time)
        return RequestOutput(req.request_id, req.prompt, list(req.prompt_ids), completions, finished,
                             req.num_cached_tokens or 0, metrics)

    def reset_prefix_cache(self) -> None:
        """Forget the cached KV blocks no sequence holds (benchmarks measure cold prefills after this)."""
        self.blocks.reset_prefix_cache()

    def stats(self) -> EngineStats:
        """Counts of queued and running sequences, KV blocks and tokens (a snapshot)."""
        sched, bm = self.scheduler, self.blocks
        return EngineStats(num_waiting=len(sched.waiting), num_running=len(sched.running),
                           num_blocks_used=bm.num_used_blocks, num_blocks_total=bm.num_blocks,
                           num_blocks_cached=bm.num_cached_blocks, num_preemptions=sched.num_preemptions,
                           prefix_cache_hit_tokens=bm.hit_tokens, prompt_tokens=self._prompt_tokens,
                           generation_tokens=self._generation_tokens,
                           num_requests_finished=self._finished_requests)
