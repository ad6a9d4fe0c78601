"""LLM: offline batch inference (generate, chat) on top of LLMEngine, vLLM's entry point."""
from __future__ import annotations

import itertools
import os
from typing import Any, Dict, List, Sequence, Union

import numpy as np

from .engine import LLMEngine
from .outputs import RequestOutput
from .params import RequestError, SamplingParams, SamplingParamsError

__all__ = ["LLM", "chat_prompt_ids", "chat_stop_token_ids"]

Message = Dict[str, Any]


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Message]) -> List[int]:
    """The prompt ids of a conversation: the tokenizer's chat template with the assistant turn opened.

    Raises:
        RequestError: no tokenizer with a chat template, or ``messages`` is not a list of role/content dicts.
    """
    if tokenizer is None or not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise RequestError("chat needs a tokenizer with a chat template: pass tokenizer=, or load the model with "
                           "from_hf so that model.tokenizer is set")
    if not isinstance(messages, (list, tuple)) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise RequestError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {messages!r:.200}")
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 tokenizers return an encoding dict
        ids = ids["input_ids"]
    return [int(i) for i in (ids[0] if len(ids) and isinstance(ids[0], (list, tuple)) else ids)]


def chat_stop_token_ids(tokenizer: Any) -> List[int]:
    """Ids that end an assistant turn besides the model's eos: the tokenizer's eos and ``<|im_end|>``."""
    from ..generation.generate import _chat_eos_ids

    return _chat_eos_ids(tokenizer) if tokenizer is not None else []


class LLM:
    """Generate for many prompts at once with continuous batching (vLLM's ``LLM``).

    Args:
        model: a :class:`~qwen2ms.modeling.Qwen2ForCausalLM`, or a local folder / hub id to load with ``from_hf``.
        tokenizer: default ``model.tokenizer``.
        **engine_kwargs: :class:`LLMEngine` options (``max_num_seqs``, ``max_model_len``, ``num_blocks``,
            ``kv_cache_memory``, ``block_size``, ``enable_prefix_caching``, ``verbose``).

    Example:
        >>> llm = LLM("Qwen/Qwen2-0.5B-Instruct", max_model_len=2048)  # doctest: +SKIP
        >>> outs = llm.generate(["Hello, my name is", "The capital of France is"],
        ...                     SamplingParams(temperature=0.8, top_p=0.95, max_tokens=32))  # doctest: +SKIP
        >>> [o.outputs[0].text for o in outs]  # doctest: +SKIP
    """

    def __init__(self, model: Any, tokenizer: Any = None, **engine_kwargs: Any):
        if isinstance(model, (str, os.PathLike)):
            from ..modeling import Qwen2ForCausalLM

            model = Qwen2ForCausalLM.from_hf(model)
        self.engine = LLMEngine(model, tokenizer, **engine_kwargs)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def _run(self, prompts: List[Any], params: List[SamplingParams], use_tqdm: bool) -> List[RequestOutput]:
        engine = self.engine
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                engine.add_request(rid, prompt, p)
            done: Dict[str, RequestOutput] = {}
            bar = None
            if use_tqdm:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(ids), desc="requests", unit="req")
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
            if bar is not None:
                bar.close()
        finally:
            engine.abort_request(ids)  # after an error: nothing of this call stays queued (finished ids: no-op)
        return [done[rid] for rid in ids]

    def _params_list(self, sampling_params: Union[SamplingParams, Sequence[SamplingParams], None], count: int
                     ) -> List[SamplingParams]:
        if sampling_params is None:
            return [self.engine.default_sampling_params()] * count
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * count
        params = list(sampling_params)
        if len(params) != count or not all(isinstance(p, SamplingParams) for p in params):
            raise SamplingParamsError(f"sampling_params must be one SamplingParams or a list of {count} (one per "
                                      f"prompt), got {len(params)} items")
        return params

    def generate(self, prompts: Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 use_tqdm: bool = False) -> List[RequestOutput]:
        """Complete every prompt; return one finished :class:`RequestOutput` per prompt, in input order.

        Args:
            prompts: a string, a list of strings, a list of token ids (one prompt), or a list of id lists.
            sampling_params: one for all prompts or one per prompt; default the model's decoding settings
                (:meth:`LLMEngine.default_sampling_params`).
            use_tqdm: show a progress bar of finished requests.

        Raises:
            SamplingParamsError / RequestError (ValueErrors): invalid settings or prompts; nothing runs then.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, (list, tuple)) and prompts and all(
                isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in prompts):
            prompts = [list(prompts)]
        prompts = list(prompts)
        return self._run(prompts, self._params_list(sampling_params, len(prompts)), use_tqdm)

    def chat(self, messages: Union[Sequence[Message], Sequence[Sequence[Message]]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             use_tqdm: bool = False) -> List[RequestOutput]:
        """Reply to one conversation or a list of them, through the tokenizer's chat template.

        The assistant turn also ends at the tokenizer's eos and ``<|im_end|>`` (added to ``stop_token_ids``),
        so a base model's eos setting does not run past the reply. Successive turns of a conversation share
        their prefix, so with prefix caching turn N does not prefill turns 1..N-1 again.

        Args:
            messages: ``[{"role": ..., "content": ...}, ...]`` or a list of such conversations.
            sampling_params: one for all or one per conversation.
            use_tqdm: show a progress bar.

        Returns:
            One finished :class:`RequestOutput` per conversation, in input order.

        Example:
            >>> llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(temperature=0, max_tokens=32))  # doctest: +SKIP
        """
        single = isinstance(messages, (list, tuple)) and (not messages or isinstance(messages[0], dict))
        convs = [messages] if single else list(messages)
        prompts = [chat_prompt_ids(self.tokenizer, c) for c in convs]
        extra = chat_stop_token_ids(self.tokenizer)
        params = []
        for p in self._params_list(sampling_params, len(convs)):
            stops = list(dict.fromkeys((p.stop_token_ids or []) + [
                i for i in extra if i not in self.engine.eos_token_ids and i < self.engine.vocab_size]))
            params.append(p.clone(stop_token_ids=stops or None))
        return self._run(prompts, params, use_tqdm)
