"""The weight dtypes qwen2ms stores (float32, float16, bfloat16): every accepted spelling resolved to a MindSpore or numpy dtype."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

__all__ = ["WEIGHT_DTYPES", "dtype_name", "numpy_dtype", "resolve_dtype"]

#: The canonical names, as config.json's ``torch_dtype`` and MindSpore spell them.
WEIGHT_DTYPES = ("float32", "float16", "bfloat16")

_SPELLINGS = {
    "float32": "float32", "fp32": "float32", "f32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
_USE = "use float32 (fp32), float16 (fp16) or bfloat16 (bf16), or the MindSpore dtype"


def _mindspore():
    import mindspore  # imported lazily: ~1.7 s, and it registers numpy's bfloat16 dtype

    return mindspore


def dtype_name(dtype: Any) -> str:
    """The canonical name (one of :data:`WEIGHT_DTYPES`) of a weight dtype given in any accepted spelling.

    Args:
        dtype: a name (``"float32"``/``"fp32"``/``"float"``, ``"float16"``/``"fp16"``/``"half"``,
            ``"bfloat16"``/``"bf16"``; any case), a MindSpore dtype or a numpy dtype.

    Returns:
        ``"float32"``, ``"float16"`` or ``"bfloat16"``.

    Raises:
        ValueError: anything else (an unknown name, or a dtype that is not a weight dtype such as int8).

    Example:
        >>> dtype_name("BF16")
        'bfloat16'
    """
    if isinstance(dtype, str):
        name = _SPELLINGS.get(dtype.strip().lower())
        if name is not None:
            return name
        try:
            np.dtype(dtype.strip())
        except Exception:  # numpy raises TypeError, and for some strings SyntaxError or ValueError
            raise ValueError(f"unknown dtype {dtype!r}; {_USE}") from None
        raise ValueError(f"dtype {dtype!r} is not supported; {_USE}")
    if dtype is None:  # np.dtype(None) is float64
        raise ValueError(f"dtype None is not supported; {_USE}")
    ms = _mindspore()
    if isinstance(dtype, ms.dtype.Type):
        name = str(dtype).lower()
    else:
        try:
            name = np.dtype(dtype).name
        except Exception:  # numpy raises TypeError, and for some objects ValueError
            raise ValueError(f"unknown dtype {dtype!r}; {_USE}") from None
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"dtype {name!r} is not supported (not a weight dtype); {_USE}")
    return name


def resolve_dtype(dtype: Any) -> Any:
    """The MindSpore dtype for a weight dtype in any spelling :func:`dtype_name` accepts.

    Raises:
        ValueError: see :func:`dtype_name`.

    Example:
        >>> resolve_dtype("fp16")
        Float16
    """
    return getattr(_mindspore(), dtype_name(dtype))


def numpy_dtype(dtype: Any) -> Optional[np.dtype]:
    """The numpy dtype for a weight dtype in any spelling :func:`dtype_name` accepts; ``None`` stays ``None``.

    bfloat16 is MindSpore's numpy extension type (``mindspore.common.np_dtype.bfloat16``).

    Raises:
        ValueError: see :func:`dtype_name`.

    Example:
        >>> numpy_dtype("bf16").name
        'bfloat16'
    """
    if dtype is None:
        return None
    name = dtype_name(dtype)
    if name == "bfloat16":
        _mindspore()
        from mindspore.common import np_dtype

        return np.dtype(np_dtype.bfloat16)
    return np.dtype(name)
