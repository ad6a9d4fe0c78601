"""Compiled forwards must not hold every layer's temporaries at once (MindSpore 2.10 CPU broadcasting issue).

Each measurement runs in a fresh interpreter: the resident memory a compiled prefill adds is compared
between a 1-layer and a 5-layer model. Temporaries freed layer by layer cost the same for both;
before the fix in qwen2ms.ops.reference (explicit broadcasts), every extra layer kept ~100 MB of
attention and norm buffers alive at this size.
"""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, sys
import numpy as np
from qwen2ms.config import Qwen2Config
from qwen2ms.modeling import Qwen2ForCausalLM

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

layers, backend = int(sys.argv[1]), sys.argv[2]
cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
model = Qwen2ForCausalLM(cfg, ops_backend=backend)
model.set_train(False)
ids = np.random.default_rng(0).integers(0, 256, (1, 1024))
cache = model.new_cache(1, 1056)
model.forward_step(ids[:, :32], None, None, model.new_cache(1, 64), 0, logits_to_keep=1)  # warm the runtime
before = rss()
model.forward_step(ids, None, None, cache, 0, logits_to_keep=1).asnumpy()
print(json.dumps({"grew": rss() - before}))
"""


def _growth(layers: int, backend: str) -> int:
    env = dict(os.environ, GLOG_v="3")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(layers), backend], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["grew"]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_prefill_memory_does_not_grow_per_layer(backend):
    one, five = _growth(1, backend), _growth(5, backend)
    per_layer = (five - one) / 4
    # One layer's attention scores at 1024 tokens are 16 MB; leaking them (and their select/softmax
    # copies) per layer costs ~100 MB per layer. Freed temporaries leave a few MB of graph bookkeeping.
    assert per_layer < 12e6, f"{backend}: each extra layer kept {per_layer / 1e6:.0f} MB after a 1024-token prefill"


INT4_SCRIPT = r"""
import json, os, sys
import numpy as np
from qwen2ms.config import Qwen2Config
from qwen2ms.modeling import Qwen2ForCausalLM
from qwen2ms.modeling.quantize import quantize_weights

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

layers = int(sys.argv[1])
cfg = Qwen2Config(vocab_size=256, hidden_size=512, intermediate_size=2048, num_hidden_layers=layers,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048)
model = Qwen2ForCausalLM(cfg, ops_backend="cpu")
model.set_train(False)
quantize_weights(model, bits=4, group_size=32)
ids = np.random.default_rng(0).integers(0, 256, (1, 64))
model.forward_step(ids[:, :32], None, None, model.new_cache(1, 64), 0, logits_to_keep=1)  # warm the runtime
before = rss()
model.forward_step(ids, None, None, model.new_cache(1, 96), 0, logits_to_keep=1).asnumpy()
print(json.dumps({"grew": rss() - before}))
"""


def test_int4_prefill_memory_does_not_grow_per_layer():
    """A many-row int4 forward unpacks each weight in one kernel pass: the op-by-op unpacking kept ~10 fp32-weight
    sized temporaries per layer alive (160 MB per layer here, 15 MB of fp32 weights; a 0.5B-shape prefill passed
    14 GB); now a layer adds ~5 MB."""
    grew = []
    for layers in (1, 5):
        out = subprocess.run([sys.executable, "-c", INT4_SCRIPT, str(layers)], capture_output=True, text=True,
                             env=dict(os.environ, GLOG_v="3"), timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        grew.append(json.loads(out.stdout.strip().splitlines()[-1])["grew"])
    per_layer = (grew[1] - grew[0]) / 4
    assert per_layer < 10e6, f"each extra int4 layer kept {per_layer / 1e6:.0f} MB after a 64-token prefill"
