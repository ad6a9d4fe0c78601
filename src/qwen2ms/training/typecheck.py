"""Strict checks of values against dataclass field annotations, shared by TrainingArguments and YAML run configs."""
from __future__ import annotations

import dataclasses
import math
import os
import typing
from typing import Any, Dict, Literal, Mapping, Optional, Union

__all__ = ["field_types", "expected_type", "type_problem", "matches"]

_NONE = type(None)


def field_types(cls: type) -> Dict[str, Any]:
    """Field name -> resolved annotation of a dataclass (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` has the type annotation ``tp`` asks for (an int counts as a float; NaN too)."""
    return _matches(value, tp)


def _matches(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is _NONE:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        # An int is a float value (YAML `learning_rate: 1`); a bool is not.
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, typing.List) or tp is list:
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value) if args else \
            isinstance(value, (list, tuple))
    if origin in (tuple, typing.Tuple) or tp is tuple:
        if not isinstance(value, (list, tuple)):
            return False
        if not args or (len(args) == 2 and args[1] is Ellipsis):
            return all(_matches(v, args[0]) for v in value) if args else True
        return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
    if origin in (dict, typing.Dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            return False
        if not args:
            return True
        return all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation this checker does not model is left to the field's own validation


def expected_type(tp: Any) -> str:
    """Words for an annotation: ``Optional[int]`` -> ``"an integer or null"``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Union:
        parts = [expected_type(a) for a in args if a is not _NONE]
        text = " or ".join(dict.fromkeys(parts))
        return text + " or null" if _NONE in args else text
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is bool:
        return "a boolean (true or false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is os.PathLike:
        return "a path"
    if origin in (list, typing.List) or tp is list:
        return f"a list of {_plural(expected_type(args[0]))}" if args and args[0] is not Any else "a list"
    if origin in (tuple, typing.Tuple) or tp is tuple:
        return "a list"
    if origin in (dict, typing.Dict, Mapping) or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _plural(words: str) -> str:
    for a in ("an ", "a "):
        if words.startswith(a):
            words = words[len(a):]
    return words.split(" (")[0] + "s"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list", tuple: "list",
            dict: "mapping"}.get(type(value), type(value).__name__)


def type_problem(value: Any, tp: Any) -> Optional[str]:
    """``None`` when ``value`` fits annotation ``tp``, else what was expected and a hint.

    Floats must be finite; ints are accepted where floats are expected, never the reverse
    (``1.5`` steps), and no string stands in for a number or a boolean (YAML reads ``"no"``
    quoted as a string).

    Args:
        value: the value given.
        tp: the field's annotation.

    Returns:
        A phrase such as ``"'no' (a string) is not a boolean (true or false)"``, or None.

    Example:
        >>> type_problem("10", int)
        "'10' (a string) is not an integer; write it without quotes"
        >>> type_problem(3, float) is None
        True
    """
    if _matches(value, tp):
        if isinstance(value, float) and not math.isfinite(value):
            return f"{value!r} is not a finite number"
        return None
    kind = _kind(value)
    article = "" if value is None else ("an " if kind[0] in "aeiou" else "a ")
    text = f"{value!r} ({article}{kind}) is not {expected_type(tp)}"
    if isinstance(value, str):
        wants = {a for a in (typing.get_args(tp) or (tp,))}
        try:
            float(value)
            numeric = True
        except ValueError:
            numeric = False
        if numeric and (int in wants or float in wants):
            text += "; write it without quotes"
        elif bool in wants and value.lower() in ("yes", "no", "on", "off", "true", "false", "y", "n", "1", "0"):
            text += "; write true or false without quotes"
    return text
