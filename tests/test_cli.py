"""The `qwen2ms` command line: the demo (the README's main job) and argument errors."""
import subprocess
import sys
from pathlib import Path

import pytest

from qwen2ms.cli import build_parser, main
from qwen2ms.demo import demo_model, demo_tokenizer


def test_demo_formats_the_prompt_with_the_real_vocabulary(capsys):
    assert main(["demo", "--prompt", "Hello world", "--steps", "0", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>user\nHello world<|im_end|>" in out
    # Qwen2 ids: <|im_start|>=151644, "Hello world" = [9707, 1879], <|im_end|>=151645
    assert "151644, 872, 198, 9707, 1879, 151645" in out
    assert "decode(ids) == prompt: True" in out


def test_demo_tokenizer_is_qwen2_not_the_later_qwen_config():
    tok = demo_tokenizer()
    assert len(tok) == 151646 and tok.eos_token_id == 151645
    assert tok.encode("<think>") != [151667]  # a later Qwen's added token is plain text for Qwen2


def test_demo_with_a_tokenizer_folder(qwen2_tokenizer_dir, capsys):
    assert main(["demo", "--tokenizer", str(qwen2_tokenizer_dir), "--steps", "0", "--max-new-tokens", "2"]) == 0
    assert str(qwen2_tokenizer_dir) in capsys.readouterr().out


def test_demo_fine_tunes_then_chats(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["demo", "--steps", "6", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "finetune: 6 steps, loss" in out and "[3/3] chat reply" in out
    losses = [float(x) for x in out.split("loss ")[1].split(";")[0].split(" -> ")]
    assert losses[-1] < losses[0]  # the loss falls
    assert "train" in captured.err and "6/6" in captured.err  # a progress bar, as `finetune` shows
    run = tmp_path / "cache" / "qwen2ms" / "demo"
    assert str(run) in out  # says where it writes
    assert list(work.iterdir()) == []  # nothing lands in the working folder (it used to write runs/)
    assert (run / "final" / "config.json").is_file()
    assert (run / "final" / "vocab.json").is_file()  # `qwen2ms chat DIR` needs the tokenizer


@pytest.mark.slow
def test_demo_model_says_what_it_learned(tmp_path, capsys):
    from qwen2ms.demo import DEMO_PROMPT, DEMO_RECORDS

    assert DEMO_PROMPT == DEMO_RECORDS[0]["instruction"]
    assert main(["demo", "--output-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    reply = capsys.readouterr().out.split("new tokens):\n", 1)[1]
    assert reply.strip() == DEMO_RECORDS[0]["output"] == "The capital of France is Paris."


def test_demo_records_come_from_the_bundled_sample_and_the_readme_says_what_to_expect():
    import json
    from pathlib import Path

    from qwen2ms.demo import DEMO_RECORDS

    root = Path(__file__).resolve().parent.parent
    sample = json.loads((root / "examples" / "data" / "alpaca_sample.json").read_text(encoding="utf-8"))
    for record in DEMO_RECORDS:
        assert record in sample
    readme = (root / "README.md").read_text(encoding="utf-8")
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    assert DEMO_RECORDS[0]["output"] in setup and "finetune_qwen2_demo_tiny.yaml" in setup


def test_default_demo_folder_is_in_the_user_cache(monkeypatch, tmp_path):
    from qwen2ms.demo import default_demo_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_demo_dir() == tmp_path / "qwen2ms" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_demo_dir() == Path.home() / ".cache" / "qwen2ms" / "demo"


def test_unknown_subcommand_is_an_argparse_error():
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["no-such-command"])
    assert e.value.code == 2


def test_console_script_module_runs():
    r = subprocess.run([sys.executable, "-m", "qwen2ms.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "demo" in r.stdout


def test_fit_history_drops_oldest_turns_first_and_keeps_the_system_prompt():
    from qwen2ms.cli import fit_history

    tok = demo_tokenizer()
    msgs = [{"role": "system", "content": "Be brief."}]
    for i in range(4):
        msgs += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": f"answer {i} " * 5}]
    msgs.append({"role": "user", "content": "last question"})
    full = len(tok.apply_chat_template(msgs, add_generation_prompt=True))
    assert fit_history(tok, msgs, full) == msgs
    kept = fit_history(tok, msgs, full - 1)
    assert kept[0] == msgs[0] and kept[1:] == msgs[3:]  # the oldest pair went first
    only_last = fit_history(tok, msgs, len(tok.apply_chat_template([msgs[0], msgs[-1]], add_generation_prompt=True)))
    assert only_last == [msgs[0], msgs[-1]]
    with pytest.raises(ValueError, match="more than the 5 the context leaves"):
        fit_history(tok, msgs, 5)


def test_chat_loop_clear_exit_and_history(capsys):
    from qwen2ms.cli import chat_loop

    model = demo_model()
    lines = iter(["Hello there", "/clear", "你好", "", "/exit", "never read"])
    notes = []
    history = chat_loop(model, "Be brief.", {"max_new_tokens": 3, "do_sample": False}, 256,
                        read=lambda prompt: next(lines), write=notes.append)
    assert notes == ["(history cleared)"]
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[1]["content"] == "你好"
    # the streamed reply is exactly the reply kept in the history
    assert history[2]["content"] in capsys.readouterr().out
    assert next(lines) == "never read"


def test_generate_command_streams_the_demo_model(capsys):
    assert main(["generate", "--prompt", "Plan a trip", "--max-new-tokens", "4", "--greedy"]) == 0
    out = capsys.readouterr().out
    model = demo_model()
    assert out.rstrip("\n") == model.generate("Plan a trip", max_new_tokens=4, do_sample=False)


def test_generate_command_names_a_missing_model(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "no_such_model"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qwen2ms generate: error: ") and "no_such_model" in err and err.count("\n") == 1


def test_run_config_builtin_tokenizer_is_qwen2():
    from pathlib import Path

    from qwen2ms.training.run_config import _load_tokenizer, load_run_config

    run = load_run_config(Path(__file__).parent.parent / "examples" / "configs" / "finetune_qwen2_demo_tiny.yaml")
    assert run.data["tokenizer"] == "builtin"
    tok = _load_tokenizer(run, model=None)
    assert len(tok) == 151646 and tok.chat_template == demo_tokenizer().chat_template


def test_serve_passes_the_prefill_budget_to_the_engine_and_rejects_zero(capsys):
    from qwen2ms.cli import _engine_kwargs

    args = build_parser().parse_args(["serve", "some/model", "--max-num-batched-tokens", "64"])
    assert _engine_kwargs(args, 128)["max_num_batched_tokens"] == 64
    assert "max_num_batched_tokens" not in _engine_kwargs(build_parser().parse_args(["serve", "m"]), 128)  # default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m", "--max-num-batched-tokens", "0"])
    assert "--max-num-batched-tokens: must be an integer >= 1, got 0" in capsys.readouterr().err
