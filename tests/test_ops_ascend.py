"""The Ascend backend's argument mapping, with MindSpore's fused primitives replaced by recording fakes.

Each fake implements its primitive's documented semantics in NumPy (layouts, mask polarity, GQA head
grouping, the rotate-half mode, swiglu's gate|up split, grouped matmul groups, token permutation) and
records how it was called. The composed result must equal the reference implementation.
Nothing here runs on Ascend hardware.
"""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
from mindspore import Tensor  # noqa: E402

from qwen2ms.ops import reference  # noqa: E402
from qwen2ms.ops.ascend import AscendOps  # noqa: E402

rng = np.random.default_rng(3)


def _np(t):
    return t.astype(ms.float32).asnumpy().astype(np.float64)


def _out(a, like):
    return Tensor(np.asarray(a, np.float32)).astype(like.dtype)


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _attend(q, k, v, masked_out, scale):
    """q [B, N1, S1, D], k/v [B, N2, S2, D]; masked_out broadcastable to [B, N1, S1, S2], True = discard."""
    n1, n2 = q.shape[1], k.shape[1]
    assert n1 % n2 == 0, "N2 must divide N1"
    rep = n1 // n2
    k, v = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
    s = np.einsum("bnqd,bnkd->bnqk", q, k) * scale
    s = np.where(masked_out, -np.inf, s)
    return np.einsum("bnqk,bnkd->bnqd", _softmax(s), v)


class FakePrims:
    """Stands in for ``mindspore.ops``: records each call, computes the documented result."""

    def __init__(self):
        self.calls = []

    def _rec(self, name, args, kwargs):
        self.calls.append((name, args, kwargs))

    def names(self):
        return [c[0] for c in self.calls]

    def rms_norm(self, x, gamma, epsilon=1e-6):
        self._rec("rms_norm", (x, gamma, epsilon), {})
        assert x.dtype == gamma.dtype, "RmsNorm requires gamma in the dtype of x"
        a = _np(x)
        rstd = 1 / np.sqrt((a * a).mean(-1, keepdims=True) + epsilon)
        return _out(a * rstd * _np(gamma), x), Tensor(rstd.astype(np.float32))

    def add_rms_norm(self, x1, x2, gamma, epsilon=1e-6):
        self._rec("add_rms_norm", (x1, x2, gamma, epsilon), {})
        assert x1.dtype == gamma.dtype and x1.shape == x2.shape
        s = _np(x1) + _np(x2)
        rstd = 1 / np.sqrt((s * s).mean(-1, keepdims=True) + epsilon)
        return _out(s * rstd * _np(gamma), x1), Tensor(rstd.astype(np.float32)), _out(s, x1)

    def rotary_position_embedding(self, x, cos, sin, mode=0):
        self._rec("rotary_position_embedding", (x, cos, sin, mode), {})
        assert mode == 0 and x.ndim == 4 and cos.ndim == 4 and cos.dtype == x.dtype
        b, n, s, d = x.shape
        assert cos.shape in ((1, 1, s, d), (b, 1, s, d), (b, n, s, d)), f"cos layout {cos.shape} not 11SD/B1SD/BNSD"
        a, c, sn = _np(x), _np(cos), _np(sin)
        rot = np.concatenate([-a[..., d // 2:], a[..., : d // 2]], -1)
        return _out(a * c + rot * sn, x)

    def swiglu(self, input, dim=-1):
        self._rec("swiglu", (input, dim), {})
        a = _np(input)
        g, u = np.split(a, 2, axis=dim)
        return _out(g / (1 + np.exp(-g)) * u, input)

    def flash_attention_score(self, query, key, value, head_num, real_shift=None, drop_mask=None, padding_mask=None,
                              attn_mask=None, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, keep_prob=1.0,
                              scalar_value=1.0, pre_tokens=2147483647, next_tokens=2147483647, inner_precise=0,
                              input_layout="BSH", sparse_mode=0):
        self._rec("flash_attention_score", (query, key, value, head_num),
                  dict(attn_mask=attn_mask, scalar_value=scalar_value, input_layout=input_layout,
                       sparse_mode=sparse_mode, keep_prob=keep_prob))
        assert input_layout == "BNSD" and query.shape[1] == head_num and sparse_mode == 0 and keep_prob == 1.0
        assert query.dtype in (ms.float16, ms.bfloat16) and key.dtype == query.dtype == value.dtype
        b, _, s1, _ = query.shape
        s2 = key.shape[2]
        assert attn_mask.dtype in (ms.uint8, ms.bool_)
        assert attn_mask.shape in ((b, head_num, s1, s2), (b, 1, s1, s2), (s1, s2))
        out = _attend(_np(query), _np(key), _np(value), attn_mask.asnumpy().astype(bool), scalar_value)
        return _out(out, query)

    def incre_flash_attention(self, query, key, value, attn_mask=None, actual_seq_lengths=None, pse_shift=None,
                              dequant_scale1=None, quant_scale1=None, dequant_scale2=None, quant_scale2=None,
                              quant_offset2=None, antiquant_scale=None, antiquant_offset=None, block_table=None,
                              num_heads=1, input_layout="BSH", scale_value=1.0, num_key_value_heads=0, block_size=0,
                              inner_precise=1, kv_padding_size=None):
        self._rec("incre_flash_attention", (query, key, value),
                  dict(attn_mask=attn_mask, num_heads=num_heads, input_layout=input_layout, scale_value=scale_value,
                       num_key_value_heads=num_key_value_heads))
        assert isinstance(key, (list, tuple)) and isinstance(value, (list, tuple)) and len(key) == 1
        k, v = key[0], value[0]
        assert input_layout == "BNSD" and query.shape[2] == 1 and query.shape[1] == num_heads
        assert k.shape[1] == (num_key_value_heads or num_heads) and k.shape == v.shape
        b, s = query.shape[0], k.shape[2]
        assert attn_mask.dtype in (ms.bool_, ms.int8, ms.uint8)
        assert attn_mask.shape in ((b, s), (b, 1, s), (b, 1, 1, s))
        m = attn_mask.asnumpy().astype(bool).reshape(b, 1, 1, s)
        return _out(_attend(_np(query), _np(k), _np(v), m, scale_value), query)

    def moe_token_permute(self, tokens, indices, num_out_tokens=None, padded_mode=False):
        self._rec("moe_token_permute", (tokens, indices), {})
        assert indices.dtype == ms.int32 and not padded_mode
        k = indices.shape[1]
        order = np.argsort(indices.asnumpy().reshape(-1), kind="stable")
        return _out(_np(tokens)[order // k], tokens), Tensor(order.astype(np.int32))

    def grouped_matmul(self, x, weight, bias=None, scale=None, offset=None, antiquant_scale=None,
                       antiquant_offset=None, group_list=None, split_item=0, group_type=-1, transpose_a=False,
                       transpose_b=False):
        self._rec("grouped_matmul", (x, weight),
                  dict(group_list=group_list, split_item=split_item, group_type=group_type, transpose_b=transpose_b))
        assert split_item == 3 and group_type == 0 and len(x) == 1 and len(weight) == 1
        assert group_list.dtype == ms.int64 and group_list.shape[0] == weight[0].shape[0]
        a, w, ends = _np(x[0]), _np(weight[0]), group_list.asnumpy()
        assert ends[-1] == a.shape[0], "cumulative group_list must end at the row count"
        out = np.zeros((a.shape[0], w.shape[1] if transpose_b else w.shape[2]))
        start = 0
        for e, end in enumerate(ends):
            we = w[e].T if transpose_b else w[e]
            out[start:end] = a[start:end] @ we
            start = end
        return [_out(out, x[0])]

    def moe_token_unpermute(self, permuted_tokens, sorted_indices, probs=None, padded_mode=False,
                            restore_shape=None):
        self._rec("moe_token_unpermute", (permuted_tokens, sorted_indices), dict(probs=probs))
        n, k = probs.shape
        rows = np.zeros((n * k, permuted_tokens.shape[1]))
        rows[sorted_indices.asnumpy()] = _np(permuted_tokens)
        return _out((rows.reshape(n, k, -1) * _np(probs)[..., None]).sum(1), permuted_tokens)


@pytest.fixture
def fake():
    return FakePrims()


def _t(a, dt=ms.float16):
    return Tensor(np.asarray(a, np.float32)).astype(dt)


def _close(a, b, tol=2e-3):
    np.testing.assert_allclose(_np(a), _np(b), rtol=tol, atol=tol)


def test_rms_norm_and_add_rms_norm_mapping(fake):
    x, r = _t(rng.standard_normal((2, 3, 16))), _t(rng.standard_normal((2, 3, 16)))
    w = _t(rng.standard_normal(16), ms.float32)  # weight stored in another dtype: cast to x's
    impl = AscendOps(fake)
    _close(impl.rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5))
    name, (_, gamma, eps), _ = fake.calls[-1]
    assert name == "rms_norm" and gamma.dtype == ms.float16 and eps == 1e-5
    y, s = impl.add_rms_norm(x, r, w, 1e-6)
    _close(s, x + r)
    _close(y, reference.rms_norm(x + r, w, 1e-6))
    assert fake.names() == ["rms_norm", "add_rms_norm"]


def test_rope_mapping_uses_b1sd_cos_and_rotate_half(fake):
    b, t, d = 2, 5, 16
    q, k = _t(rng.standard_normal((b, 4, t, d))), _t(rng.standard_normal((b, 2, t, d)))
    inv = Tensor((1.0 / 10000 ** (np.arange(0, d, 2) / d)).astype(np.float32))
    cos, sin = reference.rope_cos_sin(Tensor(np.arange(b * t, dtype=np.int32).reshape(b, t)), inv)
    qo, ko = AscendOps(fake).apply_rope(q, k, cos, sin)
    rq, rk = reference.apply_rope(q, k, cos, sin)
    _close(qo, rq)
    _close(ko, rk)
    assert fake.names() == ["rotary_position_embedding"] * 2
    for _, (x, c, s, mode), _ in fake.calls:
        assert c.shape == (b, 1, t, d) and s.shape == (b, 1, t, d) and mode == 0 and c.dtype == x.dtype


def test_swiglu_mapping_concatenates_gate_then_up(fake):
    g, u = _t(rng.standard_normal((3, 7))), _t(rng.standard_normal((3, 7)))
    impl = AscendOps(fake)
    _close(impl.act_mul(g, u, "silu"), reference.act_mul(g, u, "silu"))
    _, (inp, dim), _ = fake.calls[0]
    assert inp.shape == (3, 14) and dim == -1
    _close(impl.act_mul(g, u, "gelu"), reference.act_mul(g, u, "gelu"))
    assert fake.names() == ["swiglu"]  # gelu is not fused


@pytest.mark.parametrize("dt", [ms.float16, ms.bfloat16])
def test_decode_attention_maps_to_incre_flash_attention(fake, dt):
    b, hq, hkv, s, d = 2, 6, 2, 7, 16
    q = _t(rng.standard_normal((b, hq, 1, d)), dt)
    k, v = _t(rng.standard_normal((b, hkv, s, d)), dt), _t(rng.standard_normal((b, hkv, s, d)), dt)
    padding = Tensor(np.array([[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0]], np.int32))  # left pad, unused slot
    mask = reference.attention_mask(Tensor(np.array([5], np.int32)), s, padding)
    got = AscendOps(fake).attention(q, k, v, mask, d ** -0.5)
    # bf16 matmuls do not run on CPU: the reference for bf16 inputs is computed in fp32 from the same values.
    f32 = [a.astype(ms.float32) for a in (q, k, v)]
    _close(got, reference.attention(*f32, mask, d ** -0.5), tol=2e-2 if dt == ms.bfloat16 else 2e-3)
    assert fake.names() == ["incre_flash_attention"]
    _, _, kw = fake.calls[0]
    assert kw["num_heads"] == hq and kw["num_key_value_heads"] == hkv and kw["input_layout"] == "BNSD"
    assert kw["scale_value"] == pytest.approx(d ** -0.5)
    m = kw["attn_mask"]
    assert m.shape == (b, 1, 1, s) and m.dtype == ms.bool_
    assert m.asnumpy()[0, 0, 0].tolist() == [True, True, False, False, False, False, True]  # True = masked out


def test_prefill_attention_maps_to_flash_attention_score(fake):
    b, hq, hkv, t, d = 2, 4, 2, 6, 16
    q = _t(rng.standard_normal((b, hq, t, d)))
    k, v = _t(rng.standard_normal((b, hkv, t, d))), _t(rng.standard_normal((b, hkv, t, d)))
    seg = Tensor(np.array([[0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]], np.int32))
    mask = reference.attention_mask(Tensor(np.arange(t, dtype=np.int32)), t, None, sliding_window=3,
                                     segment_ids=seg)
    got = AscendOps(fake).attention(q, k, v, mask, 0.3)
    _close(got, reference.attention(q, k, v, mask, 0.3))
    assert fake.names() == ["flash_attention_score"]
    _, args, kw = fake.calls[0]
    assert args[3] == hq and kw["input_layout"] == "BNSD" and kw["sparse_mode"] == 0
    assert kw["scalar_value"] == pytest.approx(0.3)
    m = kw["attn_mask"]
    assert m.shape == (b, 1, t, t) and m.dtype == ms.uint8
    np.testing.assert_array_equal(m.asnumpy().astype(bool), ~np.broadcast_to(mask.asnumpy(), (b, 1, t, t)))


def test_float32_attention_stays_on_the_reference(fake):
    q = _t(rng.standard_normal((1, 2, 3, 16)), ms.float32)
    k = v = _t(rng.standard_normal((1, 2, 3, 16)), ms.float32)
    mask = reference.attention_mask(Tensor(np.arange(3, dtype=np.int32)), 3)
    _close(AscendOps(fake).attention(q, k, v, mask, 0.25), reference.attention(q, k, v, mask, 0.25), tol=1e-6)
    assert fake.calls == []


def test_moe_experts_mapping_permute_grouped_matmul_unpermute(fake):
    n, h, inter, e, top = 5, 16, 8, 4, 2
    x = _t(rng.standard_normal((n, h)))
    gate_up = _t(rng.standard_normal((e, 2 * inter, h)) * 0.3)
    down = _t(rng.standard_normal((e, h, inter)) * 0.3)
    router = _t(rng.standard_normal((e, h)))
    _, top_w, top_i = reference.moe_router(x, router, top, False)
    got = AscendOps(fake).moe_experts(x, gate_up, down, top_i, top_w, "silu")
    _close(got, reference.moe_experts(x, gate_up, down, top_i, top_w, "silu"), tol=5e-3)
    assert fake.names() == ["moe_token_permute", "grouped_matmul", "swiglu", "grouped_matmul", "moe_token_unpermute"]
    counts = np.bincount(top_i.asnumpy().reshape(-1), minlength=e)
    for name, args, kw in fake.calls:
        if name == "grouped_matmul":
            assert kw["transpose_b"] and kw["split_item"] == 3 and kw["group_type"] == 0
            np.testing.assert_array_equal(kw["group_list"].asnumpy(), np.cumsum(counts))
    assert fake.calls[1][1][1][0].shape == (e, 2 * inter, h)  # HF [E, out, in] stack, no copy-transpose
    fake.calls.clear()
    AscendOps(fake).moe_experts(x, gate_up, down, top_i, top_w, "relu")
    assert fake.calls == []  # non-silu experts use the reference


def test_unfused_ops_are_the_reference(fake):
    impl = AscendOps(fake)
    x, w = _t(rng.standard_normal((2, 8)), ms.float32), _t(rng.standard_normal((3, 8)), ms.float32)
    _close(impl.linear(x, w), reference.linear(x, w), tol=1e-6)
    logits, labels = _t(rng.standard_normal((4, 9)), ms.float32), Tensor(np.array([1, -100, 3, 8], np.int32))
    a, b = impl.cross_entropy(logits, labels), reference.cross_entropy(logits, labels)
    _close(a[0], b[0], tol=1e-6)
    assert fake.calls == [] and impl.name == "ascend"
