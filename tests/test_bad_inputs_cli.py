"""Hostile command lines: a user mistake is one `qwen2ms CMD: error: ...` line and exit code 2, never a traceback."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen2ms import cli
from qwen2ms.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "examples" / "data" / "alpaca_sample.json"
TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64)


def run_cli(*args, env=None, timeout=300):
    """The installed console entry point in a fresh interpreter (GLOG_v unset, as a user's shell has it)."""
    full = {k: v for k, v in os.environ.items() if k not in ("GLOG_v", "QWEN2MS_DEBUG")}
    full.update(env or {})
    code = "import sys; from qwen2ms.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=full)


def one_error_line(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    prog = f"qwen2ms {command}" if command else "qwen2ms"
    assert lines[0].startswith(f"{prog}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def tiny_checkpoint(folder: Path, tokenizer_dir: Path = None) -> Path:
    from qwen2ms import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(**TINY), seed=0).save_pretrained(folder)
    if tokenizer_dir is not None:
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            (folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    return folder


# ---------------------------------------------------------------------------------------------- real processes
def test_help_is_quiet_fast_and_lists_every_command():
    r = run_cli("--help")
    assert r.returncode == 0
    assert r.stderr == ""  # MindSpore's import-time deprecation WARNING used to land here
    names = list(build_parser()._subparsers._group_actions[0].choices)
    assert set(names) == {"demo", "generate", "chat", "serve", "convert", "alpaca-convert", "preprocess", "finetune",
                          "plan"}
    description = r.stdout.split("positional arguments")[0]
    for name in names:
        assert name in description, name  # the summary line used to omit plan and finetune
    # --help does not import MindSpore at all
    probe = subprocess.run([sys.executable, "-c", "import sys, qwen2ms.cli; qwen2ms.cli.build_parser(); "
                            "print('mindspore' in sys.modules)"], capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False", probe.stderr


def test_offline_hub_id_is_one_line_exit_2(tmp_path):
    # a real command that imports MindSpore: its stderr is the error line and nothing else (no WARNING)
    r = run_cli("generate", "Qwen/Qwen2-0.5B-Instruct-not-cached", "--prompt", "hi",
                env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr, "generate")
    assert "Qwen/Qwen2-0.5B-Instruct-not-cached" in line and "local folder" in line


def test_offline_hub_id_with_debug_shows_the_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    argv = ["generate", "Qwen/Qwen2-0.5B-Instruct-not-cached", "--prompt", "hi"]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err, "generate")
    assert main(argv + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "HubError" in err and err.rstrip().splitlines()[-1] == line


@pytest.mark.slow
def test_a_real_generation_prints_no_mindspore_warning():
    r = run_cli("generate", "--prompt", "Hi", "--max-new-tokens", "1", "--greedy")
    assert r.returncode == 0, r.stderr
    assert "WARNING" not in r.stderr and r.stdout.strip()


# ---------------------------------------------------------------------------------------------- the error policy
def test_user_errors_print_one_line_and_exit_2(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    cases = [
        (["generate", missing, "--prompt", "x"], "generate", "nope"),
        (["chat", missing], "chat", "nope"),
        (["demo", "--model", missing], "demo", "nope"),
        (["finetune", "--config", missing + ".yaml"], "finetune", "nope.yaml"),
        (["convert", missing, str(tmp_path / "out.ckpt"), "--to", "ms"], "convert", "nope"),
        (["alpaca-convert", "--data-path", missing, "--output-path", str(tmp_path / "o.jsonl")], "alpaca-convert",
         "nope"),
        (["preprocess", "--input", missing, "--tokenizer", "builtin", "--output", str(tmp_path / "o.jsonl")],
         "preprocess", "nope"),
        (["plan", "--model", "qwen2-9b", "--devices", "8"], "plan", "qwen2-9b"),
    ]
    for argv, command, named in cases:
        assert main(argv) == 2, argv
        line = one_error_line(capsys.readouterr().err, command)
        assert named in line, (argv, line)


def test_a_file_where_a_folder_is_expected(tmp_path, capsys):
    f = tmp_path / "model.txt"
    f.write_text("not a model")
    assert main(["generate", str(f), "--prompt", "x"]) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err, "generate")
    # an alpaca-convert output that is a folder
    out = tmp_path / "out_dir"
    out.mkdir()
    assert main(["alpaca-convert", "--data-path", str(SAMPLE), "--output-path", str(out)]) == 2
    assert "out_dir" in one_error_line(capsys.readouterr().err, "alpaca-convert")


def test_internal_errors_exit_1_with_a_hint_and_debug_shows_the_traceback(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("kernel exploded\nC++ stack frame 1\nframe 2")

    monkeypatch.setattr(cli, "_cmd_plan", boom)
    argv = ["plan", "--model", "qwen2-0.5b", "--devices", "1"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("qwen2ms plan: internal error: RuntimeError: kernel exploded") and "--debug" in err
    for debug_argv in (["--debug"] + argv, argv + ["--debug"]):
        assert main(debug_argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" in err and "C++ stack frame 1" in err
    monkeypatch.setenv("QWEN2MS_DEBUG", "1")
    assert main(argv) == 1 and "Traceback" in capsys.readouterr().err


def test_ctrl_c_exits_130_quietly(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_cmd_plan", interrupted)
    assert main(["plan", "--model", "qwen2-0.5b", "--devices", "1"]) == 130
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv,words", [
    (["generate", "--prompt", "x", "--dtype", "banana"], "float32"),
    (["generate", "--prompt", "x", "--max-new-tokens", "-1"], ">= 1"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], ">= 1"),
    (["generate", "--prompt", "x", "--max-new-tokens", "lots"], "integer"),
    (["generate", "--prompt", "x", "--temperature", "-1"], ">= 0"),
    (["generate", "--prompt", "x", "--temperature", "nan"], ">= 0"),
    (["generate", "--prompt", "x", "--temperature", "inf"], ">= 0"),
    (["generate", "--prompt", "x", "--top-p", "0"], "(0, 1]"),
    (["generate", "--prompt", "x", "--top-p", "1.5"], "(0, 1]"),
    (["generate", "--prompt", "x", "--repetition-penalty", "0"], "> 0"),
    (["chat", "--max-context", "1"], ">= 2"),
    (["demo", "--steps", "-5"], ">= 0"),
    (["demo", "--dtype", "int4"], "bfloat16"),
    (["convert", "a", "b", "--to", "hf", "--dtype", "fp8"], "bf16"),
    (["finetune", "--config", "x.yaml", "--max-steps", "0"], ">= 1"),
    (["preprocess", "--input", "a", "--tokenizer", "b", "--output", "c", "--seq-length", "0"], ">= 2"),
    (["plan", "--model", "qwen2-7b", "--devices", "0"], ">= 1"),
    (["plan", "--model", "qwen2-7b", "--devices", "1", "--device-memory", "nan"], "> 0"),
    (["serve", "m", "--port", "0"], "[1, 65535]"),
    (["serve", "m", "--port", "http"], "port number"),
    (["serve", "m", "--port", "70000"], "[1, 65535]"),
    (["serve", "m", "--max-num-seqs", "0"], ">= 1"),
    (["serve", "m", "--max-model-len", "1"], ">= 2"),
    (["serve", "m", "--kv-cache-memory", "lots"], "2GB"),
    (["serve", "m", "--log-level", "loud"], "invalid choice"),
    (["serve"], "required: model"),
    (["no-such-command"], "invalid choice"),
])
def test_bad_arguments_are_one_line_before_any_work(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    line = one_error_line(capsys.readouterr().err, argv[0] if argv[0] != "no-such-command" else "")
    assert words in line and "--help" in line


# ---------------------------------------------------------------------------------------------- generate / chat
def test_dtype_applies_to_the_demo_model_too():
    from qwen2ms.cli import load_model

    model = load_model("demo", _dtype_arg("fp16"))
    assert str(model.model.embed_tokens.weight.dtype) == "Float16"


def test_demo_dtype_is_not_silently_ignored(capsys):
    assert main(["demo", "--dtype", "bf16"]) == 2  # the fine-tune trains in float32
    assert "--steps 0" in one_error_line(capsys.readouterr().err, "demo")


def _dtype_arg(text):
    return build_parser().parse_args(["generate", "--prompt", "x", "--dtype", text]).dtype


def test_empty_and_over_long_prompts(capsys):
    assert main(["generate", "--prompt", "", "--max-new-tokens", "2"]) == 2
    assert "prompt is empty" in one_error_line(capsys.readouterr().err, "generate")
    long_prompt = " ".join(["word"] * 5000)  # > the demo model's 4096-token context on its own
    assert main(["generate", "--prompt", long_prompt, "--max-new-tokens", "8"]) == 2
    line = one_error_line(capsys.readouterr().err, "generate")
    assert "the prompt is 5000 tokens" in line and "4096" in line and "at most 4088 tokens" in line
    assert "at most 0" not in line


def test_over_long_prompt_messages_never_suggest_zero_new_tokens():
    from qwen2ms.generation import GenerationConfig, GenerationConfigError

    with pytest.raises(GenerationConfigError) as e:
        GenerationConfig(max_new_tokens=10).validate(prompt_len=40, max_position_embeddings=32)
    assert "the prompt is 40 tokens" in str(e.value) and "at most 22 tokens" in str(e.value)
    with pytest.raises(GenerationConfigError) as e:
        GenerationConfig(max_new_tokens=32).validate(prompt_len=32, max_position_embeddings=32)
    assert "the prompt is 32 tokens" in str(e.value) and "at most 0" not in str(e.value)
    with pytest.raises(GenerationConfigError, match="lower max_new_tokens to at most 2 "):
        GenerationConfig(max_new_tokens=10).validate(prompt_len=30, max_position_embeddings=32)


@settings(max_examples=60, deadline=None)
@given(field=st.sampled_from(["temperature", "top_p", "repetition_penalty"]),
       value=st.floats(allow_nan=True, allow_infinity=True))
def test_generation_config_floats_are_finite_and_in_range(field, value):
    from qwen2ms.generation import GenerationConfig, GenerationConfigError

    try:
        cfg = GenerationConfig(**{field: value})
    except GenerationConfigError:
        return
    got = getattr(cfg, field)
    assert math.isfinite(got)
    assert {"temperature": got >= 0, "top_p": 0 < got <= 1, "repetition_penalty": got > 0}[field]


def test_nan_temperature_is_refused_by_the_library():
    from qwen2ms.generation import GenerationConfig, GenerationConfigError

    for value in (float("nan"), float("inf"), 1e39):
        with pytest.raises(GenerationConfigError, match="finite"):
            GenerationConfig(do_sample=True, temperature=value)
    with pytest.raises(GenerationConfigError, match="finite"):
        GenerationConfig(repetition_penalty=1e308)  # inf once cast to the float32 scores


def test_a_tiny_temperature_samples_the_best_token_instead_of_failing():
    import numpy as np

    from qwen2ms.generation.processors import Temperature
    from qwen2ms.generation.sampling import make_rng, sample

    scores = np.array([[1.0, -3.0, 2.0, -np.inf], [-5.0, -7.0, -6.0, -9.0]], np.float32)
    scaled = Temperature(1e-40)(None, scores)  # 2 / 1e-40 overflows float32
    assert sample(scaled, make_rng(0)).tolist() == [2, 0]
    assert Temperature(0.5)(None, scores)[0].tolist() == [2.0, -6.0, 4.0, -np.inf]


def test_text_that_is_not_utf8(capsys):
    bad = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # how Python hands over a Latin-1 argument
    assert main(["generate", "--prompt", bad, "--max-new-tokens", "1"]) == 2
    line = one_error_line(capsys.readouterr().err, "generate")
    assert "--prompt is not valid UTF-8" in line and "0xe9 at byte 3" in line
    from qwen2ms.cli import chat_loop
    from qwen2ms.demo import demo_tokenizer

    class Model:
        tokenizer = demo_tokenizer()

        def chat(self, messages, **gen):
            return "ok"

    lines = iter([bad, "fine"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    notes = []
    history = chat_loop(Model(), None, {"max_new_tokens": 2}, 256, read=read, write=notes.append)
    assert notes and "not valid UTF-8" in notes[0]
    assert history == [{"role": "user", "content": "fine"}, {"role": "assistant", "content": "ok"}]


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    for flag, argv in (("--output", ["preprocess", "--input", str(SAMPLE), "--tokenizer", "builtin", "--output"]),
                       ("--output-path", ["alpaca-convert", "--data-path", str(SAMPLE), "--output-path"])):
        assert main(argv + [str(folder)]) == 2
        assert f"{flag} {str(folder)!r} is a folder" in one_error_line(capsys.readouterr().err, argv[0])
        assert main(argv + [str(tmp_path / "missing" / "out.jsonl")]) == 2
        assert "does not exist" in one_error_line(capsys.readouterr().err, argv[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder"]  # nothing half-written (a .db index was)
    assert list(folder.iterdir()) == []


def test_checkpoint_without_tokenizer_names_the_flag(tmp_path, capsys):
    folder = tiny_checkpoint(tmp_path / "m")
    assert main(["generate", str(folder), "--prompt", "x"]) == 2
    line = one_error_line(capsys.readouterr().err, "generate")
    assert "no tokenizer files" in line and "--tokenizer" in line


def test_chat_refuses_a_reply_budget_that_fills_the_context(capsys):
    assert main(["chat", "--max-new-tokens", "64", "--max-context", "64"]) == 2
    assert "at most 63" in one_error_line(capsys.readouterr().err, "chat")
    assert main(["chat", "--max-context", "100000"]) == 2
    assert "max_position_embeddings 4096" in one_error_line(capsys.readouterr().err, "chat")


def test_ctrl_c_in_chat(monkeypatch, capsys):
    from qwen2ms.cli import chat_loop
    from qwen2ms.demo import demo_tokenizer

    class Interrupted:
        tokenizer = demo_tokenizer()

        def __init__(self):
            self.calls = 0

        def chat(self, messages, **gen):
            self.calls += 1
            if self.calls == 1:
                raise KeyboardInterrupt  # ctrl-C while the first reply streams
            return "second reply"

    lines = iter(["first", "second"])

    def read(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None  # ctrl-D

    notes = []
    model = Interrupted()
    history = chat_loop(model, None, {"max_new_tokens": 4}, 256, read=read, write=notes.append)
    assert any("interrupted" in n for n in notes)
    # the interrupted turn is not in the history; the conversation went on
    assert history == [{"role": "user", "content": "second"}, {"role": "assistant", "content": "second reply"}]

    def ctrl_c_at_the_prompt(prompt):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", ctrl_c_at_the_prompt)
    assert main(["chat", "--max-new-tokens", "4"]) == 130
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------- serve
def test_serve_refuses_settings_that_cannot_work_before_loading(capsys):
    import socket

    assert main(["serve", "demo", "--api-key", " "]) == 2
    assert "--api-key is empty" in one_error_line(capsys.readouterr().err, "serve")
    assert main(["serve", "demo", "--num-blocks", "8", "--kv-cache-memory", "1MB"]) == 2
    assert "give one of them" in one_error_line(capsys.readouterr().err, "serve")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "demo", "--port", str(port)]) == 2
        line = one_error_line(capsys.readouterr().err, "serve")
        assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line
    assert main(["serve", "demo", "--host", "no-such-host.invalid"]) == 2
    assert "--host 'no-such-host.invalid'" in one_error_line(capsys.readouterr().err, "serve")


def test_serve_checks_the_context_against_the_model(capsys):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["serve", "demo", "--max-model-len", "100000", "--port", str(port)]) == 2
    assert "max_position_embeddings 4096" in one_error_line(capsys.readouterr().err, "serve")
    from qwen2ms.cli import _engine_kwargs

    args = build_parser().parse_args(["serve", "demo", "--max-model-len", "5000"])
    with pytest.raises(ValueError, match="--max-model-len 5000 is more than the model's context"):
        _engine_kwargs(args, 4096)
    args = build_parser().parse_args(["serve", "demo", "--no-prefix-caching", "--kv-cache-memory", "2MiB"])
    assert _engine_kwargs(args, 4096) == {"max_num_seqs": 16, "max_model_len": 4096, "block_size": 16,
                                          "enable_prefix_caching": False, "kv_cache_memory": 2 * 2 ** 20}


def test_serve_without_its_extra_names_the_install(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_fastapi(name, *args, **kwargs):
        if name.split(".")[0] in ("fastapi", "uvicorn"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fastapi)
    assert main(["serve", "demo"]) == 2
    line = one_error_line(capsys.readouterr().err, "serve")
    assert "fastapi, uvicorn" in line and "pip install 'qwen2ms[serve]'" in line


# ---------------------------------------------------------------------------------------------- finetune
def test_finetune_config_mistakes(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: {config: {hidden_size: 8}\ndata: [unclosed\n")
    assert main(["finetune", "--config", str(bad_yaml)]) == 2
    assert "not valid YAML" in one_error_line(capsys.readouterr().err, "finetune")
    folder = tmp_path / "a_folder.yaml"
    folder.mkdir()
    assert main(["finetune", "--config", str(folder)]) == 2
    one_error_line(capsys.readouterr().err, "finetune")
    no_data = tmp_path / "no_data.yaml"
    no_data.write_text(json.dumps({"model": {"config": TINY}, "data": {"train_file": "missing.json", "seq_length": 16},
                                   "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1}}))
    assert main(["finetune", "--config", str(no_data), "--no-progress"]) == 2
    assert "missing.json" in one_error_line(capsys.readouterr().err, "finetune")


# ---------------------------------------------------------------------------------------------- data and convert
def test_preprocess_builtin_tokenizer_as_in_run_configs(tmp_path, capsys):
    records = tmp_path / "r.json"
    records.write_text(json.dumps(json.loads(SAMPLE.read_text(encoding="utf-8"))[:3]))
    out = tmp_path / "out.jsonl"
    assert main(["preprocess", "--input", str(records), "--tokenizer", "builtin", "--seq-length", "128",
                 "--output", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    from qwen2ms.data import load_samples_jsonl
    from qwen2ms.demo import demo_tokenizer

    rows = load_samples_jsonl(out)
    assert len(rows) == 3
    assert demo_tokenizer().decode(rows[0]["input_ids"]).startswith("<|im_start|>system\nYou are a helpful assistant.")


def test_convert_carries_the_tokenizer_both_ways(tmp_path, capsys, qwen2_tokenizer_dir):
    from qwen2ms.tokenization import Qwen2Tokenizer

    hf = tiny_checkpoint(tmp_path / "hf", qwen2_tokenizer_dir)
    assert main(["convert", str(hf), str(tmp_path / "ms" / "q.ckpt"), "--to", "ms", "--quiet"]) == 0
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / "ms" / name).read_bytes() == (hf / name).read_bytes()
    assert main(["convert", str(tmp_path / "ms" / "q.ckpt"), str(tmp_path / "back"), "--to", "hf"]) == 0
    assert "copied the tokenizer files: vocab.json, merges.txt, tokenizer_config.json" in capsys.readouterr().out
    tok = Qwen2Tokenizer.from_pretrained(tmp_path / "back")
    assert tok.encode("Hello world") == [9707, 1879] and tok.chat_template
    # a second conversion into its own earlier output replaces the files
    assert main(["convert", str(tmp_path / "ms" / "q.ckpt"), str(tmp_path / "back"), "--to", "hf", "--quiet"]) == 0


def test_convert_refuses_a_folder_holding_other_files(tmp_path, capsys):
    hf = tiny_checkpoint(tmp_path / "hf")
    assert main(["convert", str(hf), str(tmp_path / "q.ckpt"), "--to", "ms", "--quiet"]) == 0
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert main(["convert", str(tmp_path / "q.ckpt"), str(busy), "--to", "hf", "--quiet"]) == 2
    assert "notes.txt" in one_error_line(capsys.readouterr().err, "convert")
    assert sorted(p.name for p in busy.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_real_ctrl_c_at_the_chat_prompt_and_a_closed_pipe():
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if k != "GLOG_v"}
    code = "import sys; from qwen2ms.cli import main; sys.exit(main())"
    p = subprocess.Popen([sys.executable, "-c", code, "chat", "--max-new-tokens", "4"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    os.set_blocking(p.stdout.fileno(), False)
    out, start = b"", time.time()
    while b"user> " not in out and time.time() - start < 240:
        time.sleep(0.2)
        out += p.stdout.read() or b""
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err == b""
    # `qwen2ms generate ... | head -c 1`: the reader goes away, the command ends quietly
    r = subprocess.run(f"{sys.executable} -c '{code}' generate --prompt Hi --max-new-tokens 300 --greedy | head -c 1; "
                       "exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash", capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 141 and "Traceback" not in r.stderr and "Error" not in r.stderr
