"""YAML run configs: every shipped example parses, errors name the key, and `qwen2ms finetune` trains from one."""
import json
from pathlib import Path

import pytest

pytest.importorskip("mindspore")
yaml = pytest.importorskip("yaml")

from qwen2ms.training import RunConfigError, load_run_config  # noqa: E402
from qwen2ms.training.run_config import run_finetune  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
SIZES = ("0.5b", "1.5b", "7b", "57b_a14b", "72b")


@pytest.mark.parametrize("size", SIZES)
def test_every_released_size_has_finetune_and_predict_configs(size):
    ft = load_run_config(CONFIGS / f"finetune_qwen2_{size}.yaml")
    assert ft.model["pretrained"].startswith("Qwen/Qwen2-")  # hub id kept, not turned into a path
    args = ft.training_arguments()
    assert args.precision == "bf16" and args.output_dir.startswith("runs/")
    from qwen2ms import Qwen2Config
    from qwen2ms.parallel import ParallelConfig

    preset = "qwen2-" + size.replace("_", "-")
    ParallelConfig.from_dict(ft.parallel).validate(Qwen2Config.from_preset(preset))
    pr = load_run_config(CONFIGS / f"predict_qwen2_{size}_instruct.yaml")
    assert pr.model["pretrained"].endswith("-Instruct") and pr.generation["max_new_tokens"] > 0
    ParallelConfig.from_dict(pr.parallel).validate(Qwen2Config.from_preset(preset))


def test_shipped_configs_load_without_warnings(monkeypatch):
    """Our own examples hold no key that qwen2ms accepts only to ignore (each would warn on every run)."""
    import warnings

    from qwen2ms.parallel import ParallelConfig
    from qwen2ms.parallel import config as pconf

    monkeypatch.setattr(pconf, "_warned_noop", set())  # the warning is once per process
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert len(paths) == 2 * len(SIZES) + 1
    for path in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ParallelConfig.from_dict(load_run_config(path).parallel)


def test_upstream_layouts_where_the_readme_gives_them():
    from qwen2ms.parallel import ParallelConfig

    ft7 = ParallelConfig.from_dict(load_run_config(CONFIGS / "finetune_qwen2_7b.yaml").parallel)
    assert (ft7.data_parallel, ft7.model_parallel, ft7.pipeline_stage, ft7.use_seq_parallel) == (2, 4, 1, True)
    pr72 = ParallelConfig.from_dict(load_run_config(CONFIGS / "predict_qwen2_72b_instruct.yaml").parallel)
    assert (pr72.data_parallel, pr72.model_parallel, pr72.pipeline_stage) == (1, 4, 1)


def _write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("data,words", [
    ({"model": {"preset": "qwen2-0.5b"}, "trainer": {}}, "unknown key"),
    ({"model": {"preset": "qwen2-0.5b", "dtyp": "float32"}}, "dtype"),
    ({"model": {}}, "pretrained"),
    ({"model": {"preset": "qwen2-0.5b", "pretrained": "x/y"}}, "not both"),
    ({"model": {"preset": "qwen2-0.5b"}, "data": {"seq_len": 8}}, "seq_length"),
    ({"model": {"preset": "qwen2-0.5b"}, "training": {"output_dir": "o", "learning_rate": -1}}, "learning_rate"),
    ({"model": {"preset": "qwen2-0.5b"}, "parallel": {"data_parallel": 0}}, "parallel"),
    ({"model": {"preset": "qwen2-0.5b"}, "generation": {"temperature": -1.0}}, "generation"),
])
def test_bad_configs_name_section_and_key(tmp_path, data, words):
    with pytest.raises(RunConfigError, match=words):
        load_run_config(_write(tmp_path, data))


def _tiny_run(tmp_path, **training):
    samples = tmp_path / "samples.jsonl"
    rows = [{"input_ids": [1 + (i * 7 + j) % 60 for j in range(10 + i % 5)],
             "labels": [-100] * 3 + [1 + (i * 7 + j) % 60 for j in range(3, 10 + i % 5)]} for i in range(8)]
    samples.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = {
        "model": {"config": {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64},
                  "seed": 0},
        "data": {"train_file": "samples.jsonl", "eval_fraction": 0.25},
        "training": dict({"output_dir": str(tmp_path / "out"), "learning_rate": 1e-2, "max_steps": 6,
                          "per_device_train_batch_size": 2, "logging_steps": 2, "save_steps": 3,
                          "save_total_limit": 1, "disable_tqdm": True}, **training),
        "parallel": {"data_parallel": 1, "model_parallel": 1, "pipeline_stage": 1},
    }
    return _write(tmp_path, cfg)


def test_finetune_cli_trains_from_a_config(tmp_path, capsys):
    from qwen2ms.cli import main

    path = _tiny_run(tmp_path)
    assert main(["finetune", "--config", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "finetune: 6 steps, loss" in out
    logs = [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    train = [x for x in logs if "loss" in x]
    assert [x["step"] for x in train] == [2, 4, 6] and any("eval_loss" in x for x in logs)
    assert (tmp_path / "out" / "final" / "config.json").is_file()
    assert (tmp_path / "out" / "checkpoint-6").is_dir()
    # --resume without a path continues from the newest checkpoint.
    assert main(["finetune", "--config", str(path), "--no-progress", "--resume", "--max-steps", "8"]) == 0
    assert "finetune: 8 steps" in capsys.readouterr().out
    steps = [json.loads(x)["step"] for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [2, 4, 6, 8]


def test_multi_device_layout_is_refused_by_the_single_process_finetune(tmp_path):
    path = _tiny_run(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["parallel"] = {"data_parallel": 2, "model_parallel": 1, "pipeline_stage": 1}
    with pytest.raises(RunConfigError, match="needs 2 devices"):
        run_finetune(_write(tmp_path, data, "dp2.yaml"))
