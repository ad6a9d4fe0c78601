"""YAML run configs (model, data, training, parallel, generation sections) and the fine-tuning entry point behind ``qwen2ms finetune``.

A fine-tuning config::

    model:
      pretrained: Qwen/Qwen2-7B         # a local HF folder or hub id, or
      preset: qwen2-0.5b                # random weights of a released shape, or
      config: {hidden_size: 64, ...}    # an explicit (tiny) architecture; also overrides a preset
      dtype: float32                    # storage dtype ("float16" for precision fp16)
      seed: 0                           # seed of random weights
    data:
      train_file: alpaca.json           # alpaca / ShareGPT / messages JSON(L), tokenised JSONL, or .mindrecord
      eval_file: null
      tokenizer: null                   # folder or hub id; default: the model folder, else the built-in Qwen2 BPE
      seq_length: 4096
      packing: false                    # pack samples into seq_length rows (segment-masked attention)
      overflow: truncate                # or "drop" over-long samples
      only_last_turn: false
      max_samples: null
      pad_to_multiple_of: 8             # dynamic padding granularity (fewer shapes -> fewer compiles)
    training: {output_dir: runs/x, learning_rate: 1e-5, ...}   # TrainingArguments fields
    parallel: {data_parallel: 1, model_parallel: 1, pipeline_stage: 1, ...}   # qwen2ms.parallel.ParallelConfig

Relative input paths are resolved against the YAML file's folder; ``training.output_dir`` against
the working directory. A prediction config has ``model``,
``generation`` (GenerationConfig fields) and ``parallel`` sections.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import Qwen2msError

__all__ = ["RunConfig", "RunConfigError", "load_run_config", "build_model", "build_datasets", "run_finetune",
           "cli_msrun_command", "build_generation_model"]

_SECTIONS = ("model", "data", "training", "parallel", "generation")
# The types of the model and data keys, checked as strictly as the dataclass sections' fields.
_MODEL_TYPES: Dict[str, Any] = {"pretrained": Optional[str], "preset": Optional[str],
                                "config": Optional[Dict[str, Any]], "dtype": Optional[str], "seed": int,
                                "revision": Optional[str]}
_DATA_TYPES: Dict[str, Any] = {"train_file": Optional[str], "eval_file": Optional[str], "tokenizer": Optional[str],
                               "seq_length": int, "packing": bool, "overflow": Literal["truncate", "drop"],
                               "only_last_turn": bool, "max_samples": Optional[int], "pad_to_multiple_of": int,
                               "system_prompt": Optional[str], "eval_fraction": Optional[float]}
_MODEL_KEYS = tuple(_MODEL_TYPES)
_DATA_KEYS = tuple(_DATA_TYPES)
# Input paths are relative to the YAML file; training.output_dir, like HF's, to the working directory.
_PATH_KEYS = {"model": ("pretrained",), "data": ("train_file", "eval_file", "tokenizer")}
BUILTIN_TOKENIZER = "builtin"


class RunConfigError(Qwen2msError, ValueError):
    """A run config is malformed: the message names the file, section and key."""


def _check_keys(where: str, data: Dict[str, Any], allowed: Sequence[str]) -> None:
    unknown = [k for k in data if k not in allowed]
    if unknown:
        hints = {k: difflib.get_close_matches(str(k), allowed, n=1) for k in unknown}
        raise RunConfigError(f"{where}: unknown key(s) {unknown} (closest: {hints}); allowed: {list(allowed)}")


def _check_types(where: str, section: str, data: Dict[str, Any], types: Dict[str, Any]) -> None:
    """Every key of ``data`` that ``types`` knows must have that type (the message names the dotted key)."""
    from .typecheck import type_problem

    for key, value in data.items():
        if key in types:
            problem = type_problem(value, types[key])
            if problem:
                raise RunConfigError(f"{where}: {section}.{key}: {problem}")


def _check_values(where: str, model: Dict[str, Any], data: Dict[str, Any]) -> None:
    """Ranges of the model and data keys (their types are already checked)."""
    def bad(key: str, want: str) -> RunConfigError:
        section, name = key.split(".")
        value = (model if section == "model" else data)[name]
        return RunConfigError(f"{where}: {key}: {value!r} is invalid: {want}")

    if data.get("seq_length") is not None and data["seq_length"] < 2:
        raise bad("data.seq_length", "must be at least 2 (a prompt token and a trained token)")
    if data.get("pad_to_multiple_of") is not None and data["pad_to_multiple_of"] < 1:
        raise bad("data.pad_to_multiple_of", "must be an integer >= 1")
    if data.get("max_samples") is not None and data["max_samples"] < 1:
        raise bad("data.max_samples", "must be an integer >= 1, or null for every sample")
    if data.get("eval_fraction") is not None and not 0.0 <= data["eval_fraction"] < 1.0:
        raise bad("data.eval_fraction", "must be in [0, 1): the share of train_file held out for evaluation")
    for key in ("train_file", "eval_file", "tokenizer"):
        if data.get(key) == "":
            raise bad(f"data.{key}", "give a file path, or leave the key out")
    if model.get("seed") is not None and model["seed"] < 0:
        raise bad("model.seed", "must be an integer >= 0")
    if model.get("dtype") is not None:
        from ..dtypes import dtype_name

        try:
            dtype_name(model["dtype"])
        except ValueError:
            raise bad("model.dtype", "use float32, float16 or bfloat16") from None


@dataclass
class RunConfig:
    """A parsed run config: one dict per section, paths already resolved.

    Attributes:
        model, data, training, parallel, generation: the sections (empty dicts when absent).
        path: the YAML file it came from (None when built in code).
    """

    model: Dict[str, Any] = field(default_factory=dict)
    data: Dict[str, Any] = field(default_factory=dict)
    training: Dict[str, Any] = field(default_factory=dict)
    parallel: Dict[str, Any] = field(default_factory=dict)
    generation: Dict[str, Any] = field(default_factory=dict)
    path: Optional[str] = None

    def validate(self) -> None:
        """Check every section's keys and values (unknown keys, missing model source, bad layouts).

        Raises:
            RunConfigError: the first problem, naming the section and key.
        """
        from ..config import Qwen2Config
        from .arguments import TrainingArguments
        from .typecheck import field_types

        where = self.path or "run config"
        _check_keys(f"{where} [model]", self.model, _MODEL_KEYS)
        _check_keys(f"{where} [data]", self.data, _DATA_KEYS)
        _check_types(where, "model", self.model, _MODEL_TYPES)
        _check_types(where, "data", self.data, _DATA_TYPES)
        if isinstance(self.model.get("config"), dict):
            _check_types(where, "model.config", self.model["config"], field_types(Qwen2Config))
        _check_values(where, self.model, self.data)
        train_types = field_types(TrainingArguments)
        _check_keys(f"{where} [training]", self.training, tuple(train_types))
        train_types["resume_from_checkpoint"] = Optional[Union[str, bool]]
        _check_types(where, "training", self.training, train_types)
        if self.parallel:
            from ..parallel import ParallelConfig

            _check_types(where, "parallel", self.parallel, field_types(ParallelConfig))
        if self.generation:
            from ..generation import GenerationConfig

            gen_types = field_types(GenerationConfig)
            gen_types.pop("extra", None)
            _check_types(where, "generation", self.generation, gen_types)
        sources = [k for k in ("pretrained", "preset") if self.model.get(k)]
        if len(sources) > 1:
            raise RunConfigError(f"{where} [model]: give either 'pretrained' or 'preset', not both")
        if not sources and not self.model.get("config"):
            raise RunConfigError(f"{where} [model]: set 'pretrained' (HF folder or hub id), 'preset' (e.g. "
                                 "qwen2-0.5b) or 'config' (an architecture dict)")
        if self.model.get("config") is not None and not isinstance(self.model["config"], dict):
            raise RunConfigError(f"{where} [model] config: must be a mapping of Qwen2Config fields")
        if self.training:
            try:
                TrainingArguments.from_dict(self.training)
            except (TypeError, ValueError) as e:
                raise RunConfigError(f"{where} [training]: {e}") from e
        if self.parallel:
            try:
                from ..parallel import ParallelConfig

                ParallelConfig.from_dict(self.parallel)
            except ValueError as e:
                raise RunConfigError(f"{where} [parallel]: {e}") from e
        if self.generation:
            try:
                from ..generation import GenerationConfig

                GenerationConfig(**self.generation)
            except (TypeError, ValueError) as e:
                raise RunConfigError(f"{where} [generation]: {e}") from e

    def training_arguments(self, **overrides: Any):
        """The ``training`` section (plus ``overrides``) as :class:`TrainingArguments`."""
        from .arguments import TrainingArguments

        data = dict(self.training)
        data.update({k: v for k, v in overrides.items() if v is not None})
        if "output_dir" not in data:
            raise RunConfigError(f"{self.path or 'run config'} [training]: set output_dir")
        try:
            return TrainingArguments.from_dict(data)
        except (TypeError, ValueError) as e:
            raise RunConfigError(f"{self.path or 'run config'} [training]: {e}") from e


def _yaml_loader():
    """PyYAML's safe loader, reading ``1e-5`` and ``3E4`` as numbers (YAML 1.2) instead of strings (YAML 1.1).

    PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent, so ``learning_rate: 1e-5``
    would arrive as the string "1e-5" and be refused by the strict type check; every other YAML tool
    (and every training recipe) reads it as a float. Quoted values stay strings.
    """
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return Loader


def load_run_config(path: Union[str, os.PathLike]) -> RunConfig:
    """Read and validate a YAML run config.

    Args:
        path: the YAML file.

    Returns:
        The :class:`RunConfig`, with relative paths resolved against the file's folder.

    Raises:
        RunConfigError: unreadable YAML, unknown sections or keys, invalid values.

    Example:
        >>> run = load_run_config("examples/configs/finetune_qwen2_demo_tiny.yaml")  # doctest: +SKIP
        >>> run.training_arguments().max_steps  # doctest: +SKIP
        60
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise RunConfigError(f"run config {os.fspath(path)!r} does not exist")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_yaml_loader()) or {}
    except yaml.YAMLError as e:
        raise RunConfigError(f"{p}: not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise RunConfigError(f"{p}: not UTF-8 text (byte {e.start}); save the run config as UTF-8") from e
    if not isinstance(data, dict):
        raise RunConfigError(f"{p}: the top level must be a mapping with sections {list(_SECTIONS)}")
    _check_keys(str(p), data, _SECTIONS)
    sections: Dict[str, Dict[str, Any]] = {}
    for name in _SECTIONS:
        sec = data.get(name)
        sec = {} if sec is None else sec
        if not isinstance(sec, dict):
            raise RunConfigError(f"{p} [{name}]: must be a mapping of keys, got {type(sec).__name__} {sec!r}")
        sec = copy.deepcopy(sec)
        for key in _PATH_KEYS.get(name, ()):
            value = sec.get(key)
            if isinstance(value, str) and value and value != BUILTIN_TOKENIZER:
                sec[key] = _resolve(p.parent, value, may_be_hub_id=key in ("pretrained", "tokenizer"))
        sections[name] = sec
    run = RunConfig(path=str(p), **sections)
    run.validate()
    return run


def _resolve(base: Path, value: str, may_be_hub_id: bool) -> str:
    expanded = os.path.expanduser(value)
    if os.path.isabs(expanded):
        return expanded
    candidate = base / expanded
    # A hub id ("Qwen/Qwen2-7B") is kept as is when no such folder exists next to the config.
    if may_be_hub_id and not candidate.exists() and value.count("/") == 1 and not value.startswith("."):
        return value
    return str(candidate)


def build_model(run: RunConfig):
    """The model of the ``model`` section (loaded, or random from a preset / explicit config)."""
    from ..config import Qwen2Config
    from ..modeling import Qwen2ForCausalLM

    m = run.model
    dtype = m.get("dtype")
    if m.get("pretrained"):
        return Qwen2ForCausalLM.from_hf(m["pretrained"], dtype=dtype, revision=m.get("revision"))
    overrides = dict(m.get("config") or {})
    cfg = Qwen2Config.from_preset(m["preset"], **overrides) if m.get("preset") else Qwen2Config.from_dict(overrides)
    return Qwen2ForCausalLM(cfg, dtype=dtype, seed=int(m.get("seed", 0)))


def _load_tokenizer(run: RunConfig, model: Any):
    from ..tokenization import Qwen2Tokenizer, builtin_tokenizer

    tok = run.data.get("tokenizer")
    if tok == BUILTIN_TOKENIZER:
        return builtin_tokenizer()
    if tok:
        return Qwen2Tokenizer.from_pretrained(tok)
    if getattr(model, "tokenizer", None) is not None:
        return model.tokenizer
    if run.model.get("pretrained"):
        return Qwen2Tokenizer.from_pretrained(run.model["pretrained"])
    return builtin_tokenizer()


def _read_samples(path: str, run: RunConfig, model: Any) -> List[Dict[str, Any]]:
    from ..data import iter_mindrecord, load_records, load_samples_jsonl, pack_samples, tokenize_dataset

    d = run.data
    where = f"{run.path or 'run config'} [data]"
    if not os.path.exists(path):
        raise RunConfigError(f"{where}: file {path!r} does not exist")
    if os.path.isdir(path):
        raise RunConfigError(f"{where}: {path!r} is a folder; give a data file (JSON/JSONL records, tokenised JSONL "
                             f"or .mindrecord)")
    seq_length = int(d.get("seq_length", 4096))
    report = None
    if ".mindrecord" in os.path.basename(path):
        # Arrays, not lists: a ninth of the memory, and the Trainer's sample check runs vectorised on them.
        rows = [{k: np.array(v) for k, v in row.items()} for row in iter_mindrecord(path)]
    else:
        with open(path, encoding="utf-8-sig") as f:
            head = f.read(4096).lstrip()
        if head.startswith("{") and '"input_ids"' in head.split("\n", 1)[0]:
            rows = load_samples_jsonl(path)
        else:
            tok = _load_tokenizer(run, model)
            records = load_records(path)
            kwargs = {}
            if "system_prompt" in d:
                kwargs["system_prompt"] = d["system_prompt"]
            rows, report = tokenize_dataset(records, tok, seq_length=seq_length, overflow=d.get("overflow", "truncate"),
                                            only_last_turn=bool(d.get("only_last_turn", False)), **kwargs)
            if d.get("packing") and rows:
                pad = tok.pad_token_id if getattr(tok, "pad_token_id", None) is not None else 151643
                rows = [{k: v.tolist() for k, v in r.items()} for r in pack_samples(rows, seq_length, pad)]
    if d.get("max_samples"):
        rows = rows[: int(d["max_samples"])]
    if not rows:
        why = ""
        if report is not None:
            why = f" (seq_length={seq_length}, overflow={d.get('overflow', 'truncate')!r}):\n{report.summary()}"
            if report.dropped:
                why += "\nSamples are dropped when they are longer than seq_length (overflow: drop) or when "
                why += "truncation leaves no reply token: raise data.seq_length."
        raise RunConfigError(f"{where}: {path!r} gave no usable samples{why}")
    return rows


def build_datasets(run: RunConfig, model: Any) -> Tuple[List[Dict[str, Any]], Optional[List[Dict[str, Any]]]]:
    """Tokenised ``(train, eval)`` samples from the ``data`` section (eval None when not configured)."""
    d = run.data
    if not d.get("train_file"):
        raise RunConfigError(f"{run.path or 'run config'} [data]: set train_file")
    train = _read_samples(d["train_file"], run, model)
    evals = _read_samples(d["eval_file"], run, model) if d.get("eval_file") else None
    frac = float(d.get("eval_fraction") or 0.0)
    if evals is None and frac > 0:
        n_eval = max(1, int(len(train) * frac))
        if n_eval >= len(train):
            raise RunConfigError(f"{run.path or 'run config'} [data]: eval_fraction={frac} of {len(train)} sample(s) "
                                 f"leaves no training sample; add samples, or give an eval_file instead")
        train, evals = train[n_eval:], train[:n_eval]
    return train, evals


def cli_msrun_command(run: RunConfig, command: str, worker_num: int) -> str:
    """The one-node ``msrun`` command line that runs ``qwen2ms <command> --config <run config>`` on ``worker_num`` workers.

    msrun starts every worker (and its scheduler) with ``python <args>``, so the CLI runs as
    ``python -m qwen2ms.cli``; the ``python`` on ``PATH`` must be the one with qwen2ms installed.

    Args:
        run: the run config (its file path goes on the command line).
        command: the ``qwen2ms`` subcommand, e.g. "finetune".
        worker_num: processes to start (= the layout's world size).

    Returns:
        The command line as one string.

    Example:
        >>> cli_msrun_command(RunConfig(path="run.yaml"), "finetune", 2)
        'msrun --worker_num=2 --local_worker_num=2 --master_addr=127.0.0.1 --master_port=8118 --log_dir=output/msrun_log --join=True python -m qwen2ms.cli finetune --config run.yaml'
    """
    from ..parallel.launch import msrun_command

    script_args = ["-m", "qwen2ms.cli", command, "--config", run.path or "run.yaml"]
    return " ".join(msrun_command("python", script_args, worker_num=worker_num, log_dir="output/msrun_log"))


def _launch_layout(run: RunConfig, command: str = "finetune"):
    """The run's multi-device ParallelConfig with communication initialised, or None for a one-device run.

    Raises:
        RunConfigError: the layout asks for what ``command`` cannot run (for finetune LoRA, for
            generate pipeline stages or sequence parallel), the process was not started by msrun,
            or msrun started another number of workers.
    """
    if not run.parallel:
        return None
    from ..parallel import ParallelConfig, ParallelConfigError
    from ..parallel.launch import init_distributed, under_msrun
    from .trainer import check_parallel_layout

    pc = ParallelConfig.from_dict(run.parallel)
    n = pc.world_size
    if n == 1:
        return None
    where = f"{run.path or 'run config'} [parallel]"
    mp = pc.model_parallel
    if command == "finetune":
        try:
            check_parallel_layout(pc, int(run.training.get("lora_r") or 0))
        except ValueError as e:
            raise RunConfigError(f"{where}: {e}") from e
        pad = int(run.data.get("pad_to_multiple_of", 8))
        if pc.use_seq_parallel and mp > 1 and pad % mp:
            raise RunConfigError(f"{where}: use_seq_parallel splits every batch's sequence over model_parallel={mp} "
                                 f"ranks; set data.pad_to_multiple_of to a multiple of {mp} (it is {pad})")
    elif pc.pipeline_stage > 1 or (pc.use_seq_parallel and mp > 1):
        bad = f"pipeline_stage={pc.pipeline_stage}" if pc.pipeline_stage > 1 else "use_seq_parallel=true"
        raise RunConfigError(f"{where}: {bad}: generation runs tensor-parallel layouts (model_parallel, with "
                             f"data_parallel replicas); set pipeline_stage: 1 and use_seq_parallel: false")
    cmd = cli_msrun_command(run, command, n)
    if not under_msrun():
        raise RunConfigError(
            f"{where}: this layout needs {n} devices (data_parallel x model_parallel x pipeline_stage = "
            f"{pc.data_parallel} x {mp} x {pc.pipeline_stage}) but this process was not started by msrun. "
            f"Run one worker per device, e.g. on one node:\n  {cmd}\n(or set every degree to 1 for a "
            f"single-device run)")
    started = os.environ.get("MS_WORKER_NUM")
    if started is not None and started.isdigit() and int(started) != n:
        raise RunConfigError(f"{where}: msrun started {started} workers but this layout needs {n} "
                             f"(data_parallel x model_parallel x pipeline_stage); start it with --worker_num={n}:\n"
                             f"  {cmd}")
    try:
        init_distributed(pc)
    except ParallelConfigError as e:
        raise RunConfigError(f"{where}: {e}:\n  {cmd}") from e
    return pc


def build_generation_model(run: RunConfig, tokenizer: Optional[str] = None) -> Tuple[Any, int]:
    """The model of a prediction config with its tokenizer, cut for this rank when the ``parallel`` section asks.

    A layout of more than one device must run under ``msrun`` (:func:`cli_msrun_command` with
    "generate"): every rank then holds its tensor-parallel shard and generates the same tokens
    (the KV cache holds its heads); data-parallel replicas repeat the work.

    Args:
        run: a run config with a ``model`` section (and optionally ``parallel``, ``data.tokenizer``).
        tokenizer: a tokenizer folder or hub id that replaces the config's.

    Returns:
        ``(model, rank)``: a ``Qwen2ForCausalLM`` and 0, or this rank's
        :class:`~qwen2ms.parallel.apply.ParallelCausalLM` and its global rank.

    Raises:
        RunConfigError: a layout that generation cannot run, or a launch that does not match it.

    Example:
        >>> model, rank = build_generation_model(load_run_config("predict.yaml"))  # doctest: +SKIP
    """
    layout = _launch_layout(run, "generate")
    model = build_model(run)
    if tokenizer:
        from ..tokenization import Qwen2Tokenizer

        model.tokenizer = Qwen2Tokenizer.from_pretrained(tokenizer)
    else:
        model.tokenizer = _load_tokenizer(run, model)
    if layout is None:
        return model, 0
    from ..parallel import parallelize

    pm = parallelize(model, layout)
    return pm, pm.groups.rank


def run_finetune(config: Union[str, os.PathLike, RunConfig], **overrides: Any):
    """Fine-tune as a run config says: build the model and data, train, save the result.

    A ``parallel`` section with more than one device needs the job started by ``msrun`` with that
    many workers (:func:`cli_msrun_command` gives the line): every worker then initialises
    communication, builds the model, cuts its shard with :func:`qwen2ms.parallel.parallelize` and
    trains with the same :class:`Trainer` (data, tensor, sequence, expert and pipeline parallel).

    Args:
        config: a YAML path or a :class:`RunConfig`.
        overrides: TrainingArguments fields that replace the config's (``None`` values are ignored).

    Returns:
        ``(trainer, train_output)``.

    Example:
        >>> trainer, out = run_finetune("examples/configs/finetune_qwen2_demo_tiny.yaml", max_steps=10)  # doctest: +SKIP
    """
    from ..data import DataCollatorForSFT
    from .trainer import Trainer

    run = config if isinstance(config, RunConfig) else load_run_config(config)
    layout = _launch_layout(run)
    args = run.training_arguments(**overrides)
    model = build_model(run)
    train, evals = build_datasets(run, model)
    pad = getattr(model.config, "pad_token_id", None)
    if pad is None or pad >= model.config.vocab_size:
        pad = 151643 if model.config.vocab_size > 151643 else 0
    collator = DataCollatorForSFT(pad_token_id=int(pad), pad_to_multiple_of=int(run.data.get("pad_to_multiple_of", 8)))
    if layout is not None:
        from ..parallel import parallelize

        model = parallelize(model, layout)
    trainer = Trainer(model, args, train_dataset=train, eval_dataset=evals, data_collator=collator)
    out = trainer.train()
    trainer.save_model(os.path.join(args.output_dir, "final"))
    return trainer, out
