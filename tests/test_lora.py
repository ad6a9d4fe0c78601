"""LoRA: injection keeps HF names, merge equals the adapter forward, PEFT-style adapter files, training and export."""
import json

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mindspore import Tensor  # noqa: E402

from qwen2ms import Qwen2Config  # noqa: E402
from qwen2ms.modeling import Qwen2ForCausalLM  # noqa: E402
from qwen2ms.training import (  # noqa: E402
    LoraConfig,
    LoraLinear,
    Trainer,
    TrainingArguments,
    apply_lora,
    load_adapter,
    lora_modules,
    merge_and_unload,
    save_adapter,
)

VOCAB = 80
CFG = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def model_(seed=0):
    return Qwen2ForCausalLM(Qwen2Config(**CFG), seed=seed)


def randomise_adapters(model, seed=1):
    rng = np.random.default_rng(seed)
    for _, cell in lora_modules(model):
        cell.lora_B.set_data(Tensor(rng.standard_normal(cell.lora_B.shape).astype(np.float32) * 0.2))


IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 9))


def logits(model):
    model.set_train(False)
    return model(IDS).logits.asnumpy()


def test_injection_keeps_hf_names_and_freezes_the_base():
    m = model_()
    names = [p.name for p in m.get_parameters()]
    base_logits = logits(m)
    paths = apply_lora(m, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    assert paths == [f"model.layers.{i}.self_attn.{k}" for i in range(2) for k in ("q_proj", "v_proj")]
    after = [p.name for p in m.get_parameters()]
    assert [n for n in after if "lora_" not in n] == names
    trainable = sorted(p.name for p in m.trainable_params())
    assert trainable == sorted(f"{p}.lora_{x}" for p in paths for x in "AB")
    assert all(isinstance(c, LoraLinear) for _, c in lora_modules(m))
    # B starts at zero: the adapted model computes exactly what the base model did.
    np.testing.assert_array_equal(logits(m), base_logits)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(m, LoraConfig(r=2))


def test_unknown_target_lists_the_linear_names():
    with pytest.raises(ValueError, match=r"no linear layer matches.*'down_proj'.*'q_proj'"):
        apply_lora(model_(), LoraConfig(r=2, target_modules=["qkv"]))
    with pytest.raises(ValueError, match="lm_head cannot"):
        apply_lora(model_(), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="r must be"):
        LoraConfig(r=0)


def test_merge_equals_adapter_forward_and_restores_the_plain_model():
    m = model_()
    names = [p.name for p in m.get_parameters()]
    apply_lora(m, LoraConfig(r=4, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomise_adapters(m)
    with_adapters = logits(m)
    assert np.abs(with_adapters - logits(model_())).max() > 1e-3  # the adapters change the output
    merged = merge_and_unload(m)
    assert len(merged) == 2 * 3
    assert not lora_modules(m)
    assert [p.name for p in m.get_parameters()] == names
    assert all(p.requires_grad for p in m.get_parameters())
    np.testing.assert_allclose(logits(m), with_adapters, rtol=1e-5, atol=1e-5)


def test_adapter_files_are_peft_style_and_round_trip(tmp_path):
    m = model_()
    apply_lora(m, LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["k_proj", "o_proj"]))
    randomise_adapters(m, seed=3)
    want = logits(m)
    save_adapter(m, tmp_path)
    from safetensors.numpy import load_file

    keys = sorted(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    assert len(keys) == 2 * 2 * 2
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["lora_dropout"] == 0.1
    assert cfg["target_modules"] == ["k_proj", "o_proj"] and cfg["task_type"] == "CAUSAL_LM"
    fresh = model_()
    load_adapter(fresh, tmp_path)
    np.testing.assert_allclose(logits(fresh), want, rtol=1e-6, atol=1e-6)
    other = Qwen2ForCausalLM(Qwen2Config(**dict(CFG, hidden_size=48, num_attention_heads=4)), seed=0)
    with pytest.raises(ValueError, match="does not fit"):
        load_adapter(other, tmp_path)


def test_lora_training_updates_only_adapters_and_exports_a_merged_model(tmp_path):
    rng = np.random.default_rng(5)
    data = []
    for _ in range(6):
        ids = rng.integers(1, VOCAB, 12).tolist()
        data.append({"input_ids": ids, "labels": [-100] * 4 + ids[4:]})
    m = model_()
    base = {p.name: p.asnumpy().copy() for p in m.get_parameters()}
    args = TrainingArguments(str(tmp_path / "run"), learning_rate=2e-2, max_steps=30, per_device_train_batch_size=3,
                             logging_steps=10, save_steps=30, disable_tqdm=True, lora_r=8, lora_alpha=16,
                             lora_dropout=0.05, lora_target_modules=["q_proj", "v_proj", "gate_proj"])
    tr = Trainer(m, args, train_dataset=data)
    tr.train()
    logs = [h["loss"] for h in tr.state.log_history]
    assert logs[-1] < logs[0]
    for p in m.get_parameters():
        if "lora_" in p.name:
            continue
        np.testing.assert_array_equal(p.asnumpy(), base[p.name], err_msg=p.name)
    assert any(np.abs(c.lora_B.asnumpy()).max() > 0 for _, c in lora_modules(m))
    ckpt = tmp_path / "run" / "checkpoint-30"
    files = {p.name for p in ckpt.iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    tr.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()

    adapted = logits(m)
    tr.save_model(str(tmp_path / "merged"), merge_lora=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), attn_implementation="eager")
    with torch.no_grad():
        want = hf(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(want, adapted, rtol=1e-4, atol=1e-4)
