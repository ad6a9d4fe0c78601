"""The model under ms.jit and GRAPH_MODE: same outputs as PyNative, and gradients equal transformers'."""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")

from qwen2ms.modeling import CausalLMOutput, Qwen2ForCausalLM  # noqa: E402
from test_modeling import TOL, assert_close, ids_for, make_hf  # noqa: E402


def test_forward_compiles_under_jit(tmp_path):
    _, folder = make_hf(tmp_path, moe=True, decoder_sparse_step=2)
    model = Qwen2ForCausalLM.from_hf(folder)
    ids = ids_for(2, 6)
    eager = model(ids, labels=ids, output_router_logits=True)
    ids_t, lab_t = ms.Tensor(ids.astype(np.int32)), ms.Tensor(ids.astype(np.int32))

    @ms.jit
    def step(x, y):
        out = model(x, None, None, y, None, None, None, True, 0)  # the plain tuple inside graphs
        return out[0], out[1], out[2]

    logits, loss, aux = step(ids_t, lab_t)
    assert_close(logits, eager.logits.asnumpy(), 1e-5)
    assert abs(float(loss) - float(eager.loss)) < 1e-5 and abs(float(aux) - float(eager.aux_loss)) < 1e-6


def test_graph_mode_forward_and_decode_step(tmp_path):
    _, folder = make_hf(tmp_path, moe=True, decoder_sparse_step=2)
    model = Qwen2ForCausalLM.from_hf(folder)
    ids = ids_for(2, 5)
    eager = model(ids, labels=ids, output_router_logits=True)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph = model(ids, labels=ids, output_router_logits=True)
        cache = model.new_cache(2, 6)
        prefill = model.forward_step(ids, None, None, cache, 0, 1)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert isinstance(graph, CausalLMOutput)
    assert_close(graph.logits, eager.logits.asnumpy(), 1e-5)
    assert abs(float(graph.loss) - float(eager.loss)) < 1e-5
    assert_close(prefill.asnumpy()[:, -1], eager.logits.asnumpy()[:, -1], 1e-5)


@pytest.mark.parametrize("moe", [False, True])
def test_gradients_match_transformers(tmp_path, moe):
    hf, folder = make_hf(tmp_path, moe=moe, tie_word_embeddings=not moe)
    model = Qwen2ForCausalLM.from_hf(folder)
    ids = ids_for(2, 6)
    labels = ids.copy()
    labels[0, :2] = -100
    params = model.trainable_params()

    def loss_fn(x, y):
        return model(x, None, None, y, None, None, None, moe, 0)[1]

    grad_fn = ms.jit(ms.value_and_grad(loss_fn, None, params))
    loss, grads = grad_fn(ms.Tensor(ids.astype(np.int32)), ms.Tensor(labels.astype(np.int32)))
    out = hf(torch.tensor(ids), labels=torch.tensor(labels), output_router_logits=moe)
    out.loss.backward()
    ref = dict(hf.named_parameters())
    assert abs(float(loss) - float(out.loss.detach())) <= TOL
    for p, g in zip(params, grads):
        expected = ref[p.name].grad.numpy()
        diff = np.abs(g.asnumpy() - expected).max()
        assert diff <= 1e-4 * max(1.0, np.abs(expected).max()), (p.name, diff)
