"""Checkpoints across layouts: MindSpore strategy files for a ParallelConfig, and split / merge / reshard through
``mindspore.parallel.transform_checkpoints`` (the upstream's Transform_Ckpt).

A strategy file (``node_strategy_pb2.ParallelStrategyMap``) records, per parameter, a device matrix
and a tensor map. Ours use the device matrix ``[dp/ep, ep, mp]`` (row-major, so the device index is
the global rank of :meth:`ParallelConfig.rank_coords`); a tensor map entry names the device-matrix
axis that splits that tensor dimension, counted from the right (``0`` = model parallel, ``1`` =
expert parallel), ``-1`` = not split. kv heads replicated over a tensor-parallel group larger
than their count use ``[dp/ep, ep, kv, mp/kv]`` and split by the ``kv`` axis.

The MoE ``experts.gate_up_proj`` ``[E, 2I, H]`` holds gate rows then up rows, and a rank keeps a
chunk of each half -- not one contiguous slice. Before splitting, its rows are reordered so that
each rank's ``[gate_r; up_r]`` is contiguous (and back after merging); a rank's shard is then the
same tensor :func:`qwen2ms.parallel.apply.shard_parameters` gives it.

Checkpoint folders follow MindSpore's convention ``<dir>/rank_<r>/<prefix><r>.ckpt``.

Example:
    >>> pc = ParallelConfig(model_parallel=2)
    >>> paths = split_checkpoint("full.ckpt", "shards", config, pc)      # shards/rank_0/..., rank_1/...
    >>> merge_checkpoints("shards", "merged.ckpt", config, pc)          # equal to full.ckpt
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..config import Qwen2Config
from .config import ParallelConfig, ParallelConfigError
from .plans import PARAM_PLAN, match

__all__ = ["layout_for", "strategy_layouts", "write_strategy_file", "split_checkpoint", "merge_checkpoints",
           "reshard_checkpoints", "save_rank_checkpoint", "load_rank_checkpoint", "rank_checkpoint_path"]

PathLike = Union[str, os.PathLike]


def _check_layout(pc: ParallelConfig) -> None:
    if pc.pipeline_stage > 1:
        raise ParallelConfigError(
            "strategy files here describe data/tensor/expert layouts (pipeline_stage=1); a pipeline stage's "
            "checkpoint is the single-device checkpoint filtered to that stage's layers")


def layout_for(name: str, shape: Sequence[int], config: Qwen2Config, pc: ParallelConfig
               ) -> Tuple[List[int], List[int]]:
    """``(dev_matrix, tensor_map)`` of one parameter under a layout.

    Args:
        name: HF parameter name.
        shape: its full shape.
        config: the model.
        pc: the layout.

    Returns:
        The device matrix and tensor map (see the module docstring).
    """
    _check_layout(pc)
    dp, mp, ep = pc.data_parallel, pc.model_parallel, pc.expert_parallel
    tmap = [-1] * len(shape)
    split = match(PARAM_PLAN, name)
    dev = [dp // ep, ep, mp]
    if split is None:
        return dev, tmap
    if split.expert_dim is not None and ep > 1:
        tmap[split.expert_dim] = 1
    if split.dim is not None and mp > 1 and not (split.kind == "vocab" and pc.vocab_emb_dp):
        kv = config.num_key_value_heads
        if split.kind == "kv_heads" and kv < mp:
            dev = [dp // ep, ep, kv, mp // kv]
            tmap[split.dim] = 1
        else:
            tmap[split.dim] = 0
    return dev, tmap


def strategy_layouts(shapes: Dict[str, Sequence[int]], config: Qwen2Config, pc: ParallelConfig
                     ) -> Dict[str, Tuple[List[int], List[int]]]:
    """:func:`layout_for` of every parameter in ``{name: full shape}``."""
    return {n: layout_for(n, s, config, pc) for n, s in shapes.items()}


def write_strategy_file(path: PathLike, shapes: Dict[str, Sequence[int]], config: Qwen2Config,
                        pc: ParallelConfig) -> Path:
    """Write the MindSpore strategy file of ``pc`` for parameters ``{name: full shape}`` (atomically).

    Returns:
        The path written.
    """
    from mindspore.train import node_strategy_pb2 as pb

    from ..hub import atomic_write_bytes

    smap = pb.ParallelStrategyMap()
    smap.current_stage = 0
    for name, (dev, tmap) in strategy_layouts(shapes, config, pc).items():
        item = smap.parallel_layout_item.add()
        item.param_name = name
        lay = item.parallel_layouts
        lay.dev_matrix.add().dim.extend(dev)
        lay.tensor_map.add().dim.extend(tmap)
        # Both must be present (empty) for MindSpore's reader; no uneven splits, no optimizer sharding.
        lay.param_split_shape.add()
        lay.indices_offset.add()
        lay.field = 0
        lay.opt_weight_shard_step = 0
        lay.opt_weight_shard_size = 0
    path = Path(path)
    atomic_write_bytes(path, smap.SerializeToString())
    return path


def _halves_order(size: int, n: int) -> np.ndarray:
    """Row order that makes each rank's ``[gate_r; up_r]`` contiguous (n chunks of each half)."""
    half = size // 2
    step = half // n
    return np.concatenate([np.r_[r * step:(r + 1) * step, half + r * step:half + (r + 1) * step] for r in range(n)])


def _reorder(arrays: Dict[str, np.ndarray], config: Qwen2Config, pc: ParallelConfig, inverse: bool
             ) -> Dict[str, np.ndarray]:
    out = {}
    for name, arr in arrays.items():
        split = match(PARAM_PLAN, name)
        if split is not None and split.kind == "halves" and pc.model_parallel > 1:
            order = _halves_order(arr.shape[split.dim], pc.model_parallel)
            if inverse:
                order = np.argsort(order)
            arr = np.take(arr, order, axis=split.dim)
        out[name] = arr
    return out


def _load_arrays(path: PathLike) -> Dict[str, np.ndarray]:
    import mindspore as ms

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {os.fspath(path)!r}")
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(os.fspath(path)).items()}


def _save_arrays(arrays: Dict[str, np.ndarray], path: PathLike) -> None:
    import mindspore as ms

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # save_checkpoint appends ".ckpt" to other names, so the temporary name ends in it too.
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}.ckpt")
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in arrays.items()], os.fspath(tmp))
    os.replace(tmp, path)


def rank_checkpoint_path(folder: PathLike, rank: int, prefix: str = "qwen2ms") -> Path:
    """``<folder>/rank_<rank>/<prefix><rank>.ckpt`` (MindSpore's layout for transform_checkpoints)."""
    return Path(folder) / f"rank_{rank}" / f"{prefix}{rank}.ckpt"


def _only_ckpt(folder: Path) -> Path:
    files = sorted(folder.glob("*.ckpt"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .ckpt in {os.fspath(folder)!r}, found {[f.name for f in files]}")
    return files[0]


def split_checkpoint(full_ckpt: PathLike, out_dir: PathLike, config: Qwen2Config, pc: ParallelConfig,
                     prefix: str = "qwen2ms") -> List[Path]:
    """Split a single-device checkpoint (HF parameter names) into per-rank shards with transform_checkpoints.

    Args:
        full_ckpt: a MindSpore ``.ckpt`` of the whole model.
        out_dir: where ``rank_<r>/<prefix><r>.ckpt`` and ``strategy.ckpt`` are written.
        config: the model.
        pc: the target layout (validated against ``config``).
        prefix: file name prefix of the shards.

    Returns:
        The shard paths, by rank.
    """
    import mindspore as ms

    _check_layout(pc)
    pc.validate(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = _reorder(_load_arrays(full_ckpt), config, pc, inverse=False)
    strategy = write_strategy_file(out_dir / "strategy.ckpt", {k: v.shape for k, v in arrays.items()}, config, pc)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        src = Path(tmp) / "src"
        _save_arrays(arrays, src / "rank_0" / "full.ckpt")
        dst = Path(tmp) / "dst"
        dst.mkdir()
        ms.transform_checkpoints(os.fspath(src), os.fspath(dst), prefix, None, os.fspath(strategy))
        paths = []
        for r in range(pc.world_size):
            target = rank_checkpoint_path(out_dir, r, prefix)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(_only_ckpt(dst / f"rank_{r}"), target)
            paths.append(target)
    return paths


def merge_checkpoints(shard_dir: PathLike, out_ckpt: PathLike, config: Qwen2Config, pc: ParallelConfig) -> Path:
    """Merge per-rank shards written for ``pc`` back into one single-device checkpoint.

    Args:
        shard_dir: folder with ``rank_<r>/*.ckpt`` (one file per rank).
        out_ckpt: the merged ``.ckpt`` to write (atomically).
        config: the model.
        pc: the layout the shards were written for.

    Returns:
        ``out_ckpt``.
    """
    import mindspore as ms

    _check_layout(pc)
    shard_dir = Path(shard_dir)
    first = _load_arrays(_only_ckpt(shard_dir / "rank_0"))
    full_shapes = {}
    for name, arr in first.items():
        dev, tmap = layout_for(name, arr.shape, config, pc)
        full_shapes[name] = [s * (dev[len(dev) - 1 - t] if t >= 0 else 1) for s, t in zip(arr.shape, tmap)]
    with tempfile.TemporaryDirectory(dir=shard_dir) as tmp:
        strategy = write_strategy_file(Path(tmp) / "src_strategy.ckpt", full_shapes, config, pc)
        src = Path(tmp) / "src"
        for r in range(pc.world_size):
            rank_dir = shard_dir / f"rank_{r}"
            if not rank_dir.is_dir():
                raise FileNotFoundError(f"missing shard folder {os.fspath(rank_dir)!r} for layout of "
                                        f"{pc.world_size} ranks")
            (src / f"rank_{r}").mkdir(parents=True)
            os.symlink(_only_ckpt(rank_dir).resolve(), src / f"rank_{r}" / "shard.ckpt")
        dst = Path(tmp) / "dst"
        dst.mkdir()
        ms.transform_checkpoints(os.fspath(src), os.fspath(dst), "merged", os.fspath(strategy), None)
        merged = _reorder(_load_arrays(_only_ckpt(dst / "rank_0")), config, pc, inverse=True)
    _save_arrays(merged, out_ckpt)
    return Path(out_ckpt)


def reshard_checkpoints(src_dir: PathLike, dst_dir: PathLike, config: Qwen2Config, src_pc: ParallelConfig,
                        dst_pc: ParallelConfig, prefix: str = "qwen2ms") -> List[Path]:
    """Re-cut shards written for ``src_pc`` into shards for ``dst_pc`` (e.g. TP=2 -> DP=2 or TP=4).

    Goes through one merged checkpoint in a temporary folder (the fused MoE expert rows are ordered
    per layout, so a direct transform could not keep them right).

    Returns:
        The new shard paths, by rank.
    """
    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst_dir) as tmp:
        full = merge_checkpoints(src_dir, Path(tmp) / "full.ckpt", config, src_pc)
        return split_checkpoint(full, dst_dir, config, dst_pc, prefix)


def save_rank_checkpoint(pmodel, folder: PathLike, prefix: str = "qwen2ms") -> Path:
    """Write this rank's parameters of a parallelized model to ``<folder>/rank_<r>/<prefix><r>.ckpt``.

    Every rank calls it; the result is what :func:`split_checkpoint` would write for the layout, so
    :func:`merge_checkpoints` turns the folder back into one checkpoint.

    Args:
        pmodel: a :class:`~qwen2ms.parallel.apply.ParallelCausalLM`.
        folder: the checkpoint folder (shared by the ranks).
        prefix: file name prefix.

    Returns:
        This rank's file.
    """
    rank = pmodel.groups.rank
    arrays = {p.name: p.asnumpy() for p in pmodel.get_parameters()}
    path = rank_checkpoint_path(folder, rank, prefix)
    _save_arrays(arrays, path)
    return path


def load_rank_checkpoint(pmodel, folder: PathLike, rank: Optional[int] = None) -> None:
    """Load one rank's shard from ``<folder>/rank_<r>/`` into a parallelized (or sharded) model.

    With a model built without weights (``Qwen2ForCausalLM(config, init_weights=False)``) and cut by
    :func:`~qwen2ms.parallel.apply.parallelize` or ``shard_parameters``, only this rank's shard is
    ever read: the way to load a model too large for one host's memory.

    Args:
        pmodel: a :class:`~qwen2ms.parallel.apply.ParallelCausalLM`, or a model already cut by
            ``shard_parameters``.
        folder: the checkpoint folder (``split_checkpoint`` / ``save_rank_checkpoint`` output).
        rank: the global rank to read (default: the parallel model's own rank).

    Raises:
        ValueError: a parameter is missing from the file or has another shape (the layouts differ:
            use :func:`reshard_checkpoints` first), or no rank was given for a plain model.
    """
    import mindspore as ms

    if rank is None:
        if not hasattr(pmodel, "groups"):
            raise ValueError("pass rank= when loading into a model that was not built by parallelize")
        rank = pmodel.groups.rank
    arrays = _load_arrays(_only_ckpt(Path(folder) / f"rank_{rank}"))
    for p in pmodel.get_parameters():
        if p.name not in arrays:
            raise ValueError(f"{p.name} is not in the rank {rank} checkpoint under {os.fspath(folder)!r}")
        if tuple(arrays[p.name].shape) != tuple(p.shape):
            raise ValueError(f"{p.name}: checkpoint shape {tuple(arrays[p.name].shape)} != this rank's "
                             f"{tuple(p.shape)}; the checkpoint was written for another layout (reshard it)")
        p.set_data(ms.Tensor(arrays[p.name], dtype=p.dtype))
