"""Render chat templates (Jinja) in a sandbox that cannot reach Python internals, as Hugging Face does."""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .bpe import TokenizerError

__all__ = ["QWEN2_CHAT_TEMPLATE", "DEFAULT_SYSTEM_PROMPT", "render_chat_template", "validate_messages"]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# The Qwen2-Instruct template (tokenizer_config.json "chat_template" of the released instruct models).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _plain(value: Any, where: str) -> Any:
    # Templates only ever see JSON-like data: rich objects carry methods the sandbox cannot vet.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    raise TokenizerError(
        f"{where} is a {type(value).__name__}; chat template inputs must be plain JSON data "
        "(dict, list, str, int, float, bool, None)."
    )


def validate_messages(messages: Any) -> List[Dict[str, Any]]:
    """Check a conversation and return a plain-data copy of it.

    Args:
        messages: a list of dicts, each with a string ``"role"`` and a string ``"content"``
            (an assistant message that carries ``"tool_calls"`` may omit ``"content"`` or set it to None).

    Returns:
        A deep copy made of plain JSON types, with None-valued keys dropped (as the reference does).

    Raises:
        TokenizerError: the conversation is not of that shape; the message says which entry is wrong.

    Example:
        >>> validate_messages([{"role": "user", "content": "hi"}])
        [{'role': 'user', 'content': 'hi'}]
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TokenizerError(
            f"messages must be a list of dicts like [{{'role': 'user', 'content': 'Hi'}}]; got {type(messages).__name__}."
        )
    out: List[Dict[str, Any]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(
                f"messages[{i}] is a {type(message).__name__}; each message must be a dict with 'role' and 'content' strings."
            )
        message = {k: v for k, v in message.items() if v is not None}
        role = message.get("role")
        if not isinstance(role, str):
            raise TokenizerError(f"messages[{i}] needs a string 'role' (e.g. 'system', 'user', 'assistant'); got {role!r}.")
        tool_call_only = "content" not in message and "tool_calls" in message
        if not tool_call_only and not isinstance(message.get("content"), str):
            raise TokenizerError(
                f"messages[{i}] (role {role!r}) needs a string 'content'; got {message.get('content')!r}."
            )
        out.append(_plain(message, f"messages[{i}]"))
    return out


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for masks; rendering keeps the body.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Optional[int] = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # Jinja's own tojson HTML-escapes; chat templates expect plain JSON.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class _Sandbox(ImmutableSandboxedEnvironment):
        # Jinja's sandbox turns unsafe attributes into an Undefined that prints as "" - a hostile
        # template would then render silently. Fail at the access instead.
        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe."
            )

    class _Dict:
        # `dict` in templates builds dicts but is not the dict type itself (no type-level attributes to walk).
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class _Namespace(jinja2.utils.Namespace):
        # Namespaces refuse underscore-prefixed names, so templates cannot plant dunder attributes.
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                _Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'.")

    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e


def render_chat_template(
    template: str,
    messages: Any,
    add_generation_prompt: bool = False,
    tools: Optional[Sequence[Mapping[str, Any]]] = None,
    documents: Optional[Sequence[Mapping[str, Any]]] = None,
    **kwargs: Any,
) -> str:
    """Render ``template`` for one conversation in a sandboxed, immutable Jinja environment.

    The environment matches the reference (trim_blocks, lstrip_blocks, loop controls,
    ``raise_exception``, ``strftime_now``, a JSON ``tojson`` filter).

    Args:
        template: Jinja source, e.g. :data:`QWEN2_CHAT_TEMPLATE`.
        messages: the conversation (see :func:`validate_messages`).
        add_generation_prompt: append the header that starts the assistant's reply.
        tools: JSON schemas of callable tools, for templates that render them.
        documents: retrieval documents (dicts), for templates that render them.
        **kwargs: extra variables the template may read.

    Returns:
        The rendered prompt text.

    Raises:
        TokenizerError: bad messages, a template syntax error, a template that reaches for
            Python internals (sandbox violation), or a template's own ``raise_exception``.

    Example:
        >>> render_chat_template(QWEN2_CHAT_TEMPLATE, [{"role": "user", "content": "Hi"}], True)
        '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    import jinja2

    if not isinstance(template, str):
        raise TokenizerError(f"chat template must be a str of Jinja source; got {type(template).__name__}.")
    chat = validate_messages(messages)
    if tools is not None:
        for i, tool in enumerate(tools):
            if not isinstance(tool, Mapping):
                raise TokenizerError(f"tools[{i}] is a {type(tool).__name__}; pass each tool as a JSON-schema dict.")
        tools = _plain(list(tools), "tools")
    if documents is not None:
        for i, doc in enumerate(documents):
            if not isinstance(doc, Mapping):
                raise TokenizerError(f"documents[{i}] is a {type(doc).__name__}; pass each document as a dict.")
        documents = _plain(list(documents), "documents")
    extra = {k: _plain(v, k) for k, v in kwargs.items()}
    compiled = _compile(template)
    try:
        return compiled.render(messages=chat, tools=tools, documents=documents,
                               add_generation_prompt=bool(add_generation_prompt), **extra)
    except jinja2.exceptions.SecurityError as e:
        raise TokenizerError(
            f"chat template was stopped by the sandbox ({e}); templates may not access Python internals "
            "such as __class__, __mro__, __subclasses__ or __globals__. Use a trusted template."
        ) from e
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"chat template failed to render: {e}") from e
