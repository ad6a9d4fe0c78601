"""Render chat templates (Jinja) in a sandbox that cannot reach Python internals, as Hugging Face does."""
from __future__ import annotations

import contextvars
import json
import re
import string
import time
from datetime import datetime
from functools import lru_cache, wraps
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from .bpe import TokenizerError

__all__ = [
    "QWEN2_CHAT_TEMPLATE",
    "DEFAULT_SYSTEM_PROMPT",
    "DEFAULT_MAX_OUTPUT_CHARS",
    "DEFAULT_MAX_ITERATIONS",
    "DEFAULT_TIMEOUT",
    "ChatTemplateLimitError",
    "render_chat_template",
    "validate_messages",
]

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Rendering limits: real templates need a tiny fraction of each; hostile ones hit one of them
# instead of hanging or building gigabyte strings.
DEFAULT_MAX_OUTPUT_CHARS = 1_000_000
DEFAULT_MAX_ITERATIONS = 1_000_000
DEFAULT_TIMEOUT = 10.0
_MAX_INT_BITS = 1 << 16  # ints past ~20k digits only come from runaway arithmetic
# Strings and lists made while rendering (output, blocks, macros, filters, calls, operators) may
# total this many times max_output_chars: real templates copy each message a few times, while
# loops that keep building fresh large strings (each under the cap) would otherwise fill memory.
_PRODUCED_FACTOR = 32
_MAX_DEPTH = 200  # nesting of messages/tools data


class ChatTemplateLimitError(TokenizerError):
    """A chat template went past a rendering limit; the message names the limit and how to raise it."""

# The Qwen2-Instruct template (tokenizer_config.json "chat_template" of the released instruct models).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _plain(value: Any, where: str, depth: int = 0) -> Any:
    # Templates only ever see JSON-like data: rich objects carry methods the sandbox cannot vet.
    if value is None or type(value) in (str, int, float, bool):
        return value
    if depth >= _MAX_DEPTH:
        raise TokenizerError(
            f"{where} is nested more than {_MAX_DEPTH} levels deep (a structure that contains itself?); "
            "chat template inputs must be plain JSON data of reasonable depth."
        )
    if isinstance(value, Mapping):
        return {_plain(k, where, depth + 1): _plain(v, f"{where}[{k!r}]", depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)]
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


class _Budget:
    """The limits of one render and what it has used so far."""

    __slots__ = ("max_chars", "max_iterations", "timeout", "deadline", "iterations", "produced")

    def __init__(self, max_chars: int, max_iterations: int, timeout: float) -> None:
        self.max_chars = max_chars
        self.max_iterations = max_iterations
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.iterations = 0
        self.produced = 0

    def tick(self) -> None:
        # one loop iteration or macro call
        self.iterations += 1
        if self.iterations > self.max_iterations:
            raise ChatTemplateLimitError(
                f"chat template ran more than max_iterations={self.max_iterations} loop iterations and macro calls "
                "(a runaway or deeply nested loop?); pass max_iterations=N to apply_chat_template() or "
                "render_chat_template() to allow more."
            )
        self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise ChatTemplateLimitError(
                f"chat template rendering took longer than timeout={self.timeout:g} s; pass timeout=SECONDS to "
                "apply_chat_template() or render_chat_template() to allow more."
            )

    def produce(self, size: int) -> None:
        self.produced += size
        if self.produced > self.max_chars * _PRODUCED_FACTOR:
            raise ChatTemplateLimitError(
                f"chat template made more than {_PRODUCED_FACTOR} x max_output_chars = "
                f"{self.max_chars * _PRODUCED_FACTOR} characters of strings and lists while rendering (a loop "
                "that keeps building large strings?); pass max_output_chars=N to apply_chat_template() or "
                "render_chat_template() to allow more."
            )

    def check_size(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise ChatTemplateLimitError(
                f"chat template would make {what} of about {size} characters, over max_output_chars="
                f"{self.max_chars}; pass max_output_chars=N to apply_chat_template() or render_chat_template() "
                "to allow more."
            )


_BUDGET: "contextvars.ContextVar[_Budget]" = contextvars.ContextVar("qwen2ms_chat_template_budget")


def _budget() -> _Budget:
    try:
        return _BUDGET.get()
    except LookupError:  # a compiled template rendered outside render_chat_template: per-check defaults
        return _Budget(DEFAULT_MAX_OUTPUT_CHARS, DEFAULT_MAX_ITERATIONS, DEFAULT_TIMEOUT)


def _rendered_size(value: Any, limit: int) -> int:
    """About len(str(value)); stops counting once past ``limit`` (so it costs O(limit) at most)."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v) + 2
        elif isinstance(v, (list, tuple)):
            total += 2 + 2 * len(v)
            if total <= limit:
                stack.extend(v)
        elif isinstance(v, dict):
            total += 2 + 4 * len(v)
            if total <= limit:
                stack.extend(v.keys())
                stack.extend(v.values())
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 1
        else:
            total += 8
        if total > limit:
            break
    return total


def _check_rendered(budget: _Budget, value: Any, what: str) -> None:
    if isinstance(value, str):
        budget.check_size(len(value), what)
    elif isinstance(value, (list, tuple, dict)):
        budget.check_size(_rendered_size(value, budget.max_chars), what)


def _check_ints(budget: _Budget, values: Any, what: str) -> None:
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and v > budget.max_chars:
            budget.check_size(v, what)


# widths and precisions in %-formats and str.format specs
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _check_percent(budget: _Budget, fmt: str, args: Any) -> None:
    for m in _PERCENT_SPEC.finditer(fmt):
        for group in m.groups():
            if group and group != "*":
                budget.check_size(int(group), "a %-format width")
    _check_ints(budget, args if isinstance(args, tuple) else (args,), "a %-format width")
    budget.check_size(len(fmt) + _rendered_size(args, budget.max_chars), "a %-formatted string")


def _check_format(budget: _Budget, fmt: str, args: Any, kwargs: Mapping[str, Any]) -> None:
    try:
        specs = [spec for _, _, spec, _ in string.Formatter().parse(fmt) if spec]
    except ValueError:
        return  # str.format raises its own error for a malformed format
    for spec in specs:
        for digits in _DIGITS.findall(spec):
            budget.check_size(int(digits), "a str.format width")
    values = list(args) + list(kwargs.values())
    _check_ints(budget, values, "a str.format width")
    budget.check_size(len(fmt) + _rendered_size(values, budget.max_chars), "a formatted string")


def _check_str_method(budget: _Budget, text: str, name: str, args: Any, kwargs: Mapping[str, Any]) -> None:
    # str methods whose result can be far larger than their inputs
    if name in ("center", "ljust", "rjust", "zfill") and args:
        _check_ints(budget, args[:1], f"str.{name}()")
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            budget.check_size(len(text) + text.count("\t") * size, "str.expandtabs()")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        hits = text.count(old) if old else len(text) + 1
        count = args[2] if len(args) > 2 else kwargs.get("count", -1)
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        budget.check_size(len(text) + hits * max(0, len(new) - len(old)), "str.replace()")
    elif name == "join" and args and isinstance(args[0], (list, tuple)):
        parts = args[0]
        budget.check_size(_rendered_size(parts, budget.max_chars) + len(text) * len(parts), "str.join()")
    elif name == "translate" and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        budget.check_size(len(text) * longest, "str.translate()")
    elif name in ("format", "format_map"):
        values = args[0] if name == "format_map" and args else kwargs
        positional = () if name == "format_map" else args
        _check_format(budget, text, positional, values if isinstance(values, Mapping) else {})


def _check_binop(budget: _Budget, op: str, left: Any, right: Any) -> None:
    seqs = (str, list, tuple)
    if op == "*":
        if isinstance(left, int) and isinstance(right, seqs):
            left, right = right, left
        if isinstance(left, seqs) and isinstance(right, int):
            if isinstance(left, str):
                budget.check_size(len(left) * right, f"'*' of a str")
            else:
                budget.check_size(len(left) * right, f"'*' of a {type(left).__name__}")
                budget.check_size(_rendered_size(left, budget.max_chars) * right, f"'*' of a {type(left).__name__}")
        elif isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
            raise ChatTemplateLimitError(f"chat template multiplies integers past {_MAX_INT_BITS} bits.")
    elif op == "+":
        if isinstance(left, str) and isinstance(right, str):
            budget.check_size(len(left) + len(right), "'+' of a str")
        elif isinstance(left, seqs) and isinstance(right, seqs):
            budget.check_size(len(left) + len(right), f"'+' of a {type(left).__name__}")
            # lists keep their items alive: a loop appending fresh large strings must stop too
            budget.check_size(_rendered_size(left, budget.max_chars) + _rendered_size(right, budget.max_chars),
                              f"'+' of a {type(left).__name__}")
    elif op == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            if left.bit_length() * right > _MAX_INT_BITS:
                raise ChatTemplateLimitError(
                    f"chat template computes {left}**{right}, an integer past {_MAX_INT_BITS} bits."
                )
    elif op == "%" and isinstance(left, str):
        _check_percent(budget, left, right)


# filters whose result can be far larger than their input, with the check for each
def _filter_check(name: str) -> Optional[Callable[[_Budget, Any, tuple, dict], None]]:
    if name == "center":
        return lambda b, value, args, kwargs: _check_ints(b, list(args) + [kwargs.get("width")], "|center")
    if name == "indent":
        def indent(b: _Budget, value: Any, args: tuple, kwargs: dict) -> None:
            width = args[0] if args else kwargs.get("width", 4)
            step = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
            text = value if isinstance(value, str) else ""
            b.check_size(_rendered_size(value, b.max_chars) + step * (text.count("\n") + 1), "|indent")
        return indent
    if name in ("batch", "slice"):
        return lambda b, value, args, kwargs: _check_ints(b, list(args) + list(kwargs.values()), f"|{name}")
    if name == "format":
        return lambda b, value, args, kwargs: _check_percent(b, value, args or kwargs) if isinstance(value, str) else None
    if name == "replace":
        return lambda b, value, args, kwargs: _check_str_method(b, value, "replace", args, kwargs) if isinstance(value, str) else None
    if name == "join":
        return lambda b, value, args, kwargs: b.check_size(
            _rendered_size(value, b.max_chars) + len(args[0] if args and isinstance(args[0], str) else "") * (
                len(value) if isinstance(value, (list, tuple)) else 0), "|join")
    if name == "tojson":
        def tojson(b: _Budget, value: Any, args: tuple, kwargs: dict) -> None:
            indent = kwargs.get("indent", args[1] if len(args) > 1 else None)
            step = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
            size = _rendered_size(value, b.max_chars)
            b.check_size(size * (1 + step), "|tojson")
        return tojson
    if name in ("string", "pprint", "e", "escape", "forceescape", "safe", "trim", "upper", "lower", "title",
                "capitalize", "wordwrap", "truncate", "urlize", "striptags", "urlencode", "xmlattr", "list"):
        return lambda b, value, args, kwargs: _check_rendered(b, value, f"|{name}")
    return None


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    check = _filter_check(name)
    offset = 1 if hasattr(func, "jinja_pass_arg") else 0  # the context/environment comes first

    @wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.check_time()
        if check is not None and len(args) > offset:
            check(budget, args[offset], args[offset + 1:], kwargs)
        result = func(*args, **kwargs)
        if isinstance(result, (str, list, tuple)):
            budget.check_size(len(result), f"the result of |{name}")
            budget.produce(len(result))
        return result

    return guarded


def _counted(iterable: Any) -> Any:
    # every for-loop iterates through this: one tick per item
    budget = _budget()
    for item in iterable:
        budget.tick()
        yield item


def _concat(parts: Any) -> str:
    # joins of output buffers (macros, {% set %} blocks, call blocks) and of `~`
    parts = [p if isinstance(p, str) else str(p) for p in parts] if not isinstance(parts, list) else parts
    budget, size = _budget(), sum(map(len, parts))
    budget.check_size(size, "a joined string")
    budget.produce(size)
    return "".join(parts)


def _tilde(parts: List[Any]) -> str:
    budget = _budget()
    budget.check_size(sum(_rendered_size(p, budget.max_chars) - 2 if isinstance(p, str) else
                          _rendered_size(p, budget.max_chars) for p in parts), "a '~' concatenation")
    result = "".join(map(str, parts))
    budget.produce(len(result))
    return result


_LOOP_FILTER = "qwen2ms.counted"  # not a valid filter name in template source: templates cannot call these
_TILDE_FILTER = "qwen2ms.tilde"


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.runtime import LoopContext, Macro
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.visitor import NodeTransformer

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
        # Every hook also checks the render's deadline, so a template that never outputs still stops.
        intercepted_binops = frozenset(["*", "+", "**", "%"])
        concat = staticmethod(_concat)

        # Jinja's sandbox turns unsafe attributes into an Undefined that prints as "" - a hostile
        # template would then render silently. Fail at the access instead.
        def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
            raise jinja2.exceptions.SecurityError(
                f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe."
            )

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            budget = _budget()
            budget.check_time()
            _check_binop(budget, operator, left, right)
            result = super().call_binop(context, operator, left, right)
            if isinstance(result, (str, list, tuple)):
                budget.produce(len(result))
            return result

        def getattr(self, obj: Any, attribute: str) -> Any:
            _budget().check_time()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            _budget().check_time()
            return super().getitem(obj, argument)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            budget = _budget()
            budget.check_time()
            if isinstance(__obj, LoopContext):
                budget.tick()
                args = tuple(_counted(a) if k == 0 else a for k, a in enumerate(args))  # loop(children)
            elif isinstance(__obj, Macro):
                budget.tick()
            else:
                target = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
                owner = getattr(target, "__self__", None)
                if isinstance(owner, str):
                    _check_str_method(budget, owner, getattr(target, "__name__", ""), args, kwargs)
            result = super().call(__context, __obj, *args, **kwargs)
            if isinstance(result, (str, list, tuple)):
                budget.check_size(len(result), "a call's result")
                budget.produce(len(result))
            return result

    class _Guard(NodeTransformer):
        # Count every for-loop's items and route `~` through a size check.
        def visit_For(self, node: Any) -> Any:
            self.generic_visit(node)
            node.iter = nodes.Filter(node.iter, _LOOP_FILTER, [], [], None, None, lineno=node.lineno)
            return node

        def visit_Concat(self, node: Any) -> Any:
            self.generic_visit(node)
            return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), _TILDE_FILTER, [], [], None, None,
                                lineno=node.lineno)

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

    def lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:  # noqa: A002
        _check_ints(_budget(), [n * max], "lipsum()")
        return jinja2.utils.generate_lorem_ipsum(n, html, min, max)

    def finalize(value: Any) -> Any:
        # `{{ value }}` prints str(value): a list of a million long strings is measured first
        budget = _budget()
        if isinstance(value, str):
            budget.produce(len(value))
        else:
            size = _rendered_size(value, budget.max_chars)
            budget.check_size(size, "an output value")
            budget.produce(size)
        return value

    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols], finalize=finalize)
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    env.globals["lipsum"] = lipsum
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.filters[_LOOP_FILTER] = _counted
    env.filters[_TILDE_FILTER] = _tilde
    try:
        tree = env.parse(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from e
    return env.from_string(_Guard().visit(tree))


def render_chat_template(
    template: str,
    messages: Any,
    add_generation_prompt: bool = False,
    tools: Optional[Sequence[Mapping[str, Any]]] = None,
    documents: Optional[Sequence[Mapping[str, Any]]] = None,
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    timeout: float = DEFAULT_TIMEOUT,
    **kwargs: Any,
) -> str:
    """Render ``template`` for one conversation in a sandboxed, immutable Jinja environment.

    The environment matches the reference (trim_blocks, lstrip_blocks, loop controls,
    ``raise_exception``, ``strftime_now``, a JSON ``tojson`` filter). Rendering is bounded: the
    output and every string or list the template builds (``*``, ``+``, ``~``, joins, formats,
    padding filters and methods) stay within ``max_output_chars``, loop iterations plus macro
    calls within ``max_iterations``, and the whole render within ``timeout`` seconds.

    Args:
        template: Jinja source, e.g. :data:`QWEN2_CHAT_TEMPLATE`.
        messages: the conversation (see :func:`validate_messages`).
        add_generation_prompt: append the header that starts the assistant's reply.
        tools: JSON schemas of callable tools, for templates that render them.
        documents: retrieval documents (dicts), for templates that render them.
        max_output_chars: the largest output (and intermediate string or list) allowed.
        max_iterations: the most loop iterations plus macro calls allowed.
        timeout: the most seconds the render may take.
        **kwargs: extra variables the template may read.

    Returns:
        The rendered prompt text.

    Raises:
        ChatTemplateLimitError: the template went past a limit (a :class:`TokenizerError`; the
            message names the limit and the argument that raises it).
        TokenizerError: bad messages, a template syntax error, a template that reaches for
            Python internals (sandbox violation), a template's own ``raise_exception``, or any
            other error while rendering.

    Example:
        >>> render_chat_template(QWEN2_CHAT_TEMPLATE, [{"role": "user", "content": "Hi"}], True)
        '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    import jinja2

    if not isinstance(template, str):
        raise TokenizerError(f"chat template must be a str of Jinja source; got {type(template).__name__}.")
    for name, value, kind in (("max_output_chars", max_output_chars, int), ("max_iterations", max_iterations, int),
                              ("timeout", timeout, (int, float))):
        if isinstance(value, bool) or not isinstance(value, kind) or not value > 0:
            raise TokenizerError(f"{name} must be a positive number; got {value!r}.")
    chat = validate_messages(messages)
    if tools is not None:
        if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
            raise TokenizerError(f"tools must be a list of JSON-schema dicts; got {type(tools).__name__}.")
        for i, tool in enumerate(tools):
            if not isinstance(tool, Mapping):
                raise TokenizerError(f"tools[{i}] is a {type(tool).__name__}; pass each tool as a JSON-schema dict.")
        tools = _plain(list(tools), "tools")
    if documents is not None:
        if isinstance(documents, (str, bytes, Mapping)) or not isinstance(documents, Sequence):
            raise TokenizerError(f"documents must be a list of dicts; got {type(documents).__name__}.")
        for i, doc in enumerate(documents):
            if not isinstance(doc, Mapping):
                raise TokenizerError(f"documents[{i}] is a {type(doc).__name__}; pass each document as a dict.")
        documents = _plain(list(documents), "documents")
    extra = {k: _plain(v, k) for k, v in kwargs.items()}
    compiled = _compile(template)
    budget = _Budget(max_output_chars, max_iterations, float(timeout))
    token = _BUDGET.set(budget)
    try:
        out: List[str] = []
        size = 0
        for chunk in compiled.generate(messages=chat, tools=tools, documents=documents,
                                       add_generation_prompt=bool(add_generation_prompt), **extra):
            size += len(chunk)
            budget.check_size(size, "output")
            budget.check_time()
            out.append(chunk)
        return "".join(out)
    except TokenizerError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TokenizerError(
            f"chat template was stopped by the sandbox ({e}); templates may not access Python internals "
            "such as __class__, __mro__, __subclasses__ or __globals__. Use a trusted template."
        ) from e
    except jinja2.exceptions.TemplateError as e:
        raise TokenizerError(f"chat template failed to render: {e}") from e
    except RecursionError as e:
        raise TokenizerError("chat template failed to render: it recursed too deeply (a macro or "
                             "recursive loop that never stops?).") from e
    except MemoryError as e:
        raise TokenizerError("chat template failed to render: out of memory.") from e
    except Exception as e:  # the template is user code: any failure of it is a template error
        raise TokenizerError(f"chat template failed to render: {type(e).__name__}: {e}") from e
    finally:
        _BUDGET.reset(token)
