"""The built-in demo: the real Qwen2 tokenizer, a tiny random-weight Qwen2 and the fine-tune behind ``qwen2ms demo``."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["demo_tokenizer", "demo_model", "demo_finetune", "default_demo_dir", "DEMO_MODEL_CONFIG", "DEMO_RECORDS",
           "DEMO_PROMPT", "DEMO_STEPS"]

#: The built-in demo model: Qwen2's real vocabulary over a tiny random-weight body.
DEMO_MODEL_CONFIG = dict(
    vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1000000.0,
    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
)

#: What the demo fine-tunes on: four records of ``examples/data/alpaca_sample.json`` (kept here so that
#: the demo also runs from an installed wheel). A model this small learns a narrow task by heart, so
#: its greedy reply to one of these instructions is the trained answer.
DEMO_RECORDS: List[Dict[str, str]] = [
    {"instruction": "What is the capital of France?", "input": "", "output": "The capital of France is Paris."},
    {"instruction": "Name the largest planet in the Solar System.", "input": "",
     "output": "Jupiter is the largest planet in the Solar System."},
    {"instruction": "中国的首都是哪里？", "input": "", "output": "中国的首都是北京。"},
    {"instruction": "Rewrite the sentence in the passive voice.", "input": "The cat chased the mouse.",
     "output": "The mouse was chased by the cat."},
]

#: The demo's question: one of :data:`DEMO_RECORDS`' instructions.
DEMO_PROMPT = DEMO_RECORDS[0]["instruction"]
#: Fine-tuning steps of ``qwen2ms demo`` (each one a batch of every record).
DEMO_STEPS = 60


def demo_tokenizer(folder: Optional[str] = None):
    """A Qwen2-Instruct tokenizer: ``folder`` (a folder or hub id) if given, else the built-in one over
    the real Qwen2 BPE (see :func:`qwen2ms.tokenization.builtin_tokenizer`; ``"builtin"`` names it too)."""
    from .tokenization import Qwen2Tokenizer, builtin_tokenizer

    return Qwen2Tokenizer.from_pretrained(folder) if folder and folder != "builtin" else builtin_tokenizer()


def demo_model(seed: int = 0, dtype: Optional[str] = None):
    """A tiny random-weight Qwen2 with the real Qwen2 vocabulary and tokenizer attached (a demo only).

    Args:
        seed: seeds the random weights.
        dtype: weight dtype ("float32", "float16" or "bfloat16"; default float32).
    """
    from .config import Qwen2Config
    from .modeling import Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(**DEMO_MODEL_CONFIG), seed=seed, dtype=dtype)
    model.tokenizer = demo_tokenizer()
    return model


def default_demo_dir() -> Path:
    """Where ``qwen2ms demo`` writes its fine-tune: ``$XDG_CACHE_HOME/qwen2ms/demo`` (``~/.cache/qwen2ms/demo``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "qwen2ms" / "demo"


def demo_finetune(output_dir: Optional[os.PathLike] = None, steps: int = DEMO_STEPS, tokenizer: Optional[str] = None,
                  progress: bool = True) -> Tuple[Any, Any, Path]:
    """Fine-tune :func:`demo_model`'s architecture on :data:`DEMO_RECORDS` (full batches, fp32).

    Args:
        output_dir: the run folder (``log.jsonl``, ``final/``); default :func:`default_demo_dir`,
            whose previous run is removed first.
        steps: optimizer steps; 60 take about a minute on 2 CPU cores and make the greedy reply to
            every trained instruction its trained answer.
        tokenizer: a tokenizer folder; default the built-in Qwen2 one.
        progress: show a progress bar.

    Returns:
        ``(trainer, train_output, final_dir)``; ``final_dir`` holds the model and its tokenizer
        (``qwen2ms chat final_dir`` talks to it).

    Example:
        >>> trainer, out, final = demo_finetune(steps=60)  # doctest: +SKIP
    """
    from .hub import atomic_write_text
    from .training.run_config import BUILTIN_TOKENIZER, RunConfig, run_finetune

    if output_dir is None:
        out = default_demo_dir()
        if out.is_dir():
            shutil.rmtree(out)  # the demo's own cache folder: a rerun starts from scratch, not from its log
    else:
        out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "demo_records.json"
    atomic_write_text(data, json.dumps(DEMO_RECORDS, ensure_ascii=False, indent=1) + "\n")
    model_cfg = dict(DEMO_MODEL_CONFIG, max_position_embeddings=512)
    run = RunConfig(
        model={"config": model_cfg, "dtype": "float32", "seed": 0},
        data={"train_file": str(data), "tokenizer": tokenizer or BUILTIN_TOKENIZER, "seq_length": 64,
              "overflow": "drop", "pad_to_multiple_of": 8},
        training={"output_dir": str(out), "precision": "fp32", "learning_rate": 1e-2, "lr_scheduler_type": "cosine",
                  "warmup_steps": 5, "max_steps": int(steps), "per_device_train_batch_size": len(DEMO_RECORDS),
                  "logging_steps": 5, "save_steps": 0, "seed": 0, "disable_tqdm": not progress},
        path="qwen2ms demo",
    )
    run.validate()
    trainer, result = run_finetune(run)
    final = out / "final"
    demo_tokenizer(tokenizer).save_pretrained(final)
    trainer.model.tokenizer = demo_tokenizer(tokenizer)
    return trainer, result, final
