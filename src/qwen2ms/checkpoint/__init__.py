"""Checkpoint formats: GGUF files (llama.cpp's format) read into Qwen2ForCausalLM or converted to HF folders."""
from .gguf import convert_gguf, load_gguf

__all__ = ["load_gguf", "convert_gguf"]
