"""Qwen2 tokenisation: byte-level BPE, the Qwen2Tokenizer, sandboxed chat templates and streaming detokenisation."""
from .bpe import ByteLevelBPE, TokenizerError
from .builtin import builtin_bpe_dir, builtin_tokenizer
from .chat_template import QWEN2_CHAT_TEMPLATE, ChatTemplateLimitError, render_chat_template
from .streaming import IncrementalDetokenizer
from .tokenizer import AddedToken, BatchEncoding, Qwen2Tokenizer

__all__ = [
    "builtin_tokenizer",
    "builtin_bpe_dir",
    "Qwen2Tokenizer",
    "TokenizerError",
    "ChatTemplateLimitError",
    "IncrementalDetokenizer",
    "BatchEncoding",
    "AddedToken",
    "ByteLevelBPE",
    "QWEN2_CHAT_TEMPLATE",
    "render_chat_template",
]
