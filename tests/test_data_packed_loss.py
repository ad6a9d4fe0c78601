"""A packed batch gives the same token losses as the same samples run unpacked (tiny random Qwen2)."""
import numpy as np
import pytest

from qwen2ms import Qwen2Config, Qwen2ForCausalLM
from qwen2ms.data import IGNORE_INDEX, DataCollatorForSFT, pack_samples

VOCAB = 64


@pytest.fixture(scope="module")
def model():
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_theta=10000.0, tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg, seed=3)


def _samples(seed):
    rng = np.random.default_rng(seed)
    out = []
    for i, length in enumerate((9, 5, 13, 3, 7, 11)):
        ids = rng.integers(1, VOCAB, size=length).tolist()
        # like SFT: a masked prompt, then trained reply tokens; sample 1 is trained from its first
        # token, which packing must not turn into a target of the previous sample's last token
        prompt = 0 if i == 1 else int(rng.integers(1, length))
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def _targets(labels):
    """Tokens that count in the mean loss: labels shifted left by one, ignoring -100."""
    return int((np.asarray(labels)[..., 1:] != IGNORE_INDEX).sum())


def _loss_sum(model, batch):
    kwargs = {k: v for k, v in batch.items() if k != "input_ids"}
    out = model(batch["input_ids"], **kwargs)
    return float(out.loss.asnumpy()) * _targets(batch["labels"])


@pytest.fixture(scope="module")
def unpacked(model):
    """(samples, summed token loss of each sample run alone, target count) — computed once."""
    samples = _samples(0)
    collate = DataCollatorForSFT(pad_token_id=0, pad_to_multiple_of=1)
    total = sum(_loss_sum(model, collate([s])) for s in samples)
    return samples, total, sum(_targets(s["labels"]) for s in samples)


@pytest.mark.parametrize("strategy", ["ffd", "greedy"])
def test_packed_loss_equals_unpacked(model, unpacked, strategy):
    samples, unpacked_sum, unpacked_count = unpacked
    collate = DataCollatorForSFT(pad_token_id=0, pad_to_multiple_of=1)

    rows = pack_samples(samples, seq_length=24, pad_token_id=0, strategy=strategy)
    assert len(rows) < len(samples)  # several samples really share a row
    packed_batch = collate(rows)
    assert _targets(packed_batch["labels"]) == unpacked_count
    packed = _loss_sum(model, packed_batch)
    np.testing.assert_allclose(packed / unpacked_count, unpacked_sum / unpacked_count, rtol=0, atol=1e-5)


def test_packing_without_segment_ids_would_differ(model, unpacked):
    # guards the test above against passing trivially: without the block-diagonal mask and position
    # restart, tokens see the previous sample and the loss changes
    samples = unpacked[0]
    collate = DataCollatorForSFT(pad_token_id=0, pad_to_multiple_of=1)
    batch = collate(pack_samples(samples, seq_length=24, pad_token_id=0))
    leaky = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    assert abs(_loss_sum(model, batch) - _loss_sum(model, leaky)) > 1e-3


def test_padded_batch_loss_equals_per_sample(model, unpacked):
    samples, single, _ = unpacked
    batched = _loss_sum(model, DataCollatorForSFT(pad_token_id=0, pad_to_multiple_of=8)(samples))
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-5)
