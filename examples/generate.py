"""Generate text with a Qwen2 checkpoint (or the built-in tiny demo model), streaming to the terminal.

    python examples/generate.py                                   # demo model: random weights, output is noise
    python examples/generate.py /models/Qwen2-0.5B-Instruct --prompt "Plan a trip to Shanghai"
"""
import argparse
import os

os.environ.setdefault("GLOG_v", "3")

from qwen2ms import Qwen2ForCausalLM, TextStreamer, demo_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None, help="checkpoint folder or hub id (default: demo model)")
    ap.add_argument("--prompt", default="Plan a trip to Shanghai")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    model = demo_model() if args.model is None else Qwen2ForCausalLM.from_hf(args.model)
    # A single prompt string returns the completion string; a list of strings returns a list.
    model.chat([{"role": "user", "content": args.prompt}], max_new_tokens=args.max_new_tokens,
               streamer=TextStreamer())
    batch = model.generate(["The capital of France is", "1, 2, 3,"], max_new_tokens=8, do_sample=False)
    for completion in batch:
        print(repr(completion))


if __name__ == "__main__":
    main()
