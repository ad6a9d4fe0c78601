"""GenerationConfig, logits processors (parity with transformers), samplers, stopping rules and streamers."""
import io
import json
import warnings

import numpy as np
import pytest

from qwen2ms.generation import (
    DEFAULT_MAX_NEW_TOKENS,
    CallbackStreamer,
    GenerationConfig,
    GenerationConfigError,
    IncrementalDecoder,
    MinNewTokens,
    RepetitionPenalty,
    StopState,
    StopStrings,
    Temperature,
    TextStreamer,
    TopK,
    TopP,
    VocabLimit,
    apply_processors,
    as_streamer,
    build_processors,
    greedy,
    make_rng,
    sample,
)
from qwen2ms.generation.stopping import RowText, run_criteria

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")

QWEN2_INSTRUCT_GEN = {
    "bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.1, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0",
}


def _t(x):
    return torch.from_numpy(np.ascontiguousarray(x))


def _random_scores(rng, batch, vocab, ties=False):
    x = (rng.normal(size=(batch, vocab)) * 3).astype(np.float32)
    if ties:
        x = np.round(x * 2) / 2  # many exact ties
    return x


# ---------------------------------------------------------------------------------------- config
def test_config_defaults_and_greedy_rules():
    cfg = GenerationConfig()
    assert cfg.max_new_tokens == DEFAULT_MAX_NEW_TOKENS == 256
    assert cfg.is_greedy and cfg.top_k == 50 and cfg.top_p == 1.0
    assert GenerationConfig(do_sample=True, temperature=0.0).is_greedy
    assert not GenerationConfig(do_sample=True).is_greedy
    assert GenerationConfig(eos_token_id=5).eos_token_ids == [5]
    assert GenerationConfig(eos_token_id=[1, 2]).eos_token_ids == [1, 2]
    assert GenerationConfig(eos_token_id=[]).eos_token_ids == []  # [] disables eos stopping
    assert GenerationConfig(stop_strings="x").stop_string_list == ["x"]


def test_config_json_round_trip_keeps_unknown_keys(tmp_path):
    data = dict(QWEN2_INSTRUCT_GEN, max_length=2048, _from_model_config=False, num_beams=1)
    (tmp_path / "generation_config.json").write_text(json.dumps(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # bookkeeping keys and neutral values must not warn
        cfg = GenerationConfig.from_json(tmp_path)
    assert cfg.do_sample and cfg.temperature == 0.7 and cfg.top_k == 20 and cfg.top_p == 0.8
    assert cfg.repetition_penalty == 1.1 and cfg.eos_token_ids == [151645, 151643] and cfg.pad_token_id == 151643
    assert cfg.extra["transformers_version"] == "4.37.0" and cfg.extra["max_length"] == 2048
    out = tmp_path / "out.json"
    cfg.to_json(out)
    again = GenerationConfig.from_json(out)
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert again.to_dict()["transformers_version"] == "4.37.0"


def test_config_unsupported_feature_warns_once():
    with pytest.warns(UserWarning, match="num_beam_groups"):
        cfg = GenerationConfig.from_dict({"num_beam_groups": 3, "top_k": 5})
    assert cfg.top_k == 5 and cfg.extra == {"num_beam_groups": 3}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GenerationConfig.from_dict({"num_beam_groups": 3})


def test_config_from_json_errors(tmp_path):
    with pytest.raises(GenerationConfigError, match="no generation config"):
        GenerationConfig.from_json(tmp_path)
    (tmp_path / "generation_config.json").write_text("{nope")
    with pytest.raises(GenerationConfigError, match="not valid JSON"):
        GenerationConfig.from_json(tmp_path / "generation_config.json")
    with pytest.raises(GenerationConfigError, match="JSON object"):
        GenerationConfig.from_dict([1, 2])


def test_update_returns_new_config_and_rejects_typos():
    base = GenerationConfig.from_dict(QWEN2_INSTRUCT_GEN)
    greedy_cfg = base.update(do_sample=False, max_new_tokens=7, top_k=None)
    assert base.do_sample and base.max_new_tokens == 256
    assert not greedy_cfg.do_sample and greedy_cfg.max_new_tokens == 7 and greedy_cfg.top_k == 20
    assert greedy_cfg.extra == base.extra and greedy_cfg.extra is not base.extra
    with pytest.raises(TypeError, match="max_tokens"):
        base.update(max_tokens=3)
    with pytest.raises(GenerationConfigError, match="temperature"):
        base.update(temperature=-1.0)


def test_greedy_with_inherited_sampling_fields_is_silent():
    cfg = GenerationConfig.from_dict(QWEN2_INSTRUCT_GEN)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = cfg.update(do_sample=False)
        g.validate(prompt_len=4, max_position_embeddings=4096)
        procs = build_processors(g, prompt_len=4, vocab_limit=151646)
    # Greedy keeps the repetition penalty (as HF) but never the sampling warpers.
    assert [type(p).__name__ for p in procs] == ["VocabLimit", "RepetitionPenalty"]


@pytest.mark.parametrize("field,value,match", [
    ("temperature", -0.1, "temperature"),
    ("top_p", 0.0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("top_k", -1, "top_k"),
    ("repetition_penalty", 0.0, "repetition_penalty"),
    ("repetition_penalty", -1.0, "repetition_penalty"),
    ("num_return_sequences", 0, "num_return_sequences"),
    ("max_new_tokens", 0, "max_new_tokens"),
    ("min_new_tokens", -1, "min_new_tokens"),
    ("do_sample", "yes", "do_sample"),
    ("eos_token_id", [1, -2], "eos_token_id"),
    ("eos_token_id", -3, "eos_token_id"),
    ("pad_token_id", 1.5, "pad_token_id"),
    ("stop_strings", "", "stop_strings"),
    ("stop_strings", ["ok", ""], "stop_strings"),
    ("seed", -1, "seed"),
])
def test_every_field_error(field, value, match):
    with pytest.raises(GenerationConfigError, match=match):
        GenerationConfig(**{field: value})


def test_request_errors():
    cfg = GenerationConfig(max_new_tokens=10)
    cfg.validate(prompt_len=22, max_position_embeddings=32)
    with pytest.raises(GenerationConfigError, match=r"22 \+ max_new_tokens 10 = 32|exceeds") as e:
        cfg.validate(prompt_len=23, max_position_embeddings=32)
    assert "at most 9" in str(e.value)
    with pytest.raises(GenerationConfigError, match="prompt is empty"):
        cfg.validate(prompt_len=0)
    with pytest.raises(GenerationConfigError, match="needs sampling"):
        GenerationConfig(num_return_sequences=2)
    GenerationConfig(num_return_sequences=2, do_sample=True)


# ---------------------------------------------------------------------------------------- processors vs HF
@pytest.mark.parametrize("ties", [False, True])
def test_repetition_penalty_matches_hf(ties):
    rng = np.random.default_rng(1)
    for penalty in (1.3, 0.7):
        scores = _random_scores(rng, 4, 50, ties)
        ids = rng.integers(0, 50, size=(4, 9))
        ids[0, :3] = 60  # ids beyond the output vocab are ignored, as in HF
        ours = RepetitionPenalty(penalty)(ids, scores)
        ref = lp.RepetitionPenaltyLogitsProcessor(penalty)(_t(ids), _t(scores.copy())).numpy()
        np.testing.assert_array_equal(ours, ref)
        pad = np.array([0, 3, 9, 1])
        ours = RepetitionPenalty(penalty, prompt_ignore_length=pad)(ids, scores)
        ref = lp.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=_t(pad))(_t(ids), _t(scores.copy()))
        np.testing.assert_array_equal(ours, ref.numpy())
        ours = RepetitionPenalty(penalty, prompt_ignore_length=4)(ids, scores)
        ref = lp.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=4)(_t(ids), _t(scores.copy()))
        np.testing.assert_array_equal(ours, ref.numpy())
    # Inputs are never modified in place.
    before = scores.copy()
    RepetitionPenalty(2.0)(ids, scores)
    np.testing.assert_array_equal(scores, before)


def test_repetition_penalty_applies_once_per_id():
    scores = np.array([[4.0, -4.0, 1.0]], np.float32)
    out = RepetitionPenalty(2.0)(np.array([[0, 0, 0, 1]]), scores)
    np.testing.assert_array_equal(out, [[2.0, -8.0, 1.0]])


def test_temperature_matches_hf():
    rng = np.random.default_rng(2)
    scores = _random_scores(rng, 3, 40)
    for t in (0.3, 0.7, 1.7):
        ref = lp.TemperatureLogitsWarper(t)(None, _t(scores)).numpy()
        np.testing.assert_array_equal(Temperature(t)(None, scores), ref)
    with pytest.raises(ValueError, match="greedy"):
        Temperature(0.0)


@pytest.mark.parametrize("ties", [False, True])
def test_top_k_matches_hf(ties):
    rng = np.random.default_rng(3)
    for _ in range(50):
        vocab = int(rng.integers(2, 80))
        scores = _random_scores(rng, 3, vocab, ties)
        k = int(rng.integers(1, vocab + 3))
        ref = lp.TopKLogitsWarper(k)(None, _t(scores)).numpy()
        np.testing.assert_array_equal(TopK(k)(None, scores), ref)
    np.testing.assert_array_equal(TopK(2)(None, np.array([[3, 1, 2, 2]], np.float32)), [[3, -np.inf, 2, 2]])


def test_top_p_matches_hf_without_ties():
    rng = np.random.default_rng(4)
    for _ in range(150):
        vocab = int(rng.integers(2, 300))
        scores = _random_scores(rng, 3, vocab)
        p = float(rng.choice([0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.999, 1.0]))
        ref = lp.TopPLogitsWarper(p)(None, _t(scores)).numpy()
        np.testing.assert_array_equal(TopP(p)(None, scores), ref)
        ref = lp.TopPLogitsWarper(p, min_tokens_to_keep=3)(None, _t(scores)).numpy()
        np.testing.assert_array_equal(TopP(p, min_tokens_to_keep=3)(None, scores), ref)


def test_top_p_matches_hf_with_ties():
    # torch.sort is not stable, so which of several *equal* scores at the cut survives is arbitrary
    # in HF; the kept values (and their count) must still agree, and ours is deterministic.
    rng = np.random.default_rng(5)
    for _ in range(150):
        vocab = int(rng.integers(2, 200))
        scores = _random_scores(rng, 3, vocab, ties=True)
        p = float(rng.choice([0.1, 0.5, 0.8, 0.9, 0.95]))
        ours = TopP(p)(None, scores)
        ref = lp.TopPLogitsWarper(p)(None, _t(scores)).numpy()
        np.testing.assert_array_equal(np.sort(ours, axis=1), np.sort(ref, axis=1))
        kept = np.isfinite(ours)
        for b in range(3):
            if kept[b].any():
                lowest = scores[b][kept[b]].min()
                tied = np.flatnonzero(scores[b] == lowest)
                # among equal scores at the cut, the highest ids are the ones kept (stable ascending sort)
                assert list(np.flatnonzero(kept[b] & (scores[b] == lowest))) == list(tied[-kept[b][tied].sum():])
    # Equal probabilities: cumulative 0.25, 0.5, 0.75, 1.0 -> with top_p=0.5 two are removed.
    out = TopP(0.5)(None, np.zeros((1, 4), np.float32))
    np.testing.assert_array_equal(out, [[-np.inf, -np.inf, 0, 0]])


def test_top_p_on_a_full_qwen_vocab_row_matches_hf_with_and_without_the_shortcut():
    """A 151,936-score row: peaked rows take the shortcut (only the top scores sorted), flat ones the full sort;
    both keep exactly what HF keeps, min_tokens_to_keep included."""
    rng = np.random.default_rng(11)
    taken = set()
    for scale, p, keep in [(10, 0.8, 1), (10, 0.95, 1), (4, 0.9, 1), (4, 0.5, 600), (0.5, 0.8, 1)]:
        scores = (rng.standard_normal((2, 151936)) * scale).astype(np.float32)
        ours = TopP(p, min_tokens_to_keep=keep)(None, scores)
        ref = lp.TopPLogitsWarper(p, min_tokens_to_keep=keep)(None, _t(scores)).numpy()
        np.testing.assert_array_equal(ours, ref, err_msg=f"scale {scale} top_p {p}")
        taken.add(TopP(p, min_tokens_to_keep=keep)._row_from_the_top(scores[0]) is not None)
    assert taken == {True, False}  # both paths ran
    # 300 equal top scores straddle the first try's 256: the result is the full stable sort's (the highest ids of
    # the tied ones kept; torch.sort is not stable, so HF agrees on the kept values and their count only)
    row = np.full((1, 8192), -20.0, np.float32)
    row[0, :300] = 5.0
    full = TopP(0.9)
    full._row_from_the_top = lambda r: None
    ours = TopP(0.9)(None, row)
    np.testing.assert_array_equal(ours, full(None, row))
    np.testing.assert_array_equal(np.sort(ours), np.sort(lp.TopPLogitsWarper(0.9)(None, _t(row)).numpy()))


def test_warper_chain_matches_hf_on_large_vocab():
    # After top-k, top-p works on the finite entries only (fast path); results must not change.
    rng = np.random.default_rng(6)
    scores = _random_scores(rng, 2, 5000)
    ids = rng.integers(0, 5000, size=(2, 30))
    cfg = GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1)
    ours = apply_processors(build_processors(cfg, prompt_len=30), ids, scores)
    ref = _t(scores.copy())
    for proc in (lp.RepetitionPenaltyLogitsProcessor(1.1), lp.TemperatureLogitsWarper(0.7),
                 lp.TopKLogitsWarper(20), lp.TopPLogitsWarper(0.8)):
        ref = proc(_t(ids), ref)
    np.testing.assert_array_equal(ours, ref.numpy())
    assert 1 <= np.isfinite(ours).sum(axis=1).max() <= 20


def test_min_new_tokens_matches_hf():
    rng = np.random.default_rng(7)
    scores = _random_scores(rng, 2, 30)
    for length in (5, 7, 8, 12):
        ids = rng.integers(0, 30, size=(2, length))
        ref = lp.MinNewTokensLengthLogitsProcessor(5, 3, [4, 29])(_t(ids), _t(scores)).numpy()
        np.testing.assert_array_equal(MinNewTokens(5, 3, [4, 29])(ids, scores), ref)
    out = MinNewTokens(5, 3, 4)(np.zeros((2, 6), np.int64), scores)
    assert np.isneginf(out[:, 4]).all() and np.isfinite(out[:, 29]).all()


def test_vocab_limit_masks_padding_rows():
    scores = np.zeros((2, 10), np.float32)
    scores[:, 8] = 100.0  # a padded row with a high logit must never be chosen
    out = VocabLimit(6)(None, scores)
    assert np.isneginf(out[:, 6:]).all() and (out[:, :6] == 0).all()
    assert greedy(out).max() < 6
    assert VocabLimit(10)(None, scores) is scores


def test_build_processors_order_matches_hf():
    cfg = GenerationConfig(do_sample=True, temperature=0.5, top_k=4, top_p=0.9, repetition_penalty=1.2,
                           min_new_tokens=2, eos_token_id=[1, 2])
    user = lambda ids, s: s  # noqa: E731
    procs = build_processors(cfg, prompt_len=3, vocab_limit=100, extra=[user])
    assert [type(p).__name__ for p in procs] == ["VocabLimit", "RepetitionPenalty", "MinNewTokens", "function",
                                                 "Temperature", "TopK", "TopP"]
    assert build_processors(GenerationConfig(), prompt_len=3) == []
    assert build_processors(GenerationConfig(do_sample=True, top_k=0), prompt_len=3) == []
    # temperature 0 with do_sample is greedy: no warpers
    assert build_processors(GenerationConfig(do_sample=True, temperature=0.0), prompt_len=3) == []


def test_build_processors_skips_left_padding_for_repetition_penalty():
    cfg = GenerationConfig(repetition_penalty=2.0)
    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]])
    ids = np.array([[7, 7, 1, 2], [7, 1, 2, 3]])  # 7 is the pad id in row 0
    scores = np.full((2, 8), 4.0, np.float32)
    out = apply_processors(build_processors(cfg, prompt_len=4, attention_mask=mask), ids, scores)
    assert out[0, 7] == 4.0 and out[1, 7] == 2.0 and out[0, 1] == 2.0


# ---------------------------------------------------------------------------------------- sampling
def test_seed_reproduces_samples_and_no_global_state():
    rng = np.random.default_rng(8)
    scores = _random_scores(rng, 4, 100)
    np.random.seed(123)
    a = [sample(scores, r) for r in [make_rng(11)] for _ in range(5)]
    global_state = np.random.get_state()[1].copy()
    b = [sample(scores, r) for r in [make_rng(11)] for _ in range(5)]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    np.testing.assert_array_equal(np.random.get_state()[1], global_state)
    c = np.stack([sample(scores, r) for r in [make_rng(12)] for _ in range(5)])
    assert not np.array_equal(np.stack(a), c)


def test_top_k_1_sampling_equals_greedy():
    rng = np.random.default_rng(9)
    cfg = GenerationConfig(do_sample=True, top_k=1, temperature=0.9, top_p=0.95)
    gen = make_rng(0)
    for _ in range(20):
        scores = _random_scores(rng, 5, 300)
        processed = apply_processors(build_processors(cfg, prompt_len=1), np.zeros((5, 1), np.int64), scores)
        np.testing.assert_array_equal(sample(processed, gen), greedy(scores))


def test_sample_follows_the_distribution_and_skips_filtered_ids():
    probs = np.array([0.1, 0.0, 0.6, 0.3])
    scores = np.log(np.where(probs > 0, probs, 1e-30))[None, :].astype(np.float32)
    scores[0, 1] = -np.inf
    gen = make_rng(3)
    draws = np.concatenate([sample(np.repeat(scores, 500, axis=0), gen) for _ in range(40)])
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert freq[1] == 0
    np.testing.assert_allclose(freq, probs, atol=0.01)


def test_sample_errors():
    with pytest.raises(ValueError, match="row 1"):
        sample(np.array([[0.0, 1.0], [-np.inf, -np.inf]], np.float32), make_rng(0))
    with pytest.raises(ValueError, match="NaN"):
        sample(np.array([[np.nan, 1.0]], np.float32), make_rng(0))
    with pytest.raises(ValueError, match=r"\+inf"):
        sample(np.array([[np.inf, 1.0]], np.float32), make_rng(0))


def test_greedy_takes_first_max():
    np.testing.assert_array_equal(greedy(np.array([[1, 3, 3], [5, 0, 5]], np.float32)), [1, 0])


# ---------------------------------------------------------------------------------------- stopping
def test_stop_state_pads_after_eos_list():
    st = StopState(3, eos_token_ids=[151645, 151643], pad_token_id=151643)
    steps = [np.array([5, 151645, 6]), np.array([7, 8, 151643]), np.array([9, 9, 9])]
    out = []
    for tokens in steps:
        appended = st.select(tokens)
        st.update(appended)
        out.append(appended)
    np.testing.assert_array_equal(np.stack(out, 1), [[5, 7, 9], [151645, 151643, 151643], [6, 151643, 151643]])
    assert not st.done
    st.update(st.select(np.array([151645, 0, 0])))
    assert st.done


def test_stop_state_without_eos_and_with_criteria():
    st = StopState(2, eos_token_ids=[], pad_token_id=0)
    st.update(st.select(np.array([3, 4])), stopped=np.array([False, True]))
    np.testing.assert_array_equal(st.unfinished, [True, False])
    ids = np.array([[1, 2], [3, 4]])
    np.testing.assert_array_equal(run_criteria([lambda x: x[:, -1] == 4, lambda x: False], ids), [False, True])
    assert run_criteria([], ids) is None
    with pytest.raises(ValueError, match="one per row"):
        run_criteria([lambda x: np.zeros(3, bool)], ids)


def test_stop_strings_find_end():
    s = StopStrings(["\nUser:", "###", "##"])
    assert s.find_end("Hi!### more") == 5  # "##" ends first
    assert s.find_end("no stop") is None
    assert s.find_end("a\nUser: b") == 7
    with pytest.raises(ValueError):
        StopStrings([""])


class ByteTokenizer:
    """Ids 0..255 are single bytes, 256+ are multi-byte tokens; 300 is a special token."""

    pieces = {256: "你".encode(), 257: "好".encode()[:2], 258: "好".encode()[2:] + b"!", 259: "😀".encode()[:1],
              260: "😀".encode()[1:], 261: b"op", 262: b"opera", 263: b"las", 264: b"topper", 265: b" st"}
    special = {300: "<|im_end|>"}

    def encode_text(self, text):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=False):
        out = b""
        for i in ids:
            if i in self.special:
                out += b"" if skip_special_tokens else self.special[i].encode()
            elif i < 256:
                out += bytes([i])
            else:
                out += self.pieces[i]
        return out.decode("utf-8", errors="replace")


def test_incremental_decoder_never_splits_characters():
    tok = ByteTokenizer()
    ids = [256, 257, 258, 32, 259, 260] + list("é€😀".encode()) + [300, 0x80, 65, 0xE4]
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces[:-3])
    assert pieces[1] == "" and pieces[2] == "好!"  # the split character waits for its last byte
    assert pieces[-1] == "\ufffd"  # an unfinished trailing character decodes as a full decode would


def test_row_text_stops_and_truncates_overhang():
    tok = ByteTokenizer()
    # "st" + "opera": the stop string "stop" ends inside the final token; "era" is cut.
    row = RowText(tok, StopStrings(["stop"]))
    got = [row.push(i) for i in [ord("s"), ord("t"), 262, ord("x")]]
    assert got == ["s", "t", "op", ""] and row.stopped and row.text == "stop"
    row = RowText(tok, StopStrings(["stop"]))
    assert "".join(row.push(i) for i in [263, 264]) == "lastop" and row.stopped
    row = RowText(tok, StopStrings(["好!"]))
    assert [row.push(i) for i in [256, 257, 258]] == ["你", "", "好!"] and row.stopped
    row = RowText(tok, None)
    assert "".join(row.push(i) for i in [265, 261]) == " stop" and not row.stopped


# ---------------------------------------------------------------------------------------- streamers
def test_streamers():
    buf = io.StringIO()
    s = TextStreamer(file=buf)
    s.put("你好")
    s.put("😀")
    s.end()
    assert buf.getvalue() == "你好😀\n"
    got = []
    cb = as_streamer(got.append)
    assert isinstance(cb, CallbackStreamer)
    cb.put("a")
    cb.end()
    assert got == ["a"]
    assert as_streamer(s) is s and as_streamer(None) is None
    with pytest.raises(TypeError, match="put"):
        as_streamer(42)


def test_incremental_decoder_with_real_qwen2_bpe(qwen2_tokenizer_dir):
    # Any tokenizer with decode(ids, skip_special_tokens=...) works; here the reference Qwen2 BPE.
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(qwen2_tokenizer_dir))
    text = "你好，世界！😀🎉 naïve café 𝔘𝔫𝔦"
    ids = tok.encode(text) + [151645]
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
