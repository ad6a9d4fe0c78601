"""Token-for-token parity of Qwen2Tokenizer with transformers' Qwen2Tokenizer on the real Qwen2 BPE files."""
import random
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen2ms import Qwen2Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

ENGLISH = (
    "the of and to in is was he for it with as his on be at by I had not are but from or have an they which one "
    "you were her all she there would their we him been has when who will more no if out so said what up its about "
    "into than them can only other new some could time these two may then do first any my now such like our over "
    "man me even most made after also did many before must through back years where much your way well down should "
    "because each just those people Mr how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great old year off come "
    "tokenizer Transformer MindSpore attention gradient embedding Qwen checkpoint don't it's we're they've I'm "
    "you'll he'd O'Neil rock'n'roll naïve café résumé coöperate fiancée Zürich São Paulo"
).split()
CHINESE = (
    "我们 今天 讨论 机器学习 模型 在 中文 文本 上 的 表现 以及 如何 提高 分词器 速度 大语言模型 训练 需要 大量 数据 "
    "和 计算 资源 通义千问 是 阿里巴巴 开发 人工智能 助手 北京 上海 深圳 天气 很好 你好 世界 谢谢 请问 这个 问题 "
    "怎么 解决 程序员 编写 代码 测试 通过 失败 错误 信息 龘 齉 饕餮 魑魅魍魉 鬱 㐀 𠀀 𪚥"
).split()
JAPANESE = "これは 日本語の 文章 です。 カタカナ トークナイザー ひらがな 漢字 東京 大阪 ありがとう ございます ｶﾀｶﾅ".split()
KOREAN = "안녕하세요 한국어 문장 입니다 토크나이저 서울 감사합니다 ㄱㄴㄷ 똠방각하".split()
ARABIC = "مرحبا بالعالم هذه جملة عربية للاختبار النموذج اللغوي الكبير ١٢٣ ٤٥٦".split()
HINDI = "नमस्ते दुनिया यह एक परीक्षण वाक्य है क्षत्रिय श्री ज्ञान १२३".split()
CYRILLIC = "Привет мир это тестовое предложение для токенизатора Ёжик съешь ещё этих мягких булок".split()
EMOJI = [
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇨🇳", "🇯🇵", "❤️", "🧑🏿‍💻", "👩‍❤️‍💋‍👨", "🤖", "✨", "🙇‍♀️", "1️⃣", "#️⃣",
]
COMBINING = [
    "e\u0301", "a\u0300\u0316", "n\u0303", "o\u0308\u0304", "\u1100\u1161\u11a8", "A\u030a", "Å", "ﬁ", "Ⅻ", "ｱ",
    "x\u0338", "=\u0338", ">\u0338", "<\u0338", "\u0915\u093c", "\u05d0\u05b7", "ǆ", "ẛ\u0323", "\u0301",
]
CODE = [
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "const x = await fetch(`https://example.com/api?q=${q}&n=10`);\r\n",
    "if __name__ == \"__main__\":\n    main()\n\n\n",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;\n",
    "    \t  x = {'a': [1, 2, 3], \"b\": None}\n",
    "<div class=\"c\">&nbsp;&lt;tag&gt;</div>\n",
    "fn main() -> Result<(), Box<dyn Error>> { println!(\"{:?}\", v); Ok(()) }\n",
    "x=1;y=2;;;;;;;;z=[[[]]]{{{}}}!!!???...---___***",
]
WHITESPACE = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r\n\r\n", "\r", " \n ", "\u00a0", "\u3000",
              "\u2009", "          ", " \t \n", "\n   \n", "\u200b", "\ufeff"]
PUNCT = [".", ",", "!", "?", "...", "—", "–", "“", "”", "«", "»", "。", "，", "、", "！", "？", "：", "（", "）",
         "'s", "'S", "'ll", "'LL", "'d", "'", "\"", "$", "%", "@", "#", "©", "°C", "±", "∑", "√", "∞", "≠", "≤"]
SPECIAL_LIKE = SPECIALS + ["<|im_start", "<|im_end", "|>", "<|", "<|endoftext|", "< |im_end|>", "<|IM_END|>",
                           "<|im_start|><|im_end|>", "x<|endoftext|>y", " <|im_end|> ", "<|im_start|>user\n"]


def _number(rnd: random.Random) -> str:
    kind = rnd.randrange(4)
    if kind == 0:
        return str(rnd.randrange(10 ** rnd.randrange(1, 12)))
    if kind == 1:
        return f"{rnd.uniform(-1e4, 1e4):.{rnd.randrange(0, 6)}f}"
    if kind == 2:
        return f"{rnd.randrange(1900, 2100)}-{rnd.randrange(1, 13):02d}-{rnd.randrange(1, 29):02d}"
    return "".join(rnd.choice("0123456789") for _ in range(rnd.randrange(1, 30)))


def _random_chars(rnd: random.Random) -> str:
    blocks = [(0x20, 0x7F), (0xA0, 0x250), (0x370, 0x530), (0x590, 0x700), (0x900, 0xA00), (0xE00, 0xE80),
              (0x1100, 0x1200), (0x2000, 0x2BFF), (0x3000, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
              (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF)]
    lo, hi = rnd.choice(blocks)
    return "".join(chr(rnd.randrange(lo, hi)) for _ in range(rnd.randrange(1, 12)))


def mixed_text(n_bytes: int, seed: int = 0) -> list:
    """Deterministic documents of mixed scripts, code, whitespace, emoji and special-token strings."""
    rnd = random.Random(seed)
    words = {
        "en": ENGLISH, "zh": CHINESE, "ja": JAPANESE, "ko": KOREAN, "ar": ARABIC, "hi": HINDI, "ru": CYRILLIC,
    }
    docs, total = [], 0
    while total < n_bytes:
        parts = []
        for _ in range(rnd.randrange(5, 120)):
            r = rnd.random()
            if r < 0.45:
                lang = rnd.choice(list(words))
                sep = "" if lang in ("zh", "ja") and rnd.random() < 0.6 else " "
                parts.append(sep.join(rnd.choice(words[lang]) for _ in range(rnd.randrange(1, 15))))
            elif r < 0.55:
                parts.append(rnd.choice(CODE))
            elif r < 0.65:
                parts.append(rnd.choice(WHITESPACE))
            elif r < 0.72:
                parts.append(rnd.choice(PUNCT))
            elif r < 0.77:
                parts.append(rnd.choice(EMOJI) * rnd.randrange(1, 3))
            elif r < 0.82:
                parts.append(rnd.choice(COMBINING))
            elif r < 0.87:
                parts.append(_number(rnd))
            elif r < 0.91:
                parts.append(rnd.choice(SPECIAL_LIKE))
            else:
                parts.append(_random_chars(rnd))
            if rnd.random() < 0.5:
                parts.append(rnd.choice([" ", "", "\n", " ", ", ", ". "]))
        doc = "".join(parts)
        form = rnd.random()
        if form < 0.1:
            doc = unicodedata.normalize("NFD", doc)
        elif form < 0.15:
            doc = unicodedata.normalize("NFKD", doc)
        docs.append(doc)
        total += len(doc.encode("utf-8"))
    return docs


@pytest.fixture(scope="module")
def ours(qwen2_tokenizer_dir):
    return Qwen2Tokenizer.from_pretrained(qwen2_tokenizer_dir)


@pytest.fixture(scope="module")
def hf(qwen2_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)
    assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) == 151646
    return tok


def _first_mismatch(a, b):
    return next(i for i, (x, y) in enumerate(zip(a + [None], b + [None])) if x != y)


def test_reference_is_qwen2_from_these_files(hf, qwen2_tokenizer_dir):
    assert hf.vocab_size == 151643
    assert hf.convert_tokens_to_ids(SPECIALS) == [151643, 151644, 151645]
    assert hf.eos_token == "<|im_end|>" and hf.pad_token == "<|endoftext|>" and hf.bos_token is None


def test_golden_ids(ours, hf):
    assert ours.encode("Hello world") == [9707, 1879]
    assert ours.encode(" Hello world") == [21927, 1879]
    assert ours.encode("<|im_start|>user\nHi<|im_end|>") == hf("<|im_start|>user\nHi<|im_end|>")["input_ids"]


def test_special_tokens_are_matched_before_nfc(ours, hf):
    # ">" + U+0338 composes to "≯" under NFC: splitting on special tokens must come first, as in the reference.
    for text in ["<|im_end|>\u0338", "a<|endoftext|>\u0338b", "<|im_start|\u0338>", "x>\u0338<|im_end|>"]:
        ids = hf(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == ids, text
    assert 151645 in ours.encode("<|im_end|>\u0338")


def test_generator_covers_what_it_claims():
    docs = mixed_text(200_000, seed=1)
    text = "".join(docs)
    for needle in ["<|im_end|>", "\r\n", "\u200d", "\t", "龘", "안녕", "नमस्ते", "Привет", "مرحبا", "'LL", "\u0301"]:
        assert needle in text, needle
    assert any(not unicodedata.is_normalized("NFC", d) for d in docs)


def _check_encode_decode(ours, hf, docs):
    ref = hf(docs, add_special_tokens=False)["input_ids"]
    bad = []
    for doc, want in zip(docs, ref):
        got = ours.encode(doc)
        if got != want:
            at = _first_mismatch(got, want)
            bad.append((doc[:200], at, got[max(0, at - 3):at + 3], want[max(0, at - 3):at + 3]))
    assert not bad, f"{len(bad)} of {len(docs)} documents differ; first: {bad[0]}"
    for skip in (False, True):
        want = hf.batch_decode(ref, skip_special_tokens=skip)
        got = ours.batch_decode(ref, skip_special_tokens=skip)
        diff = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
        assert not diff, f"decode(skip_special_tokens={skip}) differs on {len(diff)} documents, first {diff[0]}"


def test_parity_small_always_on(ours, hf):
    _check_encode_decode(ours, hf, mixed_text(100_000, seed=7))


def test_parity_one_megabyte(ours, hf):
    docs = mixed_text(1_050_000, seed=2024)
    assert sum(len(d.encode("utf-8")) for d in docs) >= 1_000_000
    _check_encode_decode(ours, hf, docs)


def test_parity_cold_cache_equals_warm(qwen2_tokenizer_dir, hf):
    # A tiny cache forces evictions and recomputation; results must not depend on cache state.
    tok = Qwen2Tokenizer.from_pretrained(qwen2_tokenizer_dir, cache_size=64)
    docs = mixed_text(30_000, seed=3)
    assert [tok.encode(d) for d in docs] == hf(docs, add_special_tokens=False)["input_ids"]
    assert len(tok._bpe.cache) <= 64


def test_parity_random_letter_runs(ours, hf):
    # Runs of random letters from many scripts (no repeated words): exercises the per-character
    # start states and the CJK run cutting on character pairs never seen before.
    rnd = random.Random(11)
    blocks = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xAC00, 0xD7A3), (0x3040, 0x30FF), (0x0900, 0x097F),
              (0x0400, 0x04FF), (0x0600, 0x06FF), (0x00C0, 0x024F), (0x0370, 0x03FF), (0x20000, 0x2A6DF),
              (0x0E00, 0x0E7F), (0x1F300, 0x1FAFF)]
    docs = []
    for _ in range(2500):
        picked = [rnd.choice(blocks) for _ in range(rnd.randrange(1, 4))]
        docs.append("".join(
            chr(rnd.randrange(*rnd.choice(picked))) if rnd.random() > 0.05 else rnd.choice(" ,.a1Z\n，。“")
            for _ in range(rnd.randrange(1, 60))
        ))
    _check_encode_decode(ours, hf, docs)


_ALPHABET = st.one_of(
    st.characters(exclude_categories=("Cs",)),
    st.sampled_from(list(" \t\n\r\u00a0\u3000'sSlLdDmM<|>0123456789") + ["\u0301", "\u200d", "\u0338"]),
    st.sampled_from(list("我们的是中文龘안녕नमस्तेПривет😀👍🏽") + SPECIALS),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(_ALPHABET, max_size=40).map("".join))
def test_parity_hypothesis_text(ours, hf, text):
    want = hf(text, add_special_tokens=False)["input_ids"]
    assert ours.encode(text) == want
    assert ours.decode(want) == hf.decode(want)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_parity_hypothesis_any_unicode(ours, hf, text):
    assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"]


_IDS = st.lists(
    st.one_of(
        st.integers(0, 151642),
        st.integers(100, 260),  # single bytes: splits multi-byte characters
        st.sampled_from([151643, 151644, 151645]),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=_IDS)
def test_decode_parity_on_arbitrary_ids(ours, hf, ids):
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


_COMMON_HANZI = "的是了我们在有人这中大为上个国和地到以说时要就出会可也你对生能而子那得于着下自之年过发后作里用道行所然家种事成方多经么去法学如都同现当没动面起看定天分还进好小部其些主样理心她本前开但因只从想实"
_CJK_RUNS = st.lists(
    st.one_of(
        st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
        st.sampled_from(list(_COMMON_HANZI)),
        st.sampled_from(list(" ，。a1\n“”")),
    ),
    max_size=80,
).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_CJK_RUNS)
def test_parity_hypothesis_cjk_runs(ours, hf, text):
    # Frequent characters form multi-character tokens: the run cutting and start states must agree.
    assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
