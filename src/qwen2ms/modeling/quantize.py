"""Int8 and int4 weight-only quantization of a built model's linear and embedding weights, in place, for inference."""
from __future__ import annotations

from typing import Optional, Tuple

from mindspore import Parameter, Tensor

from ..ops.cpu import INT8_GROUP_MULTIPLE, quantize_int4, quantize_int8
from ..ops.reference import INT4_BLOCK
from .model import Embedding

__all__ = ["ACTIVATIONS", "INT4_GROUP_SIZE", "INT8_GROUP_SIZE", "quantize_int8_weights", "quantize_weights",
           "set_activations"]

#: Default int8 group size: on the random 0.5B shape, groups of 128 inputs cut the logit error against the bf16
#: model from 0.17 to 0.14 (max) and 0.145 to 0.11 (median per step) for ~2% more bytes read per token.
INT8_GROUP_SIZE = 128
#: Default int4 group size: GGUF Q4_0's 32 (see :func:`quantize_weights` for 128).
INT4_GROUP_SIZE = 32
#: What the int8/int4 linear layers read: "int8", activations rounded to int8 per block of 32 inputs (llama.cpp's
#: Q8_0 activations; integer dot products in the CPU kernels), or "float32", the activations as they are.
ACTIVATIONS = ("int8", "float32")


def _check_activations(activations: str) -> None:
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be 'int8' (rounded per block of 32, the default) or 'float32' "
                         f"(unrounded), got {activations!r}")


def set_activations(model, activations: str) -> None:
    """How the int8/int4 linear layers of ``model`` read their input, e.g. for a model loaded with int8/int4
    weights (``Qwen2ForCausalLM.from_gguf`` of a Q8_0/Q4_0 file); :func:`quantize_weights` takes the same setting.

    A setting of the model's ops backend (every cell's ``ops_impl``), so it reaches the kernels; other models keep
    theirs. Set it before the first forward: graphs compiled earlier keep the value they were built with.

    Args:
        model: a ``mindspore.nn.Cell`` such as ``Qwen2ForCausalLM``.
        activations: "int8" (the default of every model: rounded to int8 per block of 32 inputs, integer dot
            products) or "float32".

    Raises:
        ValueError: ``activations`` is not one of :data:`ACTIVATIONS`.

    Example:
        >>> set_activations(model, "float32")   # doctest: +SKIP
    """
    _check_activations(activations)
    for _, cell in model.cells_and_names():
        impl = getattr(cell, "ops_impl", None)
        if impl is not None:
            impl.quantize_activations = activations == "int8"


def quantize_int8_weights(model, skip: Tuple[str, ...] = (), group_size: Optional[int] = INT8_GROUP_SIZE,
                          activations: str = "int8") -> int:
    """Replace each 2-D weight that accepts a ``weight_scale`` (the model's linear layers and embedding)
    by int8 codes plus float32 scales, in place, for inference.

    The cells keep their parameter names (``...q_proj.weight``); the scales are added as
    ``...q_proj.weight_scale``. A tied lm_head shares the embedding's codes and scales. Quantised weights
    are frozen (``requires_grad=False``). Both the CPU kernels and the reference ops run them.

    Args:
        model: a ``mindspore.nn.Cell`` whose linear/embedding cells have ``weight`` and ``weight_scale``
            attributes (``weight_scale`` None until quantised), such as ``Qwen2ForCausalLM``.
        skip: cell names (as in ``model.cells_and_names()``) to leave untouched.
        group_size: one scale per ``group_size`` inputs (a multiple of 32; default 128) for every linear
            weight whose input size it divides; None for one scale per output channel everywhere. Embedding
            tables (and a tied lm_head, which shares them) and the other weights keep per-row scales.
        activations: "int8" (default): the quantised layers read their input rounded to int8 per block of 32
            inputs, as llama.cpp does for Q8_0/Q4_0, and the CPU kernels take integer dot products (decode ~1.5x
            faster with int4 weights); "float32": the input as it is (logits slightly closer to the float model).
            A setting of the model's ops backend, for all its int8/int4 layers; set it before the first forward.

    Returns:
        The number of weights quantised.

    Raises:
        ValueError: ``group_size`` is not a positive multiple of 32, or ``activations`` is not one of
            :data:`ACTIVATIONS`.

    Example:
        >>> from qwen2ms import quantize_int8_weights
        >>> n = quantize_int8_weights(model)   # doctest: +SKIP
    """
    if group_size is not None and (group_size <= 0 or group_size % INT8_GROUP_MULTIPLE):
        raise ValueError(f"group_size must be a positive multiple of {INT8_GROUP_MULTIPLE} or None, got {group_size}")
    set_activations(model, activations)
    count = 0
    for cell_name, cell in model.cells_and_names():
        if cell_name in skip or not hasattr(cell, "weight_scale") or getattr(cell, "weight_scale") is not None:
            continue
        weight = getattr(cell, "weight", None)
        if not isinstance(weight, Parameter) or weight.ndim != 2:
            continue
        grouped = group_size is not None and not isinstance(cell, Embedding) and weight.shape[1] % group_size == 0
        qw = quantize_int8(weight, group_size if grouped else None)
        name = weight.name
        cell.weight = Parameter(Tensor(qw.q), name=name, requires_grad=False)
        cell.weight_scale = Parameter(Tensor(qw.scale), name=name + "_scale", requires_grad=False)
        count += 1
    return count


def quantize_weights(model, bits: int = 8, group_size: Optional[int] = None, skip: Tuple[str, ...] = (),
                     activations: str = "int8") -> int:
    """Weight-only quantisation of a model in place: int8 (``bits=8``) or int4 (``bits=4``) linear weights.

    ``bits=8`` is :func:`quantize_int8_weights`. ``bits=4`` stores every linear weight whose input size
    ``group_size`` divides as int4 codes (uint8 ``[out, in / 2]``, two per byte, GGUF Q4_0's layout and rounding)
    with one float32 scale per group (``weight_scale`` ``[out, in / group_size]``); embedding tables (and a tied
    lm_head, which shares the table) and linear weights the group size does not divide become int8 (per row for
    tables, groups of ``group_size`` or per channel for the rest), since the lookup kernel reads int8 rows.
    Quantised weights are frozen; gradients still reach the activations (adapters on a quantised base train).

    Args:
        model: a ``mindspore.nn.Cell`` such as ``Qwen2ForCausalLM`` (see :func:`quantize_int8_weights`).
        bits: 8 or 4.
        group_size: inputs per scale, a multiple of 32. Default: 128 for int8, 32 for int4 (Q4_0). With int4,
            32 gives a smaller logit error and 128 reads ~6% fewer bytes per token (4.25 against 4.5 bits).
        skip: cell names (as in ``model.cells_and_names()``) to leave untouched.
        activations: "int8" (default) or "float32": how the quantised layers read their input (see
            :func:`quantize_int8_weights`).

    Returns:
        The number of weights quantised (int4 and int8 together).

    Raises:
        ValueError: ``bits`` is not 4 or 8, ``group_size`` is not a positive multiple of 32, or ``activations``
            is not one of :data:`ACTIVATIONS`.

    Example:
        >>> from qwen2ms.modeling.quantize import quantize_weights
        >>> n = quantize_weights(model, bits=4, group_size=32)   # doctest: +SKIP
    """
    _check_activations(activations)
    if bits == 8:
        return quantize_int8_weights(model, skip, INT8_GROUP_SIZE if group_size is None else group_size, activations)
    if bits != 4:
        raise ValueError(f"bits must be 8 (int8) or 4 (int4), got {bits!r}")
    group_size = INT4_GROUP_SIZE if group_size is None else group_size
    if group_size <= 0 or group_size % INT4_BLOCK:
        raise ValueError(f"int4 group_size must be a positive multiple of {INT4_BLOCK}, got {group_size}")
    int4_cells = []
    for cell_name, cell in model.cells_and_names():
        if cell_name in skip or isinstance(cell, Embedding) or getattr(cell, "weight_scale", 0) is not None:
            continue
        weight = getattr(cell, "weight", None)
        if isinstance(weight, Parameter) and weight.ndim == 2 and weight.shape[1] % group_size == 0:
            int4_cells.append((cell_name, cell))
    for _, cell in int4_cells:
        qw = quantize_int4(cell.weight, group_size)
        name = cell.weight.name
        cell.weight = Parameter(Tensor(qw.q), name=name, requires_grad=False)
        cell.weight_scale = Parameter(Tensor(qw.scale), name=name + "_scale", requires_grad=False)
    done = {name for name, _ in int4_cells}
    # Tables and what int4 cannot group: int8 (groups of group_size where they divide, else per channel).
    return len(int4_cells) + quantize_int8_weights(model, tuple(skip) + tuple(done), group_size, activations)
