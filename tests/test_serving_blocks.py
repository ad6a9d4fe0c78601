"""The serving engine's bookkeeping without a model: block pool, prefix caching, scheduling, preemption, stops.

A fake runner stands in for the paged model: its "KV cache" stores each written token with a digest of the
whole prefix it was computed from, and every read checks those digests, so a block table that points at the
wrong block, a prefix hit on a different prefix, or a block overwritten by another sequence changes the
logits or fails the read. Its logits are a hash of the full context, so each request's greedy reference is
a plain loop over that function.
"""
import hashlib
import random
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen2ms.generation import GenerationConfigError
from qwen2ms.serving import LLM, LLMEngine, RequestError, SamplingParams, SamplingParamsError
from qwen2ms.serving.engine import EngineStepError
from qwen2ms.serving.block_manager import BlockManager, block_hash
from qwen2ms.serving.params import CompletionText

VOCAB = 48
EOS = 3


def _digest(prev, token):
    return hash((prev, int(token)))


def context_logits(ctx, eos_bias=0.0):
    seed = int.from_bytes(hashlib.sha256(np.asarray(ctx, np.int64).tobytes()).digest()[:8], "little")
    logits = np.random.default_rng(seed).standard_normal(VOCAB).astype(np.float32)
    logits[EOS] += eos_bias
    return logits


class FakeRunner:
    """The PagedModelRunner interface over a token store that checks what it reads."""

    bytes_per_block = 4096

    def __init__(self, num_blocks, block_size, eos_bias=0.0):
        self.bs = block_size
        self.tok = np.full((num_blocks, block_size), -1, np.int64)
        self.dig = np.zeros((num_blocks, block_size), dtype=object)
        self.eos_bias = eos_bias
        self.prefill_tokens = 0
        self.decode_batches = []

    def _read(self, table, upto):
        ctx, d = [], None
        for p in range(upto):
            b, o = table[p // self.bs], p % self.bs
            t = int(self.tok[b, o])
            assert t >= 0, f"position {p} (block {b}) was never written"
            d = _digest(d, t)
            assert self.dig[b, o] == d, f"block {b} holds the KV of another prefix at position {p}"
            ctx.append(t)
        return ctx, d

    def _write(self, table, p, token, d):
        b, o = table[p // self.bs], p % self.bs
        d = _digest(d, token)
        self.tok[b, o], self.dig[b, o] = token, d
        return d

    def prefill(self, token_ids, start, block_table):
        assert len(token_ids) >= 1
        ctx, d = self._read(block_table, start)
        for i, t in enumerate(token_ids):
            d = self._write(block_table, start + i, t, d)
        self.prefill_tokens += len(token_ids)
        return context_logits(ctx + list(token_ids), self.eos_bias)

    def decode(self, tokens, positions, block_tables):
        self.decode_batches.append(len(tokens))
        out = []
        for t, p, table in zip(tokens, positions, block_tables):
            ctx, d = self._read(table, p)
            self._write(table, p, t, d)
            out.append(context_logits(ctx + [t], self.eos_bias))
        return np.stack(out)


def reference(prompt, max_new, eos_bias=0.0, eos=(EOS,)):
    ctx = list(prompt)
    out = []
    for _ in range(max_new):
        t = int(np.argmax(context_logits(ctx, eos_bias)))
        out.append(t)
        ctx.append(t)
        if t in eos:
            break
    return out


class CharTokenizer:
    """Letters as ids 4..; id 3 is a special eos token skipped in text."""

    ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?ABCDEFGHIJKLMNOPQ"[:VOCAB - 4]

    def encode(self, text):
        return [4 + self.ALPHABET.index(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.ALPHABET[i - 4] if i >= 4 else ("" if skip_special_tokens else f"<{i}>") for i in ids)

    def __len__(self):
        return VOCAB

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        text = "".join(f"{m['role'][0]} {m['content']}." for m in messages) + ("a " if add_generation_prompt else "")
        return self.encode(text) if tokenize else text


def fake_engine(num_blocks=64, block_size=4, max_num_seqs=4, max_model_len=64, eos_bias=0.0, tokenizer=None,
                **kw):
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=128, eos_token_id=EOS,
                                                   pad_token_id=0))
    runner = FakeRunner(num_blocks, block_size, eos_bias)
    engine = LLMEngine(model, tokenizer, block_size=block_size, num_blocks=num_blocks, max_num_seqs=max_num_seqs,
                       max_model_len=max_model_len, runner=runner, verbose=False, **kw)
    return engine, runner


def run(engine, schedule, check=None):
    """Drive the engine; ``schedule`` maps step number -> [(id, prompt, params)] submitted before that step."""
    done, seen_finished, step = {}, [], 0
    while engine.has_unfinished_requests() or any(k >= step for k in schedule):
        for rid, prompt, params in schedule.get(step, []):
            engine.add_request(rid, prompt, params)
        for out in engine.step():
            if out.finished:
                seen_finished.append(out.request_id)
                done[out.request_id] = out
        engine.blocks.check()
        s = engine.stats()
        assert s.num_running <= engine.max_num_seqs
        if check is not None:
            check(engine)
        step += 1
        assert step < 2000
    assert sorted(seen_finished) == sorted(set(seen_finished))  # finished reported exactly once
    return done


# ---------------------------------------------------------------------- block manager
def test_prefix_hit_reuses_full_blocks_only_and_recomputes_the_last_token():
    bm = BlockManager(num_blocks=10, block_size=4)
    a = list(range(10, 22))  # three full blocks
    assert bm.allocate("a", a) == 0
    bm.mark_computed("a", a, len(a))
    bm.free("a")
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 3
    # The same prompt: all three blocks are cached, but the last token must be computed for its logits,
    # so only two blocks are reused and the third is a fresh block (a cached block is never written again).
    assert bm.allocate("b", a) == 8
    assert bm.block_table("b")[:2] == [0, 1] and bm.block_table("b")[2] not in (0, 1, 2)
    # A prompt that diverges inside block 2 reuses block 1 only through the chain: same tokens after a
    # different first block are a miss.
    assert bm.allocate("c", a[:4] + [99] * 5) == 4
    assert bm.allocate("d", [99] * 4 + a[4:8] + [1]) == 0
    bm.check()
    for s in "bcd":
        bm.free(s)
    bm.check()
    assert bm.num_used_blocks == 0


def test_lru_eviction_and_capacity():
    bm = BlockManager(num_blocks=4, block_size=2)
    for name, toks in (("x", [1, 2, 3]), ("y", [5, 6, 7])):
        bm.allocate(name, toks)
        bm.mark_computed(name, toks, 3)
        bm.free(name)
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 4
    assert bm.can_allocate([9] * 8) and not bm.can_allocate([9] * 9)
    bm.allocate("z", [9] * 5)  # 3 blocks: two free ones, then the least recently used cached block (x's)
    assert not bm.append_slots("z", 100) and bm.num_blocks_of("z") == 3  # nothing changed when out of blocks
    bm.free("z")
    assert bm.allocate("x2", [1, 2, 3]) == 0  # evicted
    bm.free("x2")
    assert bm.allocate("y2", [5, 6, 7]) == 2  # still cached
    with pytest.raises(ValueError, match="already has blocks"):
        bm.allocate("y2", [1])
    bm.check()


def test_no_prefix_caching_means_no_hits():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    bm.allocate("a", [1, 2, 3])
    bm.mark_computed("a", [1, 2, 3], 3)
    bm.free("a")
    assert bm.num_cached_blocks == 0 and bm.allocate("b", [1, 2, 3]) == 0


def test_block_hash_chains_the_prefix():
    assert block_hash(None, [1, 2]) == block_hash(None, (1, 2))
    assert block_hash(block_hash(None, [1, 2]), [3, 4]) != block_hash(block_hash(None, [9, 9]), [3, 4])
    assert block_hash(None, [1, 2]) != block_hash(None, [2, 1])


ops = st.lists(st.tuples(st.sampled_from(["alloc", "grow", "compute", "free"]), st.integers(0, 5),
                         st.integers(1, 12), st.integers(0, 3)), max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.integers(1, 4), st.integers(3, 12))
def test_random_operation_sequences_keep_the_pool_consistent(operations, block_size, num_blocks):
    bm = BlockManager(num_blocks=num_blocks, block_size=block_size)
    prefixes = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 9, 9, 9, 9], [5, 5, 5, 5, 5, 5, 5, 5], [2]]
    tokens, computed = {}, {}
    for op, sid, length, which in operations:
        sid = str(sid)
        if op == "alloc" and sid not in tokens:
            toks = (prefixes[which] + [20 + i for i in range(length)])[:length]
            if bm.can_allocate(toks):
                free_before = bm.num_free_blocks
                cached = bm.allocate(sid, toks)
                assert 0 <= cached < len(toks) and cached % block_size == 0
                assert bm.num_free_blocks <= free_before
                tokens[sid], computed[sid] = toks, cached
            else:
                with pytest.raises(ValueError):
                    bm.allocate(sid, toks)
        elif op == "grow" and sid in tokens:
            toks = tokens[sid] + [30 + which] * length
            if bm.append_slots(sid, len(toks)):
                tokens[sid] = toks
        elif op == "compute" and sid in tokens:
            # Every block the sequence will write (from its first uncomputed position on) is its alone.
            table = bm.block_table(sid)
            for b in table[computed[sid] // block_size:]:
                assert bm.refcount[b] == 1
            bm.mark_computed(sid, tokens[sid], len(tokens[sid]))
            computed[sid] = len(tokens[sid])
        elif op == "free":
            bm.free(sid)
            tokens.pop(sid, None)
            computed.pop(sid, None)
        bm.check()
        for sid, toks in tokens.items():
            assert bm.num_blocks_of(sid) >= bm.blocks_for(len(toks))
    for sid in list(tokens):
        bm.free(sid)
    bm.check()
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == num_blocks


# ---------------------------------------------------------------------- engine logic over the fake runner
def _prompts(rng, n, shared=()):
    return [list(shared) + [int(x) for x in rng.integers(4, VOCAB, int(rng.integers(1, 14)))] for _ in range(n)]


@pytest.mark.parametrize("num_blocks,prefix", [(64, False), (64, True), (9, False), (9, True)],
                         ids=["roomy", "roomy-prefix", "tiny-pool", "tiny-pool-prefix"])
def test_greedy_equals_the_reference_alone_with_staggered_requests(num_blocks, prefix):
    rng = np.random.default_rng(num_blocks + prefix)
    system = [int(x) for x in rng.integers(4, VOCAB, 9)] if prefix else []
    prompts = _prompts(rng, 7, system)
    lengths = [int(x) for x in rng.integers(6, 15, 7)]
    engine, runner = fake_engine(num_blocks=num_blocks, block_size=4, max_num_seqs=4, eos_bias=1.0)
    schedule = {}
    for i, (p, m) in enumerate(zip(prompts, lengths)):
        schedule.setdefault(i % 4 * 2, []).append((f"r{i}", p, SamplingParams(temperature=0, max_tokens=m)))
    done = run(engine, schedule)
    for i, (p, m) in enumerate(zip(prompts, lengths)):
        out = done[f"r{i}"].outputs[0]
        ref = reference(p, m, eos_bias=1.0)
        assert out.token_ids == ref, i
        assert out.finish_reason == ("stop" if ref[-1] == EOS and len(ref) <= m else "length")
    s = engine.stats()
    assert s.num_blocks_used == 0 and s.num_running == 0 and s.num_waiting == 0
    assert s.generation_tokens == sum(len(d.outputs[0].token_ids) for d in done.values())
    if num_blocks == 9:
        assert s.num_preemptions > 0
    if prefix:
        assert s.prefix_cache_hit_tokens > 0
        assert max(d.num_cached_tokens for d in done.values()) >= 8
    assert max(runner.decode_batches) > 1


def test_preemption_recomputes_and_keeps_generated_tokens():
    # Two long requests, a pool for about one and a half: the later one is preempted and finishes later.
    engine, runner = fake_engine(num_blocks=6, block_size=4, max_num_seqs=2)
    a, b = [5, 6, 7, 8, 9], [10, 11, 12]
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    done = run(engine, {0: [("a", a, params), ("b", b, params)]})
    assert engine.stats().num_preemptions >= 1
    assert done["a"].outputs[0].token_ids == reference(a, 14, eos=())
    assert done["b"].outputs[0].token_ids == reference(b, 14, eos=())
    assert done["a"].metrics.finished_time <= done["b"].metrics.finished_time


def test_admission_is_fcfs_and_bounded_by_max_num_seqs():
    engine, _ = fake_engine(num_blocks=64, max_num_seqs=2)
    p = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for i in range(5):
        engine.add_request(f"r{i}", [4 + i, 5, 6], p)
    order = []
    while engine.has_unfinished_requests():
        assert engine.stats().num_running <= 2
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == [f"r{i}" for i in range(5)]


def test_seeded_sampling_is_reproducible_whatever_the_batch():
    p = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, max_tokens=10, seed=7, ignore_eos=True)
    alone, _ = fake_engine()
    solo = run(alone, {0: [("x", [4, 5, 6], p)]})["x"].outputs[0].token_ids
    crowd, _ = fake_engine(num_blocks=10, max_num_seqs=3)
    rng = np.random.default_rng(1)
    others = {s: [(f"o{s}{j}", pr, SamplingParams(temperature=1.0, max_tokens=8))
                  for j, pr in enumerate(_prompts(rng, 2))] for s in range(3)}
    others[1].append(("x", [4, 5, 6], p))
    assert run(crowd, others)["x"].outputs[0].token_ids == solo
    other_seed = run(fake_engine()[0], {0: [("x", [4, 5, 6], p.clone(seed=8))]})["x"].outputs[0].token_ids
    assert other_seed != solo


def test_n_completions_differ_and_share_the_prompt_blocks():
    engine, runner = fake_engine(block_size=4)
    prompt = list(range(4, 17))  # 13 tokens: three full blocks
    out = run(engine, {0: [("r", prompt, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=6,
                                                        ignore_eos=True))]})["r"]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    # Completions 1 and 2 reuse completion 0's full prompt blocks: only 13 + 1 + 1 prompt tokens prefilled.
    assert runner.prefill_tokens == 13 + 1 + 1
    assert engine.stats().num_blocks_used == 0


def test_stop_token_ids_min_tokens_ignore_eos_and_max_tokens():
    prompt = [4, 5, 6]
    free = reference(prompt, 12, eos=())
    stop_id = free[4]
    first = free.index(stop_id)
    engine, _ = fake_engine(eos_bias=-100.0)
    done = run(engine, {0: [
        ("stopid", prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id])),
        ("len", prompt, SamplingParams(temperature=0, max_tokens=5)),
    ]})
    out = done["stopid"].outputs[0]
    assert out.token_ids == free[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_id
    assert done["len"].outputs[0].token_ids == free[:5] and done["len"].outputs[0].finish_reason == "length"
    # eos strongly favoured: stops at once, unless ignored, or suppressed until min_tokens.
    engine, _ = fake_engine(eos_bias=100.0)
    done = run(engine, {0: [
        ("eos", prompt, SamplingParams(temperature=0, max_tokens=8)),
        ("ignore", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)),
        ("min", prompt, SamplingParams(temperature=0, max_tokens=8, min_tokens=4)),
    ]})
    assert done["eos"].outputs[0].token_ids == [EOS]
    assert done["eos"].outputs[0].finish_reason == "stop" and done["eos"].outputs[0].stop_reason is None
    assert done["ignore"].outputs[0].token_ids == [EOS] * 8
    assert done["ignore"].outputs[0].finish_reason == "length"
    mins = done["min"].outputs[0].token_ids
    assert len(mins) == 5 and EOS not in mins[:4] and mins[4] == EOS


def test_stop_strings_cut_the_text_and_streamed_text_is_never_taken_back():
    tok = CharTokenizer()
    prompt = tok.encode("hello")
    free_ids = reference(prompt, 20, eos=())
    free_text = tok.decode(free_ids)
    stop = free_text[6:8]
    cut = free_text.index(stop)
    engine, _ = fake_engine(tokenizer=tok, eos_bias=-100.0)
    engine.add_request("s", "hello", SamplingParams(temperature=0, max_tokens=20, stop=[stop, "#"]))
    texts = []
    while engine.has_unfinished_requests():
        for o in engine.step():
            texts.append(o.outputs[0].text)
            last = o
    assert last.outputs[0].text == free_text[:cut] and last.outputs[0].stop_reason == stop
    assert last.outputs[0].finish_reason == "stop" and last.prompt == "hello"
    ids = last.outputs[0].token_ids
    assert ids == free_ids[:len(ids)] and free_text[:cut + len(stop)] in tok.decode(ids)
    for a, b in zip(texts, texts[1:]):  # each step's text extends the previous one
        assert b.startswith(a)


def test_completion_text_cuts_the_longest_stop_string_ending_at_the_match():
    tok = CharTokenizer()
    text = CompletionText(tok, ["b", "ab"])
    for i in tok.encode("xab"):
        text.push(i)
    assert text.text == "x" and text.stop_reason == "ab"
    special = CompletionText(tok, [], skip_special_tokens=False)
    special.push(EOS)
    assert special.text == f"<{EOS}>"


def test_abort_frees_blocks_at_once_and_unknown_ids_are_ignored():
    engine, _ = fake_engine()
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    engine.add_request("a", list(range(4, 14)), p)
    engine.add_request("b", list(range(4, 8)), p)
    engine.step()
    assert engine.stats().num_blocks_used > 0
    engine.abort_request("a")
    engine.abort_request("nope")
    engine.blocks.check()
    used_b = engine.blocks.num_blocks_of("b#0")
    assert engine.stats().num_blocks_used == used_b
    engine.abort_request(["b"])
    assert engine.stats().num_blocks_used == 0 and not engine.has_unfinished_requests()
    assert engine.step() == []
    engine.add_request("a", [4, 5], p.clone(max_tokens=2))  # the id is free again
    assert run(engine, {})["a"].finished


def test_add_request_errors_name_the_problem():
    engine, _ = fake_engine(num_blocks=8, block_size=4, max_model_len=40)
    with pytest.raises(RequestError, match="prompt length 30 \\+ max_tokens 16 = 46 exceeds max_model_len 40"):
        engine.add_request("x", [5] * 30, SamplingParams())
    with pytest.raises(RequestError, match="more than the whole pool \\(8 blocks, 32 tokens\\)"):
        engine.add_request("x", [5] * 30, SamplingParams(max_tokens=5))
    with pytest.raises(RequestError, match="at most 31 fit"):
        engine.add_request("x", [5] * 32, SamplingParams(max_tokens=None))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request("x", [], SamplingParams())
    with pytest.raises(RequestError, match="token id 48 is outside"):
        engine.add_request("x", [5, 48], SamplingParams())
    with pytest.raises(RequestError, match="needs a tokenizer"):
        engine.add_request("x", "text", SamplingParams())
    engine.tokenizer = SimpleNamespace(encode=lambda text: [5, 1000])
    with pytest.raises(RequestError, match="token id 1000 is outside .* \\(the tokenizer does not match the model\\)"):
        engine.add_request("x", "text", SamplingParams())
    engine.tokenizer = None
    with pytest.raises(SamplingParamsError, match="stop strings need a tokenizer"):
        engine.add_request("x", [5], SamplingParams(stop="."))
    with pytest.raises(SamplingParamsError, match="stop_token_ids has id 99"):
        engine.add_request("x", [5], SamplingParams(stop_token_ids=[99]))
    engine.add_request("x", [5], SamplingParams(max_tokens=None))
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request("x", [5], SamplingParams())
    out = run(engine, {})["x"].outputs[0]
    assert len(out.token_ids) <= 31
    assert isinstance(RequestError("x"), ValueError) and issubclass(SamplingParamsError, GenerationConfigError)


def test_engine_sizes_and_startup_line(capsys):
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=128, eos_token_id=EOS))
    engine = LLMEngine(model, runner=FakeRunner(1, 1), block_size=8, max_num_seqs=3, max_model_len=100)
    assert engine.num_blocks == 3 * 13  # enough for max_num_seqs sequences of max_model_len
    line = capsys.readouterr().out.strip()
    assert line.startswith("qwen2ms serving: KV cache 39 blocks x 8 tokens") and "max_model_len 100" in line
    engine = LLMEngine(model, runner=FakeRunner(1, 1), kv_cache_memory=10 * 4096 + 5, verbose=False)
    assert engine.num_blocks == 10 and engine.max_model_len == 128 and "40.0 KiB" in engine.summary
    big = SimpleNamespace(config=SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=32768, eos_token_id=EOS))
    runner = FakeRunner(1, 1)
    runner.bytes_per_block = 16 * 12 << 10  # Qwen2-0.5B in float32: 12 KiB per token
    capped = LLMEngine(big, runner=runner, verbose=False)  # 16 x 32768 tokens would take 6 GiB
    assert capped.kv_cache_bytes <= 4 << 30 and capped.num_blocks == (4 << 30) // runner.bytes_per_block
    with pytest.raises(ValueError, match="max_model_len 200 exceeds"):
        LLMEngine(model, runner=FakeRunner(1, 1), max_model_len=200)
    with pytest.raises(ValueError, match="max_num_seqs must be a positive integer"):
        LLMEngine(model, runner=FakeRunner(1, 1), max_num_seqs=0)
    with pytest.raises(ValueError, match="holds no KV block"):
        LLMEngine(model, runner=FakeRunner(1, 1), kv_cache_memory=100)


# ---------------------------------------------------------------------- SamplingParams
@pytest.mark.parametrize("kwargs,field", [
    (dict(n=0), "n must be"), (dict(temperature=-1), "temperature must"), (dict(temperature=float("nan")), "temp"),
    (dict(top_p=0), "top_p must be in"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k must"),
    (dict(top_k=2.5), "top_k"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(max_tokens=0), "max_tokens must"), (dict(min_tokens=-1), "min_tokens must"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens \\(5\\) must be <= max_tokens \\(4\\)"),
    (dict(n=2, temperature=0), "n=2 needs sampling"), (dict(stop=""), "stop must"), (dict(stop=["a", 3]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(ignore_eos=1), "ignore_eos must be True or False"), (dict(seed=-3), "seed must"),
    (dict(skip_special_tokens=None), "skip_special_tokens"), (dict(max_tokens=True), "max_tokens"),
    (dict(presence_penalty=2.5), "presence_penalty must be a number in \\[-2, 2\\]"),
    (dict(frequency_penalty=float("inf")), "frequency_penalty"),
])
def test_sampling_params_errors_name_the_field_and_range(kwargs, field):
    with pytest.raises(SamplingParamsError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_defaults_and_conversions():
    p = SamplingParams(stop=("a", "b"), stop_token_ids=(5,), temperature=1)
    assert p.stop == ["a", "b"] and p.stop_token_ids == [5] and isinstance(p.temperature, float)
    assert SamplingParams(top_k=0).top_k == 0 and SamplingParams(top_k=-1).to_generation_config(4, []).top_k == 0
    assert SamplingParams(temperature=0).is_greedy and not SamplingParams().is_greedy
    assert SamplingParams(stop="x").stop_list == ["x"] and SamplingParams(max_tokens=None).max_tokens is None
    with pytest.raises(SamplingParamsError):
        SamplingParams().clone(top_p=2.0)


@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.sampled_from(["n", "temperature", "top_p", "top_k", "repetition_penalty", "max_tokens",
                                        "min_tokens", "seed"]),
                       st.one_of(st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), st.none(),
                                 st.booleans(), st.text(max_size=3)), max_size=4))
def test_sampling_params_either_validates_or_raises_its_own_error(kwargs):
    try:
        p = SamplingParams(**kwargs)
    except SamplingParamsError:
        return
    p.validate()
    assert p.n >= 1 and p.temperature >= 0 and 0 < p.top_p <= 1


def fake_llm(**kw):
    model = SimpleNamespace(config=SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=128, eos_token_id=EOS))
    return LLM(model, CharTokenizer(), runner=FakeRunner(kw.get("num_blocks", 64), kw.get("block_size", 4)),
               **dict(dict(num_blocks=64, block_size=4, max_num_seqs=2, max_model_len=100, verbose=False), **kw))


def test_llm_chat_renders_the_template_and_turn_two_reuses_turn_one():
    llm = fake_llm()
    tok = llm.tokenizer
    greedy = SamplingParams(temperature=0, max_tokens=8)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    (first,) = llm.chat(messages, greedy)
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert first.prompt_token_ids == prompt and first.outputs[0].token_ids == reference(prompt, 8)
    messages += [{"role": "assistant", "content": first.outputs[0].text}, {"role": "user", "content": "why"}]
    two = llm.chat([messages, messages[:2]], greedy)
    assert two[1].outputs[0].token_ids == first.outputs[0].token_ids and two[1].num_cached_tokens >= 16
    # Turn 2's prompt starts with turn 1's prompt: its full blocks come from the cache.
    assert two[0].num_cached_tokens >= len(prompt) // 4 * 4
    with pytest.raises(RequestError, match="messages must be a list"):
        llm.chat([{"content": "no role"}])


def test_llm_generate_keeps_input_order_and_validates_first():
    llm = fake_llm()
    engine = llm.engine
    prompts = [[4 + i] * (1 + i) for i in range(5)]
    outs = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=1 + i) for i in range(5)])
    assert [o.prompt_token_ids for o in outs] == prompts
    assert [len(o.outputs[0].token_ids) <= 1 + i for i, o in enumerate(outs)] == [True] * 5
    single = llm.generate(list(np.array([4, 5, 6])), SamplingParams(temperature=0, max_tokens=3), use_tqdm=True)
    assert len(single) == 1 and single[0].prompt_token_ids == [4, 5, 6]
    with pytest.raises(SamplingParamsError, match="one per prompt"):
        llm.generate(prompts, [SamplingParams()])
    with pytest.raises(RequestError):
        llm.generate([[4], [999]])
    assert not engine.has_unfinished_requests() and engine.stats().num_blocks_used == 0


def test_random_workloads_with_aborts_end_with_an_empty_pool():
    rng = random.Random(5)
    engine, _ = fake_engine(num_blocks=12, block_size=2, max_num_seqs=3, eos_bias=0.5)
    live = set()
    for step in range(150):
        if rng.random() < 0.4:
            rid = f"q{step}"
            n = rng.choice([1, 1, 2])
            engine.add_request(rid, [rng.randrange(4, VOCAB) for _ in range(rng.randint(1, 9))],
                               SamplingParams(n=n, temperature=0.8 if n > 1 else rng.choice([0, 0.8]),
                                              max_tokens=rng.randint(1, 9), seed=step))
            live.add(rid)
        if live and rng.random() < 0.15:
            victim = rng.choice(sorted(live))
            engine.abort_request(victim)
            live.discard(victim)
        for o in engine.step():
            if o.finished:
                live.discard(o.request_id)
        engine.blocks.check()
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.stats().num_blocks_used == 0 and engine.stats().num_waiting == 0


def test_generated_blocks_are_cached_for_the_next_turn():
    engine, runner = fake_engine(block_size=4, eos_bias=-100.0)
    prompt = list(range(4, 10))  # 6 tokens
    reply = run(engine, {0: [("t1", prompt, SamplingParams(temperature=0, max_tokens=11))]})["t1"].outputs[0].token_ids
    # 6 + 11 tokens, the last never fed: 16 computed = four full blocks, two of them filled by decoding.
    follow = prompt + reply + [20, 21]
    out = run(engine, {0: [("t2", follow, SamplingParams(temperature=0, max_tokens=3))]})["t2"]
    assert out.num_cached_tokens == 16
    assert out.outputs[0].token_ids == reference(follow, 3, eos_bias=-100.0)
    engine.reset_prefix_cache()
    assert engine.stats().num_blocks_cached == 0
    again = run(engine, {0: [("t3", follow, SamplingParams(temperature=0, max_tokens=3))]})["t3"]
    assert again.num_cached_tokens == 0 and again.outputs[0].token_ids == out.outputs[0].token_ids


class FailingRunner(FakeRunner):
    fail_on = "decode"

    def decode(self, tokens, positions, block_tables):
        if self.fail_on == "decode":
            raise RuntimeError("device lost")
        return super().decode(tokens, positions, block_tables)

    def prefill(self, token_ids, start, block_table):
        if self.fail_on == "prefill" and token_ids[0] == 40:
            raise RuntimeError("bad prefill")
        return super().prefill(token_ids, start, block_table)


def test_a_model_failure_aborts_its_requests_and_the_engine_keeps_serving():
    engine, _ = fake_engine()
    runner = engine.runner = FailingRunner(64, 4)
    p = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("a", [5, 6], p)
    engine.add_request("b", [7], p.clone(max_tokens=1))  # finishes in its prefill, before the decode fails
    with pytest.raises(EngineStepError, match="'a'") as info:
        engine.step()
    assert info.value.request_ids == ["a"] and isinstance(info.value, RuntimeError)
    assert engine.stats().num_blocks_used == 0
    runner.fail_on = "prefill"
    engine.add_request("c", [40, 41], p)
    engine.add_request("d", [8, 9], p)
    with pytest.raises(EngineStepError, match="'c'"):
        engine.step()
    runner.fail_on = None
    done = run(engine, {})
    assert sorted(done) == ["b", "d"] and done["b"].outputs[0].token_ids == reference([7], 1, eos=())
    assert done["d"].outputs[0].token_ids == reference([8, 9], 4, eos=())


def test_default_sampling_params_follow_the_models_generation_config():
    instruct = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1,
                "eos_token_id": [EOS, 2]}
    config = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=128, eos_token_id=EOS)
    model = SimpleNamespace(config=config, generation_config_dict=instruct)
    engine = LLMEngine(model, runner=FakeRunner(64, 4), num_blocks=64, block_size=4, verbose=False)
    p = engine.default_sampling_params(max_tokens=5)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, p.max_tokens) == (0.7, 0.8, 20, 1.1, 5)
    assert engine.eos_token_ids == [EOS, 2]
    greedy_model = SimpleNamespace(config=config, generation_config_dict={"repetition_penalty": 1.5})
    llm = LLM(greedy_model, runner=FakeRunner(64, 4), num_blocks=64, block_size=4, verbose=False)
    assert llm.engine.default_sampling_params().temperature == 0.0
    # LLM.generate without params decodes greedily with the config's repetition penalty, as model.generate does.
    (out,) = llm.generate([[4, 5, 6]])
    ctx, want = [4, 5, 6], []
    for _ in range(16):
        scores = context_logits(ctx)
        seen = np.unique(ctx)
        scores[seen] = np.where(scores[seen] < 0, scores[seen] * 1.5, scores[seen] / 1.5)
        want.append(int(np.argmax(scores)))
        ctx.append(want[-1])
        if want[-1] == EOS:
            break
    assert out.outputs[0].token_ids == want


_junk = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=4)),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=2), inner, max_size=2),
                     max_leaves=8)


@settings(max_examples=80, deadline=None)
@given(st.one_of(_junk, st.lists(st.integers(-3, VOCAB + 3), max_size=70)), st.one_of(st.text(max_size=3), _junk))
def test_add_request_accepts_or_names_the_problem(prompt, request_id):
    engine, _ = fake_engine(num_blocks=8, block_size=4, max_model_len=40)
    try:
        engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=4))
    except (RequestError, SamplingParamsError) as e:
        assert str(e)
        assert not engine.has_unfinished_requests() and engine.stats().num_waiting == 0
        return
    assert isinstance(request_id, str) and request_id
    done = run(engine, {})
    assert len(done[request_id].outputs[0].token_ids) <= 4


def test_presence_and_frequency_penalties_push_the_reply_off_its_own_tokens():
    prompt = [4, 5, 6]
    engine, _ = fake_engine(eos_bias=-100.0)
    plain = SamplingParams(temperature=0, max_tokens=12)
    done = run(engine, {0: [("plain", prompt, plain), ("pen", prompt, plain.clone(frequency_penalty=2.0,
                                                                                   presence_penalty=2.0))]})
    ctx, want = list(prompt), []
    for _ in range(12):
        scores = context_logits(ctx, -100.0)
        ids, counts = np.unique(want, return_counts=True)
        if len(want):
            scores[ids] -= 2.0 * counts + 2.0
        want.append(int(np.argmax(scores)))
        ctx.append(want[-1])
    assert done["pen"].outputs[0].token_ids == want != done["plain"].outputs[0].token_ids
    assert SamplingParams(presence_penalty=1).presence_penalty == 1.0
