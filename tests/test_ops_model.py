"""The model on the CPU kernels against the model on the reference ops: logits, decode, bf16/int8 weights, training."""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore import Tensor  # noqa: E402

from qwen2ms import Qwen2Config  # noqa: E402
from qwen2ms.modeling import Qwen2ForCausalLM  # noqa: E402
from qwen2ms.modeling.quantize import quantize_int8_weights  # noqa: E402
from qwen2ms.ops import dispatch  # noqa: E402

# Stated bounds (max |logit difference|, logits of magnitude ~1-3 on these tiny random models):
FP32_TOL = 1e-4  # same fp32 weights, kernels vs reference
SAME_WEIGHTS_TOL = 1e-4  # bf16 or int8 weights read by the kernels vs the same weights cast by the reference
INT8_VS_BF16_TOL = 0.1  # int8 weight-only quantisation error against the bf16 model it came from


def tiny_config(**kw):
    base = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, tie_word_embeddings=True)
    base.update(kw)
    return Qwen2Config(**base)


def pair(dtype="float32", **kw):
    cfg = tiny_config(**kw)
    return (Qwen2ForCausalLM(cfg, dtype=dtype, seed=3, ops_backend="cpu"),
            Qwen2ForCausalLM(cfg, dtype=dtype, seed=3, ops_backend="reference"))


IDS = np.array([[5, 17, 33, 2, 150, 9], [0, 0, 44, 8, 1, 99]], np.int64)
MASK = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], np.int64)


def logits(model, ids=IDS, mask=MASK):
    return model(ids, attention_mask=mask).logits.asnumpy()


def test_backend_is_resolved_once_and_stored(monkeypatch):
    cfg = tiny_config()
    assert Qwen2ForCausalLM(cfg).ops_impl.name == "cpu"  # device target CPU, compiler present
    assert Qwen2ForCausalLM(cfg, ops_backend="reference").ops_impl.name == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    model = Qwen2ForCausalLM(cfg)
    assert model.ops_impl.name == "reference"
    layer = model.model.layers[0]
    assert layer.self_attn.q_proj.ops_impl is model.ops_impl and layer.mlp.ops_impl is model.ops_impl


@pytest.mark.parametrize("tied", [True, False])
def test_fp32_logits_match_reference(tied):
    ours, ref = pair(tie_word_embeddings=tied)
    assert np.abs(logits(ours) - logits(ref)).max() <= FP32_TOL


def test_bf16_weights_read_by_kernels_match_reference():
    ours, ref = pair("bfloat16")
    assert ours.model.layers[0].mlp.up_proj.weight.dtype == ms.bfloat16
    assert np.abs(logits(ours) - logits(ref)).max() <= SAME_WEIGHTS_TOL


def test_int8_weights_match_reference_and_stay_close_to_bf16():
    ours, ref = pair("bfloat16")
    before = logits(ours)
    n_linear = 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + the (tied) embedding
    assert quantize_int8_weights(ours) == n_linear and quantize_int8_weights(ref) == n_linear
    assert ours.model.embed_tokens.weight.dtype == ms.int8
    got = logits(ours)
    assert np.abs(got - logits(ref)).max() <= SAME_WEIGHTS_TOL
    assert np.abs(got - before).max() <= INT8_VS_BF16_TOL


def test_int8_group_scales_match_reference_and_keep_tables_per_row():
    ours, ref = pair("bfloat16")
    before = logits(ours)
    assert quantize_int8_weights(ours, group_size=32) == quantize_int8_weights(ref, group_size=32) == 2 * 7 + 1
    layer = ours.model.layers[0]
    assert layer.self_attn.q_proj.weight_scale.shape == (64, 2) and layer.mlp.down_proj.weight_scale.shape == (64, 3)
    assert ours.model.embed_tokens.weight_scale.shape == (160,)  # the lookup reads one scale per row
    got = logits(ours)
    assert np.abs(got - logits(ref)).max() <= SAME_WEIGHTS_TOL
    assert np.abs(got - before).max() <= INT8_VS_BF16_TOL
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_int8_weights(pair("bfloat16")[0], group_size=48)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_int8_greedy_equals_bf16_on_the_parity_prompts(tmp_path, moe):
    """The generation parity setup (tests/test_generation_model.py): its random model loaded with bf16
    weights, a left-padded batch, greedy; the int8 weight-only model must emit the same tokens."""
    pytest.importorskip("torch")
    from test_generation_model import left_padded, make_hf

    from qwen2ms.generation.generate import generate

    _, folder = make_hf(tmp_path, moe)
    model = Qwen2ForCausalLM.from_hf(folder, dtype="bfloat16")
    ids, mask = left_padded([7, 3, 5], 7)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=[])
    want = generate(model, ids, attention_mask=mask, **kw)
    assert quantize_int8_weights(model) > 0
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == ms.int8
    np.testing.assert_array_equal(generate(model, ids, attention_mask=mask, **kw), want)


def _greedy(model, new=5):
    b, t = IDS.shape
    cache = model.new_cache(b, t + new)
    mask = np.zeros((b, t + new), np.int32)
    mask[:, :t] = MASK
    out = model.forward_step(IDS, mask, None, cache, 0, 1).asnumpy()[:, -1]
    steps = [out]
    for i in range(new):
        nxt = out.argmax(-1).reshape(b, 1)
        mask[:, t + i] = 1
        pos = mask.sum(1, keepdims=True) - 1
        out = model.forward_step(nxt, mask, pos, cache, Tensor(t + i, ms.int32)).asnumpy()[:, -1]
        steps.append(out)
    return np.stack(steps)


def test_compiled_cached_decode_matches_reference():
    ours, ref = pair()
    a, b = _greedy(ours), _greedy(ref)
    assert np.abs(a - b).max() <= FP32_TOL
    assert (a.argmax(-1) == b.argmax(-1)).all()


def test_compiled_training_gradients_match_reference():
    ours, ref = pair(tie_word_embeddings=False)
    ids = Tensor(IDS.astype(np.int32))
    labels = Tensor(np.where(MASK == 1, IDS, -100).astype(np.int32))
    mask = Tensor(MASK.astype(np.int32))

    def run(model):
        params = model.trainable_params()

        def loss_fn(x, m, y):
            return model(x, m, None, y)[1]

        loss, grads = ms.jit(ms.value_and_grad(loss_fn, None, params))(ids, mask, labels)
        return float(loss), {p.name: g.asnumpy() for p, g in zip(params, grads)}

    (l1, g1), (l2, g2) = run(ours), run(ref)
    assert abs(l1 - l2) <= 1e-5
    assert g1.keys() == g2.keys()
    for name in g1:
        assert np.abs(g1[name] - g2[name]).max() <= 1e-4 * max(1.0, np.abs(g2[name]).max()), name


def test_wrapped_projections_leave_the_fused_path_and_keep_the_logits():
    """q/k/v and gate/up run fused only while they are plain Linear cells; a LoRA wrapper (B = 0 at
    first, so the same function) takes its layer back to separate projections with the same logits."""
    from qwen2ms.training.lora import LoraConfig, apply_lora

    ours, _ = pair()
    layer = ours.model.layers[0]
    assert layer.self_attn.fused_qkv and layer.mlp.fused_gate_up
    before = logits(ours)
    apply_lora(ours, LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    assert not layer.self_attn.fused_qkv and not layer.mlp.fused_gate_up
    np.testing.assert_allclose(logits(ours), before, rtol=1e-6, atol=1e-6)


def test_first_compiled_step_moves_the_weights_to_huge_pages_once(monkeypatch):
    from qwen2ms.ops import cpu

    seen = []
    monkeypatch.setattr(cpu, "collapse_huge_pages", lambda tensors: seen.append(len(list(tensors))) or 0)
    ours, _ = pair()
    _greedy(ours, new=1)  # compiles a prefill and a decode step
    assert seen == [len(list(ours.get_parameters()))]


class _ToyLinear(ms.nn.Cell):
    """A linear cell shaped like the model's: ``weight``, ``bias``, ``weight_scale`` and an ops backend."""

    def __init__(self, impl, rng, n=45, k=33):
        super().__init__()
        w = Tensor(rng.standard_normal((n, k)).astype(np.float32) * 0.1).astype(ms.bfloat16)
        self.weight = ms.Parameter(w, name="toy.weight")
        self.bias = None
        self.weight_scale = None
        self.ops_impl = impl

    def construct(self, x):
        return self.ops_impl.linear(x, self.weight, self.bias, self.weight_scale)


def test_quantize_int8_weights_in_place():
    rng = np.random.default_rng(7)
    for impl in (dispatch.get_ops("cpu"), dispatch.get_ops("reference")):
        toy = _ToyLinear(impl, rng)
        x = Tensor(rng.standard_normal((1, 3, 33)).astype(np.float32))
        before = toy(x).asnumpy()
        w = toy.weight.astype(ms.float32).asnumpy()
        assert quantize_int8_weights(toy) == 1
        assert toy.weight.dtype == ms.int8 and toy.weight.name == "toy.weight" and not toy.weight.requires_grad
        assert toy.weight_scale.name == "toy.weight_scale" and toy.weight_scale.shape == (45,)
        after = toy(x).asnumpy()
        # int8 error: half a quantisation step per weight, summed over K=33 inputs.
        bound = (np.abs(x.asnumpy()) @ (np.abs(w).max(1) / 127 / 2)[None, :].repeat(33, 0)).max()
        assert np.abs(after - before).max() <= bound
        assert quantize_int8_weights(toy) == 0  # already quantised: untouched
        np.testing.assert_allclose(ms.jit(toy)(x).asnumpy(), after, rtol=1e-5, atol=1e-5)
