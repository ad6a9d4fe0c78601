"""Hostile inputs to fine-tuning: bad datasets, MindRecord files, run configs, arguments and checkpoints get clear errors."""
import json
import math
import os
import shutil

import numpy as np
import pytest

ms = pytest.importorskip("mindspore")
yaml = pytest.importorskip("yaml")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qwen2ms import Qwen2Config  # noqa: E402
from qwen2ms.data import (  # noqa: E402
    DataCollatorForSFT,
    SampleError,
    UntrainedDatasetError,
    check_samples,
    iter_mindrecord,
    write_mindrecord,
)
from qwen2ms.data.mindrecord import MindRecordError, MindRecordNotFoundError  # noqa: E402
from qwen2ms.modeling import Qwen2ForCausalLM  # noqa: E402
from qwen2ms.training import (  # noqa: E402
    CheckpointError,
    RunConfigError,
    Trainer,
    TrainingArguments,
    load_run_config,
)
from qwen2ms.training.run_config import build_datasets  # noqa: E402

VOCAB = 64
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def tiny_model(seed=0):
    return Qwen2ForCausalLM(Qwen2Config(**TINY), seed=seed)


def samples(n, seed=0, masked=False):
    """n samples of 8 tokens (one padded shape, one compile); masked: every label -100."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(1, VOCAB, 8).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 8 if masked else [-100] * 3 + ids[3:]})
    return out


def args_for(path, **kw):
    base = dict(output_dir=str(path), learning_rate=1e-2, per_device_train_batch_size=2, save_steps=0,
                logging_steps=1, disable_tqdm=True, shuffle=False, max_steps=1, lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


def params_of(model):
    return {p.name: p.asnumpy().copy() for p in model.get_parameters()}


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------- datasets with nothing to train on
def test_all_masked_train_dataset_is_refused_before_the_first_step(tmp_path):
    model = tiny_model()
    before = params_of(model)
    trainer = Trainer(model, args_for(tmp_path), train_dataset=samples(6, masked=True))
    with pytest.raises(UntrainedDatasetError) as e:
        trainer.train()
    msg = str(e.value)
    assert "train_dataset" in msg and "6 samples" in msg and "48 tokens" in msg and "seq_length" in msg
    assert trainer.state.global_step == 0 and not (tmp_path / "log.jsonl").exists()
    assert_same_params(before, params_of(model))


def test_all_masked_eval_dataset_is_refused_before_training(tmp_path):
    model = tiny_model()
    trainer = Trainer(model, args_for(tmp_path), train_dataset=samples(4), eval_dataset=samples(3, masked=True))
    with pytest.raises(UntrainedDatasetError, match="eval_dataset: none of its 3 samples"):
        trainer.train()
    assert trainer.state.global_step == 0
    with pytest.raises(UntrainedDatasetError, match="eval_dataset"):
        trainer.evaluate(samples(2, seed=5, masked=True))


def partly_masked():
    """The first micro-batch has no trained token, the second has: a dataset that trains."""
    return samples(2, masked=True) + samples(2, seed=1)


@pytest.mark.slow  # shares finished_run: one compile and save (~8-13 s here)
def test_a_batch_without_trained_tokens_is_fine_when_the_dataset_has_some(finished_run):
    stats = check_samples(partly_masked(), VOCAB, "train_dataset")
    assert (stats.samples, stats.untrained_samples, stats.trained_tokens) == (4, 2, 10)
    _, out, logged = finished_run  # trained on partly_masked()
    assert out.global_step == 2 and [h["loss"] for h in logged][0] == 0.0 and logged[1]["loss"] > 1.0


def test_an_eval_dataset_without_len_is_named(tmp_path):
    trainer = Trainer(tiny_model(), args_for(tmp_path), train_dataset=samples(2), eval_dataset=iter(samples(2)))
    with pytest.raises(TypeError, match="the eval_dataset must support len\\(\\) and indexing"):
        trainer.train()


@pytest.mark.parametrize("seq_length", [1, 0, -5, 2.5, "64", True])
def test_preprocessing_refuses_a_bad_seq_length_even_without_records(seq_length):
    from qwen2ms.data import tokenize_dataset

    with pytest.raises(ValueError, match=f"seq_length must be an integer >= 2 .*got {seq_length!r}"):
        tokenize_dataset([], tokenizer=None, seq_length=seq_length)


def test_empty_dataset_is_an_error():
    with pytest.raises(UntrainedDatasetError, match="empty"):
        check_samples([], VOCAB, "train_dataset")


# ---------------------------------------------------------------- ids outside the vocabulary
@pytest.mark.parametrize("column,value,words", [
    ("labels", VOCAB, f"labels[5] = {VOCAB} is not a token id (vocab_size={VOCAB})"),
    ("labels", VOCAB + 1000, f"labels[5] = {VOCAB + 1000}"),
    ("labels", -1, "labels[5] = -1 is not a token id"),
    ("labels", -101, "labels[5] = -101"),
    ("input_ids", VOCAB, f"input_ids[5] = {VOCAB} is outside the vocabulary (vocab_size={VOCAB})"),
    ("input_ids", -3, "input_ids[5] = -3 is outside the vocabulary"),
    ("input_ids", -100, "input_ids[5] = -100 is outside"),
])
def test_ids_outside_the_vocabulary_are_refused_before_training(tmp_path, column, value, words):
    data = samples(6)
    data[4][column][5] = value
    trainer = Trainer(tiny_model(), args_for(tmp_path), train_dataset=data)
    with pytest.raises(SampleError) as e:
        trainer.train()
    assert "train_dataset sample 4" in str(e.value) and words in str(e.value)
    assert trainer.state.global_step == 0


@pytest.mark.parametrize("sample,words", [
    ({"input_ids": [1, 2.5, 3], "labels": [1, 2, 3]}, "input_ids[1] = 2.5 (float): token ids must be integers"),
    ({"input_ids": [1, "2", 3], "labels": [1, 2, 3]}, "input_ids[1] = '2' (str)"),
    ({"input_ids": np.array([1, 2, 3]), "labels": np.array([1.0, 2.0, 3.0])}, "labels[0] = 1.0 (float)"),
    ({"input_ids": np.array([1, 2, 3]), "labels": np.array([True, False, True])}, "labels[0] = True (bool)"),
    ({"input_ids": [1, 2, 3], "labels": [1, 2]}, "'labels' has 2 entries but 'input_ids' has 3"),
    ({"input_ids": [], "labels": []}, "'input_ids' is empty"),
    ({"input_ids": [[1, 2], [3, 4]], "labels": [1, 2]}, "flat list"),
    ({"input_ids": [1, 2 ** 70], "labels": [1, 2]}, "input_ids[1] = 1180591620717411303424 is far outside"),
    ({"text": "hello"}, "must be a mapping with 'input_ids' and 'labels'"),
    ({"input_ids": [1, 2], "labels": [1, 2], "segment_ids": [1, -1]}, "segment_ids[1] = -1 is negative"),
])
def test_malformed_samples_name_the_sample_and_the_value(sample, words):
    with pytest.raises(SampleError) as e:
        check_samples([{"input_ids": [1, 2], "labels": [1, 2]}, sample], VOCAB, "train_dataset")
    assert "train_dataset sample 1" in str(e.value) and words in str(e.value)


@FAST
@given(st.lists(st.lists(st.integers(-300, VOCAB + 50), min_size=1, max_size=6), min_size=1, max_size=5),
       st.lists(st.lists(st.integers(-300, VOCAB + 50), min_size=1, max_size=6), min_size=1, max_size=5))
def test_check_samples_refuses_exactly_the_bad_ids(ids_rows, label_rows):
    data = [{"input_ids": ids, "labels": (lab * len(ids))[:len(ids)]} for ids, lab in zip(ids_rows, label_rows)]
    bad = any(not 0 <= i < VOCAB for s in data for i in s["input_ids"]) or any(
        not (lab == -100 or 0 <= lab < VOCAB) for s in data for lab in s["labels"])
    try:
        stats = check_samples(data, VOCAB, "d", require_trained=False)
    except SampleError:
        assert bad
    else:
        assert not bad and stats.trained_tokens == sum(sum(lab != -100 for lab in s["labels"][1:]) for s in data)


def test_a_custom_collator_with_bad_ids_is_stopped_before_the_compiled_step(tmp_path):
    class Shifting(DataCollatorForSFT):
        def __call__(self, batch):
            out = super().__call__(batch)
            out["labels"] = np.where(out["labels"] >= 0, out["labels"] + VOCAB, out["labels"])
            return out

    trainer = Trainer(tiny_model(), args_for(tmp_path), train_dataset=samples(4), data_collator=Shifting(0))
    with pytest.raises(SampleError, match=f"train_dataset epoch 0 micro-batch 0, row 0: labels.* is outside the "
                                          f"vocabulary \\(vocab_size={VOCAB}\\)"):
        trainer.train()


# ---------------------------------------------------------------- MindRecord files
@pytest.fixture
def mindrecord(tmp_path):
    path = tmp_path / "train.mindrecord"
    write_mindrecord(samples(5), path)
    return path


def test_mindrecord_missing_file_and_folder(tmp_path):
    with pytest.raises(MindRecordNotFoundError, match="nope.mindrecord' does not exist"):
        list(iter_mindrecord(tmp_path / "nope.mindrecord"))
    (tmp_path / "dir.mindrecord").mkdir()
    with pytest.raises(MindRecordNotFoundError, match="is a folder"):
        list(iter_mindrecord(tmp_path / "dir.mindrecord"))


def test_mindrecord_missing_db_sidecar(mindrecord):
    os.remove(f"{mindrecord}.db")
    with pytest.raises(MindRecordNotFoundError, match=r"the index '.*train.mindrecord.db' .* is missing"):
        list(iter_mindrecord(mindrecord))


def test_mindrecord_truncated(mindrecord):
    data = mindrecord.read_bytes()
    mindrecord.write_bytes(data[: len(data) // 2])
    with pytest.raises(MindRecordError, match=rf"train.mindrecord' is truncated: it has {len(data) // 2} bytes but "
                                              rf"its header describes {len(data)}"):
        list(iter_mindrecord(mindrecord))


@FAST
@given(st.floats(0.0, 0.999))
def test_mindrecord_cut_anywhere_is_a_mindrecord_error(tmp_path_factory, cut):
    folder = tmp_path_factory.mktemp("cut")
    path = folder / "t.mindrecord"
    write_mindrecord(samples(3), path)
    data = path.read_bytes()
    path.write_bytes(data[: int(cut * len(data))])
    with pytest.raises(MindRecordError, match="t.mindrecord"):
        list(iter_mindrecord(path))


@pytest.mark.parametrize("content", [b"", b"garbage" * 1000, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}"])
def test_mindrecord_garbage_file(mindrecord, content):
    mindrecord.write_bytes(content)
    with pytest.raises(MindRecordError, match=f"'{mindrecord}' is not a MindRecord data file \\({len(content)} bytes"):
        list(iter_mindrecord(mindrecord))


def test_mindrecord_garbage_db(mindrecord):
    with open(f"{mindrecord}.db", "wb") as f:
        f.write(b"junk" * 100)
    with pytest.raises(MindRecordError, match="train.mindrecord.db' .* is not a MindRecord index"):
        list(iter_mindrecord(mindrecord))


def test_mindrecord_wrong_schema(tmp_path):
    path = tmp_path / "other.mindrecord"
    write_mindrecord([{"tokens": [1, 2], "mask": [1, 1]}] * 3, path)
    with pytest.raises(MindRecordError, match=r"lacks the column\(s\) \['input_ids', 'labels'\] \(its columns are "
                                              r"\['mask', 'tokens'\]\)"):
        list(iter_mindrecord(path))
    assert len(list(iter_mindrecord(path, required_columns=()))) == 3


def test_mindrecord_renamed(mindrecord):
    renamed = mindrecord.with_name("renamed.mindrecord")
    os.rename(mindrecord, renamed)
    os.rename(f"{mindrecord}.db", f"{renamed}.db")
    with pytest.raises(MindRecordError, match="renamed after writing.*'train.mindrecord'"):
        list(iter_mindrecord(renamed))


def test_mindrecord_missing_shard(tmp_path):
    files = write_mindrecord(samples(6), tmp_path / "s.mindrecord", shard_num=2)
    os.remove(files[1])
    with pytest.raises(MindRecordNotFoundError, match="s.mindrecord1' is missing"):
        list(iter_mindrecord(files[0]))


# ---------------------------------------------------------------- run configs
def _write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _base():
    return {"model": {"config": dict(TINY), "seed": 0}, "data": {"train_file": "train.jsonl"},
            "training": {"output_dir": "out", "max_steps": 2}}


@pytest.mark.parametrize("section,key,value,words", [
    ("training", "shuffle", "no", "training.shuffle: 'no' (a string) is not a boolean (true or false)"),
    ("training", "disable_tqdm", 1, "training.disable_tqdm: 1 (an integer) is not a boolean"),
    ("training", "max_steps", "10", "training.max_steps: '10' (a string) is not an integer; write it without quotes"),
    ("training", "max_steps", 1.5, "training.max_steps: 1.5 (a number) is not an integer"),
    ("training", "logging_steps", [1, 2], "training.logging_steps: [1, 2] (a list) is not an integer"),
    ("training", "learning_rate", float("nan"), "training.learning_rate: nan is not a finite number"),
    ("training", "precision", None, "training.precision: None (null) is not a string"),
    ("training", "lora_target_modules", [1], "training.lora_target_modules: [1] (a list) is not a list of strings"),
    ("data", "seq_length", "512", "data.seq_length: '512' (a string) is not an integer"),
    ("data", "seq_length", 1, "data.seq_length: 1 is invalid: must be at least 2"),
    ("data", "packing", "yes", "data.packing: 'yes' (a string) is not a boolean"),
    ("data", "packing", None, "data.packing: None (null) is not a boolean"),
    ("data", "overflow", "cut", "data.overflow: 'cut' (a string) is not one of 'truncate', 'drop'"),
    ("data", "max_samples", 0, "data.max_samples: 0 is invalid"),
    ("data", "eval_fraction", 1.0, "data.eval_fraction: 1.0 is invalid: must be in [0, 1)"),
    ("model", "seed", "0", "model.seed: '0' (a string) is not an integer"),
    ("model", "dtype", "banana", "model.dtype: 'banana' is invalid: use float32, float16 or bfloat16"),
    ("parallel", "data_parallel", "2", "parallel.data_parallel: '2' (a string) is not an integer"),
    ("parallel", "use_seq_parallel", "no", "parallel.use_seq_parallel: 'no' (a string) is not a boolean"),
    ("generation", "do_sample", "true", "generation.do_sample: 'true' (a string) is not a boolean"),
    ("generation", "max_new_tokens", 2.5, "generation.max_new_tokens: 2.5 (a number) is not an integer"),
])
def test_run_config_values_are_type_checked_strictly(tmp_path, section, key, value, words):
    cfg = _base()
    cfg.setdefault(section, {})[key] = value
    path = _write(tmp_path, cfg)
    with pytest.raises(RunConfigError) as e:
        load_run_config(path)
    assert str(path) in str(e.value) and words in str(e.value)


def test_run_config_reads_exponent_floats_as_numbers_and_refuses_quoted_ones(tmp_path):
    # PyYAML (YAML 1.1) reads a plain 1e-5 as a string; run configs read it as YAML 1.2 and every recipe does.
    cfg = _base()
    cfg["training"]["learning_rate"] = "@LR@"
    text = yaml.safe_dump(cfg)
    for plain, expected in (("1e-5", 1e-5), ("3E-4", 3e-4), ("2.5e+3", 2500.0), ("1_0e-1", 1.0)):
        path = tmp_path / "plain.yaml"
        path.write_text(text.replace("'@LR@'", plain))
        assert load_run_config(path).training["learning_rate"] == expected
    path = tmp_path / "quoted.yaml"
    path.write_text(text.replace("'@LR@'", "'1e-5'"))
    with pytest.raises(RunConfigError, match="training.learning_rate: '1e-5' \\(a string\\) is not a number; "
                                             "write it without quotes"):
        load_run_config(path)


def test_non_utf8_run_config_and_model_config_name_the_file(tmp_path):
    from qwen2ms import ConfigError, Qwen2Config

    path = tmp_path / "latin1.yaml"
    path.write_bytes("training: {output_dir: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(RunConfigError, match="latin1.yaml: not UTF-8 text \\(byte 26\\); save the run config as UTF-8"):
        load_run_config(path)
    (tmp_path / "config.json").write_bytes(b'{"model_type": "qwen2", "x": "\xff"}')
    with pytest.raises(ConfigError, match="config.json' is not UTF-8 text"):
        Qwen2Config.from_json(tmp_path)


def test_run_config_nested_model_config_and_sections_are_checked(tmp_path):
    cfg = _base()
    cfg["model"]["config"]["hidden_size"] = "32"
    with pytest.raises(RunConfigError, match="model.config.hidden_size: '32' \\(a string\\) is not an integer"):
        load_run_config(_write(tmp_path, cfg))
    path = tmp_path / "list.yaml"
    path.write_text("model: {preset: qwen2-0.5b}\ntraining: []\n")
    with pytest.raises(RunConfigError, match="\\[training\\]: must be a mapping"):
        load_run_config(path)


def test_run_config_accepts_ints_for_floats_and_nulls_where_optional(tmp_path):
    cfg = _base()
    cfg["training"].update(learning_rate=1, max_grad_norm=None, num_train_epochs=2, save_total_limit=None)
    cfg["data"].update(max_samples=None, system_prompt=None, eval_fraction=0)
    run = load_run_config(_write(tmp_path, cfg))
    assert run.training_arguments().learning_rate == 1


def test_run_config_overrides_are_checked_like_the_file(tmp_path):
    path = _write(tmp_path, _base())
    with pytest.raises(RunConfigError, match=r"run.yaml \[training\]: TrainingArguments.max_steps: '3' \(a string\)"):
        load_run_config(path).training_arguments(max_steps="3")


_BOOL_FIELDS = ("shuffle", "dataloader_drop_last", "disable_tqdm")
_INT_FIELDS = ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps",
               "save_steps", "seed", "warmup_steps", "lora_r")
_not_bool = st.one_of(st.text(max_size=5), st.integers(), st.floats(allow_nan=False), st.lists(st.booleans()),
                      st.none())
_not_int = st.one_of(st.text(max_size=5), st.booleans(), st.floats().filter(lambda x: x != int(x) if math.isfinite(x)
                                                                          else True), st.lists(st.integers()),
                     st.none())


@FAST
@given(st.sampled_from(_BOOL_FIELDS + _INT_FIELDS), st.data())
def test_training_arguments_reject_wrong_types_naming_the_field(field, data):
    value = data.draw(_not_bool if field in _BOOL_FIELDS else _not_int)
    with pytest.raises((TypeError, ValueError)) as e:
        TrainingArguments("out", **{field: value})
    assert f"TrainingArguments.{field}" in str(e.value)
    if not (isinstance(value, float) and not math.isfinite(value)):
        assert e.type is TypeError and repr(value) in str(e.value)


@FAST
@given(st.sampled_from(_BOOL_FIELDS + _INT_FIELDS), st.data())
def test_yaml_wrong_types_name_the_file_and_dotted_key(tmp_path_factory, field, data):
    value = data.draw(_not_bool if field in _BOOL_FIELDS else _not_int)
    cfg = _base()
    cfg["training"][field] = value
    path = _write(tmp_path_factory.mktemp("cfg"), cfg)
    with pytest.raises(RunConfigError) as e:
        load_run_config(path)
    assert str(path) in str(e.value) and f"training.{field}:" in str(e.value)


@pytest.mark.parametrize("kw,exc,words", [
    ({"per_device_train_batch_size": 0}, ValueError, "per_device_train_batch_size=0"),
    ({"gradient_accumulation_steps": 0}, ValueError, "gradient_accumulation_steps=0"),
    ({"learning_rate": -1e-3}, ValueError, "learning_rate=-0.001"),
    ({"learning_rate": float("nan")}, ValueError, "learning_rate: nan is not a finite number"),
    ({"max_grad_norm": float("nan")}, ValueError, "max_grad_norm: nan is not a finite number"),
    ({"num_train_epochs": float("inf")}, ValueError, "num_train_epochs: inf is not a finite number"),
    ({"output_dir": None}, TypeError, "output_dir: None"),
    ({"lora_target_modules": 5}, TypeError, "lora_target_modules: 5 (an integer) is not a list of strings"),
])
def test_training_arguments_bad_values(kw, exc, words):
    with pytest.raises(exc) as e:
        TrainingArguments(**{"output_dir": "out", **kw})
    assert words in str(e.value)


def test_arguments_changed_after_construction_are_checked_by_the_trainer(tmp_path):
    args = args_for(tmp_path)
    args.max_steps = "10"
    with pytest.raises(TypeError, match="TrainingArguments.max_steps: '10'"):
        Trainer(tiny_model(), args, train_dataset=samples(2))


def test_output_dir_that_is_a_file(tmp_path):
    target = tmp_path / "taken"
    target.write_text("x")
    trainer = Trainer(tiny_model(), args_for(target), train_dataset=samples(2))
    with pytest.raises(ValueError, match="output_dir=.*taken' is a file, not a folder"):
        trainer.train()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_run_config_data_errors(tmp_path):
    cfg = _base()
    _write_jsonl(tmp_path / "train.jsonl", [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}])
    cfg["data"]["eval_fraction"] = 0.5
    run = load_run_config(_write(tmp_path, cfg))
    with pytest.raises(RunConfigError, match="eval_fraction=0.5 of 1 sample\\(s\\) leaves no training sample"):
        build_datasets(run, tiny_model())
    cfg["data"] = {"train_file": str(tmp_path)}
    with pytest.raises(RunConfigError, match="is a folder"):
        build_datasets(load_run_config(_write(tmp_path, cfg)), tiny_model())
    _write_jsonl(tmp_path / "bad.jsonl", [{"input_ids": [1, "x"], "labels": [1, 2]}])
    cfg["data"] = {"train_file": "bad.jsonl"}
    with pytest.raises(ValueError, match="line 1: 'input_ids' must be a list of integers"):
        build_datasets(load_run_config(_write(tmp_path, cfg)), tiny_model())


def test_run_config_reads_a_mindrecord_and_names_a_broken_one(tmp_path):
    write_mindrecord(samples(4), tmp_path / "train.mindrecord")
    cfg = _base()
    cfg["data"] = {"train_file": "train.mindrecord"}
    run = load_run_config(_write(tmp_path, cfg))
    train, _ = build_datasets(run, tiny_model())
    assert [r["input_ids"].tolist() for r in train] == [s["input_ids"] for s in samples(4)]
    os.remove(tmp_path / "train.mindrecord.db")
    with pytest.raises(MindRecordError, match="train.mindrecord.db' .* is missing"):
        build_datasets(run, tiny_model())


# ---------------------------------------------------------------- resume: finished runs and broken checkpoints
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """(folder, TrainOutput, loss logs) of a run trained on partly_masked() to max_steps=2, with checkpoint-2."""
    folder = tmp_path_factory.mktemp("finished")
    trainer = Trainer(tiny_model(), args_for(folder, max_steps=2, save_steps=2), train_dataset=partly_masked())
    out = trainer.train()
    assert (folder / "checkpoint-2" / "optimizer.safetensors").is_file()
    return folder, out, [h for h in trainer.state.log_history if "loss" in h]


def _copy_run(finished_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished_run[0], dst)
    return dst


@pytest.mark.slow  # shares finished_run: one compile and save (~8-13 s here)
def test_resuming_a_finished_run_reports_zero_steps_not_a_huge_rate(finished_run, tmp_path):
    from qwen2ms.cli import _finetune_summary

    run = _copy_run(finished_run, tmp_path)
    trainer = Trainer(tiny_model(seed=1), args_for(run, max_steps=2, save_steps=2), train_dataset=partly_masked())
    out = trainer.train(resume_from_checkpoint="latest")
    assert out.already_finished and out.global_step == 2
    assert out.metrics["train_steps"] == 0 and out.metrics["train_tokens"] == 0
    assert out.metrics["train_tokens_per_second"] == 0.0
    assert any("nothing to train: the run is at step 2, which already reaches max_steps=2" in h.get("message", "")
               for h in trainer.state.log_history)
    line = _finetune_summary(trainer, out)
    assert "nothing to train" in line and "step 2 of max_steps=2" in line and "tokens/s" not in line


@pytest.mark.slow  # shares finished_run: one compile and save (~8-13 s here)
@pytest.mark.parametrize("damage,words", [
    (lambda ck: (ck / "trainer_state.json").write_text('{"state": {"global_st'), "trainer_state.json' cannot be read"),
    (lambda ck: (ck / "trainer_state.json").write_text('{"state": {}}'), "lacks the trainer state"),
    (lambda ck: os.remove(ck / "optimizer.safetensors"), "is incomplete: ['optimizer.safetensors'] missing"),
    (lambda ck: (ck / "optimizer.safetensors").write_bytes(b"\x00" * 10), "optimizer.safetensors"),
    (lambda ck: os.remove(ck / "model.safetensors"), "is incomplete: ['model.safetensors'] missing"),
])
def test_resume_from_a_damaged_checkpoint_names_the_file_and_keeps_the_weights(finished_run, tmp_path, damage, words):
    run = _copy_run(finished_run, tmp_path)
    damage(run / "checkpoint-2")
    model = tiny_model(seed=1)
    before = params_of(model)
    trainer = Trainer(model, args_for(run, max_steps=3), train_dataset=partly_masked())
    with pytest.raises(CheckpointError) as e:
        trainer.train(resume_from_checkpoint=True)
    assert words in str(e.value) and "checkpoint-2" in str(e.value)
    assert_same_params(before, params_of(model))
