"""qwen2ms: the Qwen2 LLM family (dense and MoE) on MindSpore — tokenizer, HF checkpoints, generation, fine-tuning."""
from typing import TYPE_CHECKING

# The public names load on first use (PEP 562): `import qwen2ms.cli` (the console script, `--help`) then
# costs no MindSpore import (~2 s), and the CLI can quiet MindSpore's logging before MindSpore loads.
_EXPORTS = {
    ".errors": ("Qwen2msError",),
    ".config": ("PRESETS", "ConfigError", "Qwen2Config"),
    ".hub": ("HubError",),
    ".modeling": ("CausalLMOutput", "KVCache", "Qwen2ForCausalLM", "Qwen2Model", "quantize_int8_weights",
                  "quantize_weights", "set_activations"),
    ".checkpoint": ("CheckpointError",),
    ".tokenization": ("IncrementalDetokenizer", "Qwen2Tokenizer", "TokenizerError"),
    ".generation": ("GenerationConfig", "GenerationConfigError", "TextStreamer"),
    ".data": ("ConversionReport", "DataCollatorForSFT", "DataFormatError", "PreprocessReport", "TemplateMismatchError",
              "convert_file", "load_records", "load_samples_jsonl", "pack_samples", "preprocess_file", "read_mindrecord",
              "record_to_messages", "save_samples_jsonl", "tokenize_conversation", "tokenize_dataset",
              "write_mindrecord"),
    ".training": ("AdamW", "LoraConfig", "NonFiniteLossError", "RunConfigError", "Trainer", "TrainerCallback",
                  "TrainerState", "TrainingArguments", "TrainOutput", "apply_lora", "get_scheduler", "load_adapter",
                  "load_run_config", "merge_and_unload", "run_finetune", "save_adapter"),
    ".serving": ("LLM", "CompletionOutput", "LLMEngine", "RequestError", "RequestOutput", "SamplingParams",
                 "SamplingParamsError"),
    ".demo": ("demo_model", "demo_tokenizer"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
_SUBPACKAGES = ("checkpoint", "cli", "config", "data", "demo", "dtypes", "errors", "generation", "hub", "modeling",
                "ops", "parallel", "serving", "tokenization", "training")


def __getattr__(name: str):
    import importlib

    if name in _SUBPACKAGES:  # `import qwen2ms; qwen2ms.modeling...` worked when everything loaded eagerly
        return importlib.import_module(f".{name}", __name__)
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'qwen2ms' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))


if TYPE_CHECKING:  # static analysers read the names from here
    from .errors import Qwen2msError
    from .config import PRESETS, ConfigError, Qwen2Config
    from .hub import HubError
    from .modeling import (CausalLMOutput, KVCache, Qwen2ForCausalLM, Qwen2Model, quantize_int8_weights,
                           quantize_weights, set_activations)
    from .checkpoint import CheckpointError
    from .tokenization import IncrementalDetokenizer, Qwen2Tokenizer, TokenizerError
    from .generation import GenerationConfig, GenerationConfigError, TextStreamer
    from .data import (
        ConversionReport,
        DataCollatorForSFT,
        DataFormatError,
        PreprocessReport,
        TemplateMismatchError,
        convert_file,
        load_records,
        load_samples_jsonl,
        pack_samples,
        preprocess_file,
        read_mindrecord,
        record_to_messages,
        save_samples_jsonl,
        tokenize_conversation,
        tokenize_dataset,
        write_mindrecord,
    )
    from .training import (
        AdamW,
        LoraConfig,
        NonFiniteLossError,
        RunConfigError,
        Trainer,
        TrainerCallback,
        TrainerState,
        TrainingArguments,
        TrainOutput,
        apply_lora,
        get_scheduler,
        load_adapter,
        load_run_config,
        merge_and_unload,
        run_finetune,
        save_adapter,
    )
    from .serving import (LLM, CompletionOutput, LLMEngine, RequestError, RequestOutput, SamplingParams,
                          SamplingParamsError)
    from .demo import demo_model, demo_tokenizer

__version__ = "0.1.0"

__all__ = ["__version__", *_WHERE]
