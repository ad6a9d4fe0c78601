"""qwen2ms: the Qwen2 LLM family (dense and MoE) on MindSpore — tokenizer, HF checkpoints, generation, fine-tuning."""
from .config import PRESETS, ConfigError, Qwen2Config
from .hub import HubError
from .modeling import CausalLMOutput, CheckpointError, KVCache, Qwen2ForCausalLM, Qwen2Model
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

from .cli import demo_model, demo_tokenizer

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "demo_model",
    "demo_tokenizer",
    "Qwen2Config",
    "PRESETS",
    "ConfigError",
    "HubError",
    "Qwen2Model",
    "Qwen2ForCausalLM",
    "CausalLMOutput",
    "KVCache",
    "CheckpointError",
    "Qwen2Tokenizer",
    "TokenizerError",
    "IncrementalDetokenizer",
    "GenerationConfig",
    "GenerationConfigError",
    "TextStreamer",
    "ConversionReport",
    "DataCollatorForSFT",
    "DataFormatError",
    "PreprocessReport",
    "TemplateMismatchError",
    "convert_file",
    "load_records",
    "load_samples_jsonl",
    "pack_samples",
    "preprocess_file",
    "read_mindrecord",
    "record_to_messages",
    "save_samples_jsonl",
    "tokenize_conversation",
    "tokenize_dataset",
    "write_mindrecord",
]
__all__ += [
    "AdamW", "LoraConfig", "NonFiniteLossError", "RunConfigError", "Trainer", "TrainerCallback", "TrainerState",
    "TrainingArguments", "TrainOutput", "apply_lora", "get_scheduler", "load_adapter", "load_run_config",
    "merge_and_unload", "run_finetune", "save_adapter",
]
