"""A multi-turn chat in a few lines: the history is your own list of messages.

    python examples/chat.py /models/Qwen2-0.5B-Instruct
    python examples/chat.py            # the tiny demo model (random weights: replies are noise)
"""
import os
import sys

os.environ.setdefault("GLOG_v", "3")

from qwen2ms import Qwen2ForCausalLM, TextStreamer, demo_model


def main() -> None:
    model = Qwen2ForCausalLM.from_hf(sys.argv[1]) if len(sys.argv) > 1 else demo_model()
    history = [{"role": "system", "content": "You are a helpful assistant."}]
    for question in ["Plan a two-day trip to Shanghai.", "Make it cheaper."]:
        history.append({"role": "user", "content": question})
        print(f"user> {question}\nassistant> ", end="", flush=True)
        reply = model.chat(history, max_new_tokens=48, streamer=TextStreamer())
        history.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    main()
