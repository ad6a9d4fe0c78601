"""SFT data: alpaca/ShareGPT conversion, loss-masked tokenisation, packing, padding, MindRecord and JSONL I/O."""
from .collate import DataCollatorForSFT, iter_batches
from .convert import (
    DEFAULT_SYSTEM_PROMPT,
    ConversionReport,
    DataFormatError,
    convert_file,
    convert_records,
    load_records,
    record_to_messages,
    write_messages_jsonl,
)
from .jsonl import load_samples_jsonl, save_samples_jsonl
from .mindrecord import iter_mindrecord, read_mindrecord, write_mindrecord
from .packing import pack_samples, plan_bins
from .pipeline import pad_samples, preprocess_file
from .sft import (
    IGNORE_INDEX,
    PreprocessReport,
    TemplateMismatchError,
    fit_to_length,
    tokenize_conversation,
    tokenize_dataset,
)
from .validate import DatasetStats, SampleError, UntrainedDatasetError, check_samples

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "IGNORE_INDEX",
    "ConversionReport",
    "DatasetStats",
    "DataCollatorForSFT",
    "DataFormatError",
    "PreprocessReport",
    "SampleError",
    "TemplateMismatchError",
    "UntrainedDatasetError",
    "check_samples",
    "convert_file",
    "convert_records",
    "fit_to_length",
    "iter_batches",
    "iter_mindrecord",
    "load_records",
    "load_samples_jsonl",
    "pack_samples",
    "pad_samples",
    "plan_bins",
    "preprocess_file",
    "read_mindrecord",
    "record_to_messages",
    "save_samples_jsonl",
    "tokenize_conversation",
    "tokenize_dataset",
    "write_messages_jsonl",
]
