"""Real multi-process runs under msrun on this CPU, checked number by number against one process.

Two msrun jobs:

* 2 processes (tests/parallel_workers/collectives_and_layouts.py): every collective against its
  definition (world group and the sub-group compositions); TP, TP with replicated kv heads and tied
  embeddings, TP + sequence parallel, DP, DP + ZeRO-1, MoE TP, MoE EP + ZeRO-1, PP (GPipe, untied
  and tied) forward passes, synchronised gradients, gradient norms, one AdamW step and the loss after
  it, ms.jit gradients, and TP greedy generation with float and with int8 weights;
* 4 processes (tests/parallel_workers/four_ranks.py): layouts whose groups are real sub-groups --
  DP x TP + SP + ZeRO-1, MoE DP x EP x TP, PP x TP (tied, replicated kv heads).

The references are the single-process model on the whole batch (tests/parallel_workers/cases.py).
"""
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = os.path.join(HERE, "parallel_workers")
sys.path.insert(0, WORKERS)

import cases  # noqa: E402

pytestmark = pytest.mark.slow

ATOL = 2e-5


def _run_job(tmp_path_factory, script, workers):
    from qwen2ms.parallel.launch import MsrunError, run_msrun

    out = tmp_path_factory.mktemp("msrun_out")
    try:
        run_msrun(os.path.join(WORKERS, script), [str(out)], worker_num=workers, log_dir=out / "logs",
                  timeout=900, cwd=str(out))
    except MsrunError as first:
        # One more try only when the cluster never formed (no worker got past init): that is the
        # machine (ports, load), not the code. Any failure after init is reported as it is.
        started = list((out / "logs").glob("worker_*.log"))
        if any("initialised" in p.read_text(errors="replace") for p in started):
            raise
        retry = tmp_path_factory.mktemp("msrun_retry")
        try:
            run_msrun(os.path.join(WORKERS, script), [str(retry)], worker_num=workers, log_dir=retry / "logs",
                      timeout=900, cwd=str(retry))
        except MsrunError as second:
            raise MsrunError(f"{first}\n=== retry ===\n{second}") from second
        out = retry
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(workers)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _run_job(tmp_path_factory, "collectives_and_layouts.py", 2)


@pytest.fixture(scope="module")
def ranks4(tmp_path_factory):
    return _run_job(tmp_path_factory, "four_ranks.py", 4)


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = cases.reference(name)
        return cache[name]

    return get


def _x(rank):
    return np.arange(24, dtype=np.float32).reshape(4, 6) + 100 * rank


@pytest.mark.parametrize("tag", ["world", "composite"])
def test_collectives_match_definitions(ranks, tag):
    xs = [_x(0), _x(1)]
    for r in range(2):
        got = {k.split("/", 1)[1]: v for k, v in ranks[r].items() if k.startswith(tag + "/")}
        np.testing.assert_array_equal(got["all_reduce_sum"], xs[0] + xs[1])
        np.testing.assert_array_equal(got["all_reduce_max"], np.maximum(xs[0], xs[1]))
        np.testing.assert_array_equal(got["all_reduce_min"], np.minimum(xs[0], xs[1]))
        np.testing.assert_array_equal(got["all_gather0"], np.concatenate(xs, 0))
        np.testing.assert_array_equal(got["all_gather1"], np.concatenate(xs, 1))
        total = xs[0] + xs[1]
        np.testing.assert_array_equal(got["reduce_scatter0"], np.split(total, 2, 0)[r])
        np.testing.assert_array_equal(got["reduce_scatter1"], np.split(total, 2, 1)[r])
        # all_to_all(split 1, concat 0): rank r gets column-chunk r of every rank, stacked by rows
        np.testing.assert_array_equal(got["all_to_all_1_0"],
                                      np.concatenate([np.split(xs[j], 2, 1)[r] for j in range(2)], 0))
        np.testing.assert_array_equal(got["broadcast1"], xs[1])
    np.testing.assert_array_equal(ranks[1][f"{tag}/recv"], xs[0] * 2)


def _norm(grads):
    return float(np.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values())))


def _shard(name, pname, full, rank):
    from qwen2ms.parallel.plans import PARAM_PLAN, match, param_shard

    pc = cases.layout(name)
    _, dp_rank, mp_rank = pc.rank_coords(rank)
    return param_shard(full, match(PARAM_PLAN, pname), cases.config(name), mp_rank, pc.model_parallel,
                       dp_rank % pc.expert_parallel, pc.expert_parallel, pc.vocab_emb_dp)


def _check_layout(ranks, name, ref):
    pc = cases.layout(name)
    split = cases.split_batch(name)
    for r, got in enumerate(ranks):
        dp_rank = pc.rank_coords(r)[1]
        want = np.split(ref["logits"], pc.data_parallel, 0)[dp_rank] if split else ref["logits"]
        np.testing.assert_allclose(got[f"{name}/logits"], want, atol=ATOL, rtol=1e-5, err_msg=f"{name} logits rank {r}")
        names = [k.split("/", 2)[2] for k in got if k.startswith(f"{name}/grad/")]
        assert sorted(names) == sorted(ref["grads"]), f"{name}: parameter names changed"
        for pname in names:
            np.testing.assert_allclose(got[f"{name}/grad/{pname}"], _shard(name, pname, ref["grads"][pname], r),
                                       atol=ATOL, rtol=1e-4, err_msg=f"{name} grad {pname} rank {r}")
            np.testing.assert_allclose(got[f"{name}/param/{pname}"], _shard(name, pname, ref["params"][pname], r),
                                       atol=ATOL, rtol=1e-4, err_msg=f"{name} param {pname} after step rank {r}")
            if name in cases.JIT:
                np.testing.assert_allclose(got[f"{name}/jit_grad/{pname}"],
                                           _shard(name, pname, ref["grads"][pname], r), atol=ATOL, rtol=1e-4,
                                           err_msg=f"{name} ms.jit grad {pname} rank {r}")
        assert float(got[f"{name}/grad_norm"]) == pytest.approx(_norm(ref["grads"]), rel=1e-5)
        if name in cases.JIT:
            assert float(got[f"{name}/jit_grad_norm"]) == pytest.approx(_norm(ref["grads"]), rel=1e-5)
    # equal token counts per replica: the global mean is the mean of the replica means
    assert np.mean([float(g[f"{name}/loss"]) for g in ranks]) == pytest.approx(ref["loss"], abs=1e-5)
    assert np.mean([float(g[f"{name}/loss_after"]) for g in ranks]) == pytest.approx(ref["loss_after"], abs=1e-5)
    assert ref["loss_after"] < ref["loss"]


def _stage_params(name, stage):
    """Parameter names a pipeline stage must hold."""
    cfg, pc = cases.config(name), cases.layout(name)
    layers = pc.stage_layers(cfg.num_hidden_layers)[stage]
    names = {n for n in cases.reference_names(name) if ".layers." in n and int(n.split(".")[2]) in layers}
    last = stage == pc.pipeline_stage - 1
    if stage == 0 or (last and cfg.tie_word_embeddings):
        names.add("model.embed_tokens.weight")
    if last:
        names.add("model.norm.weight")
        if not cfg.tie_word_embeddings:
            names.add("lm_head.weight")
    return names


def _check_pipeline(ranks, name, ref):
    pc = cases.layout(name)
    for r, got in enumerate(ranks):
        stage = pc.rank_coords(r)[0]
        names = {k.split("/", 2)[2] for k in got if k.startswith(f"{name}/grad/")}
        assert names == _stage_params(name, stage), f"rank {r} (stage {stage}) holds the wrong parameters"
        for pname in names:
            np.testing.assert_allclose(got[f"{name}/grad/{pname}"], _shard(name, pname, ref["grads"][pname], r),
                                       atol=ATOL, rtol=1e-4, err_msg=f"{name} grad {pname} rank {r}")
            np.testing.assert_allclose(got[f"{name}/param/{pname}"], _shard(name, pname, ref["params"][pname], r),
                                       atol=ATOL, rtol=1e-4, err_msg=f"{name} param {pname} after step, rank {r}")
        assert float(got[f"{name}/loss"]) == pytest.approx(ref["loss"], abs=1e-5)
        assert float(got[f"{name}/grad_norm"]) == pytest.approx(_norm(ref["grads"]), rel=1e-5)
        assert float(got[f"{name}/loss_after"]) == pytest.approx(ref["loss_after"], abs=1e-5)
        if stage == pc.pipeline_stage - 1:
            np.testing.assert_allclose(got[f"{name}/logits_after"], ref["logits_after"], atol=ATOL, rtol=1e-5)
        else:
            assert f"{name}/logits_after" not in got


@pytest.mark.parametrize("name", list(cases.CASES))
def test_layout_matches_single_process(ranks, references, name):
    _check_layout(ranks, name, references(name))


@pytest.mark.parametrize("name", list(cases.PIPELINE_CASES))
def test_pipeline_matches_single_process(ranks, references, name):
    _check_pipeline(ranks, name, references(name))


@pytest.mark.parametrize("name", cases.GENERATE)
def test_tensor_parallel_generation_matches_single_process(ranks, name):
    from qwen2ms.generation.generate import generate
    from qwen2ms.modeling.model import Qwen2ForCausalLM

    ids, _ = cases.batch(name)
    want = generate(Qwen2ForCausalLM(cases.config(name), seed=cases.SEED), ids[:2, :cases.PROMPT],
                    max_new_tokens=cases.NEW_TOKENS, do_sample=False)
    for r in range(2):
        np.testing.assert_array_equal(ranks[r][f"{name}/generate"], want)


@pytest.mark.parametrize("name", cases.INT8_GENERATE)
def test_tensor_parallel_int8_generation_matches_single_process(ranks, name):
    """int8 weights under TP=2: the vocabulary-split head reads its codes with their scales, like the model."""
    from qwen2ms.generation.generate import generate

    ids, _ = cases.batch(name)
    model = cases.int8_model(name)
    logits = model(ids).logits.asnumpy()
    want = generate(model, ids[:2, :cases.PROMPT], max_new_tokens=cases.NEW_TOKENS, do_sample=False)
    for r in range(2):
        np.testing.assert_allclose(ranks[r][f"int8/{name}/logits"], logits, atol=ATOL, rtol=1e-5,
                                   err_msg=f"{name} int8 logits rank {r}")
        np.testing.assert_array_equal(ranks[r][f"int8/{name}/generate"], want)


def _zero_bytes(name):
    from qwen2ms.modeling.model import Qwen2ForCausalLM

    pc = cases.layout(name)
    model = Qwen2ForCausalLM(cases.config(name), seed=cases.SEED)
    from qwen2ms.parallel.apply import shard_parameters

    shard_parameters(model, pc, 0)
    # fp32 slice + AdamW's two moments of 1/dp of every (flattened, padded) local parameter
    return sum(-(-int(np.prod(p.shape)) // pc.data_parallel) for p in model.trainable_params()) * 4 * 3


def test_optimizer_state_is_sharded(ranks, ranks4):
    for got, name in ((ranks, "dp_zero"), (ranks4, "dp2_tp2_sp")):
        want = _zero_bytes(name)
        for r, res in enumerate(got):
            # (plus the optimizer's step counter); unsharded would be dp times as much
            assert want <= int(res[f"{name}/optimizer_state_bytes"]) <= want + 64, f"{name} rank {r}"


@pytest.mark.parametrize("name", list(cases.FOUR_CASES))
def test_four_process_layout_matches_single_process(ranks4, references, name):
    _check_layout(ranks4, name, references(name))


@pytest.mark.parametrize("name", list(cases.FOUR_PIPELINE_CASES))
def test_four_process_pipeline_matches_single_process(ranks4, references, name):
    _check_pipeline(ranks4, name, references(name))
