"""Load and save Hugging Face checkpoints (config.json + safetensors, single or sharded) for Qwen2ForCausalLM.

The mapping between HF keys and our parameter names is the identity, plus one explicit
:func:`sanitize` step: released MoE checkpoints store one tensor per expert
(``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``) and the model holds them stacked
(``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``mlp.experts.down_proj`` ``[E, H, I]``); a tied model
ignores a redundant ``lm_head.weight`` on load and never writes one.

Memory: tensors are read straight from the file into their own buffer (plain ``readinto``, no
memory map whose pages would count twice) and handed to the parameter without another copy, so
loading peaks at about one copy of the weights (``benchmarks/bench_load.py`` measures it).
Saving writes one tensor at a time into a staging folder that is swapped in at the end.
"""
from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ..config import ConfigError, Qwen2Config
from ..dtypes import dtype_name, numpy_dtype, resolve_dtype
from ..hub import atomic_write_text, resolve_pretrained
from ..modeling.model import Qwen2ForCausalLM
from ..errors import CheckpointError

__all__ = ["CheckpointError", "load_hf", "save_hf", "sanitize", "parse_shard_size", "read_safetensors_header"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_ALLOW = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


# ---------------------------------------------------------------------------------------------
# safetensors files: header parsing, streaming reads and writes
# ---------------------------------------------------------------------------------------------
# safetensors dtype -> (numpy dtype, raw integer dtype of the same width for byte-level I/O)
_ST_DTYPES: Dict[str, Tuple[Any, Any]] = {
    "F64": (np.dtype(np.float64), np.uint64), "F32": (np.dtype(np.float32), np.uint32),
    "F16": (np.dtype(np.float16), np.uint16), "BF16": (numpy_dtype("bfloat16"), np.uint16),
    "I64": (np.dtype(np.int64), np.uint64), "I32": (np.dtype(np.int32), np.uint32),
    "I16": (np.dtype(np.int16), np.uint16), "I8": (np.dtype(np.int8), np.uint8),
    "U64": (np.dtype(np.uint64), np.uint64), "U32": (np.dtype(np.uint32), np.uint32),
    "U16": (np.dtype(np.uint16), np.uint16), "U8": (np.dtype(np.uint8), np.uint8),
    "BOOL": (np.dtype(np.bool_), np.uint8),
}
_FLOAT_ST = {"F64", "F32", "F16", "BF16"}
_MS_TO_ST = {ms.float32: "F32", ms.float16: "F16", ms.bfloat16: "BF16"}
# The safetensors library's own limit: a longer header is refused before it is read.
_MAX_HEADER = 100_000_000
_U64 = 1 << 64


@dataclass(frozen=True)
class _TensorInfo:
    dtype: str
    shape: Tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _json_object(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            # safetensors keeps the last of two same-named tensors; either choice loads the wrong bytes
            # for one of them, so a repeated name is refused.
            raise ValueError(f"the name {key!r} appears twice")
        key.encode("utf-8")  # a lone surrogate escape is not UTF-8 (UnicodeEncodeError is a ValueError)
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _u64(value: Any) -> bool:
    return type(value) is int and 0 <= value < _U64


def parse_safetensors_header(raw: bytes, file_size: int, path: Union[str, os.PathLike]
                             ) -> Tuple[Dict[str, _TensorInfo], Dict[str, str]]:
    """Validate a safetensors header (the JSON after the 8-byte length) as the safetensors library does.

    Every tensor needs a known dtype, a shape of non-negative ints and ``data_offsets`` ``[begin, end]``
    with ``end - begin == prod(shape) * itemsize``; sorted by offset, the tensors must tile the data
    section exactly: contiguous from 0, no overlap (two tensors reading the same bytes), no gap, and
    ending at the end of the file. ``__metadata__`` must map strings to strings. A name may appear only
    once (the library would keep the last). Unknown fields of an entry are ignored, as the library does.

    Args:
        raw: the header bytes.
        file_size: size of the whole file in bytes.
        path: the file, for messages.

    Returns:
        ``(tensors, metadata)``: per name its dtype, shape and absolute byte range; the metadata dict.

    Raises:
        CheckpointError: naming the file and, where there is one, the tensor.
    """
    path = Path(path)
    try:
        text = raw.decode("utf-8")
        # "-0" is a float to the library's parser (so never a valid size), NaN/Infinity are not JSON.
        header = json.loads(text, object_pairs_hook=_json_object, parse_constant=_reject_constant,
                            parse_int=lambda s: -0.0 if s == "-0" else int(s))
    except (UnicodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header (a JSON {type(header).__name__}, "
                              "not an object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: the safetensors __metadata__ must map strings to strings, "
                              f"got {metadata!r:.200}")
    for v in metadata.values():
        try:
            v.encode("utf-8")
        except UnicodeError as e:
            raise CheckpointError(f"{path}: __metadata__ holds a string that is not UTF-8 ({e})") from e
    base = 8 + len(raw)
    spans: List[Tuple[int, int, str]] = []
    out: Dict[str, _TensorInfo] = {}
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or not all(k in entry for k in ("dtype", "shape", "data_offsets")):
            raise CheckpointError(f"{where} needs an object with 'dtype', 'shape' and 'data_offsets', "
                                  f"got {entry!r:.200}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
            raise CheckpointError(f"{where} has unsupported dtype {dtype!r}; qwen2ms reads "
                                  f"{', '.join(sorted(_ST_DTYPES))}")
        if not isinstance(shape, list) or not all(_u64(d) for d in shape):
            raise CheckpointError(f"{where} has shape {shape!r:.200}; it must be a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_u64(o) for o in offsets):
            raise CheckpointError(f"{where} has data_offsets {offsets!r:.200}; they must be two non-negative "
                                  "integers [begin, end]")
        begin, end = offsets
        count = 1
        for d in shape:
            count *= d
        nbytes = count * _ST_DTYPES[dtype][0].itemsize
        if nbytes >= _U64:
            raise CheckpointError(f"{where}: shape {shape} of {dtype} overflows a 64-bit byte count")
        if end < begin or end - begin != nbytes:
            raise CheckpointError(f"{path} has a corrupt safetensors header: tensor {name!r} offsets [{begin}, {end}) "
                                  f"do not fit shape {shape} of {dtype} ({nbytes} bytes)")
        spans.append((begin, end, name))
        out[name] = _TensorInfo(dtype, tuple(shape), base + begin, nbytes)
    spans.sort()
    # Overlaps first: two tensors reading the same bytes is the silent-corruption case worth naming.
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0!r} (data bytes [{b0}, {e0})) and {n1!r} ([{b1}, {e1})) "
                                  "overlap; each tensor must have bytes of its own. The file is corrupt.")
    at = 0
    for begin, end, name in spans:
        if begin != at:
            raise CheckpointError(f"{path}: no tensor holds data bytes [{at}, {begin}) before tensor {name!r}; "
                                  "the tensors must tile the data section without gaps. The file is corrupt.")
        at = end
    data = file_size - base
    if at > data:
        raise CheckpointError(f"{path} is truncated: its tensors end at byte {base + at} but the file has "
                              f"{file_size} bytes")
    if at < data:
        raise CheckpointError(f"{path} has {data - at} bytes after its last tensor (the data section must end "
                              "with the file); it is corrupt or was appended to")
    return out, metadata


def read_safetensors_header(path: Union[str, os.PathLike]) -> Tuple[Dict[str, _TensorInfo], Dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data.

    Validation is :func:`parse_safetensors_header`'s (what the safetensors library checks).

    Returns:
        ``(tensors, metadata)``: per name its dtype, shape and byte range; the ``__metadata__`` dict.

    Raises:
        CheckpointError: the file is missing, truncated, or its header is corrupt.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path} is not a safetensors file: only {size} bytes (truncated?)")
            (hlen,) = struct.unpack("<Q", head)
            if hlen > _MAX_HEADER:
                raise CheckpointError(f"{path} is corrupt: header length {hlen} exceeds the safetensors limit of "
                                      f"{_MAX_HEADER} bytes")
            if 8 + hlen > size:
                raise CheckpointError(f"{path} is corrupt or truncated: header length {hlen} does not fit the "
                                      f"{size}-byte file")
            raw = f.read(hlen)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from e
    return parse_safetensors_header(raw, size, path)


def _read_tensor(f, info: _TensorInfo, path: Path) -> np.ndarray:
    np_dtype, raw = _ST_DTYPES[info.dtype]
    buf = np.empty(info.nbytes // np.dtype(raw).itemsize, dtype=raw)
    f.seek(info.start)
    got = f.readinto(memoryview(buf).cast("B"))
    if got != info.nbytes:
        raise CheckpointError(f"{path} is truncated: read {got} of {info.nbytes} bytes")
    return buf.view(np_dtype).reshape(info.shape)


def _write_safetensors(path: Path, tensors: List[Tuple[str, Any]], metadata: Dict[str, str]) -> int:
    """Write ``(name, array_fn)`` pairs (array_fn() -> contiguous numpy array) one tensor at a time."""
    header: Dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    specs = []
    for name, spec in tensors:
        st_dtype, shape, fn = spec
        nbytes = int(np.prod(shape, dtype=np.int64)) * _ST_DTYPES[st_dtype][0].itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        specs.append((st_dtype, shape, fn, nbytes))
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8-byte alignment
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for st_dtype, shape, fn, nbytes in specs:
            arr = np.ascontiguousarray(fn())
            if tuple(arr.shape) != tuple(shape) or arr.nbytes != nbytes:
                raise CheckpointError(f"internal: tensor for {path.name} has shape {arr.shape}, expected {shape}")
            f.write(memoryview(arr.view(_ST_DTYPES[st_dtype][1])).cast("B"))
        f.flush()
        os.fsync(f.fileno())
    return offset


# ---------------------------------------------------------------------------------------------
# Key mapping (the sanitize step)
# ---------------------------------------------------------------------------------------------
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
# KV cache buffers that save_pretrained wrote after generate() before it exported only the weights.
_STALE_CACHE = re.compile(r"(^|\.)kv_cache\d+\.(key|value)\.\d+$")


@dataclass(frozen=True)
class _Target:
    param: str  # our parameter name
    expert: Optional[int] = None  # expert index for a per-expert piece
    part: Optional[str] = None  # "gate_proj" | "up_proj" | "down_proj"

    def place(self, stack: np.ndarray, piece: np.ndarray) -> None:
        """Write this expert's released tensor into the model's stack: gate rows then up rows of
        ``gate_up_proj`` ``[E, 2I, H]``, or its ``down_proj`` ``[E, H, I]`` slice."""
        inter = stack.shape[1] // 2
        if self.part == "gate_proj":
            stack[self.expert, :inter] = piece
        elif self.part == "up_proj":
            stack[self.expert, inter:] = piece
        else:
            stack[self.expert] = piece


def sanitize(key: str, params: Dict[str, Any], tied: bool) -> Optional[_Target]:
    """Where an HF checkpoint key goes in the model, or None when it is to be skipped.

    Identity for every parameter; per-expert MoE keys go to a slice of the stacked expert tensor;
    ``lm_head.weight`` of a tied model and rotary ``inv_freq`` buffers are skipped.

    Raises:
        KeyError: the key has no place in the model (reported as "unexpected" by the loader).
    """
    if key in params:
        return _Target(key)
    m = _EXPERT.match(key)
    if m:
        prefix, e, part = m.group(1), int(m.group(2)), m.group(3)
        target = f"{prefix}.{'down_proj' if part == 'down_proj' else 'gate_up_proj'}"
        if target in params:
            return _Target(target, e, part)
    if (key == "lm_head.weight" and tied) or _IGNORED.search(key):
        return None
    raise KeyError(key)


def _piece_shape(target: _Target, param_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    if target.part == "down_proj":
        return tuple(param_shape[1:])  # [H, I]
    return (param_shape[1] // 2, param_shape[2])  # [I, H]


def _released_expert_keys(name: str, shape: Tuple[int, ...]) -> List[str]:
    prefix = name.rsplit(".", 1)[0]
    parts = ("down_proj",) if name.endswith("down_proj") else ("gate_proj", "up_proj")
    return [f"{prefix}.{e}.{p}.weight" for e in range(shape[0]) for p in parts]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def _allowed_roots(folder: Path) -> List[Path]:
    root = folder.resolve()
    roots = [root]
    # A huggingface_hub snapshot holds symlinks into the repo's blob store (snapshots/<rev>/f -> ../../blobs/<hash>).
    blobs = root.parent.parent / "blobs"
    if root.parent.name == "snapshots" and blobs.is_dir():
        roots.append(blobs.resolve())
    return roots


def checkpoint_file(folder: Union[str, os.PathLike], name: Any, source: str,
                    must_exist: bool = True) -> Path:
    """``folder / name`` for a weight file named by ``source`` (an index, or the folder listing), refused
    when the name is not a relative path that stays inside ``folder`` once symlinks are resolved.

    Files of a huggingface_hub snapshot may point into that repo's blob store.

    Raises:
        CheckpointError: a non-string or empty name, an absolute path, ``..`` leaving the folder, a symlink
            out of it, or (with ``must_exist``) a file that does not exist.
    """
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{source} names shard file {name!r}; a shard name must be a non-empty file name "
                              f"inside {folder}")
    path = folder / name
    if Path(name).is_absolute():
        raise CheckpointError(f"{source} names shard file {name!r}, an absolute path; shard names are relative "
                              f"to the checkpoint folder {folder}. Fix the index.")
    target = path.resolve()
    if not any(target.is_relative_to(root) for root in _allowed_roots(folder)):
        via = "a symlink that leads" if target != Path(os.path.abspath(path)) else "a path"
        raise CheckpointError(f"{source} names shard file {name!r}, {via} outside the checkpoint folder "
                              f"{folder} (to {target}); qwen2ms reads weights only from inside the folder. Copy "
                              "the file into the folder or fix the index.")
    if must_exist and not target.is_file():
        raise CheckpointError(f"{source} names shard file {name!r}, which is not in {folder}. Download the "
                              "missing shard or fix the index.")
    return path


def read_index(folder: Union[str, os.PathLike]) -> Tuple[Dict[str, str], List[Path]]:
    """The ``weight_map`` of ``folder``'s ``model.safetensors.index.json`` and its shard files, checked.

    Returns:
        ``(weight_map, files)``: tensor name -> shard name, and the distinct shard paths (sorted).

    Raises:
        CheckpointError: invalid JSON, no ``weight_map`` object of string -> string, or a shard name that
            :func:`checkpoint_file` refuses (outside the folder, missing); every missing shard is listed.
    """
    folder = Path(folder)
    index = folder / INDEX_NAME
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError("the index is not a JSON object")
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        bad = [v for v in weight_map.values() if not isinstance(v, str)][:3]
        if bad:
            raise TypeError(f"weight_map values must be shard file names (strings), got {bad}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index ({e}); it needs a "
                              "'weight_map' object of tensor name -> shard file") from e
    names = sorted(set(weight_map.values()))
    files = [checkpoint_file(folder, name, str(index), must_exist=False) for name in names]
    absent = [name for name, path in zip(names, files) if not path.is_file()]
    if absent:
        raise CheckpointError(f"{index} names shard file(s) that are not in the folder {folder}: {absent}. "
                              "Download the missing shards or fix the index.")
    return weight_map, files


def _shard_files(folder: Path) -> List[Path]:
    if (folder / INDEX_NAME).is_file():
        return read_index(folder)[1]
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [checkpoint_file(folder, WEIGHTS_NAME, f"the folder {folder}")]
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        return [checkpoint_file(folder, n, f"the folder {folder}") for n in others]
    found = sorted(p.name for p in folder.iterdir())
    raise CheckpointError(f"no safetensors weights in {folder} (expected {WEIGHTS_NAME} or {INDEX_NAME}); "
                          f"found {found}. PyTorch .bin checkpoints are not read: convert them with "
                          "transformers' save_pretrained(safe_serialization=True).")


def _read_json(path: Path, what: str) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{what} {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object")
    return data


def _attach_tokenizer(model: Qwen2ForCausalLM, folder: Path) -> None:
    if not any((folder / n).is_file() for n in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        return
    try:
        from ..tokenization import Qwen2Tokenizer  # written concurrently; optional here
    except ImportError:
        return
    try:
        model.tokenizer = Qwen2Tokenizer.from_pretrained(folder)
    except Exception as e:  # a broken tokenizer must not make the weights unloadable
        import warnings

        warnings.warn(f"tokenizer files in {folder} could not be loaded ({type(e).__name__}: {e}); "
                      "model.tokenizer is None", stacklevel=3)


def load_hf(path_or_repo_id: Union[str, os.PathLike], dtype: Any = None,
            revision: Optional[str] = None, check_finite: bool = True) -> Qwen2ForCausalLM:
    """Build a :class:`Qwen2ForCausalLM` from an HF checkpoint folder or hub repo id.

    Args:
        path_or_repo_id: a local folder, or a hub id (resolved through ``huggingface_hub``; offline
            behaviour as :func:`qwen2ms.hub.resolve_pretrained`).
        dtype: parameter storage dtype ("float32", "float16", "bfloat16" or a MindSpore dtype);
            None keeps the checkpoint's own dtype (its most common float dtype), so a bf16
            checkpoint round-trips bit for bit.
        revision: hub branch, tag or commit.
        check_finite: refuse a tensor holding NaN or +-Inf (also one that a narrowing ``dtype`` cast
            overflows), naming the tensor and file. The check reads each tensor's exponent bits as it
            is streamed in (about 0.3 s per GB of weights on a 2-core CPU, some 15% of a load from the
            page cache). False loads such weights as they are.

    Returns:
        The model, with ``generation_config_dict`` (raw generation_config.json or None) and
        ``tokenizer`` (a ``Qwen2Tokenizer`` when the folder has tokenizer files, else None).

    Raises:
        CheckpointError: missing/invalid config, no weights, a shard named by the index is absent or
            lies outside the folder, a truncated or corrupt file (a safetensors header that the
            safetensors library would refuse: overlapping or aliased tensors included), keys that do not
            fit the model (all missing, unexpected and shape-mismatched keys are listed in one message),
            or (``check_finite``) a NaN/Inf weight.
        qwen2ms.HubError: the id could not be resolved.

    Example:
        >>> model = Qwen2ForCausalLM.from_hf("Qwen/Qwen2-0.5B-Instruct", dtype="bfloat16")  # doctest: +SKIP
    """
    folder = resolve_pretrained(path_or_repo_id, allow_patterns=_ALLOW, revision=revision)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no config.json; an HF checkpoint folder needs one")
    try:
        config = Qwen2Config.from_json(cfg_path)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from e
    gen_path = folder / "generation_config.json"
    generation = _read_json(gen_path, "generation config") if gen_path.is_file() else None

    files = _shard_files(folder)
    headers = [(p, read_safetensors_header(p)[0]) for p in files]

    if dtype is None:
        found = [info.dtype for _, h in headers for info in h.values() if info.dtype in ("F32", "F16", "BF16")]
        st = max(set(found), key=found.count) if found else "F32"
        storage = {"F32": ms.float32, "F16": ms.float16, "BF16": ms.bfloat16}[st]
    else:
        storage = resolve_dtype(dtype)

    model = Qwen2ForCausalLM(config, dtype=storage, init_weights=False)
    params = {p.name: p for p in model.get_parameters()}
    tied = model.tied

    # Plan every key before reading any data, so one error lists every problem.
    plan: List[Tuple[Path, str, _TensorInfo, _Target]] = []
    unexpected, mismatched, bad_dtype = [], [], []
    covered: Dict[str, set] = {}
    seen_keys: Dict[str, Path] = {}
    reported: set = set()  # present but unusable keys: listed once, not again as missing
    stale_cache: List[str] = []
    for path, header in headers:
        for key, info in header.items():
            if key in seen_keys:
                unexpected.append(f"{key} (duplicated in {seen_keys[key].name} and {path.name})")
                continue
            seen_keys[key] = path
            if _STALE_CACHE.search(key) and key not in params:
                stale_cache.append(key)
                continue
            try:
                target = sanitize(key, params, tied)
            except KeyError:
                unexpected.append(key)
                continue
            if target is None:
                continue
            pshape = tuple(params[target.param].shape)
            want = pshape if target.expert is None else _piece_shape(target, pshape)
            if target.expert is not None and target.expert >= pshape[0]:
                unexpected.append(f"{key} (expert {target.expert} >= num_experts {pshape[0]})")
                continue
            if tuple(info.shape) != want:
                mismatched.append(f"{key}: checkpoint {list(info.shape)} vs model {list(want)}")
                reported.add(key)
                continue
            if info.dtype not in _FLOAT_ST:
                bad_dtype.append(f"{key}: {info.dtype}")
                reported.add(key)
                continue
            covered.setdefault(target.param, set()).add(key)
            plan.append((path, key, info, target))
    missing = []
    for name, p in params.items():
        got = covered.get(name, set())
        if name in got or name in reported:
            continue
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            need = _released_expert_keys(name, tuple(p.shape))
            lacking = [k for k in need if k not in got and k not in reported]
            missing.extend(lacking)
        else:
            missing.append(name)
    if missing or unexpected or mismatched or bad_dtype:
        parts = [f"checkpoint {folder} does not fit the model built from its config.json:"]
        for title, items in (("missing", missing), ("unexpected", unexpected),
                             ("shape mismatch", mismatched), ("non-float dtype", bad_dtype)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                parts.append(f"  {title} ({len(items)}): " + ", ".join(shown))
        raise CheckpointError("\n".join(parts))
    if stale_cache:
        import warnings

        warnings.warn(f"{folder} holds {len(stale_cache)} KV cache buffers ({stale_cache[0]}, ...) that an older "
                      "qwen2ms save_pretrained wrote after generate(); they are not weights and were skipped. "
                      "Save the model again to drop them (transformers reports them as unexpected keys).",
                      stacklevel=3)

    _stream_into(model, params, plan, storage, show_progress=len(files) > 1, check_finite=check_finite)
    model.generation_config_dict = generation
    _attach_tokenizer(model, folder)
    return model


# Exponent bits of each float format: a value is NaN or +-Inf exactly when all of them are set.
_EXPONENT_BITS = {"F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80),
                  "F32": (np.uint32, 0x7F800000), "F64": (np.uint64, 0x7FF0000000000000)}
_FINITE_CHUNK = 1 << 20


def first_nonfinite(arr: np.ndarray, st_dtype: str) -> Optional[int]:
    """Flat index of the first NaN or +-Inf in ``arr``, a tensor of safetensors dtype ``st_dtype``; None if none.

    Reads the exponent bits a million elements at a time (no float conversion of bfloat16 and no
    full-size temporary), so it runs near memory speed. Non-float dtypes have no such values: None.
    """
    spec = _EXPONENT_BITS.get(st_dtype)
    if spec is None or arr.size == 0:
        return None
    raw, mask = spec
    flat = np.ascontiguousarray(arr).reshape(-1).view(raw)
    buf = np.empty(min(flat.size, _FINITE_CHUNK), raw)
    for start in range(0, flat.size, _FINITE_CHUNK):
        part = flat[start:start + _FINITE_CHUNK]
        bits = np.bitwise_and(part, raw(mask), out=buf[:part.size])
        if bits.max() == mask:  # the masked bits never exceed the mask; equal means all exponent bits set
            return start + int(np.argmax(bits == mask))
    return None


def _check_finite(arr: np.ndarray, st_dtype: str, key: str, path: Path, cast_from: Optional[str] = None) -> None:
    index = first_nonfinite(arr, st_dtype)
    if index is None:
        return
    value = float(arr.reshape(-1)[index])
    where = f"tensor {key!r} in {path} ({value} at flat index {index} of shape {list(arr.shape)})"
    if cast_from is not None:
        raise CheckpointError(f"{where} overflows {st_dtype} when cast from the file's {cast_from}: load with "
                              "dtype='float32' or 'bfloat16' (float32's range), or pass check_finite=False to "
                              "keep the infinities")
    raise CheckpointError(f"{where} is not finite: the checkpoint is corrupt (a failed save, a diverged "
                          "training run or a bad conversion). Pass check_finite=False to load it anyway.")


def _cast(arr: np.ndarray, st_dtype: str, storage: Any, target_np: np.dtype) -> np.ndarray:
    """One tensor to the storage dtype (a new array; the caller drops the old one)."""
    if st_dtype == "BF16" and target_np == np.float32:
        # bfloat16 is the top half of a float32: widening is an exact shift, far faster than a cast op.
        return (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    # Everything else through MindSpore, which rounds to bfloat16/float16 the way torch does.
    return Tensor.from_numpy(np.ascontiguousarray(arr)).astype(storage).asnumpy()


def _stream_into(model, params, plan, storage, show_progress: bool, check_finite: bool = True) -> None:
    target_np = numpy_dtype(storage)
    stacks: Dict[str, Tuple[np.ndarray, int]] = {}
    expected_pieces = {name: len(_released_expert_keys(name, tuple(p.shape)))
                       for name, p in params.items() if name.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    by_file: Dict[Path, List[Tuple[str, _TensorInfo, _Target]]] = {}
    for path, key, info, target in plan:
        by_file.setdefault(path, []).append((key, info, target))
    files = list(by_file)
    iterator: Any = files
    if show_progress:
        from tqdm.auto import tqdm

        iterator = tqdm(files, desc="Loading checkpoint shards", unit="shard")
    for path in iterator:
        entries = sorted(by_file[path], key=lambda e: e[1].start)  # sequential reads
        try:
            f = open(path, "rb")
        except OSError as e:
            raise CheckpointError(f"cannot open checkpoint shard {path}: {e}") from e
        with f:
            for key, info, target in entries:
                arr = _read_tensor(f, info, path)
                if check_finite:
                    _check_finite(arr, info.dtype, key, path)
                if arr.dtype != target_np:
                    arr = _cast(arr, info.dtype, storage, target_np)
                    if check_finite and _ST_DTYPES[info.dtype][0].itemsize > target_np.itemsize:
                        _check_finite(arr, _MS_TO_ST[storage], key, path, cast_from=info.dtype)
                param = params[target.param]
                if target.expert is None:
                    param.set_data(Tensor.from_numpy(arr))
                    continue
                buf, count = stacks.get(target.param, (None, 0))
                if buf is None:
                    buf = np.empty(tuple(param.shape), dtype=target_np)
                target.place(buf, arr)
                count += 1
                if count == expected_pieces[target.param]:
                    param.set_data(Tensor.from_numpy(buf))
                    stacks.pop(target.param, None)
                else:
                    stacks[target.param] = (buf, count)


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------
_UNITS = {"": 1, "B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_shard_size(size: Union[int, str]) -> int:
    """Bytes for ``5GB`` / ``500MB`` / ``2GiB`` / an int (HF's convention: GB = 10**9, GiB = 2**30).

    Raises:
        ValueError: an unparseable or non-positive size.
    """
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        value = int(size)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(size))
        if not m or m.group(2).upper() not in _UNITS:
            raise ValueError(f"max_shard_size {size!r} is not a size; use e.g. '5GB', '500MB', '2GiB' or bytes")
        value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def model_weights(model: Qwen2ForCausalLM) -> List[Tuple[str, Any]]:
    """``(name, Parameter)`` for every weight of ``model``'s architecture, in the model's order.

    The list is derived from the config (the HF keys of :func:`qwen2ms.checkpoint.mindformers.hf_parameter_shapes`,
    stacked experts as one parameter each), not from whatever parameters the object holds: the KV cache
    that ``generate()`` keeps on the model, or any other state attached later, is never a weight.

    Raises:
        CheckpointError: the model lacks a parameter its config implies, or holds it with another shape.
    """
    from .mindformers import hf_parameter_shapes

    params = {p.name: p for p in model.get_parameters()}
    wanted: set = set()
    problems = []
    for key, shape in hf_parameter_shapes(model.config).items():
        try:
            target = sanitize(key, params, model.tied)
        except KeyError:
            problems.append(f"{key} (no such parameter)")
            continue
        if target is None:
            continue
        pshape = tuple(params[target.param].shape)
        have = pshape if target.expert is None else _piece_shape(target, pshape)
        if tuple(have) != tuple(shape) or (target.expert is not None and target.expert >= pshape[0]):
            problems.append(f"{key}: model {list(pshape)}, config {list(shape)}")
            continue
        wanted.add(target.param)
    if problems:
        raise CheckpointError(f"the model does not hold the weights its config describes: {problems[:10]}"
                              + (f" and {len(problems) - 10} more" if len(problems) > 10 else ""))
    return [(name, p) for name, p in params.items() if name in wanted]


def _export_entries(model: Qwen2ForCausalLM, dtype: Any) -> Iterator[Tuple[str, Tuple[str, Tuple[int, ...], Any]]]:
    """HF keys in the released layout with (safetensors dtype, shape, lazy array getter), for the
    architecture's weights only (:func:`model_weights`)."""
    for name, param in model_weights(model):
        shape = tuple(param.shape)
        out_dtype = dtype if dtype is not None else param.dtype
        if param.dtype not in _MS_TO_ST or out_dtype not in _MS_TO_ST:
            raise CheckpointError(f"parameter {name} is {param.dtype}; only float32/float16/bfloat16 weights can be "
                                  "exported (an int8-quantized model: save it before quantize_int8_weights)")
        st = _MS_TO_ST[out_dtype]

        def whole(p=param, od=out_dtype):
            return p.asnumpy() if p.dtype == od else p.astype(od).asnumpy()

        if name.endswith("experts.gate_up_proj"):
            prefix, inter = name.rsplit(".", 1)[0], shape[1] // 2
            for e in range(shape[0]):
                for part, sl in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, None))):
                    def piece(p=param, od=out_dtype, e=e, sl=sl):
                        t = p[e, sl]
                        return (t if p.dtype == od else t.astype(od)).asnumpy()
                    yield f"{prefix}.{e}.{part}.weight", (st, (inter, shape[2]), piece)
        elif name.endswith("experts.down_proj"):
            prefix = name.rsplit(".", 1)[0]
            for e in range(shape[0]):
                def piece(p=param, od=out_dtype, e=e):
                    t = p[e]
                    return (t if p.dtype == od else t.astype(od)).asnumpy()
                yield f"{prefix}.{e}.down_proj.weight", (st, shape[1:], piece)
        else:
            yield name, (st, shape, whole)


# ---------------------------------------------------------------------------------------------
# Publishing a folder atomically
# ---------------------------------------------------------------------------------------------
_HF_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
#: Files a tokenizer folder may hold; a save that writes a tokenizer replaces all of them, so no file
#: of an earlier tokenizer (a tokenizer.json that transformers would prefer, say) survives beside it.
TOKENIZER_FILES = frozenset({"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                             "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                             "chat_template.json"})
# Temp file of one file write: hub.atomic_write_bytes, checkpoint.mindspore and the per-file saves of
# earlier versions name it ".<file>.tmp-<pid>" with an optional suffix.
_FILE_TEMP = re.compile(r"^\.(?P<base>.+?)\.tmp-(?P<pid>\d+)(?:\.[A-Za-z0-9.]+)?$")
_active_stages: set = set()  # staging folders of saves running in this process
_stage_ids = itertools.count()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except (OverflowError, OSError):
        return False
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stage_pattern(dest: Path) -> "re.Pattern[str]":
    return re.compile(rf"^\.{re.escape(dest.name)}\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-\d+)?$")


def clean_stale_saves(dest: Union[str, os.PathLike]) -> List[Path]:
    """Remove what killed saves into ``dest`` left behind: their staging folders (``.<dest>.tmp-<pid>-<n>``
    next to ``dest`` or inside it) and per-file temp files inside ``dest``, when process ``pid`` is gone.

    A save that died between the two renames of the non-Linux swap left ``dest`` missing and the previous
    checkpoint in ``.<dest>.old-<pid>-<n>``: that folder is renamed back to ``dest``.

    Returns:
        The paths removed.
    """
    dest = Path(dest)
    pattern = _stage_pattern(dest)
    removed = []
    for where in (dest.parent, dest):
        if not where.is_dir():
            continue
        for entry in list(where.iterdir()):
            m = pattern.match(entry.name)
            if m:
                pid = int(m.group("pid"))
                if _pid_alive(pid) and (pid != os.getpid() or entry in _active_stages):
                    continue
                if m.group("kind") == "old" and where == dest.parent and not dest.exists() and entry.is_dir():
                    os.rename(entry, dest)
                    continue
            elif where == dest:
                t = _FILE_TEMP.match(entry.name)
                if t is None or int(t.group("pid")) == os.getpid() or _pid_alive(int(t.group("pid"))):
                    continue
            else:
                continue
            _remove(entry)
            removed.append(entry)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported.

    The standard library has no call for it; the system call is one line through ctypes.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, or another C library
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # e.g. a file system without it
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _carry_over(old: Path, stage: Path, owned: Callable[[str], bool]) -> None:
    """Hard-link (copy where links fail) every entry of ``old`` that is not the save's own into ``stage``."""
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    for entry in old.iterdir():
        t = _FILE_TEMP.match(entry.name)
        if owned(entry.name) or (t is not None and owned(t.group("base"))) or (stage / entry.name).exists() \
                or _stage_pattern(old).match(entry.name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), stage / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, stage / entry.name, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(str(entry), str(stage / entry.name))


def _swap_in(stage: Path, dest: Path) -> None:
    if not dest.exists():
        os.rename(stage, dest)
    elif not _exchange(stage, dest):
        old = dest.parent / f".{dest.name}.old-{os.getpid()}-{next(_stage_ids)}"
        os.rename(dest, old)
        try:
            os.rename(stage, dest)
        except BaseException:
            os.rename(old, dest)
            raise
        _remove(old)
    # After an exchange ``stage`` holds the previous checkpoint; the caller removes it.
    _fsync_dir(dest.parent)


def _publish_in_place(stage: Path, dest: Path, owned: Callable[[str], bool]) -> None:
    # dest is a mount point (or its parent is read-only): no sibling to swap with. Files move one by
    # one, weights first and the index last, so a reader never sees an index naming absent shards.
    names = sorted(os.listdir(stage), key=lambda n: (not _HF_WEIGHT_FILE.match(n), n == INDEX_NAME, n))
    for name in names:
        os.replace(stage / name, dest / name)
    for entry in dest.iterdir():
        if owned(entry.name) and entry.name not in names:
            _remove(entry)
    _fsync_dir(dest)


def write_folder_atomically(dest: Union[str, os.PathLike], write: Callable[[Path], None],
                            owned: Callable[[str], bool]) -> Path:
    """Fill a staging folder with ``write(stage)`` and make it ``dest`` in one rename.

    The staging folder ``.<dest>.tmp-<pid>-<n>`` sits next to ``dest``. A new ``dest`` is a plain
    rename; an existing one is swapped with ``renameat2(RENAME_EXCHANGE)`` on Linux (elsewhere: two
    renames, and :func:`clean_stale_saves` repairs a crash between them). Readers see the whole old
    folder or the whole new one. Entries of an existing ``dest`` for which ``owned(name)`` is false
    (files the user put there, other tools' output) are carried into the new folder as hard links.
    When ``dest`` is a mount point, holds the current working directory, or its parent is not writable,
    the files are staged inside ``dest`` and renamed one by one (each file atomic, not the folder).
    Leftovers of killed saves are removed first.

    Returns:
        ``dest`` resolved (a symlinked ``dest`` is written through to its target).

    Raises:
        CheckpointError: ``dest`` exists and is not a folder.
    """
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise CheckpointError(f"{dest} exists and is not a folder; a checkpoint is a folder")
    dest = dest.resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_saves(dest)
    name = f".{dest.name}.tmp-{os.getpid()}-{next(_stage_ids)}"
    # Swapping the folder this process works in would leave its working directory deleted.
    inside = os.path.ismount(dest) or Path.cwd().resolve().is_relative_to(dest)
    if not inside:
        try:
            (dest.parent / name).mkdir()
        except PermissionError:
            inside = True
    if inside:
        dest.mkdir(exist_ok=True)
        (dest / name).mkdir()
    stage = (dest if inside else dest.parent) / name
    _active_stages.add(stage)
    try:
        write(stage)
        if inside:
            _publish_in_place(stage, dest, owned)
        else:
            if dest.is_dir():
                _carry_over(dest, stage, owned)
            _fsync_dir(stage)
            _swap_in(stage, dest)
    finally:
        _active_stages.discard(stage)
        _remove(stage)
    return dest


def _checkpoint_file(name: str) -> bool:
    return bool(_HF_WEIGHT_FILE.match(name)) or name in (INDEX_NAME, "config.json", "generation_config.json")


def save_hf(model: Qwen2ForCausalLM, save_directory: Union[str, os.PathLike], max_shard_size: Union[int, str] = "5GB",
            dtype: Any = None) -> None:
    """Write ``model`` in the HF layout: config.json, generation_config.json, safetensors (+ index).

    Only the weights of the architecture are written (:func:`model_weights`: never the KV cache that
    ``generate()`` keeps on the model). Per-expert MoE keys are written (the released format), a tied
    lm_head is not. Transformers loads the result with ``from_pretrained``.

    The save is atomic (:func:`write_folder_atomically`): everything is written into a staging folder
    ``.<name>.tmp-<pid>-<n>`` next to ``save_directory`` and swapped in at the end, so a crash leaves
    the previous checkpoint whole and never a mix of old and new shards. Saving over an earlier save
    replaces the checkpoint's own files (``model*.safetensors``, the index, config.json,
    generation_config.json, and the tokenizer files when the model has a tokenizer); other files in
    the folder are kept. Staging folders of killed saves whose process is gone are removed.

    Args:
        model: the model to export.
        save_directory: target folder (created if needed).
        max_shard_size: largest shard ("5GB", "500MB", bytes); one file ``model.safetensors`` when all fits.
        dtype: cast the weights on the way out; None writes each parameter in its stored dtype.

    Raises:
        ValueError: a bad ``max_shard_size`` or ``dtype``.
        CheckpointError: the model holds trainable parameters outside the architecture (LoRA
            adapters: merge them first) or int8-quantized weights; ``save_directory`` is a file.

    Example:
        >>> model.save_pretrained("out/qwen2-0.5b", max_shard_size="500MB")  # doctest: +SKIP
    """
    limit = parse_shard_size(max_shard_size)
    out_dtype = resolve_dtype(dtype) if dtype is not None else None

    entries = list(_export_entries(model, out_dtype))
    exported = {id(p) for _, p in model_weights(model)}
    dropped = [p.name for p in model.get_parameters() if id(p) not in exported and p.requires_grad]
    if dropped:
        raise CheckpointError(f"the model has trainable parameters that are not Qwen2 weights, which save_pretrained "
                              f"would lose: {dropped[:6]}{' ...' if len(dropped) > 6 else ''}. LoRA adapters: "
                              "merge them into the weights first (qwen2ms.merge_and_unload(model)) or save them "
                              "alone (qwen2ms.save_adapter(model, folder)).")
    shards: List[List[Tuple[str, Any]]] = [[]]
    sizes = [0]
    for name, spec in entries:
        nbytes = int(np.prod(spec[1], dtype=np.int64)) * _ST_DTYPES[spec[0]][0].itemsize
        if shards[-1] and sizes[-1] + nbytes > limit:
            shards.append([])
            sizes.append(0)
        shards[-1].append((name, spec))
        sizes[-1] += nbytes
    n = len(shards)
    names = [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    cfg = model.config.to_dict()
    cfg["dtype"] = dtype_name(out_dtype if out_dtype is not None else model.storage_dtype)
    cfg.pop("torch_dtype", None)
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        tokenizer = None

    def write(stage: Path) -> None:
        for shard_name, shard in zip(names, shards):
            _write_safetensors(stage / shard_name, shard, {"format": "pt"})
        if n > 1:
            index = {"metadata": {"total_size": int(sum(sizes))},
                     "weight_map": {name: shard_name for shard_name, shard in zip(names, shards) for name, _ in shard}}
            atomic_write_text(stage / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
        atomic_write_text(stage / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if model.generation_config_dict is not None:
            atomic_write_text(stage / "generation_config.json",
                              json.dumps(model.generation_config_dict, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)

    write_folder_atomically(save_directory, write,
                            lambda name: _checkpoint_file(name) or (tokenizer is not None and name in TOKENIZER_FILES))
