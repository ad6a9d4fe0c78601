"""The model-agnostic generate loop with scripted/bigram NumPy decoders: stopping, padding, text, streaming, errors."""
import numpy as np
import pytest

from qwen2ms.generation import GenerationConfig, GenerationConfigError
from qwen2ms.generation.generate import decode_loop, left_pad, prepare_inputs, resolve_config, run_generation

SPECIAL = 300
VOCAB = 320


class ByteTokenizer:
    """Ids 0..255 are bytes, 256+ multi-byte pieces, 300 a special eos token; len() is 301 (< VOCAB)."""

    pieces = {256: "你".encode(), 257: "好".encode()[:2], 258: "好".encode()[2:] + b"!", 259: "😀".encode()[:1],
              260: "😀".encode()[1:], 261: b"op", 262: b"opera"}
    eos_token_id = SPECIAL
    pad_token_id = None

    def __len__(self):
        return 301

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=False):
        out = b""
        for i in ids:
            if i == SPECIAL:
                out += b"" if skip_special_tokens else b"<eos>"
            else:
                out += bytes([i]) if i < 256 else self.pieces[i]
        return out.decode("utf-8", errors="replace")


class Scripted:
    """Row b emits script[b][k] at step k (one-hot logits); records what the loop fed back."""

    def __init__(self, scripts, vocab=VOCAB):
        self.scripts = [list(s) for s in scripts]
        self.vocab = vocab
        self.k = 0
        self.fed = []
        self.prefills = []

    def _logits(self):
        out = np.zeros((len(self.scripts), self.vocab), np.float32)
        for b, s in enumerate(self.scripts):
            out[b, s[min(self.k, len(s) - 1)]] = 10.0
        return out

    def prefill(self, ids, mask):
        self.prefills.append((ids.copy(), mask.copy()))
        self.k = 0
        return self._logits()

    def step(self, tokens):
        self.fed.append(tokens.copy())
        self.k += 1
        return self._logits()


class Bigram:
    """Logits depend on the last token only: a fixed random table (for sampling tests)."""

    def __init__(self, batch, seed=0, vocab=64):
        self.table = np.random.default_rng(seed).normal(size=(vocab, vocab)).astype(np.float32)

    def prefill(self, ids, mask):
        return self.table[ids[:, -1]]

    def step(self, tokens):
        return self.table[tokens]


def _factory(decoder, calls=None):
    def make(batch, prompt_len, max_new_tokens):
        if calls is not None:
            calls.append((batch, prompt_len, max_new_tokens))
        return decoder
    return make


def test_eos_list_pads_and_trims_like_hf():
    dec = Scripted([[5, 6, 7, 8, 9], [5, 151645 % VOCAB, 1, 1, 1], [4, 4, 2, 9, 9]])
    cfg = GenerationConfig(max_new_tokens=5, eos_token_id=[151645 % VOCAB, 2], pad_token_id=0)
    ids = np.array([[1, 2], [3, 4], [5, 6]])
    out, lengths = decode_loop(dec, ids, np.ones_like(ids), cfg)
    np.testing.assert_array_equal(out, [[1, 2, 5, 6, 7, 8, 9], [3, 4, 5, 151645 % VOCAB, 0, 0, 0],
                                        [5, 6, 4, 4, 2, 0, 0]])
    np.testing.assert_array_equal(lengths, [5, 2, 3])
    # The padded tokens are what the model is fed for finished rows (as HF does).
    np.testing.assert_array_equal(dec.fed[-1], [8, 0, 0])


def test_loop_stops_when_all_rows_finish():
    dec = Scripted([[5, 2, 9], [2, 9, 9]])
    cfg = GenerationConfig(max_new_tokens=10, eos_token_id=2, pad_token_id=0)
    out, _ = decode_loop(dec, np.array([[1], [1]]), np.ones((2, 1), np.int64), cfg)
    np.testing.assert_array_equal(out, [[1, 5, 2], [1, 2, 0]])
    assert len(dec.fed) == 1  # no model step after the last token


def test_min_new_tokens_suppresses_eos():
    dec = Scripted([[2, 2, 2, 2]])
    dec_logits = dec._logits

    def logits_with_runner_up():
        out = dec_logits()
        out[:, 7] = 5.0  # second best
        return out
    dec._logits = logits_with_runner_up
    cfg = GenerationConfig(max_new_tokens=4, min_new_tokens=2, eos_token_id=2, pad_token_id=0)
    out = run_generation(_factory(dec), np.array([[1, 1]]), cfg)
    np.testing.assert_array_equal(out, [[1, 1, 7, 7, 2]])


def test_stop_strings_keep_tokens_and_cut_text():
    tok = ByteTokenizer()
    script = [ord("a"), ord("s"), ord("t"), 262, ord("z"), ord("z")]
    cfg = GenerationConfig(max_new_tokens=6, stop_strings=["stop"], eos_token_id=SPECIAL, pad_token_id=0)
    ids = run_generation(_factory(Scripted([script])), np.array([[65]]), cfg, tokenizer=tok)
    np.testing.assert_array_equal(ids, [[65, ord("a"), ord("s"), ord("t"), 262]])  # the token "opera" is kept
    text = run_generation(_factory(Scripted([script])), "A", cfg, tokenizer=tok)
    assert text == "astop"  # "era" after the stop string is dropped
    pieces = []
    assert run_generation(_factory(Scripted([script])), "A", cfg, tokenizer=tok, streamer=pieces.append) == "astop"
    assert "".join(pieces) == "astop"


def test_stop_strings_per_row_in_a_batch():
    tok = ByteTokenizer()
    scripts = [[ord("x"), ord("#"), ord("#"), ord("y")], [ord("#"), ord("a"), ord("#"), ord("#")]]
    cfg = GenerationConfig(max_new_tokens=4, stop_strings="##", pad_token_id=0)
    out = run_generation(_factory(Scripted(scripts)), [[65], [66]], cfg, tokenizer=tok)
    np.testing.assert_array_equal(out, [[65, ord("x"), ord("#"), ord("#"), 0], [66, ord("#"), ord("a"), ord("#"), ord("#")]])
    texts = run_generation(_factory(Scripted(scripts)), ["A", "B"], cfg, tokenizer=tok)
    assert texts == ["x##", "#a##"]


class Recorder:
    def __init__(self):
        self.pieces, self.ended = [], 0

    def put(self, text):
        self.pieces.append(text)

    def end(self):
        self.ended += 1


def test_streaming_chinese_and_emoji_equals_final_text():
    tok = ByteTokenizer()
    script = [256, 257, 258, 32, 259, 260] + list("é😀".encode()) + [SPECIAL]
    cfg = GenerationConfig(max_new_tokens=20, eos_token_id=SPECIAL, pad_token_id=0)
    rec = Recorder()
    text = run_generation(_factory(Scripted([script])), "hi", cfg, tokenizer=tok, streamer=rec)
    assert text == "你好! 😀é😀" == "".join(rec.pieces)
    assert rec.ended == 1 and all("\ufffd" not in p for p in rec.pieces)
    assert "" not in rec.pieces


def test_text_prompts_are_left_padded_and_return_strings():
    tok = ByteTokenizer()
    dec = Scripted([[ord("o"), ord("k"), SPECIAL], [ord("n"), SPECIAL, SPECIAL]])
    cfg = GenerationConfig(max_new_tokens=5, eos_token_id=SPECIAL)
    cfg = resolve_config(cfg, tokenizer=tok)
    calls = []
    assert run_generation(_factory(dec, calls), ["abc", "d"], cfg, tokenizer=tok) == ["ok", "n"]
    ids, mask = dec.prefills[0]
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(ids[1], [SPECIAL, SPECIAL, ord("d")])  # padded with the eos-derived pad id
    assert calls == [(2, 3, 5)]  # the cache is sized from the request


def test_vocab_limit_from_tokenizer_blocks_padding_ids():
    tok = ByteTokenizer()
    dec = Scripted([[310, 310]])  # id 310 >= len(tokenizer): a padded embedding row
    dec_logits = dec._logits

    def with_runner_up():
        out = dec_logits()
        out[:, ord("q")] = 1.0
        return out
    dec._logits = with_runner_up
    cfg = GenerationConfig(max_new_tokens=2, pad_token_id=0)
    assert run_generation(_factory(dec), "x", cfg, tokenizer=tok) == "qq"


def test_num_return_sequences_and_seed():
    cfg = GenerationConfig(max_new_tokens=6, do_sample=True, top_k=0, num_return_sequences=3, seed=7, pad_token_id=0)
    calls = []
    a = run_generation(_factory(Bigram(0), calls), np.array([[1, 2], [3, 4]]), cfg)
    b = run_generation(_factory(Bigram(0)), np.array([[1, 2], [3, 4]]), cfg)
    assert a.shape == (6, 8) and calls == [(6, 2, 6)]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:3, :2], [[1, 2]] * 3)
    assert len({tuple(r) for r in a[:3]}) > 1  # samples differ between the copies
    c = run_generation(_factory(Bigram(0)), np.array([[1, 2], [3, 4]]), cfg.update(seed=8))
    assert not np.array_equal(a, c)


def test_top_k_1_sampling_equals_greedy_in_the_loop():
    ids = np.array([[1, 2], [3, 4]])
    g = run_generation(_factory(Bigram(1)), ids, GenerationConfig(max_new_tokens=8, pad_token_id=0))
    s = run_generation(_factory(Bigram(1)), ids, GenerationConfig(max_new_tokens=8, do_sample=True, top_k=1,
                                                                 temperature=0.6, seed=3, pad_token_id=0))
    np.testing.assert_array_equal(g, s)


def test_injected_processor_sampler_and_criterion():
    seen = []

    def ban_five(input_ids, scores):
        seen.append(input_ids.shape[1])
        scores = scores.copy()
        scores[:, 5] = -np.inf
        return scores

    dec = Scripted([[5, 6, 6, 6]])
    dec_logits = dec._logits

    def with_runner_up():
        out = dec_logits()
        out[:, 9] = 1.0
        return out
    dec._logits = with_runner_up
    cfg = GenerationConfig(max_new_tokens=4, pad_token_id=0)
    out = run_generation(_factory(dec), np.array([[1]]), cfg, logits_processors=[ban_five],
                         stopping_criteria=[lambda x: x[:, -1] == 6])
    np.testing.assert_array_equal(out, [[1, 9, 6]])
    assert seen == [1, 2]
    out = run_generation(_factory(Scripted([[5, 6]])), np.array([[1]]), cfg.update(max_new_tokens=2),
                         sampler=lambda scores, rng: np.full(scores.shape[0], 3))
    np.testing.assert_array_equal(out, [[1, 3, 3]])


def test_prepare_inputs_variants():
    ids, mask, kind = prepare_inputs([3, 4, 5])
    assert ids.shape == (1, 3) and kind == "ids" and mask.sum() == 3
    ids, mask, _ = prepare_inputs([[3, 4, 5], [6]], pad_token_id=9)
    np.testing.assert_array_equal(ids, [[3, 4, 5], [9, 9, 6]])
    # HF's rule: a pad id that is not an eos id marks padding when no mask is given.
    ids, mask, _ = prepare_inputs(np.array([[9, 1, 2]]), pad_token_id=9, eos_token_ids=[2])
    np.testing.assert_array_equal(mask, [[0, 1, 1]])
    _, mask, _ = prepare_inputs(np.array([[9, 1, 2]]), pad_token_id=9, eos_token_ids=[9])
    np.testing.assert_array_equal(mask, [[1, 1, 1]])
    ms = pytest.importorskip("mindspore")
    ids, mask, _ = prepare_inputs(ms.Tensor(np.array([[1, 2]], np.int32)), ms.Tensor(np.array([[0, 1]], np.int32)))
    assert ids.dtype == np.int64 and mask.tolist() == [[0, 1]]
    np.testing.assert_array_equal(left_pad([[1], [2, 3]], 0)[1], [[0, 1], [1, 1]])


@pytest.mark.parametrize("inputs,mask,match", [
    (np.zeros((1, 0), np.int64), None, "prompt is empty"),
    ([], None, "prompt is empty"),
    (np.array([[1, 2], [3, 4]]), np.array([[1, 1], [0, 0]]), "row 1 is empty"),
    (np.array([[1, 2, 3]]), np.array([[1, 1, 0]]), "left padding"),
    (np.array([[1, 2, 3]]), np.array([[1, 1]]), "shape"),
    (np.array([[0.5, 1.0]]), None, "integer"),
    ("text", None, "tokenizer"),
])
def test_prepare_inputs_errors(inputs, mask, match):
    with pytest.raises(GenerationConfigError, match=match):
        prepare_inputs(inputs, mask)


def test_run_generation_errors():
    tok = ByteTokenizer()
    cfg = GenerationConfig(max_new_tokens=4, pad_token_id=0)
    with pytest.raises(GenerationConfigError, match="max_position_embeddings"):
        run_generation(_factory(Bigram(0)), np.array([[1, 2]]), cfg, max_position_embeddings=5)
    with pytest.raises(GenerationConfigError, match="single sequence"):
        run_generation(_factory(Bigram(0)), ["a", "b"], cfg, tokenizer=tok, streamer=print)
    with pytest.raises(GenerationConfigError, match="stop_strings needs a tokenizer"):
        run_generation(_factory(Bigram(0)), np.array([[1]]), cfg.update(stop_strings="x"))
    with pytest.raises(GenerationConfigError, match="streaming needs a tokenizer"):
        run_generation(_factory(Bigram(0)), np.array([[1]]), cfg, streamer=print)
    with pytest.raises(GenerationConfigError, match="only with token ids"):
        run_generation(_factory(Bigram(0)), "a", cfg, attention_mask=np.ones((1, 1)), tokenizer=tok)


def test_resolve_config_fallbacks():
    class M:
        class config:
            eos_token_id = 7
            pad_token_id = None
        generation_config = GenerationConfig(top_k=3)

    assert resolve_config(None, M(), None, eos_token_id=[]).eos_token_ids == []  # [] is not "unset"
    cfg = resolve_config(None, M(), None, max_new_tokens=9)
    assert cfg.top_k == 3 and cfg.eos_token_ids == [7] and cfg.pad_token_id == 7 and cfg.max_new_tokens == 9
    assert M.generation_config.max_new_tokens == 256  # the model's config is not modified
    cfg = resolve_config({"eos_token_id": [4, 5], "do_sample": True}, M())
    assert cfg.eos_token_ids == [4, 5] and cfg.pad_token_id == 4 and cfg.top_k == 50
    assert resolve_config(None).pad_token_id == 0
    with pytest.raises(TypeError, match="generation_config"):
        resolve_config(42)


def test_streaming_with_qwen2_tokenizer_equals_final_decode(qwen2_tokenizer_dir):
    from qwen2ms.tokenization import Qwen2Tokenizer

    tok = Qwen2Tokenizer.from_pretrained(qwen2_tokenizer_dir)
    text = "你好，世界！😀🎉 naïve café 𝔘𝔫𝔦 👨‍👩‍👧"
    script = tok.encode(text) + [tok.convert_tokens_to_ids("<|im_end|>")]
    cfg = resolve_config(GenerationConfig(max_new_tokens=len(script) + 3), tokenizer=tok)
    assert cfg.eos_token_ids == [151645]
    pieces = []
    out = run_generation(_factory(Scripted([script], vocab=151936)), "Hi", cfg, tokenizer=tok, streamer=pieces.append)
    assert out == text == "".join(pieces)
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 5
    # Array output: the eos token is kept (HF), nothing after it.
    ids = run_generation(_factory(Scripted([script], vocab=151936)), "Hi", cfg, tokenizer=tok, return_text=False)
    assert ids[0, -1] == 151645 and tok.decode(ids[0, 1:], skip_special_tokens=True) == text
