"""Supervised fine-tuning: TrainingArguments, the compiled Trainer, AdamW and schedules, checkpoints, LoRA."""
from .arguments import TrainingArguments
from .callbacks import CallbackHandler, JsonlLoggerCallback, ProgressCallback, TrainerCallback, TrainerState
from .checkpointing import CheckpointError, latest_checkpoint, list_checkpoints, rotate_checkpoints
from .lora import LoraConfig, LoraLinear, apply_lora, load_adapter, lora_modules, merge_and_unload, save_adapter
from .loss_scale import DynamicLossScale
from .optim import AdamW, LRSchedule, decay_parameter_names, get_scheduler
from .run_config import RunConfig, RunConfigError, load_run_config, run_finetune
from .trainer import NonFiniteLossError, SFTDataLoader, Trainer, TrainOutput

__all__ = [
    "AdamW",
    "CallbackHandler",
    "CheckpointError",
    "DynamicLossScale",
    "JsonlLoggerCallback",
    "LRSchedule",
    "LoraConfig",
    "LoraLinear",
    "NonFiniteLossError",
    "ProgressCallback",
    "RunConfig",
    "RunConfigError",
    "SFTDataLoader",
    "TrainOutput",
    "Trainer",
    "TrainerCallback",
    "TrainerState",
    "TrainingArguments",
    "apply_lora",
    "decay_parameter_names",
    "get_scheduler",
    "latest_checkpoint",
    "list_checkpoints",
    "load_run_config",
    "load_adapter",
    "lora_modules",
    "merge_and_unload",
    "rotate_checkpoints",
    "run_finetune",
    "save_adapter",
]
