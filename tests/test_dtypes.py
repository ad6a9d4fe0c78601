"""The one weight-dtype helper module: every spelling the model, the checkpoints and the run configs accept."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

ms = pytest.importorskip("mindspore")
from mindspore.common import np_dtype  # noqa: E402

from qwen2ms.dtypes import WEIGHT_DTYPES, dtype_name, numpy_dtype, resolve_dtype  # noqa: E402

SPELLINGS = {
    "float32": ["float32", "fp32", "f32", "float", "FP32", " Float32 "],
    "float16": ["float16", "fp16", "f16", "half", "HALF"],
    "bfloat16": ["bfloat16", "bf16", "BF16", "bFloat16 "],
}


@pytest.mark.parametrize("name", WEIGHT_DTYPES)
def test_every_spelling_and_dtype_object_resolves_to_one_name(name):
    ms_dt, np_dt = getattr(ms, name), np.dtype(np_dtype.bfloat16) if name == "bfloat16" else np.dtype(name)
    for given_dtype in SPELLINGS[name] + [ms_dt, np_dt]:
        assert dtype_name(given_dtype) == name
        assert resolve_dtype(given_dtype) == ms_dt
        assert numpy_dtype(given_dtype) == np_dt


def test_none_means_keep_for_numpy_only():
    assert numpy_dtype(None) is None
    with pytest.raises(ValueError, match="dtype None is not supported"):
        resolve_dtype(None)


@pytest.mark.parametrize("bad,match", [
    ("int8", "dtype 'int8' is not supported"),  # a dtype, but not one weights are stored in
    ("float64", "dtype 'float64' is not supported"),
    ("fp8", "unknown dtype 'fp8'"),
    ("", "unknown dtype ''"),
    (ms.int8, "dtype 'int8' is not supported"),
    (np.int32, "dtype 'int32' is not supported"),
    (3, "unknown dtype 3"),
    (object, "dtype 'object' is not supported"),
    (object(), "unknown dtype <object object"),
])
def test_other_values_are_refused_with_the_accepted_names(bad, match):
    for fn in (dtype_name, resolve_dtype, numpy_dtype):
        with pytest.raises(ValueError, match=match) as info:
            fn(bad)
        assert "float32 (fp32), float16 (fp16) or bfloat16 (bf16)" in str(info.value)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=12))
def test_any_string_is_a_weight_dtype_or_a_value_error(text):
    try:
        name = dtype_name(text)
    except ValueError as e:
        assert repr(text) in str(e)
    else:
        assert name in WEIGHT_DTYPES and text.strip().lower() in {s.strip().lower() for s in SPELLINGS[name]}
