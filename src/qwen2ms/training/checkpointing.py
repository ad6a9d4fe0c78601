"""Atomic training checkpoints (``checkpoint-<step>`` folders), their discovery, rotation and tensor files."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from ..errors import CheckpointError

__all__ = [
    "CHECKPOINT_PREFIX",
    "CheckpointError",
    "list_checkpoints",
    "latest_checkpoint",
    "write_checkpoint_dir",
    "publish_checkpoint_dir",
    "rotate_checkpoints",
    "save_tensors",
    "load_tensors",
    "capture_rng_state",
    "restore_rng_state",
    "assign_parameters",
]

CHECKPOINT_PREFIX = "checkpoint-"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_PREFIX = ".tmp-checkpoint-"
PathLike = Union[str, os.PathLike]


def list_checkpoints(output_dir: PathLike) -> List[Tuple[int, Path]]:
    """Complete checkpoint folders in ``output_dir`` as ``(step, path)``, oldest first.

    Temporary folders of an interrupted save are never listed.

    Args:
        output_dir: a run's output folder.

    Returns:
        Sorted ``(step, folder)`` pairs; empty when the folder does not exist.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _CKPT_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: PathLike) -> Optional[Path]:
    """The checkpoint folder with the highest step in ``output_dir``, or ``None``."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def write_checkpoint_dir(output_dir: PathLike, step: int, write: Callable[[Path], None]) -> Path:
    """Create ``output_dir/checkpoint-<step>`` atomically.

    ``write(tmp)`` fills a temporary folder inside ``output_dir``; only when it returns is the
    folder renamed into place, so a crash mid-save leaves the previous checkpoints untouched and no
    half-written ``checkpoint-*`` folder. An existing folder for the same step is replaced.

    Args:
        output_dir: the run folder.
        step: the global step (names the folder).
        write: callback that writes every file into the folder it is given.

    Returns:
        The final checkpoint folder.
    """
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step}-", dir=root))
    try:
        write(tmp)
        return publish_checkpoint_dir(tmp, root, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def staging_dir(output_dir: PathLike, step: int, tag: str) -> Path:
    """A temporary folder name for a checkpoint that several processes fill (same path in each of them).

    :func:`remove_stale_temporaries` deletes it if the save never completed.
    """
    return Path(output_dir) / f"{_TMP_PREFIX}{step}-{tag}"


def publish_checkpoint_dir(tmp: PathLike, output_dir: PathLike, step: int) -> Path:
    """Rename a completely written folder to ``output_dir/checkpoint-<step>`` (replacing an existing one).

    Args:
        tmp: the filled temporary folder, inside ``output_dir``.
        output_dir: the run folder.
        step: the global step.

    Returns:
        The final checkpoint folder.
    """
    root = Path(output_dir)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    if final.exists():
        # A directory cannot be renamed over a non-empty one: move the old one aside first.
        old = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-{step}-", dir=root))
        os.replace(final, old / "x")
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def remove_stale_temporaries(output_dir: PathLike) -> None:
    """Delete temporary folders left by a save that was interrupted."""
    root = Path(output_dir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(_TMP_PREFIX) and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def rotate_checkpoints(output_dir: PathLike, save_total_limit: Optional[int],
                       best_checkpoint: Optional[PathLike] = None) -> List[Path]:
    """Delete the oldest checkpoints beyond ``save_total_limit``, never the newest or the best.

    Args:
        output_dir: the run folder.
        save_total_limit: how many checkpoints to keep; ``None`` keeps all. When the best is not the
            newest and the limit is 1, both are kept.
        best_checkpoint: folder of the best checkpoint so far (lowest eval loss), kept regardless.

    Returns:
        The folders that were deleted.
    """
    if save_total_limit is None:
        return []
    found = [p for _, p in list_checkpoints(output_dir)]
    if len(found) <= save_total_limit:
        return []
    newest = found[-1]
    best = Path(best_checkpoint).resolve() if best_checkpoint else None
    protected = {newest.resolve()}
    if best is not None:
        protected.add(best)
    keep_budget = max(save_total_limit, len(protected))
    # Keep the protected ones plus the newest others up to the budget; delete the rest.
    others = [p for p in found if p.resolve() not in protected]
    n_keep_others = max(0, keep_budget - len(protected))
    to_delete = others[: max(0, len(others) - n_keep_others)]
    for p in to_delete:
        shutil.rmtree(p)
    return to_delete


def save_tensors(path: PathLike, tensors: Mapping[str, Any], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write name -> tensor (MindSpore Tensor/Parameter or NumPy array) as one safetensors file.

    Args:
        path: destination file (written as given; call inside a temporary checkpoint folder).
        tensors: the tensors; MindSpore tensors are copied to NumPy.
        metadata: optional string metadata stored in the header.
    """
    from safetensors.numpy import save_file

    arrays = {}
    for name, t in tensors.items():
        arr = t.asnumpy() if hasattr(t, "asnumpy") else np.asarray(t)
        arrays[name] = np.ascontiguousarray(arr)
    save_file(arrays, os.fspath(path), metadata=metadata)


def load_tensors(path: PathLike) -> Dict[str, np.ndarray]:
    """Read a safetensors file into name -> NumPy array.

    Raises:
        CheckpointError: the file is missing or unreadable.
    """
    import mindspore  # noqa: F401  (registers NumPy's bfloat16 so bf16 tensors can be read)
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {os.fspath(path)!r} does not exist")
    try:
        with safe_open(os.fspath(path), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for corrupt headers
        raise CheckpointError(f"cannot read {os.fspath(path)!r}: {e}") from e


def capture_rng_state() -> Dict[str, Any]:
    """The states of Python's, NumPy's and MindSpore's global random generators (JSON-serialisable)."""
    import mindspore as ms

    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "mindspore": ms.get_rng_state().asnumpy().tolist(),
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    import mindspore as ms

    if "python" in state:
        v, inner, gauss = state["python"]
        random.setstate((v, tuple(inner), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "mindspore" in state:
        current = ms.get_rng_state()
        ms.set_rng_state(ms.Tensor(np.asarray(state["mindspore"], dtype=current.asnumpy().dtype)))


def write_json(path: PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON (inside a temporary checkpoint folder, so no extra rename)."""
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=str), encoding="utf-8")


def assign_parameters(pairs: List[Tuple[Any, Any]]) -> None:
    """Write values into Parameters so that already-compiled graphs see them.

    In MindSpore 2.10, once a compiled graph has updated a Parameter, ``Parameter.set_data`` only
    replaces the host copy: graphs keep reading their own buffer. An ``ops.assign`` inside a compiled
    graph writes that shared buffer, so checkpoint loading goes through one here.

    Args:
        pairs: ``(parameter, value)`` with values as MindSpore tensors or NumPy arrays of the
            parameter's shape (cast to its dtype).
    """
    import mindspore as ms
    from mindspore import ParameterTuple, Tensor, nn, ops

    if not pairs:
        return

    class _Assign(nn.Cell):
        def __init__(self, params):
            super().__init__(auto_prefix=False)
            self.targets = ParameterTuple(params)

        def construct(self, values):
            for p, v in zip(self.targets, values):
                ops.assign(p, v)
            return values[0]

    params = [p for p, _ in pairs]
    values = []
    for p, v in pairs:
        t = v if isinstance(v, Tensor) else Tensor(np.asarray(v))
        values.append(t.astype(p.dtype).reshape(p.shape))
    ms.jit(_Assign(params).construct)(tuple(values))
