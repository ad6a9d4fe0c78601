"""Adversarial inputs for the tokenizer: long runs, hostile templates, bad ids, surrogates and malformed files."""
import json
import random
import shutil
import time
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen2ms import IncrementalDetokenizer, Qwen2Tokenizer, TokenizerError
from qwen2ms.tokenization import bpe as bpe_module
from qwen2ms.tokenization.bpe import ByteLevelBPE, bytes_to_unicode

FIXTURE_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok(qwen2_tokenizer_dir):
    return Qwen2Tokenizer.from_pretrained(qwen2_tokenizer_dir)


@pytest.fixture(scope="module")
def fast(qwen_bpe_dir):
    # the Rust reference on the same BPE (HF tokenizers), without transformers' Python layer
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(qwen_bpe_dir / "tokenizer.json"))


def _ref(fast, text):
    return fast.encode(text, add_special_tokens=False).ids


# ---- BPE on long runs without spaces ------------------------------------------------------------
def _rare_cjk(n, rnd):
    return "".join(chr(rnd.randrange(0x4E00, 0x9FFF)) for _ in range(n // 3))


LONG_KINDS = {
    "one letter": lambda n, rnd: "a" * n,
    "random letters": lambda n, rnd: "".join(rnd.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(n)),
    "punctuation": lambda n, rnd: "".join(rnd.choice("!#$%&()*+,-./:;<=>?@[]^_`{|}~") for _ in range(n)),
    "spaces": lambda n, rnd: " " * n,
    "cyrillic": lambda n, rnd: "".join(rnd.choice("абвгдежзийклмнопрстуфхцчшщъыьэюя") for _ in range(n // 2)),
    "rare CJK": _rare_cjk,
}


def _best_time(fn, texts):
    # CPU time of this process: other processes on a shared machine do not inflate it
    best = float("inf")
    for text in texts:
        t0 = time.process_time()
        fn(text)
        best = min(best, time.process_time() - t0)
    return best


@pytest.mark.parametrize("kind", list(LONG_KINDS))
def test_bpe_scales_linearly_on_long_runs(tok, fast, kind):
    # Quadratic BPE (the old rescan per merge) makes 4x the input cost ~16x; linear-ish is ~4-5x.
    # Each round uses a distinct text (lengths differ) so that no cache can answer it.
    make, rnd = LONG_KINDS[kind], random.Random(0)
    small = [make(20_000 + 3 * k, rnd) for k in range(3)]
    large = [make(80_000 + 3 * k, rnd) for k in range(3)]
    # per-vocabulary and per-character tables fill on first sight; fill them outside the timing
    tok.encode(" ".join(sorted(set("".join(small + large)))))
    ratio = _best_time(tok.encode, large) / _best_time(tok.encode, small)
    assert ratio < 8, f"{kind}: 4x longer input took {ratio:.1f}x longer"
    assert tok.encode(large[0]) == _ref(fast, large[0])


def test_one_megabyte_word_in_bounded_time(tok):
    # a generous bound on CPU time (about 1-2 s measured): it only has to catch quadratic behaviour
    for text in ("a" * 1_000_000, LONG_KINDS["random letters"](1_000_000, random.Random(1))):
        t0 = time.process_time()
        ids = tok.encode(text)
        assert time.process_time() - t0 < 20 and tok.decode(ids) == text


_LONG_ALPHABETS = [
    "ab", "abc", "aAbB", "xyz'", "!?.", "-=_", " \t", "\n ", "的是了", "我们中文", "ééè", "жжы", "😀a",
    "abcdefghijklmnopqrstuvwxyz", "{}[]();:,.", "ＡＢ", "αβγ",
]


@st.composite
def long_runs(draw):
    # long pieces built from repeated short segments: the rank buckets see many equal pairs
    alphabet = draw(st.sampled_from(_LONG_ALPHABETS))
    segments = draw(st.lists(st.text(alphabet=alphabet, min_size=1, max_size=6), min_size=1, max_size=4))
    parts = [seg * draw(st.integers(1, 400)) for seg in segments]
    return "".join(draw(st.permutations(parts)))


@settings(max_examples=120, **FIXTURE_SETTINGS)
@given(text=long_runs())
def test_parity_long_runs_without_spaces(tok, fast, text):
    assert tok.encode(text) == _ref(fast, text)


_RUN_CHARS = st.one_of(
    st.sampled_from(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")),
    st.sampled_from(list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
    st.characters(min_codepoint=0xC0, max_codepoint=0x24F, categories=("Lu", "Ll")),
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1F64F, categories=("So",)),
)


@settings(max_examples=80, **FIXTURE_SETTINGS)
@given(text=st.lists(_RUN_CHARS, min_size=65, max_size=600).map("".join))
def test_parity_random_long_runs(tok, fast, text):
    assert tok.encode(text) == _ref(fast, text)


@pytest.fixture(scope="module")
def pipeline_spec(qwen_bpe_dir):
    # the reference's own pipeline (NFC, Qwen2 split, byte level), to pair with other BPE models
    spec = json.loads((qwen_bpe_dir / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"] = []
    spec["post_processor"] = None
    spec["model"]["vocab"], spec["model"]["merges"] = {}, []
    return spec


def _fast_from(vocab, merges, spec):
    from tokenizers import Tokenizer

    spec = dict(spec, model=dict(spec["model"], vocab=vocab, merges=[[a, b] for a, b in merges]))
    return Tokenizer.from_str(json.dumps(spec))


@st.composite
def shuffled_merges(draw):
    # merges over a few letters, then ranks shuffled: inputs are often made by higher-ranked merges
    byte_char = bytes_to_unicode()
    vocab = {byte_char[b]: b for b in range(256)}
    tokens = ["a", "b", "c"]
    merges = []
    for _ in range(draw(st.integers(3, 25))):
        left, right = draw(st.sampled_from(tokens)), draw(st.sampled_from(tokens))
        if (left, right) in merges or len(left + right) > 12:
            continue
        merges.append((left, right))
        if left + right not in vocab:
            vocab[left + right] = len(vocab)
            tokens.append(left + right)
    return vocab, draw(st.permutations(merges))


_ABC_TEXT = st.one_of(
    st.builds(lambda segments, n: "".join(segments) * n,
              st.lists(st.text(alphabet="abc", min_size=1, max_size=8), min_size=1, max_size=5), st.integers(65, 150)),
    st.text(alphabet="abc", min_size=1, max_size=40),
)


@settings(max_examples=80, **FIXTURE_SETTINGS)
@given(spec=shuffled_merges(), text=_ABC_TEXT)
def test_parity_merge_lists_whose_ranks_do_not_rise(pipeline_spec, spec, text):
    vocab, merges = spec
    ours = ByteLevelBPE(vocab, merges)
    assert ours.encode_ordinary(text) == _fast_from(vocab, merges, pipeline_spec).encode(text).ids


def test_long_piece_paths_agree_with_the_short_path(tok, monkeypatch):
    # both long-piece strategies must give what the short-piece loop gives on the real merges
    bpe, rnd = tok._bpe, random.Random(5)
    texts = ["a" * 300, "ab" * 150, "!" * 257, LONG_KINDS["random letters"](400, rnd), "aaaaa" + "b" * 200]
    long_ids = [bpe.bpe_piece(t) for t in texts]
    monkeypatch.setattr(bpe_module, "_LONG_PIECE", 10**9)
    for text, got in zip(texts, long_ids):
        ids = list(map(bpe.byte_ids.__getitem__, text.encode("utf-8")))
        assert list(got) == list(bpe.bpe_piece(text)) == bpe._merge_by_heap(list(ids)) == bpe._merge_by_rank(ids)


def test_word_cache_stays_bounded_with_long_and_distinct_pieces(qwen2_tokenizer_dir):
    small = Qwen2Tokenizer.from_pretrained(qwen2_tokenizer_dir, cache_size=1000)
    rnd = random.Random(3)
    small.encode("x" * 100_000)
    words = [LONG_KINDS["random letters"](rnd.randrange(10, 250), rnd) for _ in range(3000)]
    small.encode(" ".join(words))
    cache = small._bpe.cache
    assert len(cache) <= 1000
    assert max(map(len, cache)) <= 256  # long pieces are not kept
    assert sum(map(len, cache)) <= 8 * 1000  # nor thousands of near-limit ones


def test_character_memos_stay_bounded_with_random_code_points(tok, fast, monkeypatch):
    # Text of random code points would otherwise keep a table entry for each of the 1.1M characters.
    monkeypatch.setattr(bpe_module, "_CHAR_TABLE_CAP", 500, raising=False)
    monkeypatch.setattr(bpe_module, "_PAIR_MEMO_CAP", 500, raising=False)
    rnd = random.Random(4)
    blocks = [(0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x10000, 0x3FFFF)]
    for _ in range(4):
        # assigned characters only: for code points newer than Python's Unicode tables the
        # `regex` module and the reference may disagree on \p{L}
        chars = (chr(rnd.randrange(*rnd.choice(blocks))) for _ in range(2000))
        text = "".join(c for c in chars if unicodedata.category(c) not in ("Cn", "Co"))[:800]
        cjk = "".join(chr(rnd.randrange(0x4E00, 0x9FFF)) for _ in range(800))
        for t in (text, cjk):
            assert tok.encode(t) == _ref(fast, t)
    assert len(tok._bpe._chars) <= 500 and len(tok._bpe._safe3) <= 500


# ---- ids without a token ------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [151646, 151935, 10**9])
def test_decode_of_an_id_past_the_vocabulary_raises(tok, bad):
    with pytest.raises(TokenizerError, match=rf"token id {bad} is past the vocabulary: this tokenizer has 151646 tokens"):
        tok.decode([9707, bad])
    with pytest.raises(TokenizerError, match=rf"token id {bad} is past"):
        tok.batch_decode([[9707], [bad]])
    with pytest.raises(TokenizerError, match=rf"token id {bad} is past"):
        tok.convert_ids_to_tokens(bad)
    with pytest.raises(TokenizerError, match=rf"token id {bad} is past"):
        tok.convert_ids_to_tokens([1, bad])
    detok = IncrementalDetokenizer(tok)
    assert detok.push(9707) == "Hello"
    with pytest.raises(TokenizerError, match=rf"token id {bad} is past"):
        detok.push(bad)


@pytest.mark.parametrize("bad, match", [
    (-1, "token id -1 is negative"),
    (-151646, "token id -151646 is negative"),
    (True, "bool True"),
    (2.0, r"got 2\.0 \(float\)"),
    ("7", "int"),
    (None, "int"),
])
def test_non_ids_are_refused_everywhere(tok, bad, match):
    import numpy as np

    with pytest.raises(TokenizerError, match=match):
        tok.decode([9707, bad])
    with pytest.raises(TokenizerError, match=match):
        IncrementalDetokenizer(tok).push(bad)
    with pytest.raises(TokenizerError, match=match):
        tok.convert_ids_to_tokens([bad])
    if isinstance(bad, (bool, int, float)):
        with pytest.raises(TokenizerError, match=match):
            tok.decode(np.array([bad]))  # numpy keeps the dtype: bool and float arrays are refused too


def test_numpy_and_plain_ids_still_decode(tok):
    import numpy as np

    ids = tok.encode("Hello world<|im_end|>")
    assert tok.decode(np.array(ids, dtype=np.int32)) == tok.decode(ids) == "Hello world<|im_end|>"
    assert tok.decode(np.int64(9707)) == "Hello" and tok.decode([]) == ""
    assert tok.convert_ids_to_tokens(np.int64(151645)) == "<|im_end|>"


def _gapped_tokenizer():
    from qwen2ms.tokenization import AddedToken

    byte_char = bytes_to_unicode()
    vocab = {byte_char[b]: b for b in range(256)}
    added = [AddedToken("<x>", 300)]
    return Qwen2Tokenizer(vocab, [], added_tokens=added, eos_token="<x>", pad_token="<x>", unk_token="<x>")


def test_ids_in_a_gap_of_the_vocabulary_raise():
    gapped = _gapped_tokenizer()
    assert gapped.decode([104, 105, 300]) == "hi<x>"
    for call in (gapped.decode, gapped.convert_ids_to_tokens, IncrementalDetokenizer(gapped).push):
        with pytest.raises(TokenizerError, match=r"token id 256 has no token.*ids are 0\.\.300"):
            call(256 if call is not gapped.decode else [104, 256])
    with pytest.raises(TokenizerError, match="token id 301 is past the vocabulary"):
        gapped.decode([301], skip_special_tokens=True)


# ---- unpaired surrogates ------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "a\ud800b",
    "<|im_end|>a\ud800",
    "<|im_start|>user\nhi<|im_end|>\n" * 3 + "x\udc00",
    "😀😀😀 \ud83d",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢" + "\udfff",
    "e\u0301" * 5 + "\ud800",  # NFC shortens the text before the surrogate
    "<|endoftext|>" + "ﬁ" * 3 + "<|im_end|>" + "\ud800" + "\udc00",
    "\ud800",
])
def test_surrogate_error_names_the_index_in_the_callers_text(tok, text):
    at = next(i for i, c in enumerate(text) if 0xD800 <= ord(c) <= 0xDFFF)
    with pytest.raises(TokenizerError, match=rf"unpaired surrogate '\\u{ord(text[at]):x}' at index {at} \(of {len(text)}"):
        tok.encode(text)
    with pytest.raises(TokenizerError, match=rf"at index {at} "):
        tok([text, "ok"])


# ---- chat template rendering limits -------------------------------------------------------------
CONV = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template", [
    "{{ 'x' * 10**9 }}",
    "{{ 10**9 * 'x' }}",
    "{{ ['x'] * 10**9 }}",
    "{% set b = 'x' * 900000 %}{{ [b] * 1000 }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l|length }}",
    "{% set ns = namespace(l=[]) %}{% for i in range(9999) %}{% set ns.l = ns.l + ['x' * 100000] %}{% endfor %}",
    "{{ 'x'|center(10**9) }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ 'x'.zfill(10**9) }}",
    "{{ ('\t' * 1000).expandtabs(10**6) }}",
    "{{ '{:>1000000000}'.format(1) }}",
    "{{ '{:>{w}}'.format(1, w=10**9) }}",
    "{{ '%1000000000d' % 1 }}",
    "{{ '%*d' % (10**9, 1) }}",
    "{{ '%s'|format('x' * 999999 ~ 'yy') }}",
    "{% set s = 'x' * 100000 %}{{ s.replace('', s) }}",
    "{% set s = 'x' * 100000 %}{{ s.join(s.split('') if false else [s, s, s, s, s, s, s, s, s, s, s]) }}",
    "{{ ('a' * 10000).translate(dict.fromkeys([97], 'b' * 10000)) }}",
    "{{ [1]|batch(10**9, 'x')|list|length }}",
    "{{ []|slice(10**8)|list|length }}",
    "{{ ('\n' * 100000)|indent(10000, true, true) }}",
    "{{ messages|tojson(indent=10**7) }}",
    "{{ lipsum(10**9) }}",
    "{{ dict.fromkeys(range(100000), 'x' * 100000) }}",
    "{% filter upper %}{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}{% endfilter %}",
    "{% set x %}{% for i in range(1000) %}{{ 'x' * 100000 }}{% endfor %}{% endset %}{{ x|length }}",
    "{{ range(100000)|map('center', 100000)|list|length }}",
    "{% for i in range(100000) %}{{ 'x' * 20 }}{% endfor %}",
], ids=lambda t: t[:50])
def test_templates_that_build_huge_strings_stop_at_max_output_chars(template):
    from qwen2ms.tokenization import ChatTemplateLimitError, render_chat_template

    t0 = time.process_time()
    with pytest.raises(ChatTemplateLimitError, match=r"max_output_chars.*pass max_output_chars=N to apply_chat_template"):
        render_chat_template(template, CONV)
    assert time.process_time() - t0 < 5  # stopped before building the string, not after


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "{% for m in messages * 100 %}{% for i in range(100000) if i < 0 %}{% endfor %}{% endfor %}",
    "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "{% for x in range(10) recursive %}{% if loop.depth < 9 %}{{ loop(range(10)) }}{% endif %}{% endfor %}",
], ids=lambda t: t[:50])
def test_runaway_loops_stop_at_max_iterations(tok, template):
    with pytest.raises(TokenizerError, match=r"more than max_iterations=20000 .*pass max_iterations=N"):
        tok.apply_chat_template(CONV, chat_template=template, tokenize=False, max_iterations=20_000)


def test_slow_templates_stop_at_the_timeout(tok):
    # each step is cheap and under every size limit; only the clock stops it
    template = ("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}"
                "{% for i in range(100000) %}{{ f(3) }}{% endfor %}")
    t0 = time.perf_counter()
    with pytest.raises(TokenizerError, match=r"longer than timeout=0\.3 s; pass timeout=SECONDS"):
        tok.apply_chat_template(CONV, chat_template=template, tokenize=False, timeout=0.3, max_iterations=10**9)
    assert time.perf_counter() - t0 < 10


def test_limits_are_configurable(tok):
    big = "{{ 'x' * 1500000 }}"
    with pytest.raises(TokenizerError, match="max_output_chars=1000000"):
        tok.apply_chat_template(CONV, chat_template=big, tokenize=False)
    assert len(tok.apply_chat_template(CONV, chat_template=big, tokenize=False, max_output_chars=2_000_000)) == 1_500_000
    loops = "{% for i in range(2000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}ok"
    with pytest.raises(TokenizerError, match="max_iterations=1000000"):
        tok.apply_chat_template(CONV, chat_template=loops, tokenize=False)
    assert tok.apply_chat_template(CONV, chat_template=loops, tokenize=False, max_iterations=3_000_000) == "ok"
    # a long real conversation is far from every default limit
    long_conv = [{"role": "user" if k % 2 == 0 else "assistant", "content": "word " * 200} for k in range(900)]
    assert len(tok.apply_chat_template(long_conv, tokenize=False)) > 900_000


@pytest.mark.parametrize("name, value", [("max_output_chars", 0), ("max_iterations", -1), ("timeout", 0),
                                         ("timeout", "10"), ("max_output_chars", 1.5), ("max_iterations", True)])
def test_bad_limit_values(tok, name, value):
    with pytest.raises(TokenizerError, match=rf"{name} must be a positive number"):
        tok.apply_chat_template(CONV, tokenize=False, **{name: value})


def test_real_templates_render_as_the_reference_on_a_long_conversation(qwen_bpe_dir, tok):
    # the later-Qwen template (tools, thinking, namespaces) and Qwen2's, on ~100-200 kB prompts
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(qwen_bpe_dir)
    later = Qwen2Tokenizer.from_pretrained(qwen_bpe_dir)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    rnd, conv = random.Random(0), [{"role": "system", "content": "You are helpful."}]
    for i in range(300):
        conv.append({"role": "user", "content": "question " * rnd.randrange(1, 40)})
        if i % 3 == 0:
            conv.append({"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "北京"}}}]})
            conv.append({"role": "tool", "content": "{\"temp\": 21}"})
        conv.append({"role": "assistant", "content": "<think>\nhmm\n</think>\n\n" + "answer " * rnd.randrange(1, 40)})
    got = later.apply_chat_template(conv, tools=tools, add_generation_prompt=True, tokenize=False)
    assert got == ref.apply_chat_template(conv, tools=tools, add_generation_prompt=True, tokenize=False)
    qwen2 = tok.apply_chat_template(conv[:700], add_generation_prompt=True, tokenize=False)
    assert qwen2 == ref.apply_chat_template(conv[:700], chat_template=tok.chat_template, add_generation_prompt=True,
                                           tokenize=False)
    t0 = time.process_time()
    later.apply_chat_template(conv, tools=tools, add_generation_prompt=True, tokenize=False)
    assert time.process_time() - t0 < 2  # about 0.05 s measured


@pytest.mark.parametrize("template, match", [
    ("{{ 1 + 'a' }}", "TypeError"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ range(10**9)|list }}", "Range too big"),
    ("{{ 10**5000 }}", "ValueError"),
    ("{{ 2**(10**9) }}", "integer past 65536 bits"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursed too deeply"),
    ("{{ messages[5] }}", ""),
    ("{% for m in 5 %}{% endfor %}", "TypeError"),
], ids=lambda t: str(t)[:40])
def test_template_runtime_errors_are_tokenizer_errors(tok, template, match):
    # a template is user code: what it raises must not surface as a raw Python traceback
    try:
        tok.apply_chat_template(CONV, chat_template=template, tokenize=False)
    except TokenizerError as e:
        assert match in str(e) and "chat template" in str(e)
    else:
        assert template == "{{ messages[5] }}"  # an undefined item prints as "", as in the reference


def test_chat_template_inputs_that_contain_themselves(tok):
    loop = {"a": 1}
    loop["self"] = loop
    with pytest.raises(TokenizerError, match="nested more than 200 levels deep"):
        tok.apply_chat_template(CONV, tokenize=False, tools=[loop])
    deep = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(TokenizerError, match=r"documents.*nested more than 200"):
        tok.apply_chat_template(CONV, tokenize=False, documents=[{"d": deep}])
    with pytest.raises(TokenizerError, match="tools must be a list"):
        tok.apply_chat_template(CONV, tokenize=False, tools={"type": "function"})


# ---- odd but valid text -------------------------------------------------------------------------
@pytest.mark.parametrize("text", [
    "", "\x00", "a\x00b\x00\x00", "<|im_end|>" * 10_000, "<|im_start|>x" * 20_000, "\x00<|endoftext|>\x00",
    "\ufeff", "\u200b" * 100, "\r\n" * 5000, "\t" * 3000 + "x",
])
def test_empty_nul_and_special_token_runs_match_the_reference(tok, fast, text):
    assert tok.encode(text) == _ref(fast, text)
    assert tok.decode(tok.encode(text)) == text


def test_empty_batches(tok):
    assert tok([]) == {"input_ids": [], "attention_mask": []}
    enc = tok([], padding=True, return_tensors="np")
    assert enc["input_ids"].shape == (0, 0) and enc["attention_mask"].shape == (0, 0)
    assert tok([""], return_tensors="np")["input_ids"].shape == (1, 0)
    assert tok.decode([]) == "" and tok.batch_decode([]) == []
    assert tok.apply_chat_template([], tokenize=False) == ""


# ---- malformed tokenizer files ------------------------------------------------------------------
def _tok_folder(tmp_path, qwen_bpe_dir, **files):
    # real vocab.json / merges.txt (linked, they are large) unless a test replaces them
    for name in ("vocab.json", "merges.txt"):
        if name not in files:
            (tmp_path / name).symlink_to(qwen_bpe_dir / name)
    for name, content in files.items():
        if content is None:
            continue
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        else:
            (tmp_path / name).write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return tmp_path


def _vocab(qwen_bpe_dir, **extra):
    vocab = json.loads((qwen_bpe_dir / "vocab.json").read_text(encoding="utf-8"))
    vocab.update(extra)
    return vocab


def _merges(qwen_bpe_dir, keep=None, extra=""):
    lines = (qwen_bpe_dir / "merges.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    return "".join(lines[:keep]) + extra


_BAD_FILES = {
    "vocab truncated": (lambda d: {"vocab.json": (d / "vocab.json").read_text(encoding="utf-8")[:5000]},
                        r"vocab\.json is not valid JSON"),
    "vocab not UTF-8": (lambda d: {"vocab.json": b"\xff\xfe{}"}, r"vocab\.json is not UTF-8"),
    "vocab a list": (lambda d: {"vocab.json": [1, 2]}, r"vocab\.json must hold a non-empty JSON object"),
    "vocab str id": (lambda d: {"vocab.json": _vocab(d, zzq="7")}, r"vocab\.json: token 'zzq' has id '7'"),
    "vocab shared id": (lambda d: {"vocab.json": _vocab(d, zzq=5)}, r"vocab\.json maps two tokens to id 5 \('&' and 'zzq'\)"),
    "vocab huge id": (lambda d: {"vocab.json": _vocab(d, zzq=10**9)}, r"vocab\.json ids must lie in \[0, 1048575\]"),
    "vocab surrogate": (lambda d: {"vocab.json": _vocab(d, **{"\ud800": 151700})}, r"token '\\ud800' \(id 151700\) is empty or holds an unpaired surrogate"),
    "vocab empty token": (lambda d: {"vocab.json": _vocab(d, **{"": 151700})}, r"token '' \(id 151700\) is empty"),
    "merges not UTF-8": (lambda d: {"merges.txt": b"#version: 0.2\n\xff a\n"}, r"merges\.txt is not UTF-8"),
    "merges empty": (lambda d: {"merges.txt": ""}, r"151387 of vocab\.json's 151643 tokens .* made by none of the 0 merges: merges\.txt is truncated"),
    "merges cut at a line": (lambda d: {"merges.txt": _merges(d, keep=100_000)}, r"made by none of the 99999 merges: merges\.txt is truncated"),
    "merges unknown token": (lambda d: {"merges.txt": _merges(d, extra="zzzzq yyyyq\n")}, r"merge 151387 \('zzzzq' 'yyyyq'.*not in the vocabulary"),
    "merges three parts": (lambda d: {"merges.txt": "#version: 0.2\nĠ t x\n"}, r"merges\.txt: line 2 is malformed"),
    "config a list": (lambda d: {"tokenizer_config.json": []}, r"tokenizer_config\.json must hold a JSON object"),
    "config truncated": (lambda d: {"tokenizer_config.json": '{"eos_token": '}, r"tokenizer_config\.json is not valid JSON"),
    "chat_template an int": (lambda d: {"tokenizer_config.json": {"chat_template": 5}}, r"tokenizer_config\.json: chat_template must be a Jinja string"),
    "chat_template.jinja not UTF-8": (lambda d: {"chat_template.jinja": b"\xff{{ x }}"}, r"chat_template\.jinja is not UTF-8"),
    "eos an int": (lambda d: {"tokenizer_config.json": {"eos_token": 5}}, r"eos_token must be a token string"),
    "model_max_length a str": (lambda d: {"tokenizer_config.json": {"model_max_length": "big"}}, r"model_max_length must be a positive int; got 'big'"),
    "model_max_length negative": (lambda d: {"tokenizer_config.json": {"model_max_length": -1}}, r"model_max_length must be a positive int; got -1"),
    "added ids collide": (lambda d: {"tokenizer_config.json": {"added_tokens_decoder": {
        "151643": {"content": "<|endoftext|>"}, "151644": {"content": "<|endoftext|>"}}}},
        r"added token '<\|endoftext\|>' is given two ids, 151643 and 151644"),
    "added id negative": (lambda d: {"tokenizer_config.json": {"added_tokens_decoder": {"-5": {"content": "<a>"}}}},
                          r"added_tokens_decoder key '-5' must be an id in \[0, 1048575\]"),
    "added id huge": (lambda d: {"tokenizer_config.json": {"added_tokens_decoder": {"99999999999": {"content": "<a>"}}}},
                      r"added_tokens_decoder key '99999999999' must be an id"),
    "added empty content": (lambda d: {"tokenizer_config.json": {"added_tokens_decoder": {"151643": {"content": ""}}}},
                            r"added token '' \(id 151643\) must be a non-empty str"),
    "added flag a str": (lambda d: {"tokenizer_config.json": {"added_tokens_decoder": {"151643": {"content": "<|endoftext|>", "special": "no"}}}},
                         r"added token '<\|endoftext\|>' \(id 151643\) has special='no'; it must be true or false"),
    "tokenizer.json a list": (lambda d: {"tokenizer.json": []}, r"tokenizer\.json must hold a JSON object"),
    "tokenizer.json added_tokens an int": (lambda d: {"tokenizer.json": {"added_tokens": 5}}, r"tokenizer\.json added_tokens must be a list"),
}


@pytest.mark.parametrize("case", list(_BAD_FILES))
def test_malformed_tokenizer_files_name_the_file_and_field(tmp_path, qwen_bpe_dir, case):
    files, match = _BAD_FILES[case]
    folder = _tok_folder(tmp_path, qwen_bpe_dir, **files(qwen_bpe_dir))
    with pytest.raises(TokenizerError, match=match):
        Qwen2Tokenizer.from_pretrained(folder)


_BAD_TOKENIZER_JSON = {
    "normalizer a str": ({"normalizer": "NFC"}, r"normalizer must be an object like"),
    "merges a str": ({"model": {"merges": "a b"}}, r"model\.merges must be a list"),
    "merges cut": ({"model": {"merges": "cut"}}, r"made by none of the 1000 merges"),
    "added_tokens an int": ({"added_tokens": 5}, r"added_tokens must be a list"),
    "added token id huge": ({"added_tokens": [{"id": 10**12, "content": "<a>"}]}, r"'<a>' has id 1000000000000; ids must lie"),
}


@pytest.mark.parametrize("case", list(_BAD_TOKENIZER_JSON))
def test_malformed_tokenizer_json_alone(tmp_path, qwen_bpe_dir, case):
    change, match = _BAD_TOKENIZER_JSON[case]
    spec = json.loads((qwen_bpe_dir / "tokenizer.json").read_text(encoding="utf-8"))
    for key, value in change.items():
        if key == "model":
            merges = value["merges"]
            spec["model"]["merges"] = spec["model"]["merges"][:1000] if merges == "cut" else merges
        else:
            spec[key] = value
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(TokenizerError, match=match):
        Qwen2Tokenizer.from_pretrained(tmp_path)


def test_bad_constructor_arguments(qwen_bpe_dir):
    from qwen2ms.tokenization import AddedToken
    from qwen2ms.tokenization.bpe import parse_merges

    vocab = _vocab(qwen_bpe_dir)
    merges = parse_merges((qwen_bpe_dir / "merges.txt").read_text(encoding="utf-8").splitlines())
    with pytest.raises(TokenizerError, match=r"merge 2 is \('a',\); each merge must be a pair"):
        Qwen2Tokenizer(vocab, merges[:2] + [("a",)] + merges[2:])
    with pytest.raises(TokenizerError, match="merges must be a list of"):
        Qwen2Tokenizer(vocab, "Ġ t")
    with pytest.raises(TokenizerError, match="added_tokens must hold AddedToken"):
        Qwen2Tokenizer(vocab, merges, added_tokens=["<x>"])
    with pytest.raises(TokenizerError, match=r"added token '<x>' has id -1"):
        Qwen2Tokenizer(vocab, merges, added_tokens=[AddedToken("<x>", -1)])
    with pytest.raises(TokenizerError, match="chat_template must be a str"):
        Qwen2Tokenizer(vocab, merges, chat_template=["{{ x }}"])
    with pytest.raises(TokenizerError, match="model_max_length must be a positive int"):
        Qwen2Tokenizer(vocab, merges, model_max_length=0)


def test_save_pretrained_into_a_file_path(tok, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(TokenizerError, match=r"save_pretrained: .*/f is a file"):
        tok.save_pretrained(tmp_path / "f")
    with pytest.raises(TokenizerError, match=r"save_pretrained: cannot create the folder .*/f/sub"):
        tok.save_pretrained(tmp_path / "f" / "sub")


def test_guarded_loops_keep_every_loop_feature(tok, qwen2_tokenizer_dir):
    # for-loops run through a counting wrapper; loop.length/last/revindex, filters, else, break,
    # recursion, cycle and tuple unpacking must behave as in the reference renderer
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)
    template = (
        "{% for m in messages %}{{ loop.index }}/{{ loop.length }}{{ '!' if loop.last }}{{ loop.revindex }}"
        "{{ loop.previtem.role if loop.previtem }}>{{ loop.nextitem.role if loop.nextitem }}"
        "{{ loop.cycle('a', 'b') }}{{ m.role ~ ':' ~ m.content }};{% endfor %}"
        "{% for m in messages if m.role == 'user' %}{{ m.content }}{% else %}none{% endfor %}"
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{% if loop.first %}{% continue %}"
        "{% endif %}[{{ m.content }}]{% endfor %}"
        "{% for k, v in tree.items() recursive %}({{ k }}{% if v is mapping %}{{ loop(v.items()) }}{% endif %})"
        "{% endfor %}{% for x in [] %}x{% else %}empty{% endfor %}"
        "{% set ns = namespace(n=0) %}{% for i in range(3) %}{% for j in range(i) %}{% set ns.n = ns.n + 1 %}"
        "{% endfor %}{% endfor %}{{ ns.n }}{{ messages | map(attribute='role') | join(',') }}"
        "{{ (messages | selectattr('role', 'equalto', 'user') | list | length) ~ '|' ~ 'x' * 3 ~ '%05d' % 42 }}"
    )
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}]
    tree = {"a": {"b": {"c": 1}, "d": 2}, "e": 3}
    got = tok.apply_chat_template(conv, chat_template=template, tokenize=False, tree=tree)
    assert got == ref.apply_chat_template(conv, chat_template=template, tokenize=False, tree=tree)
