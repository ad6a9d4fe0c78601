"""Qwen2 / Qwen2-MoE models, RoPE, the static KV cache and int8/int4 weight quantization (checkpoint I/O: qwen2ms.checkpoint)."""
from .cache import KVCache
from .model import CausalLMOutput, Qwen2ForCausalLM, Qwen2Model
from .quantize import quantize_int8_weights, quantize_weights, set_activations

__all__ = ["KVCache", "CausalLMOutput", "Qwen2ForCausalLM", "Qwen2Model", "quantize_int8_weights", "quantize_weights",
           "set_activations"]
