"""LLMEngine / LLM on real tiny Qwen2 models (dense and MoE) through the paged runner: every request's output
equals ``model.generate`` on it alone, with staggered arrivals, prefix hits and preemption; seeds, stops, n, abort.

The dense model's engine is shared by the tests of this module (its compiled graphs are reused); every test
leaves it empty, which the tests check.
"""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")

from qwen2ms import Qwen2Config  # noqa: E402
from qwen2ms.modeling import Qwen2ForCausalLM  # noqa: E402
from qwen2ms.serving import LLMEngine, RequestError, SamplingParams  # noqa: E402
from qwen2ms.tokenization import Qwen2Tokenizer  # noqa: E402

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, eos_token_id=1)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48)
EOS = 1


def tiny_model(moe, seed=0):
    """A tiny model with O(1) weights, so greedy choices are well separated and replies vary.

    The MoE model has one layer: its graphs compile in half the time, and the paging across layers is
    checked by the two-layer dense model.
    """
    config = Qwen2Config(**dict(BASE, **(dict(MOE, num_hidden_layers=1) if moe else {})))
    model = Qwen2ForCausalLM(config, seed=seed)
    rng = np.random.default_rng(seed)
    for p in model.get_parameters():
        shape = tuple(p.shape)
        value = 1.0 + 0.1 * rng.standard_normal(shape) if p.name.endswith("norm.weight") else \
            0.15 * rng.standard_normal(shape)
        p.set_data(ms.Tensor(value.astype(np.float32), p.dtype))
    return model


#: Engine shapes: the pools are small enough that the workloads below preempt (checked), and the sizes keep the
#: number of compiled graphs low (decode batch buckets up to max_num_seqs, prefill buckets up to max_model_len).
SHAPES = {False: dict(block_size=4, num_blocks=14, max_num_seqs=4, max_model_len=32),
          True: dict(block_size=4, num_blocks=5, max_num_seqs=2, max_model_len=16)}
#: (system prompt length, extra prompt lengths of 3 requests with it and 3 without, max_tokens, arrival steps)
WORKLOADS = {False: (10, (2, 9, 5, 3, 14, 7), (12, 6, 12, 16, 9, 12, 10), (0, 0, 1, 3, 3, 4, 6)),
             True: (6, (1, 3, 2, 3, 6, 5), (4, 3, 6, 8, 5, 7, 5), (0, 0, 1, 2, 2, 3, 5))}


@pytest.fixture(scope="module")
def dense(qwen2_tokenizer_dir):
    """The dense model and its engine, with the real Qwen2 tokenizer (ids below 256 are its byte tokens)."""
    from qwen2ms.tokenization import Qwen2Tokenizer

    model = tiny_model(moe=False)
    tok = Qwen2Tokenizer.from_pretrained(qwen2_tokenizer_dir)
    return model, LLMEngine(model, tok, verbose=False, **SHAPES[False])


def reference(model, prompt, max_new, **kw):
    """``model.generate`` on the prompt alone: its generated ids (eos included, padding dropped)."""
    out = model.generate(np.array([prompt]), max_new_tokens=max_new, **kw)[0, len(prompt):].tolist()
    eos = kw.get("eos_token_id", [EOS])
    for i, t in enumerate(out):
        if t in eos:
            return out[:i + 1]
    return out


def drain(engine, schedule=None):
    schedule = schedule or {}
    done, step = {}, 0
    while engine.has_unfinished_requests() or any(k >= step for k in schedule):
        for rid, prompt, params in schedule.get(step, []):
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            if out.finished:
                assert out.request_id not in done
                done[out.request_id] = out
        step += 1
    assert engine.stats().num_blocks_used == 0 and engine.stats().num_running == 0
    return done


def check_greedy_parity(model, engine, moe):
    before = engine.stats()
    sys_len, lengths, max_new, arrivals = WORKLOADS[moe]
    rng = np.random.default_rng(3)
    system = [int(x) for x in rng.integers(2, 256, sys_len)]  # a shared "system prompt"
    prompts = [system + [int(x) for x in rng.integers(2, 256, n)] for n in lengths[:3]]
    prompts += [[int(x) for x in rng.integers(2, 256, n)] for n in lengths[3:]]
    prompts.append(list(system))  # a prompt that is entirely a cached prefix
    schedule = {}
    for i, (p, m) in enumerate(zip(prompts, max_new)):
        schedule.setdefault(arrivals[i], []).append((f"r{i}", p, SamplingParams(temperature=0, max_tokens=m)))
    done = drain(engine, schedule)
    for i, (p, m) in enumerate(zip(prompts, max_new)):
        out = done[f"r{i}"].outputs[0]
        assert out.token_ids == reference(model, p, m), f"request r{i}"
        assert out.finish_reason == ("stop" if out.token_ids[-1] == EOS else "length")
    after = engine.stats()
    assert after.num_preemptions > before.num_preemptions
    assert after.prefix_cache_hit_tokens > before.prefix_cache_hit_tokens
    assert done["r1"].num_cached_tokens == sys_len // 4 * 4  # the system prompt's full blocks
    assert len({len(o.outputs[0].token_ids) for o in done.values()}) > 3


@pytest.mark.slow  # compiles the engine's five graphs (shared with the tests below) and generate's two
def test_greedy_equals_generate_alone_with_prefix_hits_and_preemption(dense):
    check_greedy_parity(*dense, moe=False)


@pytest.mark.slow  # its own model: three engine graphs and generate's two
def test_moe_greedy_equals_generate_alone_with_prefix_hits_and_preemption():
    model = tiny_model(moe=True)
    check_greedy_parity(model, LLMEngine(model, verbose=False, **SHAPES[True]), moe=True)


def test_a_step_stops_admitting_once_its_prefills_reach_max_num_batched_tokens(dense):
    """Budget 10, three 6-token prompts: step 1 prefills two (6, then 12 >= 10) and decodes them, step 2 the third
    while the first two decode; the outputs are still generate's."""
    model, engine = dense
    prompts = {f"b{i}": [240 + i, 3, 4, 5, 6, 7] for i in range(3)}  # different first blocks: no prefix hits
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    old = engine.max_num_batched_tokens
    engine.max_num_batched_tokens = 10
    try:
        for rid, prompt in prompts.items():
            engine.add_request(rid, prompt, params)
        steps, done = [], {}
        while engine.has_unfinished_requests():
            outs = engine.step()
            steps.append({o.request_id: len(o.outputs[0].token_ids) for o in outs})
            done.update({o.request_id: o for o in outs if o.finished})
    finally:
        engine.max_num_batched_tokens = old
    assert steps[0] == {"b0": 2, "b1": 2}  # first token from the prefill, second from the step's decode
    assert steps[1] == {"b0": 3, "b1": 3, "b2": 2}
    for rid, prompt in prompts.items():
        assert done[rid].outputs[0].token_ids == reference(model, prompt, 3, eos_token_id=[])
    assert engine.stats().num_blocks_used == 0


def test_max_num_batched_tokens_must_be_a_positive_integer_or_none(dense):
    model, _ = dense
    with pytest.raises(ValueError, match="max_num_batched_tokens must be a positive integer, got 0"):
        LLMEngine(model, verbose=False, max_num_batched_tokens=0, **SHAPES[False])
    assert LLMEngine(model, verbose=False, max_num_batched_tokens=None, **SHAPES[False]).max_num_batched_tokens is None


def test_seeded_sampling_is_reproducible_whatever_the_batch_and_equals_generate(dense):
    model, engine = dense
    prompt = [7, 8, 9, 10, 11]
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2, max_tokens=10, seed=5,
                            ignore_eos=True)
    alone = drain(engine, {0: [("x", prompt, params)]})["x"].outputs[0].token_ids
    rng = np.random.default_rng(0)
    crowd = {0: [(f"a{j}", [int(t) for t in rng.integers(2, 256, 6 + j)], SamplingParams(temperature=1.0, max_tokens=8))
                 for j in range(3)],
             2: [("x", prompt, params)]}
    assert drain(engine, crowd)["x"].outputs[0].token_ids == alone
    ref = model.generate(np.array([prompt]), do_sample=True, temperature=0.8, top_k=40, top_p=0.9,
                         repetition_penalty=1.2, seed=5, max_new_tokens=10, eos_token_id=[])[0, len(prompt):]
    assert alone == ref.tolist()


def test_n_completions_min_tokens_and_stop_token_ids(dense):
    model, engine = dense
    prompt = [20, 21, 22, 23, 24, 25]
    free = reference(model, prompt, 12, eos_token_id=[])
    done = drain(engine, {0: [
        ("n", prompt, SamplingParams(n=3, temperature=1.0, seed=2, max_tokens=5, ignore_eos=True)),
        ("stop", prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[free[3]], ignore_eos=True)),
        ("min", prompt, SamplingParams(temperature=0, max_tokens=12, min_tokens=6, stop_token_ids=[free[3]],
                                       ignore_eos=True)),
    ]})
    outs = done["n"].outputs
    assert [o.index for o in outs] == [0, 1, 2] and all(len(o.token_ids) == 5 for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) == 3
    first = free.index(free[3])
    assert done["stop"].outputs[0].token_ids == free[:first + 1]
    assert done["stop"].outputs[0].stop_reason == free[3]
    mins = done["min"].outputs[0].token_ids
    assert len(mins) >= 6 and free[3] not in mins[:6]


def test_abort_frees_blocks_at_once(dense):
    _, engine = dense
    engine.add_request("long", list(range(30, 42)), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.add_request("short", [5, 6], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.stats().num_blocks_used > 0
    engine.abort_request("long")
    engine.abort_request("short")
    assert engine.stats().num_blocks_used == 0 and not engine.has_unfinished_requests()
    with pytest.raises(RequestError, match="prompt length 20 \\+ max_tokens 16 = 36 exceeds max_model_len 32"):
        engine.add_request("big", list(range(2, 22)), SamplingParams())


def test_text_and_stop_strings_match_generate(dense):
    model, engine = dense
    tok = engine.tokenizer
    prompt = list(range(70, 82))  # byte-level tokens: letters
    kw = dict(do_sample=True, top_k=0, temperature=1.5, seed=1, max_new_tokens=16, eos_token_id=[])
    full = model.generate([prompt], tokenizer=tok, return_text=True, **kw)[0]
    stop = full[4:6]
    params = SamplingParams(temperature=1.5, seed=1, max_tokens=16, ignore_eos=True)
    done = drain(engine, {0: [("plain", prompt, params), ("cut", prompt, params.clone(stop=[stop, "\x00"]))]})
    assert done["plain"].outputs[0].text == full and done["plain"].prompt is None
    cut = done["cut"].outputs[0]
    assert cut.text == full[:full.index(stop)] and cut.stop_reason == stop and cut.finish_reason == "stop"
    assert len(cut.token_ids) < 16


def test_llm_loads_a_checkpoint_folder_with_its_tokenizer(tmp_path, qwen2_tokenizer_dir):
    """``LLM(path)`` (the README's first line) reads the weights with from_hf and the tokenizer beside them."""
    import shutil

    from qwen2ms.serving import LLM

    model = tiny_model(moe=False, seed=3)
    model.save_pretrained(tmp_path)
    for f in qwen2_tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    llm = LLM(str(tmp_path), verbose=False, **SHAPES[False])
    loaded = dict((n, p.asnumpy()) for n, p in llm.engine.model.named_weights())
    for name, p in model.named_weights():
        np.testing.assert_array_equal(loaded[name], p.asnumpy(), err_msg=name)
    assert llm.tokenizer is not None
    assert llm.tokenizer.encode("Paris") == Qwen2Tokenizer.from_pretrained(qwen2_tokenizer_dir).encode("Paris")
    assert llm.engine.stats().num_blocks_total == SHAPES[False]["num_blocks"]
