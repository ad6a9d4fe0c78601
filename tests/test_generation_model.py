"""generate()/chat() on real (tiny) Qwen2 models: greedy parity with transformers, cache vs recompute, text, streaming."""
import warnings

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qwen2ms import Qwen2Config  # noqa: E402
from qwen2ms.generation import GenerationConfigError  # noqa: E402
from qwen2ms.generation.engine import CachedDecoder  # noqa: E402
from qwen2ms.generation.generate import chat, generate  # noqa: E402
from qwen2ms.modeling import Qwen2ForCausalLM  # noqa: E402

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=1, max_position_embeddings=128,
            tie_word_embeddings=False, attn_implementation="eager")
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
QWEN2_INSTRUCT_GEN = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                      "eos_token_id": [151645, 151643], "repetition_penalty": 1.1, "temperature": 0.7,
                      "top_p": 0.8, "top_k": 20, "transformers_version": "4.37.0"}


def make_hf(tmp_path, moe=False):
    """A random tiny transformers model (O(1) weights so greedy choices are well separated), saved to disk."""
    cfg = (transformers.Qwen2MoeConfig if moe else transformers.Qwen2Config)(**dict(BASE, **(MOE if moe else {})))
    torch.manual_seed(0)
    model = (transformers.Qwen2MoeForCausalLM if moe else transformers.Qwen2ForCausalLM)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    folder = tmp_path / ("moe" if moe else "dense")
    model.save_pretrained(folder)
    return model, folder


def left_padded(lengths, t, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 256, (len(lengths), t))
    mask = np.zeros_like(ids)
    for r, n in enumerate(lengths):
        mask[r, t - n:] = 1
        ids[r, :t - n] = 0
    return ids, mask


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_greedy_equals_transformers_for_a_left_padded_batch(tmp_path, moe):
    hf, folder = make_hf(tmp_path, moe)
    model = Qwen2ForCausalLM.from_hf(folder)
    ids, mask = left_padded([7, 3, 5], 7)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        free = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), eos_token_id=None, **kw).numpy()
        eos = int(free[1, 7 + 3])  # a token row 1 emits early: rows then finish at different steps
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), eos_token_id=eos, **kw).numpy()
        ref_rp = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), eos_token_id=eos,
                             repetition_penalty=1.5, **kw).numpy()
    ours = generate(model, ids, attention_mask=mask, eos_token_id=eos, **kw)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref)
    assert (ours[1, 7 + 4:] == 0).all()  # pad after eos
    # The repetition penalty skips left padding and covers prompt + generated tokens, as in HF.
    np.testing.assert_array_equal(generate(model, ms.Tensor(ids), attention_mask=ms.Tensor(mask), eos_token_id=eos,
                                           repetition_penalty=1.5, **kw), ref_rp)


@pytest.fixture(scope="module")
def tiny():
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=96, tie_word_embeddings=True, eos_token_id=1)
    return Qwen2ForCausalLM(cfg, seed=3)


def test_cached_decode_logits_equal_full_recompute(tiny):
    ids, mask = left_padded([6, 2, 4], 6, seed=4)
    dec = CachedDecoder(tiny, batch_size=3, prompt_len=6, max_new_tokens=5)
    logits = dec.prefill(ids, mask)
    seq, full_mask = ids, mask
    for _ in range(3):
        ref = tiny(seq, attention_mask=full_mask).logits.asnumpy()[:, -1]
        assert np.abs(logits - ref).max() <= 1e-4
        nxt = logits.argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], 1)
        full_mask = np.concatenate([full_mask, np.ones((3, 1), np.int64)], 1)
        logits = dec.step(nxt)


def test_sampling_seed_and_num_return_sequences(tiny):
    kw = dict(do_sample=True, top_k=0, temperature=1.5, max_new_tokens=6, num_return_sequences=3, eos_token_id=[])
    a = generate(tiny, np.array([[5, 6, 7]]), seed=11, **kw)
    b = generate(tiny, np.array([[5, 6, 7]]), seed=11, **kw)
    c = generate(tiny, np.array([[5, 6, 7]]), seed=12, **kw)
    assert a.shape == (3, 9)  # batch 3: reuses the previous test's cache and graphs
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a[0], a[1])
    greedy = generate(tiny, np.array([[5, 6, 7]]), max_new_tokens=6, eos_token_id=[])
    top1 = generate(tiny, np.array([[5, 6, 7]]), do_sample=True, top_k=1, seed=0, max_new_tokens=6, eos_token_id=[])
    np.testing.assert_array_equal(greedy, top1)


def test_cache_is_sized_from_the_request_and_reused(tiny):
    generate(tiny, np.array([[5, 6, 7]]), max_new_tokens=4, eos_token_id=[])
    cache = tiny._generation_cache
    assert cache.batch_size == 1 and 3 + 4 <= cache.max_length <= 96
    generate(tiny, np.array([[5, 6, 7, 8]]), max_new_tokens=3)
    assert tiny._generation_cache is cache  # same shape class: its compiled decode step is reused
    with pytest.raises(GenerationConfigError, match="max_position_embeddings"):
        generate(tiny, np.array([[5, 6, 7]]), max_new_tokens=94)
    # Nothing compiles per token or per call: more tokens and another prompt of the same bucket add no graph.
    from mindspore.graph import api as ms_graph_api

    compiled = len(ms_graph_api.ms_compile_cache)
    out = generate(tiny, np.array([[9, 8, 7, 6, 5]]), max_new_tokens=20, eos_token_id=[])
    assert out.shape == (1, 25) and len(ms_graph_api.ms_compile_cache) == compiled


@pytest.fixture(scope="module")
def qwen_vocab_model(qwen2_tokenizer_dir):
    """A tiny model over the real Qwen2 vocabulary (151936 rows: 290 padded ones past the tokenizer)."""
    from qwen2ms.tokenization import Qwen2Tokenizer

    cfg = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=151643)
    model = Qwen2ForCausalLM(cfg, seed=5)
    model.tokenizer = Qwen2Tokenizer.from_pretrained(qwen2_tokenizer_dir)
    return model


def test_streaming_random_multibyte_tokens_equals_final_decode(qwen_vocab_model):
    tok = qwen_vocab_model.tokenizer
    pieces = []
    text = generate(qwen_vocab_model, "你好，世界 😀", streamer=pieces.append, do_sample=True, top_k=0,
                    temperature=2.0, seed=1, max_new_tokens=40, eos_token_id=[])
    assert isinstance(text, str) and text == "".join(pieces) and len(pieces) > 5
    ids = generate(qwen_vocab_model, "你好，世界 😀", do_sample=True, top_k=0, temperature=2.0, seed=1,
                   max_new_tokens=40, eos_token_id=[], return_text=False)
    prompt_len = len(tok.encode("你好，世界 😀"))
    assert text == tok.decode(ids[0, prompt_len:], skip_special_tokens=True)
    assert ids[0, prompt_len:].max() < len(tok)  # padded embedding rows are never generated
    assert any(ord(ch) > 0x2E80 for ch in text)  # CJK (multi-byte) text was actually streamed


def test_stop_strings_on_the_model(qwen_vocab_model):
    tok = qwen_vocab_model.tokenizer
    kw = dict(do_sample=True, top_k=0, temperature=2.0, seed=1, max_new_tokens=40, eos_token_id=[])
    full = generate(qwen_vocab_model, "你好，世界 😀", **kw)
    stop = full[3:5]
    cut = generate(qwen_vocab_model, "你好，世界 😀", stop_strings=[stop], **kw)
    assert cut == full[:full.index(stop) + len(stop)]
    ids = generate(qwen_vocab_model, "你好，世界 😀", stop_strings=[stop], return_text=False, **kw)
    prompt_len = len(tok.encode("你好，世界 😀"))
    assert tok.decode(ids[0, prompt_len:], skip_special_tokens=True).startswith(cut)
    assert ids.shape[1] < prompt_len + 40


def test_chat_and_no_warning_on_greedy(qwen_vocab_model):
    tok = qwen_vocab_model.tokenizer
    qwen_vocab_model.generation_config_dict = dict(QWEN2_INSTRUCT_GEN)
    try:
        messages = [{"role": "user", "content": "Hi"}]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            reply = chat(qwen_vocab_model, messages, do_sample=False, max_new_tokens=5)
        assert [w for w in caught if "qwen2ms" in str(w.filename)] == []
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        # Greedy keeps the inherited repetition penalty 1.1 (as HF); eos are the instruct pair.
        ids = generate(qwen_vocab_model, [prompt], do_sample=False, max_new_tokens=5)
        assert isinstance(reply, str) and reply == tok.decode(ids[0, len(prompt):], skip_special_tokens=True)
        plain = generate(qwen_vocab_model, [prompt], do_sample=False, max_new_tokens=5, repetition_penalty=1.0)
        assert plain.shape[0] == 1
    finally:
        qwen_vocab_model.generation_config_dict = None


def test_model_generate_and_chat_methods(qwen_vocab_model):
    kw = dict(max_new_tokens=4, eos_token_id=[])
    assert qwen_vocab_model.generate("你好", **kw) == generate(qwen_vocab_model, "你好", **kw)
    ids = qwen_vocab_model.generate(np.array([[9707, 1879]]), attention_mask=np.array([[1, 1]]), **kw)
    assert ids.shape == (1, 6) and (ids[:, :2] == [9707, 1879]).all()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert qwen_vocab_model.chat(messages, **kw) == chat(qwen_vocab_model, messages, **kw)


def test_text_batch_equals_single_prompts(qwen_vocab_model):
    single = generate(qwen_vocab_model, "你好，今天天气怎么样？", max_new_tokens=5, eos_token_id=[])
    outs = generate(qwen_vocab_model, ["Hello", "你好，今天天气怎么样？"], max_new_tokens=5, eos_token_id=[])
    assert isinstance(outs, list) and len(outs) == 2 and all(isinstance(o, str) for o in outs)
    assert outs[1] == single  # left padding in a batch changes nothing


def test_a_transformers_tokenizer_works_too(qwen_vocab_model, qwen2_tokenizer_dir):
    # Duck typing: an HF tokenizer (encode/decode/apply_chat_template returning an encoding dict) is accepted.
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(qwen2_tokenizer_dir))
    messages = [{"role": "user", "content": "你好"}]
    kw = dict(max_new_tokens=6, eos_token_id=[], do_sample=True, top_k=0, temperature=2.0, seed=4)
    pieces = []
    ours = chat(qwen_vocab_model, messages, **kw)
    theirs = chat(qwen_vocab_model, messages, tokenizer=hf_tok, streamer=pieces.append, **kw)
    assert ours == theirs == "".join(pieces)
