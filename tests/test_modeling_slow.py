"""Real-shape check: a random-weight Qwen2-0.5B (HF shapes, tied) matches transformers through our loader."""
import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from qwen2ms import Qwen2Config  # noqa: E402
from qwen2ms.modeling import Qwen2ForCausalLM  # noqa: E402


@pytest.mark.slow
def test_qwen2_0_5b_shape_parity(tmp_path):
    preset = Qwen2Config.from_preset("qwen2-0.5b")
    hcfg = transformers.Qwen2Config(**{k: v for k, v in preset.to_dict().items()
                                       if k not in ("architectures", "rope_scaling")},
                                    attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(hcfg).eval()
    hf.save_pretrained(tmp_path)
    model = Qwen2ForCausalLM.from_hf(tmp_path)
    assert model.num_parameters() == 494032768 == sum(p.numel() for p in hf.parameters())
    ids = np.random.default_rng(0).integers(0, 151646, (1, 8))
    ours = model(ids).logits.asnumpy()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-4
    assert (ours[0].argmax(-1) == ref[0].argmax(-1)).all()
