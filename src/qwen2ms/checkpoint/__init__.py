"""Checkpoint formats for Qwen2ForCausalLM: HF safetensors, MindSpore ckpt, MindFormers names, GGUF, and conversion.

``hf`` (the interchange format: config.json + safetensors), ``mindspore`` (``.ckpt`` and MindSpore-flavoured
safetensors), ``mindformers`` (the upstream parameter names, one rename table), ``convert`` (streaming
HF <-> MindSpore conversion, ``qwen2ms convert``) and ``gguf`` (llama.cpp's files). The model's
``from_hf``/``save_pretrained``/``save_checkpoint``/``from_checkpoint``/``from_gguf`` call these; this
package imports :mod:`qwen2ms.modeling`, never the reverse at import time.
"""
# The function convert stays in its module (qwen2ms.checkpoint.convert.convert): bound here under the same
# name it would hide the submodule from `import qwen2ms.checkpoint.convert` and monkeypatching.
from .convert import ConvertError
from .gguf import convert_gguf, load_gguf
from .hf import CheckpointError, load_hf, save_hf
from .mindformers import CheckpointNamingError
from .mindspore import MSCheckpointError, load_ms_checkpoint, load_ms_model, save_ms_checkpoint

__all__ = ["CheckpointError", "CheckpointNamingError", "ConvertError", "MSCheckpointError", "convert_gguf",
           "load_gguf", "load_hf", "load_ms_checkpoint", "load_ms_model", "save_hf", "save_ms_checkpoint"]
