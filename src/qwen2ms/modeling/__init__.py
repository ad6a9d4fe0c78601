"""Qwen2 / Qwen2-MoE models, RoPE, the static KV cache and Hugging Face checkpoint I/O."""
from .cache import KVCache
from .checkpoint import CheckpointError, load_hf, save_hf
from .model import CausalLMOutput, Qwen2ForCausalLM, Qwen2Model
from .quantize import quantize_int8_weights

__all__ = ["KVCache", "CheckpointError", "load_hf", "save_hf", "CausalLMOutput", "Qwen2ForCausalLM", "Qwen2Model",
           "quantize_int8_weights"]
