"""The generate loop: prompts in, tokens (or text) out, with processors, sampling, stopping and streaming.

The loop itself is model-agnostic: it drives a :class:`Decoder` (prefill once, then one step per
token) and does everything else in NumPy. :func:`generate` wires a Qwen2 model to it through
:class:`qwen2ms.generation.engine.CachedDecoder` (static KV cache, compiled decode step).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np

from .config import GenerationConfig, GenerationConfigError
from .processors import LogitsProcessor, apply_processors, build_processors
from .sampling import Sampler, greedy, make_rng, sample
from .stopping import RowText, StoppingCriterion, StopState, StopStrings, run_criteria
from .streamers import Streamer, as_streamer

__all__ = ["Decoder", "decode_loop", "left_pad", "prepare_inputs", "resolve_config", "run_generation", "generate", "chat"]


class Decoder(Protocol):
    """What the loop needs from a model: next-token logits for a prompt batch, then per appended token.

    ``prefill(input_ids [B, T], attention_mask [B, T]) -> logits [B, V]`` (float32, last position)
    and ``step(tokens [B]) -> logits [B, V]`` for the token just appended to every row.
    """

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray: ...

    def step(self, tokens: np.ndarray) -> np.ndarray: ...


def decode_loop(
    decoder: Decoder,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    config: GenerationConfig,
    processors: Sequence[LogitsProcessor] = (),
    sampler: Optional[Sampler] = None,
    rng: Optional[np.random.Generator] = None,
    row_texts: Optional[List[RowText]] = None,
    streamer: Optional[Streamer] = None,
    stopping_criteria: Sequence[StoppingCriterion] = (),
) -> Tuple[np.ndarray, np.ndarray]:
    """Generate up to ``config.max_new_tokens`` tokens for every row, HF's sampling loop.

    Each step: processors on float32 scores, ``sampler`` picks ids, finished rows get
    ``pad_token_id``, the stopping rules update the per-row flags. The loop ends when every row
    finished or the budget is spent; like HF the output is only as long as the longest row needs.

    Args:
        decoder: the model side (see :class:`Decoder`).
        input_ids: prompt ids [B, T] (left-padded).
        attention_mask: [B, T], 0 on padding.
        config: a validated config with ``pad_token_id`` resolved.
        processors: from :func:`build_processors` (plus the caller's).
        sampler: ``(scores, rng) -> ids``; default greedy or :func:`sample` per ``config``.
        rng: the call's generator (sampling only).
        row_texts: one :class:`RowText` per row to track text and stop strings, or None.
        streamer: receives row 0's text pieces (batches of one row only), then ``end()``.
        stopping_criteria: caller criteria ``(input_ids) -> bool [B]``.

    Returns:
        ``(ids [B, T + n], new_lengths [B])``: prompt then ``n`` new tokens (pad after a row
        finished), and how many tokens each row generated before it finished (its final token included).
    """
    batch, prompt_len = input_ids.shape
    if sampler is None:
        sampler = greedy if config.is_greedy else sample
    if rng is None:
        rng = make_rng(config.seed)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    state = StopState(batch, config.eos_token_ids, pad)
    out = np.empty((batch, prompt_len + config.max_new_tokens), dtype=np.int64)
    out[:, :prompt_len] = input_ids
    lengths = np.zeros(batch, dtype=np.int64)
    logits = decoder.prefill(input_ids, attention_mask)
    steps = 0
    for steps in range(1, config.max_new_tokens + 1):
        scores = apply_processors(processors, out[:, :prompt_len + steps - 1], logits)
        appended = state.select(sampler(scores, rng))
        out[:, prompt_len + steps - 1] = appended
        running = state.unfinished.copy()
        lengths += running
        stopped = np.zeros(batch, dtype=bool)
        if row_texts is not None:
            for b in np.flatnonzero(running):
                piece = row_texts[b].push(int(appended[b]))
                stopped[b] = row_texts[b].stopped
                if streamer is not None and piece:
                    streamer.put(piece)
        extra = run_criteria(stopping_criteria, out[:, :prompt_len + steps])
        state.update(appended, stopped if extra is None else stopped | extra)
        if state.done or steps == config.max_new_tokens:
            break
        logits = decoder.step(appended)
    if row_texts is not None:
        for b in range(batch):
            piece = row_texts[b].flush()
            if streamer is not None and piece:
                streamer.put(piece)
    if streamer is not None:
        streamer.end()
    return out[:, :prompt_len + steps], lengths


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "asnumpy"):  # a MindSpore Tensor
        return x.asnumpy()
    return np.asarray(x)


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> Tuple[np.ndarray, np.ndarray]:
    """Stack ragged id lists into left-padded ``(ids [B, T], attention_mask [B, T])``.

    Example:
        >>> left_pad([[5, 6], [7]], pad_token_id=0)
        (array([[5, 6],
               [0, 7]]), array([[1, 1],
               [0, 1]]))
    """
    width = max((len(r) for r in rows), default=0)
    ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for b, row in enumerate(rows):
        if len(row):
            ids[b, width - len(row):] = np.asarray(row, dtype=np.int64)
            mask[b, width - len(row):] = 1
    return ids, mask


def prepare_inputs(
    inputs: Any,
    attention_mask: Any = None,
    tokenizer: Any = None,
    pad_token_id: int = 0,
    eos_token_ids: Sequence[int] = (),
) -> Tuple[np.ndarray, np.ndarray, str]:
    """Turn ``generate``'s prompt argument into left-padded int64 ids and a mask.

    Args:
        inputs: a string, a list of strings (needs ``tokenizer``), a list of id lists (ragged
            lists are left-padded), or a [T] / [B, T] NumPy array or MindSpore Tensor.
        attention_mask: [B, T] (0 on padding) for array inputs. Without it every position counts,
            unless ``pad_token_id`` occurs and is not an eos id (HF's rule).
        tokenizer: has ``encode(text) -> list[int]``.
        pad_token_id: fills padding.
        eos_token_ids: used by the mask inference rule above.

    Returns:
        ``(ids, mask, kind)`` with ``kind`` one of "str", "list[str]", "ids".

    Raises:
        GenerationConfigError: empty prompts, right padding or holes in the mask, shape mismatch,
            strings without a tokenizer.
    """
    err = GenerationConfigError
    kind = "ids"
    if isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and inputs and all(isinstance(s, str) for s in inputs)):
        kind = "str" if isinstance(inputs, str) else "list[str]"
        if tokenizer is None:
            raise err("a text prompt needs a tokenizer: pass tokenizer=, or load the model with from_hf/"
                      "from_pretrained so that model.tokenizer is set; or pass token ids")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        ids, mask = left_pad([list(tokenizer.encode(t)) for t in texts], pad_token_id)
        if attention_mask is not None:
            raise err("attention_mask is computed from text prompts; pass it only with token ids")
    elif isinstance(inputs, (list, tuple)) and inputs and isinstance(inputs[0], (list, tuple, np.ndarray)):
        ids, mask = left_pad([list(r) for r in inputs], pad_token_id)
        if attention_mask is not None:
            mask = _to_numpy(attention_mask)
    else:
        ids = _to_numpy(inputs)
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) and ids.size:
            raise err(f"input_ids must be integer token ids of shape [T] or [B, T], got dtype {ids.dtype} "
                      f"shape {ids.shape}")
        ids = ids.astype(np.int64)
        if attention_mask is not None:
            mask = _to_numpy(attention_mask)
            if mask.ndim == 1:
                mask = mask[None, :]
        elif pad_token_id is not None and pad_token_id not in set(eos_token_ids) and (ids == pad_token_id).any():
            mask = (ids != pad_token_id).astype(np.int64)
        else:
            mask = np.ones_like(ids)
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise err("the prompt is empty: give at least one token (Qwen2 has no BOS token to start from)")
    if mask.shape != ids.shape:
        raise err(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}; they must match")
    mask = (np.asarray(mask) != 0).astype(np.int64)
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise err(f"prompt row {int(empty[0])} is empty (its attention_mask is all zeros); every row needs a token")
    holes = np.flatnonzero((mask[:, 1:] < mask[:, :-1]).any(axis=1))
    if holes.size:
        raise err(f"attention_mask row {int(holes[0])} has padding after a real token; decoder-only generation "
                  "needs left padding (pad at the start of each row, e.g. tokenizer padding_side='left')")
    return ids, mask, kind


def _first_not_none(*values: Any) -> Any:
    for v in values:
        if v is not None:
            return v
    return None


def resolve_config(
    generation_config: Union[GenerationConfig, Dict[str, Any], None],
    model: Any = None,
    tokenizer: Any = None,
    **overrides: Any,
) -> GenerationConfig:
    """The config a call runs with: the given one (or ``model.generation_config``, or defaults) plus overrides.

    The model's config is ``model.generation_config`` (a GenerationConfig) or, as loaded by
    ``from_hf``, ``model.generation_config_dict`` (the generation_config.json dict).
    Unset ``eos_token_id`` falls back to the model config's, then the tokenizer's; unset
    ``pad_token_id`` to the model config's, the tokenizer's, then the first eos id (HF does the
    same), then 0.

    Example:
        >>> resolve_config(None, eos_token_id=[2, 3]).pad_token_id
        2
    """
    if generation_config is None:
        generation_config = getattr(model, "generation_config", None)
    if generation_config is None:
        # from_hf keeps the checkpoint's generation_config.json as a raw dict.
        generation_config = getattr(model, "generation_config_dict", None)
    if generation_config is None:
        base = GenerationConfig()
    elif isinstance(generation_config, dict):
        base = GenerationConfig.from_dict(generation_config)
    elif isinstance(generation_config, GenerationConfig):
        base = generation_config
    else:
        raise TypeError(f"generation_config must be a GenerationConfig or a dict, got {type(generation_config).__name__}")
    cfg = base.update(**overrides)
    model_cfg = getattr(model, "config", None)
    if cfg.eos_token_id is None:
        eos = _first_not_none(getattr(model_cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None))
        if eos is not None:
            cfg = cfg.update(eos_token_id=eos)
    if cfg.pad_token_id is None:
        eos = cfg.eos_token_ids
        pad = _first_not_none(getattr(model_cfg, "pad_token_id", None), getattr(tokenizer, "pad_token_id", None),
                              eos[0] if eos else None, 0)
        cfg = cfg.update(pad_token_id=int(pad))
    return cfg


#: ``(batch_size, prompt_len, max_new_tokens) -> Decoder``
DecoderFactory = Callable[[int, int, int], Decoder]


def run_generation(
    make_decoder: DecoderFactory,
    inputs: Any,
    config: GenerationConfig,
    attention_mask: Any = None,
    tokenizer: Any = None,
    streamer: Any = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    stopping_criteria: Sequence[StoppingCriterion] = (),
    sampler: Optional[Sampler] = None,
    max_position_embeddings: Optional[int] = None,
    return_text: Optional[bool] = None,
) -> Any:
    """Everything :func:`generate` does except building the model's decoder.

    ``make_decoder(batch_size, prompt_len, max_new_tokens)`` returns the :class:`Decoder`; the other
    arguments are :func:`generate`'s.

    Returns:
        For id inputs a NumPy int64 array ``[B * num_return_sequences, T + n]``; for a string the
        completion string (a list of ``num_return_sequences`` strings when > 1); for a list of
        strings a list of completions (each a list when ``num_return_sequences`` > 1).
    """
    ids, mask, kind = prepare_inputs(inputs, attention_mask, tokenizer, config.pad_token_id, config.eos_token_ids)
    prompt_len = ids.shape[1]
    config.validate(prompt_len=prompt_len, max_position_embeddings=max_position_embeddings)
    streamer = as_streamer(streamer)
    n = config.num_return_sequences
    if n > 1:
        ids, mask = np.repeat(ids, n, axis=0), np.repeat(mask, n, axis=0)
    batch = ids.shape[0]
    if streamer is not None and batch != 1:
        raise GenerationConfigError(f"streaming needs a single sequence, but this call generates {batch} "
                                    "(batch size x num_return_sequences); stream one prompt at a time")
    if return_text:
        kind = "list[str]" if kind == "ids" else kind
    elif return_text is not None:
        kind = "ids"
    need_text = streamer is not None or bool(config.stop_strings) or kind != "ids"
    if need_text and tokenizer is None:
        what = "streaming" if streamer is not None else "stop_strings" if config.stop_strings else "text output"
        raise GenerationConfigError(f"{what} needs a tokenizer to decode the generated text; pass tokenizer=")
    stops = StopStrings(config.stop_string_list) if config.stop_strings else None
    row_texts = [RowText(tokenizer, stops) for _ in range(batch)] if need_text else None
    vocab_limit = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
    processors = build_processors(config, prompt_len, vocab_limit, mask, extra=logits_processors)
    decoder = make_decoder(batch, prompt_len, config.max_new_tokens)
    out, _ = decode_loop(decoder, ids, mask, config, processors, sampler, make_rng(config.seed), row_texts,
                         streamer, stopping_criteria)
    if kind == "ids":
        return out
    texts = [row.text for row in row_texts]
    if n > 1:
        texts = [texts[i * n:(i + 1) * n] for i in range(len(texts) // n)]
    return texts[0] if kind == "str" else texts


def generate(
    model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    generation_config: Union[GenerationConfig, Dict[str, Any], None] = None,
    tokenizer: Any = None,
    streamer: Any = None,
    logits_processors: Sequence[LogitsProcessor] = (),
    stopping_criteria: Sequence[StoppingCriterion] = (),
    sampler: Optional[Sampler] = None,
    return_text: Optional[bool] = None,
    **overrides: Any,
) -> Any:
    """Continue prompts with a Qwen2 model: KV-cached, compiled decoding with HF-compatible settings.

    The prompt is prefilled once into a static KV cache sized from the request; then one compiled
    decode step (the cache slot passed as a Tensor) runs per token. Left-padded batches get per-row
    positions from the mask. Greedy results equal transformers' ``generate`` token for token.

    Args:
        model: a ``Qwen2ForCausalLM``.
        input_ids: token ids ([T] or [B, T] NumPy array / MindSpore Tensor, or ragged lists, which
            are left-padded), a string, or a list of strings (needs a tokenizer).
        attention_mask: [B, T] with 0 on left padding (token-id inputs only).
        generation_config: a GenerationConfig or generation_config.json dict; default: the model's
            (``from_hf`` reads generation_config.json), else :class:`GenerationConfig` defaults.
        tokenizer: for text in/out, stop strings and streaming; default ``model.tokenizer``. Its
            length bounds the ids that can be generated (padded embedding rows never are).
        streamer: an object with ``put(text)``/``end()`` (e.g. :class:`TextStreamer`) or a function
            taking each text piece; one sequence only. Pieces never split a character and join to
            the returned completion.
        logits_processors: extra ``(input_ids, scores) -> scores`` callables, run after the
            repetition penalty and min_new_tokens and before temperature/top-k/top-p (HF's order).
        stopping_criteria: extra ``(input_ids) -> bool [B]`` callables; True ends a row.
        sampler: ``(scores, rng) -> ids`` replacing greedy/multinomial selection.
        return_text: force text (True) or id (False) output; default follows the input kind.
        **overrides: GenerationConfig fields for this call (``max_new_tokens=64``, ``do_sample=True``...).

    Returns:
        Token ids: a NumPy int64 array ``[B * num_return_sequences, T + n]`` (prompt then new tokens,
        ``pad_token_id`` after a row ended; ``n`` is what the longest row needed). A string prompt:
        the completion string (special tokens removed, cut after a stop string); a list of strings:
        a list of completions. With ``num_return_sequences > 1`` each completion becomes a list.

    Raises:
        GenerationConfigError: invalid settings or prompts (the message says what would be right).

    Example:
        >>> model = Qwen2ForCausalLM.from_hf("Qwen/Qwen2-0.5B-Instruct")  # doctest: +SKIP
        >>> generate(model, "The capital of France is", max_new_tokens=8)  # doctest: +SKIP
        ' Paris. It is the largest city in'
    """
    from .engine import CachedDecoder

    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    config = resolve_config(generation_config, model, tokenizer, **overrides)

    def make_decoder(batch: int, prompt_len: int, max_new_tokens: int) -> Decoder:
        return CachedDecoder(model, batch, prompt_len, max_new_tokens)

    return run_generation(make_decoder, input_ids, config, attention_mask, tokenizer, streamer, logits_processors,
                          stopping_criteria, sampler, int(model.config.max_position_embeddings), return_text)


def _chat_eos_ids(tokenizer: Any) -> List[int]:
    ids = []
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab() if callable(getattr(tokenizer, "get_vocab", None)) else {}
    if "<|im_end|>" in vocab:
        ids.append(int(vocab["<|im_end|>"]))
    return ids


def chat(
    model: Any,
    messages: Sequence[Dict[str, Any]],
    tokenizer: Any = None,
    streamer: Any = None,
    generation_config: Union[GenerationConfig, Dict[str, Any], None] = None,
    **gen: Any,
) -> Union[str, List[str]]:
    """Reply to a conversation: apply the chat template, generate, return the assistant's text.

    Multi-turn history is the caller's list: append ``{"role": "assistant", "content": reply}``
    and the next user message, then call again. Besides the config's eos ids, generation also
    stops at the tokenizer's eos token and ``<|im_end|>`` (the end of a ChatML turn), so a base
    model's config (eos ``<|endoftext|>`` only) does not run past the reply.

    Args:
        model: a ``Qwen2ForCausalLM``.
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
        tokenizer: default ``model.tokenizer``; must have ``apply_chat_template``.
        streamer: as in :func:`generate`.
        generation_config: as in :func:`generate`.
        **gen: GenerationConfig overrides and the other keyword arguments of :func:`generate`.

    Returns:
        The reply (a list of replies when ``num_return_sequences > 1``).

    Example:
        >>> chat(model, [{"role": "user", "content": "Hi!"}], max_new_tokens=32)  # doctest: +SKIP
        'Hello! How can I help you today?'
    """
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or not callable(getattr(tokenizer, "apply_chat_template", None)):
        raise GenerationConfigError("chat needs a tokenizer with a chat template: pass tokenizer=, or load the "
                                    "model with from_hf so that model.tokenizer is set")
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 tokenizers return an encoding dict
        ids = ids["input_ids"]
    ids = [int(i) for i in (ids[0] if len(ids) and isinstance(ids[0], (list, tuple)) else ids)]
    config = resolve_config(generation_config, model, tokenizer,
                            **{k: gen.pop(k) for k in list(gen) if k in GenerationConfig._field_names()})
    eos = list(dict.fromkeys(config.eos_token_ids + _chat_eos_ids(tokenizer)))
    if eos:
        config = config.update(eos_token_id=eos)
    replies = generate(model, [ids], generation_config=config, tokenizer=tokenizer, streamer=streamer,
                       return_text=True, **gen)
    return replies[0]
