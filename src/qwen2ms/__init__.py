"""qwen2ms: the Qwen2 LLM family (dense and MoE) on MindSpore — tokenizer, HF checkpoints, generation, fine-tuning."""
from .config import PRESETS, ConfigError, Qwen2Config
from .hub import HubError
from .generation import GenerationConfig, GenerationConfigError, TextStreamer

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Qwen2Config",
    "PRESETS",
    "ConfigError",
    "HubError",
    "GenerationConfig",
    "GenerationConfigError",
    "TextStreamer",
]
