"""Streaming checkpoint conversion between a Hugging Face folder and a MindSpore checkpoint (``qwen2ms convert``).

Tensors are read, renamed, cast and written one small group at a time (a tensor, a q/k/v triple,
or one projection of one layer's experts), so memory stays near the size of the largest group
whatever the model size. Every key and shape is checked against the config before any tensor is
written, and all output goes through temp files, so a failed conversion leaves nothing behind.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from ..config import ConfigError, Qwen2Config
from ..dtypes import numpy_dtype
from ..hub import atomic_write_bytes, atomic_write_text, resolve_pretrained
from .hf import CheckpointError, checkpoint_file, read_index, write_folder_atomically
from .mindformers import (
    HF,
    MINDFORMERS,
    NAMINGS,
    detect_naming,
    conversion_groups,
    from_mindformers,
    model_order_key,
    to_mindformers,
)
from .mindspore import (
    MSCheckpointError,
    MSCheckpointReader,
    MSCheckpointWriter,
    SafetensorsWriter,
    model_layout,
    read_checked,
    verified_hf_shapes,
    verify_hf_shapes,
)

__all__ = ["convert", "ConvertError", "ConvertSummary", "parse_size"]

PathLike = Union[str, os.PathLike]
_HF_WEIGHT_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")


class ConvertError(MSCheckpointError):
    """A conversion request cannot be carried out (bad arguments, missing config or weights)."""


@dataclass
class ConvertSummary:
    """What :func:`convert` wrote.

    Attributes:
        direction: ``"hf -> ms"`` or ``"ms -> hf"``.
        naming: the MindSpore side's naming (``"hf"`` or ``"mindformers"``).
        tensors: number of tensors written.
        bytes: bytes of tensor data written.
        dtypes: the dtypes written (names, sorted).
        files: the files written (weights, index, configs).
        skipped: source keys deliberately not written (optimizer state; a tied lm_head).
    """

    direction: str
    naming: str
    tensors: int
    bytes: int
    dtypes: Tuple[str, ...]
    files: List[Path] = field(default_factory=list)
    skipped: int = 0

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        size = f"{self.bytes / 1e9:.2f} GB" if self.bytes >= 1e8 else f"{self.bytes / 1e6:.2f} MB"
        skipped = f", skipped {self.skipped} non-weight keys" if self.skipped else ""
        where = self.files[0].parent if self.files else "?"
        return (f"converted {self.tensors} tensors ({size}, {'/'.join(self.dtypes) or '-'}) {self.direction} "
                f"[{self.naming} names] into {where}{skipped}")


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a size string like ``"5GB"`` (10**9) or ``"500MiB"`` (2**20), as HF reads them.

    Example:
        >>> parse_size("2GB"), parse_size("1KiB"), parse_size(7)
        (2000000000, 1024, 7)
    """
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise ConvertError(f"max_shard_size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ConvertError(f"cannot read size {size!r}; use e.g. '5GB', '500MB', '2GiB' or a number of bytes")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    value = int(float(m.group(1)) * scale)
    if value <= 0:
        raise ConvertError(f"max_shard_size must be positive, got {size!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Sources
class _HFFolder:
    """Lazy access to the safetensors weights of an HF folder (single file or sharded with an index)."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map, paths = read_index(folder)
            except CheckpointError as e:
                raise ConvertError(str(e)) from e
            files = [str(p.relative_to(folder)) for p in paths]
        elif single.is_file():
            try:
                checkpoint_file(folder, "model.safetensors", f"the folder {folder}")
            except CheckpointError as e:
                raise ConvertError(str(e)) from e
            files, weight_map = ["model.safetensors"], None
        else:
            raise ConvertError(f"{str(folder)!r} has no model.safetensors or model.safetensors.index.json; "
                               "convert reads HF safetensors checkpoints")
        self._readers: Dict[str, MSCheckpointReader] = {}
        self._where: Dict[str, MSCheckpointReader] = {}
        try:
            for name in files:
                reader = self._readers[name] = MSCheckpointReader(folder / name)
                if reader.format != "safetensors":
                    raise ConvertError(f"{str(folder / name)!r} is not a safetensors file")
                for k in reader.keys():
                    if weight_map is None or weight_map.get(k) == name:
                        self._where[k] = reader
        except BaseException:
            self.close()
            raise
        if weight_map is not None:
            lost = [k for k in weight_map if k not in self._where]
            if lost:
                self.close()
                raise ConvertError(f"the index lists tensors its shards do not hold, e.g. {lost[:5]}")

    def keys(self) -> List[str]:
        return list(self._where)

    def shape(self, key: str) -> Tuple[int, ...]:
        return self._where[key].shape(key)

    def get(self, key: str) -> np.ndarray:
        return self._where[key].get(key)

    def path(self, key: str) -> Path:
        return self._where[key].path

    def nbytes(self, key: str) -> int:
        return self._where[key].nbytes(key)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()

    def __enter__(self) -> "_HFFolder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Config handling
def _read_config(config: Any, next_to: Path, role: str) -> Tuple[Qwen2Config, Optional[bytes], Optional[Path]]:
    """The config object, the raw config.json bytes to copy (if any), and a generation_config.json to copy."""
    gen = next_to / "generation_config.json"
    gen_path = gen if gen.is_file() else None
    if isinstance(config, Qwen2Config):
        return config, None, gen_path
    if config is None:
        path = next_to / "config.json"
        if not path.is_file():
            raise ConvertError(f"no config.json next to the {role} ({str(next_to)!r}); pass --config PATH "
                               "(the model's HF config.json)")
    else:
        path = Path(config)
        if path.is_dir():
            if (path / "generation_config.json").is_file():
                gen_path = path / "generation_config.json"
            path = path / "config.json"
        if not path.is_file():
            raise ConvertError(f"config {str(config)!r} does not exist; pass an HF config.json or its folder")
    try:
        return Qwen2Config.from_json(path), path.read_bytes(), gen_path
    except ConfigError as e:
        raise ConvertError(f"{str(path)!r} is not a usable Qwen2 config: {e}") from e


def _write_configs(folder: Path, cfg: Qwen2Config, raw: Optional[bytes], gen: Optional[Path]) -> List[Path]:
    written = [folder / "config.json"]
    if raw is not None:
        atomic_write_bytes(folder / "config.json", raw)
    else:
        cfg.to_json(folder / "config.json")
    if gen is not None and gen.resolve() != (folder / "generation_config.json").resolve():
        atomic_write_bytes(folder / "generation_config.json", gen.read_bytes())
        written.append(folder / "generation_config.json")
    return written


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not enabled, file=sys.stderr,
                leave=False)


# ---------------------------------------------------------------------------------------------
def convert(
    src: PathLike,
    dst: PathLike,
    to: str,
    naming: Optional[str] = None,
    dtype: Any = None,
    fuse_qkv: bool = False,
    config: Any = None,
    format: Optional[str] = None,
    max_shard_size: Union[int, str] = "5GB",
    expert_layout: Optional[str] = None,
    revision: Optional[str] = None,
    verbose: bool = True,
    check_finite: bool = True,
) -> ConvertSummary:
    """Convert between an HF checkpoint folder and a MindSpore checkpoint, streaming tensor by tensor.

    Args:
        src: ``to="ms"``: an HF folder (or hub repo id) with config.json and safetensors.
            ``to="hf"``: a MindSpore ``.ckpt``/``.safetensors`` file.
        dst: ``to="ms"``: the checkpoint file (``.ckpt``/``.safetensors``), or a folder to hold
            ``model.ckpt``; config.json is copied next to it. ``to="hf"``: the output folder
            (safetensors shards + index, config.json, generation_config.json if the source had one).
        to: ``"ms"`` or ``"hf"``.
        naming: names on the MindSpore side, ``"hf"`` or ``"mindformers"``. Default: ``"hf"`` when
            writing, detected from the keys when reading.
        dtype: cast weights (``"bf16"``, ``"fp16"``, ``"fp32"``, ...); ``None`` keeps them.
        fuse_qkv: with MindFormers naming, write fused ``w_qkv``/``w_gate_hidden`` (``to="ms"``).
        config: an HF config.json path, its folder, or a Qwen2Config. Default: config.json next
            to ``src``.
        format: MindSpore file format for ``to="ms"`` (default: from ``dst``'s suffix, else ckpt).
        max_shard_size: largest HF shard for ``to="hf"`` (``"5GB"`` like transformers).
        expert_layout: MindFormers stacked-expert layout, ``"out_in"`` (default when writing) or
            ``"in_out"`` (the upstream's GroupedMatmul layout); detected when reading.
        revision: hub revision when ``src`` is a repo id.
        verbose: show a progress bar and print the summary line.
        check_finite: refuse a source tensor holding NaN or +-Inf (or one that the ``dtype`` cast
            overflows), naming it; False converts such weights as they are.

    Returns:
        A :class:`ConvertSummary`.

    Raises:
        ConvertError: bad arguments, missing config.json or weights, an index naming shards outside
            the folder, keys/shapes that do not match the config (all listed in one message).
        MSCheckpointError: also a corrupt safetensors header or (``check_finite``) a NaN/Inf weight.
        MSCheckpointError, CheckpointNamingError, HubError: unreadable or foreign inputs.

    Example:
        >>> convert("Qwen2-0.5B-Instruct", "qwen2_0.5b.ckpt", to="ms", naming="mindformers",
        ...         dtype="bf16")  # doctest: +SKIP
    """
    if to not in ("ms", "hf"):
        raise ConvertError(f"to must be 'ms' (HF folder -> MindSpore) or 'hf' (MindSpore -> HF folder), got {to!r}")
    if naming is not None and naming not in NAMINGS:
        raise ConvertError(f"naming must be 'hf' or 'mindformers', got {naming!r}")
    if fuse_qkv and (to != "ms" or naming != MINDFORMERS):
        raise ConvertError("fuse_qkv applies only to to='ms' with naming='mindformers'")
    try:
        np_dtype = numpy_dtype(dtype)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    if to == "ms":
        summary = _hf_to_ms(src, Path(dst), naming or HF, np_dtype, fuse_qkv, config, format, expert_layout or "out_in",
                            revision, verbose, check_finite)
    else:
        summary = _ms_to_hf(Path(src), Path(dst), naming, np_dtype, config, parse_size(max_shard_size),
                            expert_layout, verbose, check_finite)
    if verbose:
        print(summary.line())
    return summary


def _ms_destination(dst: Path, format: Optional[str]) -> Path:
    if dst.suffix.lower() in (".ckpt", ".safetensors"):
        return dst
    if dst.exists() and not dst.is_dir():
        raise ConvertError(f"{str(dst)!r} exists and is not a folder; name a .ckpt/.safetensors file or a folder")
    return dst / ("model.safetensors" if format == "safetensors" else "model.ckpt")


def _hf_to_ms(src: Any, dst: Path, naming: str, np_dtype: Any, fuse_qkv: bool, config: Any,
              format: Optional[str], expert_layout: str, revision: Optional[str], verbose: bool,
              check_finite: bool = True) -> ConvertSummary:
    folder = resolve_pretrained(src, allow_patterns=["*.json", "*.safetensors"], revision=revision)
    cfg, raw, gen = _read_config(config, folder, "HF checkpoint")
    with _HFFolder(folder) as source:
        keys = source.keys()
        detect = detect_naming(keys)
        if detect != HF:
            raise ConvertError(f"{str(folder)!r} holds MindFormers names, not an HF checkpoint; use to='hf' to import it")
        verify_hf_shapes({k: source.shape(k) for k in keys}, cfg, source=repr(str(folder)))
        out = _ms_destination(dst, format)
        out.parent.mkdir(parents=True, exist_ok=True)
        dtypes: set = set()
        count = 0
        with MSCheckpointWriter(out, format) as writer, \
                _progress(sum(source.nbytes(k) for k in keys), "convert", verbose) as bar:
            for unit in conversion_groups(keys, fuse_qkv and naming == MINDFORMERS):
                group = {k: read_checked(source.get(k), k, source.path(k), np_dtype, check_finite)
                         for k in unit}
                if naming == MINDFORMERS:
                    group = to_mindformers(group, cfg, fuse_qkv=fuse_qkv, expert_layout=expert_layout)
                for name, value in group.items():
                    writer.add(name, value)
                    dtypes.add(value.dtype.name)
                    count += 1
                bar.update(sum(source.nbytes(k) for k in unit))
                del group
            nbytes = writer.nbytes
    files = [out] + _write_configs(out.parent, cfg, raw, gen)
    return ConvertSummary("hf -> ms", naming, count, nbytes, tuple(sorted(dtypes)), files)


class _ShardedHFWriter:
    """HF safetensors shards written one tensor at a time, then named ``model-0000i-of-0000N``."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.shards: List[Path] = []
        self.weight_map: Dict[str, int] = {}
        self.nbytes = 0
        self._cur: Optional[SafetensorsWriter] = None

    def add(self, name: str, value: np.ndarray) -> None:
        if self._cur is not None and len(self._cur) and self._cur.nbytes + value.nbytes > self.max_bytes:
            self._cur.commit()
            self._cur = None
        if self._cur is None:
            path = self.folder / f"shard-{len(self.shards)}.safetensors"
            self.shards.append(path)
            self._cur = SafetensorsWriter(path, {"format": "pt"})
        self._cur.add(name, value)
        self.weight_map[name] = len(self.shards) - 1
        self.nbytes += value.nbytes

    def finish(self) -> List[Path]:
        if self._cur is not None:
            self._cur.commit()
            self._cur = None
        n = len(self.shards)
        if n == 1:
            final = [self.folder / "model.safetensors"]
        else:
            final = [self.folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for tmp, name in zip(self.shards, final):
            os.replace(tmp, name)
        if n > 1:
            index = {"metadata": {"total_size": self.nbytes},
                     "weight_map": {k: final[i].name for k, i in sorted(self.weight_map.items())}}
            atomic_write_text(self.folder / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
            final.append(self.folder / "model.safetensors.index.json")
        return final

    def abort(self) -> None:
        if self._cur is not None:
            self._cur.abort()
            self._cur = None


def _ms_to_hf(src: Path, dst: Path, naming: Optional[str], np_dtype: Any, config: Any, max_bytes: int,
              expert_layout: Optional[str], verbose: bool, check_finite: bool = True) -> ConvertSummary:
    if dst.exists() and not dst.is_dir():
        raise ConvertError(f"{str(dst)!r} exists and is not a folder; the HF layout needs a folder")
    if src.is_dir():
        found = sorted(p for p in src.iterdir() if p.suffix in (".ckpt", ".safetensors"))
        if len(found) != 1:
            raise ConvertError(f"{str(src)!r} is a folder with {len(found)} checkpoint files; pass the file itself")
        src = found[0]
    if not src.exists():
        raise ConvertError(f"MindSpore checkpoint {str(src)!r} does not exist")
    cfg, raw, gen = _read_config(config, src.parent, "MindSpore checkpoint")
    with MSCheckpointReader(src) as reader:
        keys, training, found_naming, layout = model_layout(reader, cfg, naming, expert_layout, error=ConvertError)
        hf_shapes = verified_hf_shapes(reader, keys, found_naming, layout, cfg)
        tied_head = cfg.tie_word_embeddings and "lm_head.weight" in hf_shapes
        skipped = len(training) + int(tied_head)

        digests: Dict[str, str] = {}
        dtypes: set = set()
        written: List[str] = []
        counts: Dict[str, int] = {}

        def write(stage: Path) -> None:
            writer = _ShardedHFWriter(stage, max_bytes)
            try:
                with _progress(sum(reader.nbytes(k) for k in keys), "convert", verbose) as bar:
                    for key in sorted(keys, key=model_order_key):
                        value = read_checked(reader.get(key), key, src, np_dtype, check_finite)
                        group = from_mindformers({key: value}, cfg, expert_layout=layout) \
                            if found_naming == MINDFORMERS else {key: value}
                        for name, part in group.items():
                            if tied_head and name in ("lm_head.weight", "model.embed_tokens.weight"):
                                digests[name] = _digest(part)
                                if name == "lm_head.weight":
                                    continue
                            writer.add(name, np.ascontiguousarray(part))
                            dtypes.add(part.dtype.name)
                        bar.update(reader.nbytes(key))
                        del value, group
                if tied_head and digests["lm_head.weight"] != digests["model.embed_tokens.weight"]:
                    raise ConvertError(
                        f"{str(src)!r} has an lm_head.weight that differs from the embeddings, but the config ties "
                        "them (tie_word_embeddings=true); set it to false in config.json to keep the separate head")
                files = writer.finish() + _write_configs(stage, cfg, raw, gen)
            except BaseException:
                writer.abort()
                raise
            written.extend(f.name for f in files)
            counts.update(tensors=len(writer.weight_map), nbytes=writer.nbytes)

        # One staging folder swapped in whole (qwen2ms.checkpoint.hf.write_folder_atomically): a crash
        # never leaves old and new shards side by side; stale HF weight files are not carried over, since
        # transformers would otherwise prefer an old model.safetensors over a new index.
        try:
            out = write_folder_atomically(dst, write, _hf_owned)
        except CheckpointError as e:
            raise ConvertError(str(e)) from e
    return ConvertSummary("ms -> hf", found_naming, counts["tensors"], counts["nbytes"], tuple(sorted(dtypes)),
                          [out / name for name in written], skipped)


def _hf_owned(name: str) -> bool:
    """Files of an HF checkpoint that a conversion into the folder replaces (other files are kept)."""
    return bool(_HF_WEIGHT_FILE.match(name)) or name in ("model.safetensors.index.json", "config.json",
                                                          "generation_config.json")


def _digest(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8).reshape(-1).data).hexdigest()
