"""Resolve a local folder or a Hugging Face hub repo id to a local folder, with offline errors that say what to do."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence, Union

from .errors import Qwen2msError

__all__ = ["HubError", "resolve_pretrained", "atomic_write_bytes", "atomic_write_text"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class HubError(Qwen2msError, OSError):
    """A model or tokenizer location could not be resolved to a local folder."""


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_pretrained(
    path_or_repo_id: Union[str, os.PathLike],
    allow_patterns: Optional[Sequence[str]] = None,
    revision: Optional[str] = None,
) -> Path:
    """Return a local folder holding ``path_or_repo_id``'s files.

    Args:
        path_or_repo_id: a local folder, or a hub repo id such as ``"Qwen/Qwen2-0.5B-Instruct"``.
        allow_patterns: file globs to fetch from the hub (only these are downloaded).
        revision: a hub branch, tag or commit; ignored for local folders.

    Returns:
        The folder as a :class:`pathlib.Path`.

    Raises:
        HubError: the folder does not exist and the id cannot be fetched (offline, unreachable,
            unknown repo); the message names the input and says how to pass a local folder.

    Example:
        >>> resolve_pretrained("/models/Qwen2-0.5B-Instruct")  # doctest: +SKIP
    """
    text = os.fspath(path_or_repo_id)
    if not text.strip():
        # Path("") is the working folder: an empty argument must not silently load whatever is there
        raise HubError("the model/tokenizer location is empty; pass a folder or a hub repo id such as "
                       "'Qwen/Qwen2-0.5B-Instruct'")
    local = Path(text).expanduser()
    if local.is_dir():
        return local
    if local.exists():
        raise HubError(f"{text!r} is a file; pass the folder that contains it instead.")
    if text.startswith((".", "/", "~")) or not _REPO_ID.match(text):
        raise HubError(
            f"{text!r} is neither an existing folder nor a hub repo id of the form 'owner/name' "
            "(for example 'Qwen/Qwen2-0.5B-Instruct'). Check the path."
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - huggingface-hub is a hard dependency
        raise HubError("huggingface-hub is not installed; pip install huggingface-hub") from e
    how = (
        f"Download it on a machine with internet access (for example `huggingface-cli download {text} "
        f"--local-dir ./{text.split('/')[-1]}`) and pass that local folder instead."
    )
    try:
        folder = snapshot_download(
            repo_id=text,
            revision=revision,
            allow_patterns=list(allow_patterns) if allow_patterns else None,
            local_files_only=_offline_env(),
        )
    except Exception as e:  # the hub raises many different types for offline / unreachable / unknown
        reason = "HF_HUB_OFFLINE is set and the files are not in the local cache" if _offline_env() else (
            f"the hub could not be reached or has no such repo ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        )
        raise HubError(f"Could not fetch {text!r} from the Hugging Face hub: {reason}. {how}") from e
    return Path(folder)


def atomic_write_bytes(path: Union[str, os.PathLike], data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Union[str, os.PathLike], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))
