"""The compiled Trainer on tiny Qwen2 models: parity with transformers+torch, accumulation, resume, hooks, NaN, fp16, overfit."""
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
    AdamW,
    NonFiniteLossError,
    SFTDataLoader,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    decay_parameter_names,
    get_scheduler,
    list_checkpoints,
)

VOCAB = 96
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)


def tiny_model(seed=0, layers=1, dtype=None, **kw):
    return Qwen2ForCausalLM(Qwen2Config(**dict(TINY, num_hidden_layers=layers, **kw)), dtype=dtype, seed=seed)


def samples(n, seed=0, lo=9, hi=17):
    """Random SFT samples of 9..16 tokens (one padded shape: one compile) with a masked "prompt" prefix."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = int(rng.integers(lo, hi))
        ids = rng.integers(1, VOCAB, t).tolist()
        prompt = int(rng.integers(1, t - 2))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def args_for(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), learning_rate=1e-2, per_device_train_batch_size=2, save_steps=0,
                logging_steps=1, disable_tqdm=True, shuffle=False, max_grad_norm=1.0, lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


def params_of(model):
    return {p.name: p.asnumpy().copy() for p in model.get_parameters()}


class LossRecorder(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_step_end(self, args, state, **kw):
        self.losses.append(kw["loss"])


# ---------------------------------------------------------------- parity with transformers
def test_one_step_loss_grads_and_update_equal_transformers(tmp_path):
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(0.1 * torch.randn_like(p) + (1.0 if name.endswith("norm.weight") else 0.0))
    hf.save_pretrained(tmp_path / "hf")
    model = Qwen2ForCausalLM.from_hf(str(tmp_path / "hf"))
    data = samples(3, seed=1)
    args = args_for(tmp_path / "run", per_device_train_batch_size=3, max_steps=1, weight_decay=0.1,
                    max_grad_norm=0.5, adam_beta2=0.95)
    trainer = Trainer(model, args, train_dataset=data)
    batch = trainer.data_collator(data)
    n_items = int((batch["labels"][:, 1:] != -100).sum())

    # Loss and gradients of compute_loss (the function the compiled step differentiates).
    weights = model.trainable_params()
    fn = ms.value_and_grad(lambda inp, n: trainer.compute_loss(model, inp, n), None, weights)
    loss, grads = fn({k: Tensor(v) for k, v in batch.items()}, Tensor(float(n_items), ms.float32))
    t_in = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    out = hf(**t_in)
    out.loss.backward()
    np.testing.assert_allclose(float(loss.asnumpy()), out.loss.item(), rtol=1e-4)
    hf_params = dict(hf.named_parameters())
    for p, g in zip(weights, grads):
        want = hf_params[p.name].grad.numpy()
        np.testing.assert_allclose(g.asnumpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=p.name)

    # One compiled step (clip + AdamW with HF's no-decay groups) against torch.
    rec = LossRecorder()
    trainer.callback_handler.add(rec)
    trainer.train()
    torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.5)
    decay = set(decay_parameter_names(list(hf_params)))
    opt = torch.optim.AdamW([{"params": [p for n, p in hf_params.items() if n in decay], "weight_decay": 0.1},
                             {"params": [p for n, p in hf_params.items() if n not in decay], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    opt.step()
    np.testing.assert_allclose(rec.losses[0], out.loss.item(), rtol=1e-4)
    for name, value in params_of(model).items():
        want = hf_params[name].detach().numpy()
        np.testing.assert_allclose(value, want, rtol=1e-4, atol=1e-5, err_msg=name)
    assert trainer.state.log_history[0]["grad_norm"] > 0.5  # clipping was active


# ---------------------------------------------------------------- accumulation
def test_accumulation_n_times_b_equals_one_batch_of_n_b(tmp_path):
    data = samples(8, seed=2)  # different lengths and prompt masks: token counts differ per micro-batch
    big = Trainer(tiny_model(), args_for(tmp_path / "a", per_device_train_batch_size=4, max_steps=2,
                                         weight_decay=0.05), train_dataset=data)
    big.train()
    acc = Trainer(tiny_model(), args_for(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                         max_steps=2, weight_decay=0.05), train_dataset=data)
    acc.train()
    la = [h["loss"] for h in big.state.log_history]
    lb = [h["loss"] for h in acc.state.log_history]
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    np.testing.assert_allclose([h["grad_norm"] for h in acc.state.log_history],
                               [h["grad_norm"] for h in big.state.log_history], rtol=1e-5)
    pa, pb = params_of(big.model), params_of(acc.model)
    for k in pa:
        # atol: k_proj.bias has a mathematically zero gradient (softmax ignores it); Adam turns its
        # float noise into ~lr-sized steps that differ at the 1e-6 level.
        np.testing.assert_allclose(pb[k], pa[k], rtol=1e-5, atol=1e-5, err_msg=k)


# ---------------------------------------------------------------- a short last micro-batch
class _ShapeRecorder(Trainer):
    """Records the row count of every micro-batch the compiled train and eval steps receive."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.rows, self.eval_rows = [], []

    def training_step(self, model, inputs, num_items_in_batch):
        self.rows.append(int(np.asarray(inputs["input_ids"]).shape[0]))
        return super().training_step(model, inputs, num_items_in_batch)

    def _compiled_eval_loss(self, batch, n):
        self.eval_rows.append(int(np.asarray(batch["input_ids"]).shape[0]))
        return super()._compiled_eval_loss(batch, n)


_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            output_router_logits=True, router_aux_loss_coef=0.5)


def test_a_short_last_batch_reuses_the_compiled_step(tmp_path):
    """5 samples in batches of 4: the epoch's 1-row batch reaches the compiled step padded to 4 rows (one graph)."""
    trainer = _ShapeRecorder(tiny_model(), args_for(tmp_path, per_device_train_batch_size=4,
                                                    per_device_eval_batch_size=2, max_steps=3),
                             train_dataset=samples(5, seed=4))
    trainer.train()
    trainer.evaluate(samples(3, seed=5))
    assert trainer.rows == [4, 4, 4] and trainer.eval_rows == [2, 2]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe-aux"])
def test_padding_rows_leave_the_loss_and_gradients_of_the_real_rows(tmp_path, moe):
    """What the padded 1-row batch contributes equals the row alone: loss and every gradient. The MoE model's
    load-balancing loss is on: the padding rows are masked, so it does not count them either."""
    model = tiny_model(**(_MOE if moe else {}))
    trainer = Trainer(model, args_for(tmp_path), train_dataset=samples(2))
    batch = trainer.data_collator(samples(1, seed=6))
    padded = trainer._fill_short_batch(batch, 4)
    assert padded["input_ids"].shape[0] == 4
    weights = model.trainable_params()
    fn = ms.value_and_grad(lambda inp, n: trainer.compute_loss(model, inp, n), None, weights)
    n = Tensor(float((batch["labels"][:, 1:] != -100).sum()), ms.float32)
    loss, grads = fn({k: Tensor(v) for k, v in batch.items()}, n)
    loss_p, grads_p = fn({k: Tensor(v) for k, v in padded.items()}, n)
    np.testing.assert_allclose(float(loss_p.asnumpy()), float(loss.asnumpy()), rtol=1e-6)
    for p, g, gp in zip(weights, grads, grads_p):
        np.testing.assert_allclose(gp.asnumpy(), g.asnumpy(), rtol=1e-5, atol=1e-7, err_msg=p.name)


def test_padding_rows_mask_every_token_and_ignore_every_label():
    from qwen2ms.training.trainer import _pad_rows

    batch = {"input_ids": np.array([[7, 8, 9]]), "labels": np.array([[-100, 8, 9]]),
             "attention_mask": np.array([[1, 1, 1]])}
    out = _pad_rows(batch, 3)
    np.testing.assert_array_equal(out["input_ids"], [[7, 8, 9]] * 3)
    np.testing.assert_array_equal(out["labels"], [[-100, 8, 9]] + [[-100] * 3] * 2)
    np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1], [0, 0, 0], [0, 0, 0]])
    assert _pad_rows(batch, 1) is batch


def test_packed_moe_batches_are_not_padded_because_the_aux_loss_counts_every_token(tmp_path):
    """Without an attention_mask the router loss would count padding rows: such a short batch keeps its shape."""
    trainer = Trainer(tiny_model(**_MOE), args_for(tmp_path), train_dataset=samples(2))
    packed = {"input_ids": np.ones((1, 8), np.int32), "labels": np.ones((1, 8), np.int32),
              "position_ids": np.tile(np.arange(8), (1, 1)), "segment_ids": np.ones((1, 8), np.int32)}
    assert trainer._fill_short_batch(packed, 4) is packed
    dense = Trainer(tiny_model(), args_for(tmp_path / "d"), train_dataset=samples(2))
    assert dense._fill_short_batch(packed, 4)["input_ids"].shape == (4, 8)


# ---------------------------------------------------------------- resume
def test_resume_continues_with_identical_losses(tmp_path):
    data = samples(6, seed=3)
    kw = dict(per_device_train_batch_size=2, max_steps=6, save_steps=3, shuffle=True, seed=7,
              lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.1)
    straight_rec = LossRecorder()
    straight = Trainer(tiny_model(), args_for(tmp_path / "s", **kw), train_dataset=data, callbacks=[straight_rec])
    straight.train()
    assert [s for s, _ in list_checkpoints(tmp_path / "s")] == [3, 6]
    ckpt = tmp_path / "s" / "checkpoint-3"
    assert {"model.safetensors", "config.json", "optimizer.safetensors", "trainer_state.json",
            "training_args.json"} <= {p.name for p in ckpt.iterdir()}
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["data"]["epoch"] == 1 and state["data"]["step_in_epoch"] == 0  # 3 micro-batches per epoch
    assert state["scheduler"]["last_step"] == 3

    resumed_rec = LossRecorder()
    # A different initial model: everything must come from the checkpoint.
    resumed = Trainer(tiny_model(seed=5), args_for(tmp_path / "s", **kw), train_dataset=data, callbacks=[resumed_rec])
    out = resumed.train(resume_from_checkpoint=str(ckpt))
    assert out.global_step == 6
    np.testing.assert_allclose(resumed_rec.losses, straight_rec.losses[3:], rtol=1e-6)
    a, b = params_of(straight.model), params_of(resumed.model)
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-6, atol=1e-7, err_msg=k)
    # The JSONL log of the run holds every logged step of both sessions.
    steps = [json.loads(x)["step"] for x in (tmp_path / "s" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 4, 5, 6]

    # Resuming into a trainer whose compiled step already ran (its graph holds the parameters):
    # the checkpoint must still be what the graph sees.
    again = LossRecorder()
    straight.callback_handler.add(again)
    straight.train(resume_from_checkpoint=str(ckpt))
    np.testing.assert_allclose(again.losses, straight_rec.losses[3:6], rtol=1e-6)


def test_resume_true_needs_a_checkpoint(tmp_path):
    trainer = Trainer(tiny_model(), args_for(tmp_path, max_steps=1, resume_from_checkpoint=True),
                      train_dataset=samples(2))
    with pytest.raises(Exception, match="no checkpoint"):
        trainer.train()


# ---------------------------------------------------------------- hooks and callbacks
def test_every_hook_and_callback_is_used(tmp_path):
    calls = {}

    def hit(name):
        calls[name] = calls.get(name, 0) + 1

    class MyTrainer(Trainer):
        def compute_loss(self, model, inputs, num_items_in_batch):
            # Traced into the compiled step (graph code: no Python side effects): the logged loss
            # shows the override ran.
            return super().compute_loss(model, inputs, num_items_in_batch) + 100.0

        def training_step(self, model, inputs, num_items_in_batch):
            hit("training_step")
            return super().training_step(model, inputs, num_items_in_batch)

        def create_optimizer(self):
            hit("create_optimizer")
            params = self.model.trainable_params()
            return AdamW(params, betas=(0.8, 0.9), weight_decay=0.0)

        def create_scheduler(self, num_training_steps):
            hit("create_scheduler")
            return get_scheduler("linear", 0.02, 0, num_training_steps)

        def get_train_dataloader(self):
            hit("get_train_dataloader")
            return SFTDataLoader(self.train_dataset[:4], 2, self.data_collator, shuffle=False)

        def log(self, logs):
            hit("log")
            logs = dict(logs, custom=1)
            super().log(logs)

    events = []

    class Events(TrainerCallback):
        def on_train_begin(self, args, state, **kw):
            events.append("begin")

        def on_step_end(self, args, state, **kw):
            events.append(f"step{state.global_step}")

        def on_log(self, args, state, logs, **kw):
            events.append("log")

        def on_save(self, args, state, checkpoint_dir="", **kw):
            events.append(f"save:{checkpoint_dir.rsplit('-', 1)[-1]}")

        def on_evaluate(self, args, state, metrics, **kw):
            events.append("evaluate")

        def on_train_end(self, args, state, **kw):
            events.append("end")

    tr = MyTrainer(tiny_model(), args_for(tmp_path, max_steps=4, save_steps=2, save_total_limit=1, logging_steps=2),
                   train_dataset=samples(10, seed=4), eval_dataset=samples(3, seed=5), callbacks=[Events()])
    tr.train()
    assert calls["training_step"] == 4
    assert calls["create_optimizer"] == calls["create_scheduler"] == calls["get_train_dataloader"] == 1
    assert calls["log"] >= 4  # 2 training logs + 2 evaluations
    assert isinstance(tr.optimizer, AdamW) and tr.optimizer.beta1 == 0.8
    train_logs = [h for h in tr.state.log_history if "loss" in h]
    assert [h["step"] for h in train_logs] == [2, 4] and all(h["custom"] == 1 for h in train_logs)
    assert all(100.0 < h["loss"] < 110.0 for h in train_logs)  # the overriding compute_loss was compiled in
    # The custom scheduler's learning rates were used: linear from 0.02 to 0 over 4 steps.
    assert train_logs[0]["learning_rate"] == pytest.approx(0.02 * 3 / 4)
    for key in ("grad_norm", "tokens_per_second", "epoch"):
        assert train_logs[0][key] > 0
    # The custom loader has 2 micro-batches per epoch: 4 steps are 2 epochs.
    assert tr.state.epoch == 2
    assert events[0] == "begin" and events[-1] == "end"
    assert events.count("evaluate") == 2 and "save:2" in events and "save:4" in events
    assert events.index("evaluate") < events.index("save:2")  # evaluated before saving, so "best" is known
    kept = [s for s, _ in list_checkpoints(tmp_path)]
    best = int(tr.state.best_checkpoint.rsplit("-", 1)[-1])
    assert 4 in kept and best in kept and len(kept) == len({4, best})
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert any("eval_loss" in x for x in lines) and any("tokens_per_second" in x for x in lines)


# ---------------------------------------------------------------- failures
def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    class Poisoned(Trainer):
        def compute_loss(self, model, inputs, num_items_in_batch):
            loss = super().compute_loss(model, inputs, num_items_in_batch)
            # A batch whose first token is 95 gets an infinite loss (only the 5th sample starts so).
            bad = inputs["input_ids"][0, 0] == 95
            return loss + ms.ops.where(bad, Tensor(float("inf"), ms.float32), Tensor(0.0, ms.float32))

    data = samples(8, seed=6)
    for i, s in enumerate(data):
        s["input_ids"][0] = 95 if i == 4 else 1
    tr = Poisoned(tiny_model(), args_for(tmp_path, max_steps=4, save_steps=2), train_dataset=data)
    before_step3 = None

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, trainer=None, **kw):
            nonlocal before_step3
            if state.global_step == 2:
                before_step3 = params_of(trainer.model)

    tr.callback_handler.add(Snapshot())
    with pytest.raises(NonFiniteLossError) as e:
        tr.train()
    msg = str(e.value)
    assert "step 3" in msg and ("inf" in msg or "nan" in msg) and "checkpoint-2" in msg
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    # The bad step did not touch the weights, and the kept checkpoint holds them.
    after = params_of(tr.model)
    back = Qwen2ForCausalLM.from_hf(str(tmp_path / "checkpoint-2"))
    for name, value in params_of(back).items():
        np.testing.assert_array_equal(after[name], before_step3[name])
        np.testing.assert_array_equal(value, before_step3[name])


def test_precision_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="bfloat16.*CPU|CPU.*bf16"):
        Trainer(tiny_model(), args_for(tmp_path, precision="bf16"), train_dataset=samples(2))
    with pytest.raises(ValueError, match="dtype='float16'"):
        Trainer(tiny_model(), args_for(tmp_path, precision="fp16"), train_dataset=samples(2))
    with pytest.raises(ValueError, match="empty"):
        Trainer(tiny_model(), args_for(tmp_path, max_steps=1), train_dataset=[]).train()


def test_fp16_trains_with_dynamic_loss_scale_and_skips_overflow(tmp_path):
    model = tiny_model(dtype="float16")
    # 2**24 overflows the float16 gradients: the first steps are skipped and the scale halves.
    args = args_for(tmp_path, precision="fp16", max_steps=12, loss_scale_init=2.0 ** 24, loss_scale_window=4,
                    learning_rate=5e-3)
    before = params_of(model)
    tr = Trainer(model, args, train_dataset=samples(8, seed=8))
    tr.train()
    logs = tr.state.log_history
    assert logs[0]["skipped_steps"] >= 1
    assert logs[0]["loss_scale"] < 2.0 ** 24
    first_applied = next(i for i, h in enumerate(logs) if h["skipped_steps"] < i + 1)
    assert first_applied >= 1
    assert all(np.isfinite(h["loss"]) for h in logs)
    assert int(tr.optimizer.step_count.asnumpy()) == 12 - logs[-1]["skipped_steps"]
    after = params_of(model)
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert all(p.dtype == ms.float16 for p in model.get_parameters())
    assert logs[-1]["loss"] < logs[first_applied]["loss"]


# ---------------------------------------------------------------- overfit + export
def test_overfits_bundled_samples_and_exports_to_transformers(tmp_path, qwen2_tokenizer_dir):
    from pathlib import Path

    from qwen2ms.data import load_records, tokenize_dataset
    from qwen2ms.tokenization import Qwen2Tokenizer

    tok = Qwen2Tokenizer.from_pretrained(str(qwen2_tokenizer_dir))
    records = load_records(Path(__file__).resolve().parents[1] / "examples" / "data" / "alpaca_sample.json")
    records = sorted(records, key=lambda r: len(r["instruction"]) + len(r["input"]) + len(r["output"]))
    # Distinct prompts only: the sample has several records with the same instruction and different
    # answers, which no model can fit to zero loss.
    unique = {}
    for r in records:
        unique.setdefault(r["instruction"] + r["input"], r)
    records = list(unique.values())[:4]
    real, _ = tokenize_dataset(records, tok, seq_length=96)
    # A compact vocabulary keeps the model tiny: the ids the samples use, renumbered.
    used = sorted({i for s in real for i in s["input_ids"]})
    remap = {old: new for new, old in enumerate(used)}
    data = [{"input_ids": [remap[i] for i in s["input_ids"]],
             "labels": [remap[i] if i != -100 else -100 for i in s["labels"]]} for s in real]
    model = Qwen2ForCausalLM(Qwen2Config(**dict(TINY, vocab_size=len(used), hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2)), seed=0)
    args = args_for(tmp_path, per_device_train_batch_size=4, max_steps=100, learning_rate=1e-2, logging_steps=10,
                    lr_scheduler_type="constant_with_warmup", warmup_steps=5)
    rec = LossRecorder()
    tr = Trainer(model, args, train_dataset=data, callbacks=[rec])
    tr.train()
    assert rec.losses[0] > 3.0 and rec.losses[-1] < 0.1, rec.losses[::10]
    final = tr.evaluate(data)["eval_loss"]
    assert final < 0.1
    tr.save_model(str(tmp_path / "export"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), attn_implementation="eager")
    ids = np.asarray([data[0]["input_ids"]])
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    model.set_train(False)
    got = model(ids).logits.asnumpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_moe_loss_includes_the_router_aux_loss_like_transformers(tmp_path):
    cfg = transformers.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=48, output_router_logits=True,
                                      router_aux_loss_coef=0.5, max_position_embeddings=128,
                                      tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.Qwen2MoeForCausalLM(cfg)
    hf.save_pretrained(tmp_path / "moe")
    model = Qwen2ForCausalLM.from_hf(str(tmp_path / "moe"))
    data = samples(2, seed=9)
    trainer = Trainer(model, args_for(tmp_path / "run", per_device_train_batch_size=2), train_dataset=data)
    batch = trainer.data_collator(data)
    n = float((batch["labels"][:, 1:] != -100).sum())
    ours = trainer.compute_loss(model, {k: Tensor(v) for k, v in batch.items()}, Tensor(n, ms.float32))
    with torch.no_grad():
        out = hf(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()})
    assert out.aux_loss is not None and out.aux_loss.item() > 0
    np.testing.assert_allclose(float(ours.asnumpy()), out.loss.item(), rtol=1e-4)
