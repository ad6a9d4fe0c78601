"""The one-kernel decoder layer (CpuOps.decode_layer) against the separate kernels: same logits, caches, tokens."""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore import Tensor  # noqa: E402

from qwen2ms import Qwen2Config  # noqa: E402
from qwen2ms.modeling import Qwen2ForCausalLM  # noqa: E402
from qwen2ms.modeling.quantize import quantize_weights  # noqa: E402
from qwen2ms.ops.cpu import kernel_profile  # noqa: E402

LAYERS = 2
PROMPT = np.array([[5, 17, 33, 2, 150, 9], [0, 0, 44, 8, 1, 99]], np.int64)
PROMPT_MASK = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], np.int64)


def tiny_config(**kw):
    base = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1,
                tie_word_embeddings=True)
    base.update(kw)
    return Qwen2Config(**base)


# name -> (storage dtype, quantize_weights kwargs or None)
WEIGHTS = {
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "int8-channel": ("bfloat16", dict(bits=8, group_size=None)),
    "int8-g32": ("bfloat16", dict(bits=8, group_size=32)),
    "int4-g32": ("bfloat16", dict(bits=4, group_size=32)),
    # groups of 64 divide the hidden size but not the intermediate size: down_proj falls back to int8, so one
    # layer mixes int4 and int8 projections.
    "int4-g64-mixed": ("bfloat16", dict(bits=4, group_size=64)),
    # int8/int4 layers read activations rounded to int8 per block of 32 by default; these keep them in fp32.
    "int8-g32-fp32-act": ("bfloat16", dict(bits=8, group_size=32, activations="float32")),
    "int4-g32-fp32-act": ("bfloat16", dict(bits=4, group_size=32, activations="float32")),
}


def build(weights, fused, **cfg):
    dtype, quant = WEIGHTS[weights]
    model = Qwen2ForCausalLM(tiny_config(**cfg), dtype=dtype, seed=3, ops_backend="cpu")
    # Norm weights and biases start at 1 and 0: give them values, so a swapped norm or a dropped bias shows.
    rng = np.random.default_rng(11)
    for p in model.get_parameters():
        if p.ndim == 1:
            p.set_data(Tensor(rng.uniform(0.5, 1.5, p.shape).astype(np.float32)).astype(p.dtype))
    if quant is not None:
        assert quantize_weights(model, **quant) > 0
    if not fused:
        model.ops_impl.decode_layer_max_rows = 0  # this model's own backend object: the separate kernels
    model.set_train(False)
    return model


def decode(model, steps=3, feed=None):
    """Left-padded batch of two: prefill, then ``steps`` one-token steps (tokens from ``feed`` when given, else
    greedy), called from Python (each kernel runs as it is called). Returns (logits per step [steps + 1, B, V],
    tokens fed [steps, B], the caches as numpy)."""
    b, t = PROMPT.shape
    cache = model.new_cache(b, t + steps)
    mask = np.zeros((b, t + steps), np.int32)
    mask[:, :t] = PROMPT_MASK
    out = model(PROMPT, attention_mask=mask, cache=cache, cache_position=0, logits_to_keep=1).logits.asnumpy()[:, -1]
    logits, fed = [out], []
    for i in range(steps):
        nxt = out.argmax(-1) if feed is None else feed[i]
        fed.append(nxt)
        mask[:, t + i] = 1
        pos = mask.sum(1, keepdims=True) - 1
        out = model(nxt.reshape(b, 1), attention_mask=mask, position_ids=pos, cache=cache,
                    cache_position=t + i).logits.asnumpy()[:, -1]
        logits.append(out)
    caches = [p.asnumpy() for p in list(cache.keys) + list(cache.values)]
    return np.stack(logits), np.stack(fed), caches


# Every weight kind, and each of the four kernel signatures (with/without quantisation and q/k/v biases).
CASES = [("fp32", True), ("bf16", False), ("int8-channel", True), ("int8-g32", False), ("int4-g32", True),
         ("int4-g64-mixed", False), ("int8-g32-fp32-act", True), ("int4-g32-fp32-act", False)]


@pytest.mark.parametrize("weights,bias", CASES, ids=[f"{w}-{'bias' if b else 'nobias'}" for w, b in CASES])
def test_fused_layer_equals_separate_kernels(weights, bias):
    fused, separate = build(weights, True, qkv_bias=bias), build(weights, False, qkv_bias=bias)
    assert fused.model.plan_fused_decode() == LAYERS and separate.model.plan_fused_decode() == 0
    kernel_profile(reset=True, enable=True)
    try:
        got, fed, got_cache = decode(fused)
        calls_fused = kernel_profile(reset=True)
        want, _, want_cache = decode(separate, feed=fed)
        calls_separate = kernel_profile(reset=True)
    finally:
        kernel_profile(reset=True, enable=False)
    np.testing.assert_array_equal(got, want)  # bit for bit, every step
    for a, b in zip(got_cache, want_cache):
        np.testing.assert_array_equal(a, b)
    # The path is really taken: one fused call per layer and decode step; attention only in the prefill.
    quant = WEIGHTS[weights][1]
    q8a = quant is not None and quant.get("activations", "int8") == "int8"
    name = "DecodeLayer" + ("Quant" if quant else "") + ("Bias" if bias else "") + ("Q8A" if q8a else "")
    assert calls_fused[name][0] == LAYERS * 3
    assert calls_fused["Attention"][0] == LAYERS  # the prefill's
    assert not any(k.startswith("DecodeLayer") for k in calls_separate)
    assert calls_separate["Attention"][0] == LAYERS * 4


@pytest.mark.slow  # compiles two prefill and two decode graphs (~25 s on 2 cores)
def test_compiled_greedy_generation_is_identical_with_and_without_the_fused_layer():
    """The compiled decode step (generate -> forward_step) takes the fused path and emits the same tokens."""
    from qwen2ms.generation.generate import generate

    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=[])
    fused, separate = build("int4-g32", True), build("int4-g32", False)
    kernel_profile(reset=True, enable=True)
    try:
        got = generate(fused, PROMPT, attention_mask=PROMPT_MASK, **kw)
        calls = kernel_profile(reset=True)
    finally:
        kernel_profile(reset=True, enable=False)
    assert calls["DecodeLayerQuantBiasQ8A"][0] == LAYERS * 5  # the first new token comes from the prefill
    np.testing.assert_array_equal(got, generate(separate, PROMPT, attention_mask=PROMPT_MASK, **kw))


def test_float16_cache_and_single_row():
    """A float16 cache (converted on write and read as the separate kernels do) and batch 1 (masks and RoPE
    tables of one row)."""
    out = {}
    for name, model in (("fused", build("bf16", True)), ("separate", build("bf16", False))):
        cache = model.new_cache(1, 7, dtype="float16")
        steps = [model(np.array([[3, 9, 27, 81]]), cache=cache, cache_position=0).logits.asnumpy()[:, -1]]
        for i in range(3):
            nxt = np.array([[int(steps[-1].argmax())]], np.int32)
            steps.append(model(nxt, cache=cache, cache_position=4 + i).logits.asnumpy()[:, -1])
        out[name] = (np.stack(steps), cache.keys[1].asnumpy())
    np.testing.assert_array_equal(out["fused"][0], out["separate"][0])
    np.testing.assert_array_equal(out["fused"][1], out["separate"][1])


def test_layers_that_keep_the_separate_path():
    from qwen2ms.training.lora import LoraConfig, apply_lora

    assert Qwen2ForCausalLM(tiny_config(), ops_backend="reference").model.plan_fused_decode() == 0
    moe = Qwen2ForCausalLM(tiny_config(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=32), ops_backend="cpu")
    assert moe.model.layers[0].is_sparse and moe.model.plan_fused_decode() == 0
    model = build("fp32", True)
    assert model.model.plan_fused_decode() == LAYERS and model.model.layers[0].fused_decode_rows == 16
    apply_lora(model, LoraConfig(r=4, target_modules=["o_proj"]))
    assert model.model.plan_fused_decode() == 0 and model.model.layers[0].fused_decode_rows == 0
    # A layer with one projection left unquantised keeps the separate kernels; the other layer fuses.
    half = Qwen2ForCausalLM(tiny_config(), dtype="bfloat16", ops_backend="cpu")
    quantize_weights(half, bits=8, skip=("model.layers.0.mlp.down_proj",))
    assert half.model.plan_fused_decode() == 1
    assert half.model.layers[0].fused_decode_rows == 0 and half.model.layers[1].fused_decode_rows == 16


def test_lora_applied_after_a_fused_step_is_not_bypassed():
    """The choice is made again before every cached forward: an adapter added later takes its layer off the fused
    path (with B = 0 the function is the same, so the logits still agree)."""
    from qwen2ms.training.lora import LoraConfig, apply_lora

    model = build("fp32", True)
    cache = model.new_cache(1, 4)
    model(np.array([[1, 2]]), cache=cache, cache_position=0)
    before = model(np.array([[3]]), cache=cache, cache_position=2).logits.asnumpy()
    assert model.model.layers[0].fused_decode_rows == 16
    apply_lora(model, LoraConfig(r=4, target_modules=["down_proj"]))
    after = model(np.array([[3]]), cache=cache, cache_position=2).logits.asnumpy()
    assert model.model.layers[0].fused_decode_rows == 0
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
