"""MindSpore checkpoints (``.ckpt`` and MindSpore-flavoured ``.safetensors``) in HF or MindFormers naming: save, load, stream.

Reading and writing work tensor by tensor so that a 72B checkpoint never sits in memory twice. A
``.ckpt`` file is a sequence of protobuf ``Checkpoint.Value`` records (MindSpore's own
``checkpoint.proto``): :class:`MSCheckpointReader` indexes them without reading tensor bytes, and
:class:`MSCheckpointWriter` emits one record at a time, laid out exactly as ``mindspore.save_checkpoint``
lays them out (the tests compare the bytes).
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import mindspore as ms
import numpy as np

from ..dtypes import numpy_dtype, resolve_dtype
from ..modeling.model import Qwen2ForCausalLM
from .hf import _ST_DTYPES, CheckpointError, _check_finite, _export_entries, read_safetensors_header, sanitize
from .mindformers import (
    HF,
    MINDFORMERS,
    NAMINGS,
    CheckpointNamingError,
    conversion_groups,
    detect_expert_layout,
    detect_naming,
    from_mindformers,
    hf_parameter_shapes,
    mindformers_shapes_to_hf,
    model_order_key,
    split_training_state,
    to_mindformers,
)

__all__ = [
    "MSCheckpointError",
    "save_ms_checkpoint",
    "load_ms_checkpoint",
    "load_ms_model",
    "MSCheckpointReader",
    "MSCheckpointWriter",
    "SafetensorsWriter",
    "cast_array",
    "read_checked",
    "sniff_format",
    "model_layout",
    "verified_hf_shapes",
    "verify_hf_shapes",
]

PathLike = Union[str, os.PathLike]
FORMATS = ("ckpt", "safetensors")
# mindspore.save_checkpoint slices tensors above this many bytes into several records (SLICE_SIZE, 512 MiB).
_CKPT_SLICE_BYTES = 512 * 1024 * 1024
_CRC_TRAILER = b"crc_num"


class MSCheckpointError(CheckpointError):
    """A MindSpore checkpoint file is missing, unreadable, corrupt, or does not fit the request."""


# ---------------------------------------------------------------------------------------------
# dtypes
def _weight_dtype(dtype: Any) -> Optional[np.dtype]:
    """:func:`qwen2ms.dtypes.numpy_dtype` (``None`` keeps each tensor's own dtype), refusing with MSCheckpointError."""
    try:
        return numpy_dtype(dtype)
    except ValueError as e:
        raise MSCheckpointError(str(e)) from None


def cast_array(array: np.ndarray, dtype: Optional[np.dtype]) -> np.ndarray:
    """``array`` in ``dtype`` (no copy when it already is; floats only; round to nearest even)."""
    if dtype is None or array.dtype == dtype:
        return array
    if array.dtype.kind not in "fV" and array.dtype.name != "bfloat16":
        return array
    if array.dtype.name == "bfloat16" or np.dtype(dtype).name == "bfloat16":
        # numpy has no direct bf16 <-> f16 cast; bf16 -> f32 is exact, so one rounding happens.
        return array.astype(np.float32).astype(dtype)
    return array.astype(dtype)


def read_checked(array: np.ndarray, key: str, path: PathLike, dtype: Optional[np.dtype],
                 check_finite: bool = True) -> np.ndarray:
    """``cast_array(array, dtype)`` for tensor ``key`` read from ``path``, refusing NaN/Inf first (and an
    overflow of a narrowing cast) when ``check_finite``.

    Raises:
        MSCheckpointError: naming the tensor and file, and ``check_finite=False`` as the way to load anyway.
    """
    source = _ST_NAMES.get(array.dtype.name, "")
    try:
        if check_finite:
            _check_finite(array, source, key, Path(path))
        out = cast_array(array, dtype)
        if check_finite and out.dtype.itemsize < array.dtype.itemsize:
            _check_finite(out, _ST_NAMES.get(out.dtype.name, ""), key, Path(path), cast_from=source)
    except CheckpointError as e:
        raise MSCheckpointError(str(e)) from e
    return out


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "asnumpy"):
        return value.asnumpy()
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # a torch tensor, for convenience
        import torch

        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(numpy_dtype("bfloat16"))
        return t.numpy()
    raise MSCheckpointError(f"cannot turn a {type(value).__name__} into an array; pass numpy or MindSpore tensors")


# ---------------------------------------------------------------------------------------------
# Format detection
def sniff_format(path: PathLike) -> str:
    """``"ckpt"`` or ``"safetensors"``, read from the file's first bytes (not its name).

    Raises:
        MSCheckpointError: the file is missing, a folder, empty, or neither format.
    """
    path = Path(path)
    if not path.exists():
        raise MSCheckpointError(f"checkpoint file {str(path)!r} does not exist")
    if path.is_dir():
        raise MSCheckpointError(f"{str(path)!r} is a folder; pass the .ckpt or .safetensors file inside it")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head[:1] == b"\x0a":
        return "ckpt"
    raise MSCheckpointError(
        f"{str(path)!r} is neither a MindSpore .ckpt (protobuf) nor a .safetensors file"
        + (" (it is empty)" if size == 0 else "") + "; an encrypted .ckpt must be decrypted with MindSpore first")


def _format_for(path: Path, format: Optional[str]) -> str:
    by_suffix = {".ckpt": "ckpt", ".safetensors": "safetensors"}.get(path.suffix.lower())
    if format is None:
        return by_suffix or "ckpt"
    if format not in FORMATS:
        raise MSCheckpointError(f"format must be 'ckpt' or 'safetensors', got {format!r}")
    if by_suffix is not None and by_suffix != format:
        raise MSCheckpointError(f"{str(path)!r} ends in {path.suffix!r} but format={format!r}; make them agree")
    return format


# ---------------------------------------------------------------------------------------------
# Reading
_CKPT_TYPES = {
    "Float32": "float32", "Float16": "float16", "Float64": "float64", "BFloat16": "bfloat16",
    "Int8": "int8", "UInt8": "uint8", "Int16": "int16", "UInt16": "uint16", "Int32": "int32",
    "UInt32": "uint32", "Int64": "int64", "UInt64": "uint64", "Bool": "bool",
}
_ST_NAMES = {np_dtype.name: st for st, (np_dtype, _raw) in _ST_DTYPES.items()}  # numpy name -> safetensors name


def _np_dtype(name: str) -> np.dtype:
    return numpy_dtype(name) if name == "bfloat16" else np.dtype(name)


def _read_varint(f: BinaryIO) -> Optional[int]:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            return None if shift == 0 else -1
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            return -1


class _Entry:
    __slots__ = ("shape", "dtype", "segments", "text")

    def __init__(self, shape: Tuple[int, ...], dtype: str):
        self.shape, self.dtype = shape, dtype
        self.segments: List[Tuple[int, int]] = []
        self.text: Optional[bytes] = None


class MSCheckpointReader:
    """Lazy, read-only access to the tensors of a MindSpore ``.ckpt`` or ``.safetensors`` file.

    Opening reads only the index (names, shapes, dtypes, offsets); :meth:`get` reads one tensor.

    Args:
        path: the checkpoint file; its format is detected from its content.

    Raises:
        MSCheckpointError: missing, truncated or corrupt file, or a record this reader cannot
            represent (map tensors).

    Example:
        >>> with MSCheckpointReader("model.ckpt") as r:  # doctest: +SKIP
        ...     w = r.get("model.norm_out.weight")
    """

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.format = sniff_format(self.path)
        self._entries: Dict[str, _Entry] = {}
        self._file: Optional[BinaryIO] = None
        self.metadata: Dict[str, str] = {}
        # Tensors are read with readinto into their own buffers, never through a memory map: mapped
        # pages of a file read end to end would stay resident and count as a second copy.
        self._file = open(self.path, "rb")
        try:
            if self.format == "ckpt":
                self._index_ckpt()
            else:
                self._index_safetensors()
        except BaseException:
            self.close()
            raise

    def _index_safetensors(self) -> None:
        # One validator for every safetensors file qwen2ms reads: the checks of the safetensors library
        # (tensors tile the data section with no overlap or gap, known dtypes, sizes that match shapes).
        try:
            tensors, metadata = read_safetensors_header(self.path)
        except CheckpointError as e:
            raise MSCheckpointError(str(e)) from e
        self.metadata = dict(metadata)
        for key, info in tensors.items():
            entry = self._entries[key] = _Entry(info.shape, _ST_DTYPES[info.dtype][0].name)
            entry.segments.append((info.start, info.nbytes))

    # -- ckpt index: walk the protobuf wire format, seeking over tensor bytes
    def _corrupt(self, why: str) -> MSCheckpointError:
        return MSCheckpointError(f"{str(self.path)!r} is not a valid MindSpore checkpoint ({why}); "
                                 "the file may be truncated or corrupt")

    def _index_ckpt(self) -> None:
        f = self._file
        assert f is not None
        size = self.path.stat().st_size
        last: Optional[str] = None
        while True:
            pos = f.tell()
            if pos == size:
                break
            if size - pos == len(_CRC_TRAILER) + 10:
                if f.read(len(_CRC_TRAILER)) == _CRC_TRAILER:
                    break
                f.seek(pos)
            key = _read_varint(f)
            if key != 0x0A:
                raise self._corrupt(f"unexpected field at byte {pos}")
            length = _read_varint(f)
            if length is None or length < 0 or f.tell() + length > size:
                raise self._corrupt(f"record at byte {pos} runs past the end of the file")
            tag, shape, dtype, content = self._parse_value(f.tell(), length)
            entry = self._entries.get(tag)
            if entry is not None and tag != last:
                raise self._corrupt(f"tensor {tag!r} appears twice")
            if entry is None:
                entry = self._entries[tag] = _Entry(shape, dtype)
            elif entry.shape != shape or entry.dtype != dtype:
                raise self._corrupt(f"slices of {tag!r} disagree on shape or dtype")
            entry.segments.append(content)
            last = tag
        for tag, entry in self._entries.items():
            if entry.dtype == "str":
                continue
            nbytes = sum(n for _, n in entry.segments)
            want = int(np.prod(entry.shape, dtype=np.int64)) * _np_dtype(entry.dtype).itemsize
            if nbytes != want:
                raise self._corrupt(f"tensor {tag!r} has {nbytes} bytes, its shape {entry.shape} needs {want}")

    def _parse_value(self, start: int, length: int) -> Tuple[str, Tuple[int, ...], str, Tuple[int, int]]:
        f = self._file
        assert f is not None
        end = start + length
        tag: Optional[str] = None
        dims: List[int] = []
        ttype: Optional[str] = None
        content: Optional[Tuple[int, int]] = None
        while f.tell() < end:
            key = _read_varint(f)
            n = _read_varint(f)
            if key is None or n is None or n < 0 or f.tell() + n > end:
                raise self._corrupt(f"bad record at byte {start}")
            if key == 0x0A:
                tag = f.read(n).decode("utf-8", errors="replace")
            elif key == 0x12:  # TensorProto
                t_end = f.tell() + n
                while f.tell() < t_end:
                    tkey = _read_varint(f)
                    if tkey == 0x08:  # one dim, unpacked int64
                        d = _read_varint(f)
                        dims.append(_signed64(d))
                        continue
                    m = _read_varint(f)
                    if tkey is None or m is None or m < 0 or f.tell() + m > t_end:
                        raise self._corrupt(f"bad tensor record at byte {start}")
                    if tkey == 0x0A:  # packed dims
                        sub = f.read(m)
                        dims.extend(_signed64(v) for v in _varints(sub))
                    elif tkey == 0x12:
                        ttype = f.read(m).decode("ascii", errors="replace")
                    elif tkey == 0x1A:
                        content = (f.tell(), m)
                        f.seek(m, os.SEEK_CUR)
                    else:
                        f.seek(m, os.SEEK_CUR)
            elif key == 0x1A:
                raise MSCheckpointError(f"{str(self.path)!r} holds a map tensor ({tag!r}); only dense tensors "
                                        "are model weights")
            else:
                f.seek(n, os.SEEK_CUR)
        if tag is None or ttype is None or content is None:
            raise self._corrupt(f"incomplete record at byte {start}")
        if ttype != "str" and ttype not in _CKPT_TYPES:
            raise MSCheckpointError(f"{str(self.path)!r}: tensor {tag!r} has unsupported type {ttype!r}")
        if dims == [0] and ttype != "str":
            dims = []
        return tag, tuple(dims), ttype if ttype == "str" else _CKPT_TYPES[ttype], content

    # -- public API
    def keys(self) -> List[str]:
        """Tensor names in file order (string entries, e.g. a saved step name, are left out)."""
        return [k for k, e in self._entries.items() if e.dtype != "str"]

    def __contains__(self, key: object) -> bool:
        return key in self._entries and self._entries[key].dtype != "str"  # type: ignore[index]

    def shape(self, key: str) -> Tuple[int, ...]:
        """Shape of tensor ``key``."""
        return self._entry(key).shape

    def dtype(self, key: str) -> np.dtype:
        """numpy dtype of tensor ``key``."""
        return _np_dtype(self._entry(key).dtype)

    def nbytes(self, key: str) -> int:
        """Size in bytes of tensor ``key``."""
        e = self._entry(key)
        return int(np.prod(e.shape, dtype=np.int64)) * _np_dtype(e.dtype).itemsize

    def _entry(self, key: str) -> _Entry:
        e = self._entries.get(key)
        if e is None or e.dtype == "str":
            raise MSCheckpointError(f"{str(self.path)!r} has no tensor {key!r}")
        return e

    def get(self, key: str) -> np.ndarray:
        """Read tensor ``key`` as a numpy array (bfloat16 stays bfloat16)."""
        e = self._entry(key)
        f = self._file
        assert f is not None
        buf = np.empty(sum(n for _, n in e.segments), dtype=np.uint8)
        view, at = memoryview(buf), 0
        for offset, n in e.segments:
            f.seek(offset)
            if f.readinto(view[at: at + n]) != n:
                raise self._corrupt(f"tensor {key!r} is cut short")
            at += n
        return buf.view(_np_dtype(e.dtype)).reshape(e.shape)

    def items(self) -> Iterator[Tuple[str, np.ndarray]]:
        """``(name, array)`` pairs, one tensor in memory at a time."""
        for k in self.keys():
            yield k, self.get(k)

    def close(self) -> None:
        """Release the file handle."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "MSCheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _signed64(v: Optional[int]) -> int:
    if v is None or v < 0:
        raise MSCheckpointError("bad dimension in checkpoint record")
    return v - (1 << 64) if v >= 1 << 63 else v


def _varints(data: bytes) -> Iterator[int]:
    result = shift = 0
    for b in data:
        result |= (b & 0x7F) << shift
        if b & 0x80:
            shift += 7
        else:
            yield result
            result = shift = 0


# ---------------------------------------------------------------------------------------------
# Writing
def _tmp_name(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")


def _finish(tmp: Path, path: Path) -> None:
    # mindspore.save_checkpoint leaves files read-only (0o400); ours stay ordinary files.
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class _AtomicWriter:
    """Context-manager protocol of the writers: :meth:`commit` on success, :meth:`abort` on error."""

    def __enter__(self):
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class SafetensorsWriter(_AtomicWriter):
    """Write one ``.safetensors`` file tensor by tensor, atomically (temp file + rename on :meth:`commit`).

    The tensors go straight to their final place after a reserved header area; the header is
    written last, padded with spaces (allowed by the format). If it outgrows the reserve, the file
    is rewritten once with a larger header.

    Args:
        path: the destination file.
        metadata: the ``__metadata__`` strings; ``{"format": "pt"}`` for files transformers reads,
            ``{"format": "ms"}`` as MindSpore writes.

    Example:
        >>> with SafetensorsWriter("out.safetensors", {"format": "pt"}) as w:  # doctest: +SKIP
        ...     w.add("model.norm.weight", np.ones(8, np.float32))
    """

    _RESERVE = 1 << 20

    def __init__(self, path: PathLike, metadata: Optional[Dict[str, str]] = None):
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._tmp = _tmp_name(self.path, ".safetensors")
        self._f: Optional[BinaryIO] = open(self._tmp, "wb")
        self._f.seek(self._RESERVE)
        self._header: Dict[str, Any] = {}
        self._offset = 0
        self.nbytes = 0

    def add(self, name: str, array: np.ndarray) -> None:
        """Append tensor ``name``."""
        if self._f is None:
            raise MSCheckpointError(f"{str(self.path)!r}: writer already closed")
        if name in self._header:
            raise MSCheckpointError(f"{str(self.path)!r}: tensor {name!r} written twice")
        array = np.ascontiguousarray(array)
        st = _ST_NAMES.get(array.dtype.name)
        if st is None:
            raise MSCheckpointError(f"tensor {name!r}: dtype {array.dtype.name} cannot be stored in safetensors")
        data = memoryview(array.reshape(-1).view(np.uint8))
        self._f.write(data)
        self._header[name] = {"dtype": st, "shape": list(array.shape),
                              "data_offsets": [self._offset, self._offset + len(data)]}
        self._offset += len(data)
        self.nbytes += len(data)

    def __len__(self) -> int:
        return len(self._header)

    def commit(self) -> Path:
        """Write the header, flush, and move the file into place."""
        if self._f is None:
            raise MSCheckpointError(f"{str(self.path)!r}: writer already closed")
        header = dict(self._header)
        if self.metadata:
            header["__metadata__"] = self.metadata
        blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
        room = self._RESERVE - 8
        f, self._f = self._f, None
        try:
            if len(blob) <= room:
                f.seek(0)
                f.write(struct.pack("<Q", room) + blob + b" " * (room - len(blob)))
                f.flush()
                os.fsync(f.fileno())
                f.close()
            else:
                f.close()
                self._rewrite_with_header(blob)
            _finish(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def _rewrite_with_header(self, blob: bytes) -> None:
        pad = (-len(blob)) % 8
        blob += b" " * pad
        second = _tmp_name(self.path, ".2.safetensors")
        try:
            with open(self._tmp, "rb") as src, open(second, "wb") as dst:
                dst.write(struct.pack("<Q", len(blob)) + blob)
                src.seek(self._RESERVE)
                while True:
                    chunk = src.read(64 << 20)
                    if not chunk:
                        break
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(second, self._tmp)
        finally:
            if second.exists():
                second.unlink()

    def abort(self) -> None:
        """Drop everything written so far."""
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tmp.exists():
            self._tmp.unlink()


class MSCheckpointWriter(_AtomicWriter):
    """Write a MindSpore checkpoint one tensor at a time, atomically (temp file + rename on :meth:`commit`).

    ``format="ckpt"`` emits the same protobuf records, in the same slicing, as
    ``mindspore.save_checkpoint``; ``format="safetensors"`` writes the file MindSpore's
    ``save_checkpoint(..., format="safetensors")`` would (metadata ``{"format": "ms"}``).

    Args:
        path: the destination file.
        format: ``"ckpt"`` or ``"safetensors"``; ``None`` picks it from the suffix (default ckpt).

    Example:
        >>> with MSCheckpointWriter("model.ckpt") as w:  # doctest: +SKIP
        ...     w.add("model.norm_out.weight", np.ones(8, np.float32))
    """

    def __init__(self, path: PathLike, format: Optional[str] = None):
        self.path = Path(path)
        self.format = _format_for(self.path, format)
        self.nbytes = 0
        self._count = 0
        self._names: set = set()
        if self.format == "safetensors":
            self._st: Optional[SafetensorsWriter] = SafetensorsWriter(self.path, {"format": "ms"})
            self._f: Optional[BinaryIO] = None
        else:
            self._st = None
            from mindspore.train.checkpoint_pb2 import Checkpoint  # MindSpore's own checkpoint.proto

            self._proto = Checkpoint
            self._tmp = _tmp_name(self.path, ".ckpt")
            self._f = open(self._tmp, "wb")
        self._type_names: Dict[str, str] = {}

    def _type_name(self, dtype: np.dtype) -> str:
        name = self._type_names.get(dtype.name)
        if name is None:
            name = self._type_names[dtype.name] = str(ms.Tensor.from_numpy(np.zeros((1,), dtype)).dtype)
        return name

    def add(self, name: str, array: np.ndarray) -> None:
        """Append tensor ``name``."""
        if name in self._names:
            raise MSCheckpointError(f"{str(self.path)!r}: tensor {name!r} written twice")
        self._names.add(name)
        array = np.ascontiguousarray(array)
        self._count += 1
        self.nbytes += array.nbytes
        if self._st is not None:
            self._st.add(name, array)
            return
        if self._f is None:
            raise MSCheckpointError(f"{str(self.path)!r}: writer already closed")
        type_name = self._type_name(array.dtype)
        flat = array.reshape(-1)
        # Same slicing rule as mindspore.save_checkpoint, so the files are byte-identical.
        pieces = np.array_split(flat, math.ceil(array.nbytes / 1024 / (_CKPT_SLICE_BYTES / 1024))) \
            if array.nbytes > _CKPT_SLICE_BYTES else [flat]
        for piece in pieces:
            # The record as protobuf serializes it (fields in number order, tensor_content last),
            # with the tensor bytes written straight from the array instead of copied into a message.
            head = self._proto.Value()
            head.tag = name
            tensor = head.tensor
            tensor.dims.extend(list(array.shape))
            tensor.tensor_type = type_name
            tensor.tensor_content = b""
            tag_part = head.SerializeToString()[: -(tensor.ByteSize() + 1 + len(_varint(tensor.ByteSize())))]
            n = piece.nbytes
            tensor_head = tensor.SerializeToString()[:-2] + b"\x1a" + _varint(n)  # drop the empty content field
            tensor_len = len(tensor_head) + n
            value_head = tag_part + b"\x12" + _varint(tensor_len) + tensor_head
            self._f.write(b"\x0a" + _varint(len(value_head) + n) + value_head)
            self._f.write(memoryview(piece.view(np.uint8)))

    def __len__(self) -> int:
        return self._count

    def commit(self) -> Path:
        """Flush and move the file into place."""
        if self._st is not None:
            self._st.commit()
            self._st = None
            return self.path
        if self._f is None:
            raise MSCheckpointError(f"{str(self.path)!r}: writer already closed")
        f, self._f = self._f, None
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            _finish(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return self.path

    def abort(self) -> None:
        """Drop everything written so far."""
        if self._st is not None:
            self._st.abort()
            self._st = None
            return
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tmp.exists():
            self._tmp.unlink()


# ---------------------------------------------------------------------------------------------
# Whole-checkpoint API
def model_layout(reader: "MSCheckpointReader", config: Any = None, naming: Optional[str] = None,
                 expert_layout: Optional[str] = None, error: type = CheckpointNamingError
                 ) -> Tuple[List[str], List[str], str, Optional[str]]:
    """The model's keys in a MindSpore checkpoint, their naming and the stacked-expert layout.

    Returns:
        ``(keys, training_keys, naming, expert_layout)``: the optimizer state and step counters of a training
        checkpoint split off; the naming detected from the keys; ``expert_layout`` as given, else detected for
        a MindFormers checkpoint (None for HF names).

    Raises:
        error: the keys use another naming than a given ``naming``.
    """
    keys, training = split_training_state(reader.keys())
    found = detect_naming(keys)
    if naming is not None and naming != found:
        raise error(f"{str(reader.path)!r} uses {found} names, but naming={naming!r} was requested")
    layout = expert_layout
    if found == MINDFORMERS and layout is None:
        layout = detect_expert_layout({k: reader.shape(k) for k in keys}, config)
    return keys, training, found, layout


def verified_hf_shapes(reader: "MSCheckpointReader", keys: List[str], naming: str, expert_layout: Optional[str],
                       config: Any) -> Dict[str, Tuple[int, ...]]:
    """The HF-named shapes of ``keys`` (from :func:`model_layout`), checked with :func:`verify_hf_shapes`."""
    shapes = {k: reader.shape(k) for k in keys}
    if naming == MINDFORMERS:
        shapes = mindformers_shapes_to_hf(shapes, config, expert_layout=expert_layout)
    verify_hf_shapes(shapes, config, source=repr(str(reader.path)))
    return shapes


def verify_hf_shapes(shapes: Mapping[str, Tuple[int, ...]], config: Any, source: str = "checkpoint") -> None:
    """Check HF-named tensor shapes against ``config``; all problems are reported in one error.

    ``lm_head.weight`` may be present or absent when the embeddings are tied.

    Raises:
        MSCheckpointError: listing missing, unexpected and shape-mismatched keys.
    """
    want = hf_parameter_shapes(config, include_tied_lm_head=True)
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = [k for k in want if k not in shapes and k not in optional]
    unexpected = [k for k in shapes if k not in want]
    mismatched = [f"{k}: {tuple(shapes[k])} (config wants {want[k]})" for k in shapes
                  if k in want and tuple(shapes[k]) != tuple(want[k])]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
                parts.append(f"{label} ({len(items)}): {items[:10]}{more}")
        raise MSCheckpointError(f"{source} does not match the config: " + "; ".join(parts))


def _lazy_hf_tensors(obj: Any) -> Tuple[Dict[str, Callable[[], np.ndarray]], Any]:
    """HF-named (released per-expert layout) array getters and the config, from a model or a state dict."""
    if isinstance(obj, Mapping):
        return {k: (lambda v=v: _to_numpy(v)) for k, v in obj.items()}, None
    if isinstance(obj, ms.nn.Cell) and hasattr(obj, "config") and hasattr(obj, "tied"):
        # The model's own exporter knows how its stacked experts map back to per-expert keys.
        return {name: spec[2] for name, spec in _export_entries(obj, None)}, obj.config
    raise MSCheckpointError(
        f"save_ms_checkpoint takes a Qwen2ForCausalLM or a dict of arrays, got {type(obj).__name__}")


def save_ms_checkpoint(
    model_or_state_dict: Any,
    path: PathLike,
    naming: str = HF,
    format: Optional[str] = None,
    fuse_qkv: bool = False,
    config: Any = None,
    dtype: Any = None,
    expert_layout: str = "out_in",
) -> Path:
    """Save weights as a MindSpore checkpoint, one tensor group at a time, atomically (temp file + rename).

    The file is what ``mindspore.save_checkpoint`` writes for the same tensors (byte for byte
    for ``.ckpt``), without first gathering a second full copy of the weights.

    Args:
        model_or_state_dict: a ``Qwen2ForCausalLM`` or a dict of HF-named arrays/tensors in the
            released layout (one key per expert).
        path: destination file.
        naming: ``"hf"`` keeps HF names; ``"mindformers"`` uses the upstream names.
        format: ``"ckpt"`` or ``"safetensors"``; ``None`` picks it from the suffix (default ckpt).
        fuse_qkv: with MindFormers naming, write fused ``w_qkv`` and ``w_gate_hidden``.
        config: the model's config (taken from the model when one is passed); needed for ``fuse_qkv``.
        dtype: cast weights to this dtype (``None`` keeps them).
        expert_layout: MindFormers stacked-expert layout, ``"out_in"`` or ``"in_out"``.

    Returns:
        The written path.

    Raises:
        MSCheckpointError: bad ``naming``/``format``/``dtype`` or unsupported input.
        CheckpointNamingError: keys that are not Qwen2 HF names.

    Example:
        >>> save_ms_checkpoint(model, "qwen2.ckpt", naming="mindformers")  # doctest: +SKIP
    """
    if naming not in NAMINGS:
        raise MSCheckpointError(f"naming must be 'hf' or 'mindformers', got {naming!r}")
    if fuse_qkv and naming != MINDFORMERS:
        raise MSCheckpointError("fuse_qkv only applies to naming='mindformers'")
    path = Path(path)
    fmt = _format_for(path, format)
    np_dtype = _weight_dtype(dtype)
    getters, model_config = _lazy_hf_tensors(model_or_state_dict)
    config = config if config is not None else model_config
    path.parent.mkdir(parents=True, exist_ok=True)
    with MSCheckpointWriter(path, fmt) as writer:
        for group in conversion_groups(list(getters), fuse_qkv and naming == MINDFORMERS):
            arrays = {k: cast_array(getters[k](), np_dtype) for k in group}
            if naming == MINDFORMERS:
                arrays = to_mindformers(arrays, config, fuse_qkv=fuse_qkv, expert_layout=expert_layout)
            for name, value in arrays.items():
                writer.add(name, value)
    return path


def load_ms_checkpoint(
    path: PathLike,
    config: Any = None,
    dtype: Any = None,
    naming: Optional[str] = None,
    expert_layout: Optional[str] = None,
    check_finite: bool = True,
) -> Dict[str, np.ndarray]:
    """Read a MindSpore checkpoint (HF or MindFormers naming) into an HF-named state dict.

    Optimizer state and step counters of an upstream training checkpoint are skipped.

    Args:
        path: a ``.ckpt`` or MindSpore ``.safetensors`` file (format detected from the content).
        config: a :class:`~qwen2ms.Qwen2Config`. When given, every key and shape is checked
            against it; it is required to split a fused ``w_qkv``.
        dtype: cast weights to this dtype (``None`` keeps the stored dtype, e.g. bf16 stays bf16).
        naming: ``"hf"`` or ``"mindformers"``; ``None`` detects it from the keys.
        expert_layout: stacked-expert layout of a MindFormers checkpoint (``None`` detects it).
        check_finite: refuse a tensor holding NaN or +-Inf (or overflowing the ``dtype`` cast);
            False reads such weights as they are.

    Returns:
        HF key -> numpy array, in the released layout (one key per expert).

    Raises:
        MSCheckpointError: missing/corrupt file, keys/shapes that do not fit ``config``
            (all listed in one message), or (``check_finite``) a NaN/Inf weight.
        CheckpointNamingError: keys in neither naming, or a naming that does not fit the keys.

    Example:
        >>> sd = load_ms_checkpoint("qwen2_mf.ckpt", Qwen2Config.from_json("config.json"))  # doctest: +SKIP
    """
    if naming is not None and naming not in NAMINGS:
        raise MSCheckpointError(f"naming must be None, 'hf' or 'mindformers', got {naming!r}")
    np_dtype = _weight_dtype(dtype)
    out: Dict[str, np.ndarray] = {}
    with MSCheckpointReader(path) as reader:
        keys, _training, found, layout = model_layout(reader, config, naming, expert_layout)
        for key in keys:
            value = read_checked(reader.get(key), key, path, np_dtype, check_finite)
            if found == MINDFORMERS:
                out.update(from_mindformers({key: value}, config, expert_layout=layout))
            else:
                out[key] = value
    if config is not None:
        verify_hf_shapes({k: v.shape for k, v in out.items()}, config, source=repr(str(path)))
    return out


def _config_from(config: Any, checkpoint: Path) -> Any:
    from ..config import ConfigError, Qwen2Config

    if config is not None and not isinstance(config, (str, os.PathLike)):
        return config
    where = Path(config) if config is not None else checkpoint.parent / "config.json"
    if where.is_dir():
        where = where / "config.json"
    if not where.is_file():
        raise MSCheckpointError(f"no config.json at {str(where)!r}; pass config= (a Qwen2Config or an HF "
                                "config.json path)")
    try:
        return Qwen2Config.from_json(where)
    except ConfigError as e:
        raise MSCheckpointError(f"{str(where)!r}: {e}") from e


def load_ms_model(
    path: PathLike,
    config: Any = None,
    dtype: Any = None,
    naming: Optional[str] = None,
    expert_layout: Optional[str] = None,
    check_finite: bool = True,
) -> Any:
    """Build a ``Qwen2ForCausalLM`` from a MindSpore checkpoint, streaming tensors into its parameters.

    Args:
        path: a ``.ckpt`` or MindSpore ``.safetensors`` file in HF or MindFormers naming.
        config: a :class:`~qwen2ms.Qwen2Config`, or a config.json path/folder; ``None`` reads the
            config.json next to ``path``.
        dtype: parameter storage dtype; ``None`` uses the checkpoint's (most common) float dtype,
            so a bf16 checkpoint loads bit for bit.
        naming: ``"hf"``/``"mindformers"``; ``None`` detects it.
        expert_layout: stacked-expert layout of a MindFormers checkpoint (``None`` detects it).
        check_finite: refuse a tensor holding NaN or +-Inf (or overflowing the ``dtype`` cast), naming
            it; False loads such weights as they are.

    Returns:
        The model.

    Raises:
        MSCheckpointError: missing file or config, keys/shapes that do not fit the config (all
            listed in one message), or (``check_finite``) a NaN/Inf weight.
        CheckpointNamingError: keys in neither naming.

    Example:
        >>> model = load_ms_model("qwen2_mf.ckpt")  # doctest: +SKIP
    """
    path = Path(path)
    if naming is not None and naming not in NAMINGS:
        raise MSCheckpointError(f"naming must be None, 'hf' or 'mindformers', got {naming!r}")
    with MSCheckpointReader(path) as reader:
        config = _config_from(config, path)
        keys, _training, found, layout = model_layout(reader, config, naming, expert_layout)
        verified_hf_shapes(reader, keys, found, layout, config)
        np_dtype = _weight_dtype(dtype)
        if np_dtype is None:
            floats = [reader.dtype(k).name for k in keys if reader.dtype(k).name in ("float32", "float16", "bfloat16")]
            np_dtype = _weight_dtype(max(set(floats), key=floats.count) if floats else "float32")
        storage = resolve_dtype(np_dtype)

        model = Qwen2ForCausalLM(config, dtype=storage, init_weights=False)
        params = {p.name: p for p in model.get_parameters()}
        stacks: Dict[str, np.ndarray] = {}
        filled: set = set()
        for key in sorted(keys, key=model_order_key):
            value = read_checked(reader.get(key), key, path, np_dtype, check_finite)
            pieces = from_mindformers({key: value}, config, expert_layout=layout) if found == MINDFORMERS \
                else {key: value}
            for name, arr in pieces.items():
                target = sanitize(name, params, model.tied)
                if target is None:
                    continue
                param = params[target.param]
                if target.expert is None:
                    param.set_data(ms.Tensor.from_numpy(np.ascontiguousarray(arr)))
                    filled.add(target.param)
                    continue
                buf = stacks.get(target.param)
                if buf is None:
                    buf = stacks[target.param] = np.empty(tuple(param.shape), dtype=np_dtype)
                target.place(buf, arr)
            del value, pieces
        for name, buf in stacks.items():
            params[name].set_data(ms.Tensor.from_numpy(buf))
            filled.add(name)
    unfilled = sorted(set(params) - filled)
    if unfilled:
        raise MSCheckpointError(f"{str(path)!r} left parameters unset: {unfilled[:10]}")
    return model
