"""GGUF logits of qwen2ms equal llama.cpp's own on the same file (F32, Q8_0 and every llama-quantize type read).

llama.cpp is built once from the llama-cpp-python sdist into a cache (benchmarks/llamacpp.py; set
QWEN2MS_LLAMACPP_DIR to use a prebuilt one, QWEN2MS_SKIP_LLAMACPP=1 to skip). Without cmake or a C/C++
compiler these tests skip with that reason; a failing build fails them.

Tolerances (max |logit difference| over every position, relative to the largest |logit|):
* F32 with llama.cpp's KV cache in float32: both sides compute in float32 and differ only in summation
  order, 1e-4 relative (measured ~1e-6).
* Quantised weights: llama.cpp also quantises the *activations* before each matmul (to Q8_0 blocks for
  Q8_0/Q4_0 weights, Q8_K for K-quants: about 1/254 of each block's largest value per element), while
  qwen2ms multiplies float activations by the exact dequantised weights. That adds ~0.4% noise per
  projection; 3% relative bounds it (measured below 1%), and the greedy next token must agree.
"""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from qwen2ms import Qwen2ForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import llamacpp  # noqa: E402

pytestmark = pytest.mark.slow

F32_TOL, QUANT_TOL = 1e-4, 3e-2
#: llama-quantize file types -> the block type they must contain (the mixes also hold others, e.g. Q6_K)
LLAMA_QUANTIZE = {"Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q2_K": "Q2_K", "Q3_K_M": "Q3_K",
                  "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}
TEXT = "<|im_start|>user\nWhat is the capital of France? 你好<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def lib():
    if os.environ.get("QWEN2MS_SKIP_LLAMACPP"):
        pytest.skip("QWEN2MS_SKIP_LLAMACPP is set")
    try:
        return llamacpp.build_dir()
    except llamacpp.LlamaCppUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ggufs(lib, tmp_path_factory, qwen2_tokenizer_dir):
    """A random Qwen2 of hidden size 256 (K-quant rows need multiples of 256), tied embeddings, real tokenizer;
    F32 and Q8_0 by llama.cpp's converter, the other types by llama-quantize from the F32 file."""
    root = tmp_path_factory.mktemp("parity")
    cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
                                   rope_theta=1000000.0)
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.08 * torch.randn_like(p))
    src = root / "hf"
    hf.save_pretrained(src)
    transformers.AutoTokenizer.from_pretrained(str(qwen2_tokenizer_dir)).save_pretrained(src)
    files = dict(zip(("F32", "Q8_0"), llamacpp.convert_hf_to_gguf(
        [(src, root / "f32.gguf", "f32"), (src, root / "q8_0.gguf", "q8_0")])))
    for kind in LLAMA_QUANTIZE:
        files[kind] = llamacpp.quantize(files["F32"], root / f"{kind.lower()}.gguf", kind)
    return files


@pytest.fixture(scope="module")
def tokens(ggufs):
    model = Qwen2ForCausalLM.from_gguf(ggufs["F32"])
    return model.tokenizer.encode(TEXT)


def test_tokenizer_matches_llamacpp(ggufs, tokens):
    texts = [TEXT, "Hello world", "  spaces\tand\nnewlines  ", "emoji 🤗 café 1234567", "'s 're I'M DON'T"]
    from qwen2ms.checkpoint.gguf import gguf_tokenizer

    tok = gguf_tokenizer(ggufs["F32"])
    assert llamacpp.tokenize(ggufs["F32"], texts) == [tok.encode(t) for t in texts]
    assert tokens == tok.encode(TEXT)


def _compare(path, tokens, tol, **kw):
    ours = Qwen2ForCausalLM.from_gguf(path, dtype="float32", **kw)(np.array([tokens])).logits.asnumpy()[0]
    theirs = llamacpp.logits(path, tokens)
    assert theirs.shape == ours.shape
    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    assert rel <= tol, f"{Path(path).name}: max |diff| / max |logit| = {rel:.2e} > {tol}"
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.9
    assert ours[-1].argmax() == theirs[-1].argmax()
    return rel


def test_f32_logits_equal_llamacpp(ggufs, tokens):
    _compare(ggufs["F32"], tokens, F32_TOL)


def test_q8_0_logits_equal_llamacpp(ggufs, tokens):
    model = Qwen2ForCausalLM.from_gguf(ggufs["Q8_0"])
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == ms.int8  # the int8 kernels run llama.cpp's blocks
    _compare(ggufs["Q8_0"], tokens, QUANT_TOL)


@pytest.mark.parametrize("kind", list(LLAMA_QUANTIZE))
def test_llama_quantize_logits_equal_llamacpp(ggufs, tokens, kind):
    from qwen2ms.checkpoint.gguf import _read_header

    types = {t.type for t in _read_header(Path(ggufs[kind])).tensors.values()}
    assert LLAMA_QUANTIZE[kind] in types, types
    _compare(ggufs[kind], tokens, QUANT_TOL)
