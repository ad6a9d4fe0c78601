"""Qwen2 tokenisation: byte-level BPE, the Qwen2Tokenizer, sandboxed chat templates and streaming detokenisation."""
from .bpe import ByteLevelBPE, TokenizerError
from .chat_template import QWEN2_CHAT_TEMPLATE, render_chat_template
from .streaming import IncrementalDetokenizer
from .tokenizer import AddedToken, BatchEncoding, Qwen2Tokenizer

__all__ = [
    "Qwen2Tokenizer",
    "TokenizerError",
    "IncrementalDetokenizer",
    "BatchEncoding",
    "AddedToken",
    "ByteLevelBPE",
    "QWEN2_CHAT_TEMPLATE",
    "render_chat_template",
]
