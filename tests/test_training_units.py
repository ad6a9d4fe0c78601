"""Trainer building blocks without a model: arguments, AdamW vs torch, schedules vs transformers, checkpoints, callbacks."""
import json
import math
import os

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mindspore import Parameter, Tensor  # noqa: E402

from qwen2ms.training import (  # noqa: E402
    AdamW,
    CallbackHandler,
    DynamicLossScale,
    JsonlLoggerCallback,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
    decay_parameter_names,
    get_scheduler,
    latest_checkpoint,
    list_checkpoints,
    rotate_checkpoints,
)
from qwen2ms.training.checkpointing import (  # noqa: E402
    capture_rng_state,
    load_tensors,
    remove_stale_temporaries,
    restore_rng_state,
    save_tensors,
    write_checkpoint_dir,
)


# ---------------------------------------------------------------- arguments
def test_arguments_defaults_follow_hf():
    import dataclasses

    a = TrainingArguments("out")
    hf_defaults = {f.name: f.default for f in dataclasses.fields(transformers.TrainingArguments)}
    for name in ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                 "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "seed"):
        assert getattr(a, name) == hf_defaults[name], name


@pytest.mark.parametrize("field,value,words", [
    ("learning_rate", -1.0, "learning_rate"),
    ("adam_beta1", 1.0, "[0, 1)"),
    ("gradient_accumulation_steps", 0, ">= 1"),
    ("max_steps", 0, "max_steps"),
    ("lr_scheduler_type", "poly", "cosine"),
    ("precision", "int8", "fp16"),
    ("save_total_limit", 0, "save_total_limit"),
    ("warmup_ratio", 1.5, "warmup_ratio"),
    ("lora_dropout", 1.0, "lora_dropout"),
])
def test_arguments_validation_names_the_field(field, value, words):
    with pytest.raises(ValueError) as e:
        TrainingArguments("out", **{field: value})
    assert field in str(e.value) and words in str(e.value)


def test_arguments_from_dict_rejects_unknown_keys_with_hint():
    with pytest.raises(ValueError, match="learning_rate"):
        TrainingArguments.from_dict({"output_dir": "o", "learnig_rate": 1e-3})
    a = TrainingArguments.from_dict({"output_dir": "o", "lora_target_modules": "q_proj, v_proj", "lora_r": 4})
    assert a.lora_target_modules == ["q_proj", "v_proj"]
    assert json.loads(a.to_json_string())["lora_r"] == 4


def test_warmup_steps_from_ratio():
    assert TrainingArguments("o", warmup_ratio=0.1).get_warmup_steps(95) == 10
    assert TrainingArguments("o", warmup_steps=3, warmup_ratio=0.5).get_warmup_steps(100) == 3


# ---------------------------------------------------------------- schedules
@pytest.mark.parametrize("name", ["linear", "cosine", "constant", "constant_with_warmup"])
def test_schedules_equal_transformers(name):
    total, warm, lr = 40, 7, 3e-4
    ours = get_scheduler(name, lr, warm, total)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr)
    hf = transformers.get_scheduler(name, opt, num_warmup_steps=warm, num_training_steps=total)
    for _ in range(total + 3):
        assert ours.get_last_lr() == pytest.approx(hf.get_last_lr()[0], rel=1e-12, abs=1e-15)
        opt.step()
        hf.step()
        ours.step()


def test_schedule_state_round_trip():
    s = get_scheduler("cosine", 1.0, 2, 10)
    for _ in range(4):
        s.step()
    t = get_scheduler("cosine", 1.0, 2, 10)
    t.load_state_dict(s.state_dict())
    assert t.get_last_lr() == s.get_last_lr() and t.last_step == 4
    with pytest.raises(ValueError, match="unknown lr_scheduler_type"):
        get_scheduler("poly", 1.0, 0, 10)


# ---------------------------------------------------------------- AdamW
def _torch_adamw_run(init, grads, lrs, wd, decay_mask, betas, eps):
    tp = [torch.nn.Parameter(torch.tensor(a)) for a in init]
    groups = [{"params": [t for t, d in zip(tp, decay_mask) if d], "weight_decay": wd},
              {"params": [t for t, d in zip(tp, decay_mask) if not d], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=1.0, betas=betas, eps=eps)
    for g_step, lr in zip(grads, lrs):
        for t, g in zip(tp, g_step):
            t.grad = torch.tensor(g)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    return [t.detach().numpy() for t in tp]


def test_adamw_equals_torch_for_several_steps():
    rng = np.random.default_rng(0)
    shapes = [(6, 5), (5,), (3, 2, 4), (7,)]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) * (k + 1) for s in shapes] for k in range(6)]
    lrs = [1e-3, 3e-3, 2e-3, 5e-4, 1e-2, 4e-3]
    mask = [True, False, True, False]
    ps = [Parameter(Tensor(a), name=f"p{i}") for i, a in enumerate(init)]
    opt = AdamW(ps, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1, decay_mask=mask)
    step = ms.jit(opt.construct)
    for g_step, lr in zip(grads, lrs):
        step(tuple(Tensor(g) for g in g_step), Tensor(lr, ms.float32))
    want = _torch_adamw_run(init, grads, lrs, 0.1, mask, (0.9, 0.95), 1e-6)
    for p, w in zip(ps, want):
        np.testing.assert_allclose(p.asnumpy(), w, rtol=1e-5, atol=1e-7)
    assert int(opt.step_count.asnumpy()) == 6


def test_adamw_fp16_parameters_keep_fp32_masters():
    rng = np.random.default_rng(1)
    init = rng.standard_normal((8, 4)).astype(np.float32)
    grads = [[rng.standard_normal((8, 4)).astype(np.float32)] for _ in range(3)]
    p = Parameter(Tensor(init).astype(ms.float16), name="w16")
    opt = AdamW([p], weight_decay=0.0)
    assert opt.has_master == (True,)
    step = ms.jit(opt.construct)
    for g in grads:
        step((Tensor(g[0]).astype(ms.float16),), Tensor(1e-4, ms.float32))
    master = opt.master[0].asnumpy()
    # The fp32 master follows torch's AdamW on the fp16-rounded start; the fp16 copy is its rounding.
    want = _torch_adamw_run([init.astype(np.float16).astype(np.float32)],
                            [[g[0].astype(np.float16).astype(np.float32)] for g in grads], [1e-4] * 3, 0.0,
                            [True], (0.9, 0.999), 1e-8)[0]
    np.testing.assert_allclose(master, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(p.asnumpy(), master.astype(np.float16))
    assert "master.w16" in opt.state_tensors()


def test_adamw_rejects_empty_and_bad_mask():
    with pytest.raises(ValueError, match="no parameters"):
        AdamW([])
    with pytest.raises(ValueError, match="decay_mask"):
        AdamW([Parameter(Tensor(np.zeros(2, np.float32)), name="a")], decay_mask=[True, False])


def test_decay_names_match_transformers_trainer():
    cfg = transformers.Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.Qwen2ForCausalLM(cfg)
    # The method reads nothing from the trainer instance (its TrainingArguments would need accelerate).
    want = transformers.Trainer.get_decay_parameter_names(None, model)
    names = [n for n, _ in model.named_parameters()]
    assert decay_parameter_names(names) == [n for n in names if n in want]
    assert "model.norm.weight" not in want and "model.layers.0.self_attn.q_proj.bias" not in want


# ---------------------------------------------------------------- loss scale
def test_dynamic_loss_scale_matches_mindspore_amp():
    ours = DynamicLossScale(1024.0, 2, 2)
    ref = ms.amp.DynamicLossScaler(1024.0, 2, 2)
    for finite in [True, True, True, False, True, True, False, False]:
        ours.adjust(Tensor(finite))
        ref.adjust(Tensor(finite))
        assert float(ours.scale.asnumpy()) == float(ref.scale_value.asnumpy())
        assert int(ours.counter.asnumpy()) == int(ref.counter.asnumpy())


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_dir_is_atomic(tmp_path):
    def ok(folder):
        (folder / "a.txt").write_text("x")

    def boom(folder):
        (folder / "half.txt").write_text("partial")
        raise RuntimeError("disk full")

    write_checkpoint_dir(tmp_path, 5, ok)
    with pytest.raises(RuntimeError, match="disk full"):
        write_checkpoint_dir(tmp_path, 10, boom)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-5"]
    # Re-saving a step replaces the folder completely.
    write_checkpoint_dir(tmp_path, 5, lambda f: (f / "b.txt").write_text("y"))
    assert sorted(p.name for p in (tmp_path / "checkpoint-5").iterdir()) == ["b.txt"]
    (tmp_path / ".tmp-checkpoint-7-abc").mkdir()
    remove_stale_temporaries(tmp_path)
    assert latest_checkpoint(tmp_path).name == "checkpoint-5"


def _make(tmp_path, steps):
    for s in steps:
        (tmp_path / f"checkpoint-{s}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name: ignored


def test_rotation_keeps_newest_and_best(tmp_path):
    _make(tmp_path, [2, 4, 6, 8, 10])
    deleted = rotate_checkpoints(tmp_path, 2, best_checkpoint=tmp_path / "checkpoint-4")
    assert sorted(p.name for p in deleted) == ["checkpoint-2", "checkpoint-6", "checkpoint-8"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 10]
    # limit 1 with a best that is not the newest: both stay.
    rotate_checkpoints(tmp_path, 1, best_checkpoint=tmp_path / "checkpoint-4")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 10]
    rotate_checkpoints(tmp_path, 1, best_checkpoint=None)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10]
    assert (tmp_path / "checkpoint-x").is_dir()


def test_rotation_without_best_keeps_the_newest_n(tmp_path):
    _make(tmp_path, [1, 2, 3, 11])
    rotate_checkpoints(tmp_path, 3)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3, 11]  # numeric, not string, order
    assert rotate_checkpoints(tmp_path, None) == []


def test_tensor_files_round_trip(tmp_path):
    data = {"a": Tensor(np.arange(6, dtype=np.float32).reshape(2, 3)), "b": np.array([1, 2], np.int32)}
    save_tensors(tmp_path / "t.safetensors", data)
    back = load_tensors(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(back["a"], data["a"].asnumpy())
    np.testing.assert_array_equal(back["b"], data["b"])
    with pytest.raises(Exception, match="does not exist"):
        load_tensors(tmp_path / "missing.safetensors")


def test_rng_state_round_trip():
    import random

    np.random.seed(3)
    state = capture_rng_state()
    a = (random.random(), np.random.rand())
    json.dumps(state)  # serialisable
    ms_before = ms.get_rng_state().asnumpy().copy()
    restore_rng_state(state)
    b = (random.random(), np.random.rand())
    assert a == b
    np.testing.assert_array_equal(ms.get_rng_state().asnumpy(), ms_before)


# ---------------------------------------------------------------- callbacks
def test_jsonl_logger_appends_lines(tmp_path):
    args = TrainingArguments(str(tmp_path))
    state = TrainerState()
    handler = CallbackHandler([JsonlLoggerCallback()])
    handler.fire("on_log", args, state, logs={"step": 1, "loss": 2.5})
    handler.fire("on_log", args, state, logs={"step": 2, "loss": float("nan")})
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert json.loads(lines[1])["loss"] == "nan"


def test_callback_handler_calls_every_event_and_checks_type():
    seen = []

    class Rec(TrainerCallback):
        def on_train_begin(self, args, state, **kw):
            seen.append("begin")

        def on_log(self, args, state, logs, **kw):
            seen.append(("log", logs["x"]))

    handler = CallbackHandler([Rec])  # a class is instantiated
    handler.fire("on_train_begin", None, TrainerState())
    handler.fire("on_log", None, TrainerState(), logs={"x": 1})
    handler.fire("on_step_end", None, TrainerState())  # base class no-op
    assert seen == ["begin", ("log", 1)]
    with pytest.raises(TypeError, match="TrainerCallback"):
        CallbackHandler([object()])


def test_trainer_state_round_trip():
    s = TrainerState(global_step=7, max_steps=10, epoch=1, step_in_epoch=3, num_update_steps_per_epoch=4,
                     best_metric=0.5, best_checkpoint="x", log_history=[{"loss": 1.0}])
    s.should_stop = True
    back = TrainerState.from_dict(json.loads(json.dumps(s.to_dict())))
    assert back.global_step == 7 and back.step_in_epoch == 3 and back.best_checkpoint == "x"
    assert back.should_stop is False and math.isclose(s.epoch_float, 1.75)
