"""The `qwen2ms` command line: the demo (the README's main job) and argument errors."""
import subprocess
import sys

import pytest

from qwen2ms.cli import build_parser, demo_tokenizer, main


def test_demo_formats_the_prompt_with_the_real_vocabulary(capsys):
    assert main(["demo", "--prompt", "Hello world"]) == 0
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
    assert main(["demo", "--tokenizer", str(qwen2_tokenizer_dir)]) == 0
    assert str(qwen2_tokenizer_dir) in capsys.readouterr().out


def test_unknown_subcommand_is_an_argparse_error():
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["no-such-command"])
    assert e.value.code == 2


def test_console_script_module_runs():
    r = subprocess.run([sys.executable, "-m", "qwen2ms.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "demo" in r.stdout
