"""Load and save Hugging Face checkpoints (config.json + safetensors, single or sharded) for Qwen2ForCausalLM.

The mapping between HF keys and our parameter names is the identity, plus one explicit
:func:`sanitize` step: released MoE checkpoints store one tensor per expert
(``model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight``) and the model holds them stacked
(``mlp.experts.gate_up_proj`` ``[E, 2I, H]``, ``mlp.experts.down_proj`` ``[E, H, I]``); a tied model
ignores a redundant ``lm_head.weight`` on load and never writes one.

Memory: tensors are read straight from the file into their own buffer (plain ``readinto``, no
memory map whose pages would count twice) and handed to the parameter without another copy, so
loading peaks at about one copy of the weights (``benchmarks/bench_load.py`` measures it).
Saving writes one tensor at a time into temp files that are renamed into place at the end.
"""
from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ..config import ConfigError, Qwen2Config
from ..hub import atomic_write_text, resolve_pretrained
from .model import Qwen2ForCausalLM, dtype_name, resolve_dtype

__all__ = ["CheckpointError", "load_hf", "save_hf", "sanitize", "parse_shard_size", "read_safetensors_header"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_ALLOW = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]


class CheckpointError(ValueError):
    """A checkpoint folder or file cannot be loaded into (or written from) the model; the message says why."""


# ---------------------------------------------------------------------------------------------
# safetensors files: header parsing, streaming reads and writes
# ---------------------------------------------------------------------------------------------
_BF16_NP = ms.dtype_to_nptype(ms.bfloat16)
# safetensors dtype -> (numpy dtype, raw integer dtype of the same width for byte-level I/O)
_ST_DTYPES: Dict[str, Tuple[Any, Any]] = {
    "F64": (np.dtype(np.float64), np.uint64), "F32": (np.dtype(np.float32), np.uint32),
    "F16": (np.dtype(np.float16), np.uint16), "BF16": (np.dtype(_BF16_NP), np.uint16),
    "I64": (np.dtype(np.int64), np.uint64), "I32": (np.dtype(np.int32), np.uint32),
    "I16": (np.dtype(np.int16), np.uint16), "I8": (np.dtype(np.int8), np.uint8),
    "U8": (np.dtype(np.uint8), np.uint8), "BOOL": (np.dtype(np.bool_), np.uint8),
}
_FLOAT_ST = {"F64", "F32", "F16", "BF16"}
_MS_TO_ST = {ms.float32: "F32", ms.float16: "F16", ms.bfloat16: "BF16"}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class _TensorInfo:
    dtype: str
    shape: Tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_safetensors_header(path: Union[str, os.PathLike]) -> Tuple[Dict[str, _TensorInfo], Dict[str, str]]:
    """Parse and validate a safetensors header without reading tensor data.

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
            if hlen > _MAX_HEADER or 8 + hlen > size:
                raise CheckpointError(f"{path} is corrupt or truncated: header length {hlen} does not fit the "
                                      f"{size}-byte file")
            raw = f.read(hlen)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} has a corrupt safetensors header ({e})") from e
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + hlen
    out: Dict[str, _TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: malformed header entry for {name!r} ({e})") from e
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        expect = int(np.prod(shape, dtype=np.int64)) * _ST_DTYPES[dtype][0].itemsize
        if end - begin != expect or begin < 0:
            raise CheckpointError(f"{path}: tensor {name!r} byte range [{begin}, {end}) does not match its "
                                  f"shape {list(shape)} and dtype {dtype}")
        if base + end > size:
            raise CheckpointError(f"{path} is truncated: tensor {name!r} ends at byte {base + end} but the file "
                                  f"has {size} bytes")
        out[name] = _TensorInfo(dtype, shape, base + begin, end - begin)
    return out, metadata


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


@dataclass(frozen=True)
class _Target:
    param: str  # our parameter name
    expert: Optional[int] = None  # expert index for a per-expert piece
    part: Optional[str] = None  # "gate_proj" | "up_proj" | "down_proj"


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
def _shard_files(folder: Path) -> List[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            weight_map = data["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e}); it needs a "
                                  "'weight_map' object of tensor name -> shard file") from e
        names = sorted(set(weight_map.values()))
        absent = [n for n in names if not (folder / n).is_file()]
        if absent:
            raise CheckpointError(f"{index} names shard file(s) that are not in {folder}: {absent}. "
                                  "Download the missing shards or fix the index.")
        return [folder / n for n in names]
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single]
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        return [folder / n for n in others]
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
            revision: Optional[str] = None) -> Qwen2ForCausalLM:
    """Build a :class:`Qwen2ForCausalLM` from an HF checkpoint folder or hub repo id.

    Args:
        path_or_repo_id: a local folder, or a hub id (resolved through ``huggingface_hub``; offline
            behaviour as :func:`qwen2ms.hub.resolve_pretrained`).
        dtype: parameter storage dtype ("float32", "float16", "bfloat16" or a MindSpore dtype);
            None keeps the checkpoint's own dtype (its most common float dtype), so a bf16
            checkpoint round-trips bit for bit.
        revision: hub branch, tag or commit.

    Returns:
        The model, with ``generation_config_dict`` (raw generation_config.json or None) and
        ``tokenizer`` (a ``Qwen2Tokenizer`` when the folder has tokenizer files, else None).

    Raises:
        CheckpointError: missing/invalid config, no weights, a shard named by the index is absent,
            a truncated or corrupt file, or keys that do not fit the model (all missing, unexpected
            and shape-mismatched keys are listed in one message).
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
    for path, header in headers:
        for key, info in header.items():
            if key in seen_keys:
                unexpected.append(f"{key} (duplicated in {seen_keys[key].name} and {path.name})")
                continue
            seen_keys[key] = path
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

    _stream_into(model, params, plan, storage, show_progress=len(files) > 1)
    model.generation_config_dict = generation
    _attach_tokenizer(model, folder)
    return model


def _cast(arr: np.ndarray, st_dtype: str, storage: Any, target_np: np.dtype) -> np.ndarray:
    """One tensor to the storage dtype (a new array; the caller drops the old one)."""
    if st_dtype == "BF16" and target_np == np.float32:
        # bfloat16 is the top half of a float32: widening is an exact shift, far faster than a cast op.
        return (arr.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    # Everything else through MindSpore, which rounds to bfloat16/float16 the way torch does.
    return Tensor.from_numpy(np.ascontiguousarray(arr)).astype(storage).asnumpy()


def _stream_into(model, params, plan, storage, show_progress: bool) -> None:
    target_np = np.dtype(ms.dtype_to_nptype(storage))
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
                if arr.dtype != target_np:
                    arr = _cast(arr, info.dtype, storage, target_np)
                param = params[target.param]
                if target.expert is None:
                    param.set_data(Tensor.from_numpy(arr))
                    continue
                buf, count = stacks.get(target.param, (None, 0))
                if buf is None:
                    buf = np.empty(tuple(param.shape), dtype=target_np)
                inter = param.shape[1] // 2
                if target.part == "gate_proj":
                    buf[target.expert, :inter] = arr
                elif target.part == "up_proj":
                    buf[target.expert, inter:] = arr
                else:
                    buf[target.expert] = arr
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


def _export_entries(model: Qwen2ForCausalLM, dtype: Any) -> Iterator[Tuple[str, Tuple[str, Tuple[int, ...], Any]]]:
    """HF keys in the released layout with (safetensors dtype, shape, lazy array getter)."""
    for param in model.get_parameters():
        name, shape = param.name, tuple(param.shape)
        out_dtype = dtype if dtype is not None else param.dtype
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


def save_hf(model: Qwen2ForCausalLM, save_directory: Union[str, os.PathLike], max_shard_size: Union[int, str] = "5GB",
            dtype: Any = None) -> None:
    """Write ``model`` in the HF layout: config.json, generation_config.json, safetensors (+ index).

    Args:
        model: the model to export.
        save_directory: target folder (created if needed). Earlier ``model*.safetensors`` files there
            that the new checkpoint does not use are removed.
        max_shard_size: largest shard ("5GB", "500MB", bytes); one file ``model.safetensors`` when all fits.
        dtype: cast the weights on the way out; None writes each parameter in its stored dtype.

    Per-expert MoE keys are written (the released format), a tied lm_head is not. Every file is
    written to a temp name and renamed, so an interrupted save never leaves a half-written file
    under a real name. Transformers loads the result with ``from_pretrained``.

    Raises:
        ValueError: a bad ``max_shard_size`` or ``dtype``.

    Example:
        >>> model.save_pretrained("out/qwen2-0.5b", max_shard_size="500MB")  # doctest: +SKIP
    """
    limit = parse_shard_size(max_shard_size)
    out_dtype = resolve_dtype(dtype) if dtype is not None else None
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)

    entries = list(_export_entries(model, out_dtype))
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

    tmp_paths: List[Path] = []
    try:
        for shard_name, shard in zip(names, shards):
            tmp = folder / f".{shard_name}.tmp-{os.getpid()}"
            tmp_paths.append(tmp)
            _write_safetensors(tmp, shard, {"format": "pt"})
        for tmp, shard_name in zip(tmp_paths, names):
            os.replace(tmp, folder / shard_name)
    finally:
        for tmp in tmp_paths:
            if tmp.exists():
                tmp.unlink()
    if n > 1:
        index = {"metadata": {"total_size": int(sum(sizes))},
                 "weight_map": {name: shard_name for shard_name, shard in zip(names, shards) for name, _ in shard}}
        atomic_write_text(folder / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
    elif (folder / INDEX_NAME).exists():
        (folder / INDEX_NAME).unlink()
    for stale in folder.glob("model*.safetensors"):
        if stale.name not in names:
            stale.unlink()

    cfg = model.config.to_dict()
    saved = dtype_name(out_dtype if out_dtype is not None else model.storage_dtype)
    cfg["dtype"] = saved
    cfg.pop("torch_dtype", None)
    atomic_write_text(folder / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if model.generation_config_dict is not None:
        atomic_write_text(folder / "generation_config.json",
                          json.dumps(model.generation_config_dict, indent=2, sort_keys=True) + "\n")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
