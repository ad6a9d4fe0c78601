"""Shared by the fine-tuning tests with a parallel layout (test_parallel_finetune*.py): the tiny model, the run
configs they write, the single-process reference run and the checks of a run against it."""
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "parallel_workers"

MODEL = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "tie_word_embeddings": False}
#: per optimizer step every run sees the same 4 samples (the last step of an epoch: 3)
TRAINING = {"learning_rate": 1e-3, "lr_scheduler_type": "constant", "max_steps": 6, "logging_steps": 1,
            "save_steps": 2, "save_total_limit": 2, "disable_tqdm": True}


def write_samples(path: Path) -> None:
    # 10 rows of different lengths; eval_fraction 0.3 keeps 7 for training: batches of 4 and 3 per epoch
    rows = [{"input_ids": [1 + (i * 7 + j * 5) % 62 for j in range(9 + (i * 3) % 7)],
             "labels": [-100] * (2 + i % 3) + [1 + (i * 7 + j * 5) % 62 for j in range(2 + i % 3, 9 + (i * 3) % 7)]}
            for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def write_config(folder: Path, name: str, parallel: dict, **training) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "samples.jsonl").exists():
        write_samples(folder / "samples.jsonl")
    cfg = {"model": {"config": MODEL, "seed": 3},
           "data": {"train_file": "samples.jsonl", "eval_fraction": 0.3},
           "training": dict(TRAINING, output_dir=str(folder / name), **training),
           "parallel": parallel}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


#: a tiny body over Qwen2's real vocabulary, so the built-in tokenizer's text round-trips
PREDICT_MODEL = {"vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
                 "max_position_embeddings": 4096, "rope_theta": 1000000.0, "bos_token_id": 151643,
                 "eos_token_id": 151645, "pad_token_id": 151643}
PROMPT = "The capital of France is"


def write_predict_config(folder: Path, name: str, parallel: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    # a strong repetition penalty: random weights otherwise repeat one token; shows the section is honoured too
    cfg = {"model": {"config": PREDICT_MODEL, "seed": 0}, "data": {"tokenizer": "builtin"},
           "generation": {"max_new_tokens": 8, "repetition_penalty": 20.0}, "parallel": parallel}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_logs(folder: Path):
    rows = [json.loads(x) for x in (folder / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}, {r["step"]: r for r in rows if "eval_loss" in r}


def launch_with_retry(tmp_path_factory, name, launch):
    """Run ``launch(folder)``; retry once in a fresh folder only if the cluster never formed (the machine)."""
    from qwen2ms.parallel.launch import MsrunError

    out = tmp_path_factory.mktemp(name)
    try:
        launch(out)
    except MsrunError as first:
        if any("initialised" in p.read_text(errors="replace") for p in (out / "logs").glob("worker_*.log")):
            raise
        out = tmp_path_factory.mktemp(f"{name}_retry")
        try:
            launch(out)
        except MsrunError as second:
            raise MsrunError(f"{first}\n=== retry ===\n{second}") from second
    return out


def run_reference(ref: Path) -> Path:
    """One process training on the combined batches (4 samples per step) for 6 steps, in ``ref/single``."""
    from qwen2ms.training.run_config import run_finetune

    run_finetune(write_config(ref, "single", {}, per_device_train_batch_size=4))
    return ref / "single"


#: fp16 with a loss scale that overflows at first (skipped steps) and grows back every 2 finite steps
FP16 = {"precision": "fp16", "loss_scale_init": 2.0 ** 20, "loss_scale_window": 2}


def write_fp16_config(folder: Path, name: str, parallel: dict, **training) -> Path:
    path = write_config(folder, name, parallel, **FP16, **training)
    data = yaml.safe_load(path.read_text())
    data["model"]["dtype"] = "float16"
    path.write_text(yaml.safe_dump(data))
    return path


def write_packed_config(folder: Path, name: str, parallel: dict, **training) -> Path:
    """10 packed rows of 16 tokens, two segments each (position ids restart per segment)."""
    rows = []
    for i in range(10):
        ids, labels, pos, seg = [], [], [], []
        for s, n in enumerate((5 + i % 4, 11 - i % 4)):
            toks = [1 + (i * 7 + s * 13 + j * 5) % 62 for j in range(n)]
            ids += toks
            labels += [-100] + toks[1:]
            pos += list(range(n))
            seg += [s + 1] * n
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos, "segment_ids": seg})
    path = write_config(folder, name, parallel, **training)
    (folder / "packed.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = yaml.safe_load(path.read_text())
    data["data"]["train_file"] = "packed.jsonl"
    path.write_text(yaml.safe_dump(data))
    return path


def check_against_reference(run: Path, ref: Path, layout: dict):
    from qwen2ms.modeling import Qwen2ForCausalLM

    got_train, got_eval = read_logs(run)
    want_train, want_eval = read_logs(ref)
    assert sorted(got_train) == sorted(want_train) == [1, 2, 3, 4, 5, 6]
    for step, want in want_train.items():
        assert got_train[step]["loss"] == pytest.approx(want["loss"], abs=1e-5), f"loss at step {step}"
        assert got_train[step]["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-4), f"grad norm, step {step}"
        assert got_train[step]["trained_tokens"] == want["trained_tokens"]
    assert sorted(got_eval) == sorted(want_eval) == [2, 4, 6]
    for step, want in want_eval.items():
        assert got_eval[step]["eval_loss"] == pytest.approx(want["eval_loss"], abs=1e-5)
    # the merged model in the HF layout loads back and equals the single-process weights
    got = dict(Qwen2ForCausalLM.from_hf(str(run / "final")).parameters_and_names())
    want = dict(Qwen2ForCausalLM.from_hf(str(ref / "final")).parameters_and_names())
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name].asnumpy(), want[name].asnumpy(), atol=1e-4, rtol=1e-4, err_msg=name)
    # per-rank checkpoints: layout recorded, one shard per rank, each loads into that rank's slice
    ckpt = run / "checkpoint-6"
    saved_layout = json.loads((ckpt / "parallel_config.json").read_text())
    for key in ("model_parallel", "pipeline_stage", "data_parallel"):
        assert saved_layout[key] == layout.get(key, 1), key
    assert json.loads((ckpt / "trainer_state.json").read_text())["state"]["global_step"] == 6
    if layout.get("pipeline_stage", 1) > 1:
        return check_stage_shards(run, ref, ckpt, layout)
    from qwen2ms import Qwen2Config
    from qwen2ms.parallel import ParallelConfig, load_rank_checkpoint
    from qwen2ms.parallel.apply import shard_parameters

    pc = ParallelConfig(**layout)
    for r in range(2):
        assert (ckpt / f"rank_{r}" / "optimizer.safetensors").is_file()
        for folder in (ckpt, run / "final"):
            model = Qwen2ForCausalLM(Qwen2Config(**MODEL), init_weights=False)
            shard_parameters(model, pc, r)
            load_rank_checkpoint(model, folder, rank=r)
            reference = Qwen2ForCausalLM.from_hf(str(ref / "final"))
            shard_parameters(reference, pc, r)
            want_shard = dict(reference.parameters_and_names())
            for name, p in model.parameters_and_names():
                np.testing.assert_allclose(p.asnumpy(), want_shard[name].asnumpy(), atol=1e-4, rtol=1e-4,
                                           err_msg=f"{folder.name} rank {r} {name}")


def check_stage_shards(run: Path, ref: Path, ckpt: Path, layout: dict):
    """Each rank's files hold exactly its stage's parameters (names of the one-device model), equal to the reference."""
    from mindspore import load_checkpoint

    from qwen2ms import Qwen2Config
    from qwen2ms.modeling import Qwen2ForCausalLM
    from qwen2ms.parallel import ParallelConfig

    pc = ParallelConfig(**layout)
    want = {n: p.asnumpy() for n, p in Qwen2ForCausalLM.from_hf(str(ref / "final")).parameters_and_names()}
    stages = pc.stage_layers(MODEL["num_hidden_layers"])
    assert not Qwen2Config(**MODEL).tie_word_embeddings
    for r in range(pc.world_size):
        stage = pc.rank_coords(r)[0]
        names = {n for n in want if ".layers." in n and int(n.split(".")[2]) in stages[stage]}
        names |= {"model.embed_tokens.weight"} if stage == 0 else set()
        names |= {"model.norm.weight", "lm_head.weight"} if stage == pc.pipeline_stage - 1 else set()
        assert (ckpt / f"rank_{r}" / "optimizer.safetensors").is_file()
        for folder in (ckpt, run / "final"):
            files = sorted((folder / f"rank_{r}").glob("*.ckpt"))
            assert len(files) == 1
            got = {k: v.asnumpy() for k, v in load_checkpoint(str(files[0])).items()}
            assert set(got) == names, f"{folder.name} rank {r} (stage {stage}) holds the wrong parameters"
            for name in names:
                np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=1e-4,
                                           err_msg=f"{folder.name} rank {r} {name}")
