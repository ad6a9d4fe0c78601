"""The OpenAI API's request models (pydantic) and response bodies, as the qwen2ms server speaks them."""
from __future__ import annotations

import time
import uuid
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ChatCompletionRequest", "CompletionRequest", "ChatMessage", "StreamOptions", "error_body",
           "completion_body", "chat_completion_body", "completion_chunk", "chat_completion_chunk", "usage_body",
           "models_body", "new_id", "SAMPLING_FIELDS"]

#: Request fields that become :class:`qwen2ms.serving.SamplingParams` fields of the same name (vLLM's extras too).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty", "frequency_penalty",
                   "min_tokens", "stop", "stop_token_ids", "ignore_eos", "seed", "skip_special_tokens")


class _Strict(BaseModel):
    # Unknown fields are refused (OpenAI answers "Unrecognized request argument"): a misspelt
    # max_token silently ignored would generate 16 tokens and nobody would know why.
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[TextPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _SamplingRequest(_Strict):
    """The fields chat and text completions share (OpenAI's names, then vLLM's extra sampling fields)."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[Dict[str, float]] = None
    user: Optional[str] = None
    # vLLM's extras (the openai client sends them through extra_body)
    top_k: Optional[int] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    stop_token_ids: Optional[List[int]] = None
    ignore_eos: Optional[bool] = None
    skip_special_tokens: Optional[bool] = None

    def unsupported(self) -> Optional[str]:
        """The name of a field set to something this server cannot do (None when all is supported)."""
        if self.logit_bias:
            return "logit_bias"
        return None


class ChatCompletionRequest(_SamplingRequest):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    response_format: Optional[Dict[str, Any]] = None
    tools: Optional[List[Dict[str, Any]]] = None
    tool_choice: Optional[Union[str, Dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None

    def unsupported(self) -> Optional[str]:
        if self.logprobs or self.top_logprobs:
            return "logprobs"
        if self.tools:
            return "tools"
        if self.response_format not in (None, {"type": "text"}):
            return "response_format"
        return super().unsupported()


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, List[str], List[int], List[List[int]]]
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    logprobs: Optional[int] = None

    def unsupported(self) -> Optional[str]:
        if self.logprobs is not None:
            return "logprobs"
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1, self.n):
            return "best_of"
        return super().unsupported()

    def prompts(self) -> List[Union[str, List[int]]]:
        """The prompts, one per entry: a string, a list of strings, a list of ids or a list of id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[Union[str, int]] = None) -> Dict[str, Any]:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def usage_body(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, created: int, choices: List[Dict[str, Any]],
                    usage: Dict[str, int]) -> Dict[str, Any]:
    """``choices``: ``{"index", "text", "finish_reason"}`` each."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [dict(c, logprobs=None) for c in choices], "usage": usage}


def chat_completion_body(rid: str, model: str, created: int, choices: List[Dict[str, Any]],
                         usage: Dict[str, int]) -> Dict[str, Any]:
    """``choices``: ``{"index", "text", "finish_reason"}`` each."""
    out = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]}, "logprobs": None,
            "finish_reason": c["finish_reason"]} for c in choices]
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": out,
            "usage": usage}


def completion_chunk(rid: str, model: str, created: int, index: Optional[int], text: str = "",
                     finish_reason: Optional[str] = None, usage: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """One SSE chunk of a streamed text completion (``index`` None: the closing usage chunk, no choices)."""
    choices = [] if index is None else [{"index": index, "text": text, "logprobs": None,
                                         "finish_reason": finish_reason}]
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
            "usage": usage}


def chat_completion_chunk(rid: str, model: str, created: int, index: Optional[int], delta: Optional[Dict] = None,
                          finish_reason: Optional[str] = None,
                          usage: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """One SSE chunk of a streamed chat completion (``index`` None: the closing usage chunk, no choices)."""
    choices = [] if index is None else [{"index": index, "delta": delta or {}, "logprobs": None,
                                         "finish_reason": finish_reason}]
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            "usage": usage}


def models_body(name: str, max_model_len: int, created: Optional[int] = None) -> Dict[str, Any]:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created or int(time.time()),
                                        "owned_by": "qwen2ms", "max_model_len": max_model_len}]}
