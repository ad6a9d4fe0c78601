"""The base of every error qwen2ms raises on purpose, and the checkpoint error that several layers share.

Every library error derives from :class:`Qwen2msError`, so ``except qwen2ms.Qwen2msError`` catches all of
them; each also keeps the built-in base that says what kind of problem it is (``ValueError`` for a bad
argument, file or config; ``OSError`` for the hub; ``RuntimeError`` for a failed build or run), so code that
catches those keeps working.

Example:
    >>> from qwen2ms.errors import CheckpointError, Qwen2msError
    >>> issubclass(CheckpointError, Qwen2msError) and issubclass(CheckpointError, ValueError)
    True
"""

__all__ = ["Qwen2msError", "CheckpointError"]


class Qwen2msError(Exception):
    """Base class of every error qwen2ms raises on purpose; the message names the input and the fix."""


class CheckpointError(Qwen2msError, ValueError):
    """A checkpoint (HF, MindSpore, MindFormers, GGUF or a trainer checkpoint folder) cannot be read,
    written, or fitted to the model; the message says which file and why."""
