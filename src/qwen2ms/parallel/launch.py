"""Launching a qwen2ms job on several devices with MindSpore's ``msrun``: command lines, start-up inside a worker.

``msrun`` (installed with MindSpore) starts one scheduler and ``--local_worker_num`` worker
processes per node; every worker runs the same script and calls ``mindspore.communication.init()``.
``--worker_num`` is the total over all nodes and must equal ``data_parallel * model_parallel *
pipeline_stage`` of the run's :class:`~qwen2ms.parallel.ParallelConfig`. The ``python`` on ``PATH``
runs the workers, so activate the environment that has qwen2ms first.

Single node, 8 devices (e.g. Qwen2-7B fine-tuning with ``data_parallel: 2, model_parallel: 4``)::

    msrun --worker_num=8 --local_worker_num=8 --master_addr=127.0.0.1 --master_port=8118 \\
          --log_dir=output/msrun_log --join=True \\
          train.py --config run.yaml

Two nodes of 8 devices (16 workers); run on each node, with the first node's address as master
and ``--node_rank`` 0 on the first node, 1 on the second::

    # node 0 (address 192.0.2.10)
    msrun --worker_num=16 --local_worker_num=8 --master_addr=192.0.2.10 --master_port=8118 \\
          --node_rank=0 --log_dir=output/msrun_log --join=True --cluster_time_out=600 \\
          train.py --config run.yaml
    # node 1
    msrun --worker_num=16 --local_worker_num=8 --master_addr=192.0.2.10 --master_port=8118 \\
          --node_rank=1 --log_dir=output/msrun_log --join=True --cluster_time_out=600 \\
          train.py --config run.yaml

``qwen2ms finetune`` and ``qwen2ms generate`` are such scripts: with a run config whose ``parallel``
section needs N devices, put ``python -m qwen2ms.cli finetune --config run.yaml`` (or ``generate
--config predict.yaml --prompt ...``) in place of ``train.py --config run.yaml`` above, with
``--worker_num=N`` (msrun runs every worker and its scheduler as ``python <args>``; the scheduler
process's ``init()`` serves the cluster and never returns)::

    msrun --worker_num=2 --local_worker_num=2 --master_addr=127.0.0.1 --master_port=8118 \\
          --log_dir=output/msrun_log --join=True python -m qwen2ms.cli finetune --config run.yaml

On a CPU-only machine the same command runs the workers as CPU processes (collectives over
MindSpore's "mccl" backend); that is how this project's multi-process tests run, with
``--worker_num=2 --local_worker_num=2``. Each worker writes ``worker_<rank>.log`` under
``--log_dir``; set ``GLOG_v=3`` to keep them short.

Inside the script (every worker runs the same code)::

    import mindspore as ms
    from mindspore import nn
    from qwen2ms import Qwen2Config, Qwen2ForCausalLM
    from qwen2ms.parallel import (ParallelConfig, parallelize, split_checkpoint, load_rank_checkpoint,
                                  make_optimizer)
    from qwen2ms.parallel.launch import init_distributed, data_shard

    pc = ParallelConfig.from_yaml("run.yaml")      # the upstream parallel_config keys work
    rank, world = init_distributed(pc)             # init() under msrun; checks dp*mp*pp == world
    config = Qwen2Config.from_json("model_dir")
    # once, on one process, before the job: split_checkpoint("full.ckpt", "shards", config, pc)
    pm = parallelize(Qwen2ForCausalLM(config, init_weights=False), pc)   # no full weights in memory
    load_rank_checkpoint(pm, "shards")             # reads this rank's shard only
    num_shards, shard_id = data_shard(pc, rank)    # which slice of the data this replica reads
    opt = make_optimizer(pm, lambda ps: nn.AdamWeightDecay(ps, learning_rate=1e-5))   # ZeRO-1 if asked
    grad_fn = ms.value_and_grad(lambda i, l: pm(i, labels=l).loss, None, pm.trainable_params())
    for input_ids, labels in batches:              # this replica's batches
        loss, grads = grad_fn(input_ids, labels)
        grads = pm.grad_sync(grads)                # data-parallel mean, SP/kv/expert sums
        norm = pm.grad_norm(grads)                 # global norm over all shards, for clipping
        opt(grads)

With ``pipeline_stage > 1`` the step is ``loss, grads = pm.forward_backward(input_ids, labels)``
(already synchronised), then ``opt(grads)``.

:func:`msrun_command` builds these command lines and :func:`run_msrun` runs one and reports the
workers' logs when it fails.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from .config import ParallelConfig, ParallelConfigError
from ..errors import Qwen2msError

__all__ = ["msrun_command", "run_msrun", "init_distributed", "under_msrun", "free_port", "data_shard", "MsrunError"]


class MsrunError(Qwen2msError, RuntimeError):
    """An msrun job failed; the message carries the tail of each worker's log."""


def under_msrun() -> bool:
    """Whether this process was started by ``msrun``: a worker (``MS_ROLE=MS_WORKER``) or its scheduler.

    msrun also runs the job's script as the scheduler (``MS_ROLE=MS_SCHED``); there
    ``mindspore.communication.init()`` serves the cluster and ends the process when the job ends.
    """
    return os.environ.get("MS_ROLE") in ("MS_WORKER", "MS_SCHED")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now (for a local msrun master)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def msrun_command(script: Union[str, os.PathLike], script_args: Sequence[str] = (), *, worker_num: int,
                  local_worker_num: Optional[int] = None, master_addr: str = "127.0.0.1", master_port: int = 8118,
                  node_rank: Optional[int] = None, log_dir: Union[str, os.PathLike] = "msrun_log",
                  join: bool = True, cluster_time_out: Optional[int] = None) -> List[str]:
    """The ``msrun`` argument list for a job (see the module docstring for single- and multi-node use).

    Args:
        script: the Python script every worker runs.
        script_args: its arguments.
        worker_num: workers over all nodes (= the layout's world size).
        local_worker_num: workers on this node (default: ``worker_num``, i.e. one node).
        master_addr, master_port: where the scheduler listens (the first node).
        node_rank: this node's index for multi-node jobs (None: msrun assigns).
        log_dir: folder for ``worker_<rank>.log`` and ``scheduler.log``.
        join: wait for the workers and fail when one fails.
        cluster_time_out: seconds to wait for every node to join.

    Returns:
        The command as a list of strings.

    Example:
        >>> " ".join(msrun_command("train.py", ["--config", "run.yaml"], worker_num=8))
        'msrun --worker_num=8 --local_worker_num=8 --master_addr=127.0.0.1 --master_port=8118 --log_dir=msrun_log --join=True train.py --config run.yaml'
    """
    local = worker_num if local_worker_num is None else local_worker_num
    for name, v in (("worker_num", worker_num), ("local_worker_num", local)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if local > worker_num:
        raise ValueError(f"local_worker_num ({local}) cannot exceed worker_num ({worker_num})")
    if worker_num % local:
        raise ValueError(f"worker_num ({worker_num}) must be a multiple of local_worker_num ({local}): every node "
                         f"runs the same number of workers")
    if not 1024 <= int(master_port) <= 65535:
        raise ValueError(f"master_port must be in [1024, 65535], got {master_port}")
    cmd = ["msrun", f"--worker_num={worker_num}", f"--local_worker_num={local}", f"--master_addr={master_addr}",
           f"--master_port={int(master_port)}"]
    if node_rank is not None:
        cmd.append(f"--node_rank={int(node_rank)}")
    cmd += [f"--log_dir={os.fspath(log_dir)}", f"--join={'True' if join else 'False'}"]
    if cluster_time_out is not None:
        cmd.append(f"--cluster_time_out={int(cluster_time_out)}")
    cmd.append(os.fspath(script))
    cmd += [str(a) for a in script_args]
    return cmd


def run_msrun(script: Union[str, os.PathLike], script_args: Sequence[str] = (), *, worker_num: int = 2,
              log_dir: Union[str, os.PathLike], timeout: float = 600.0, env: Optional[dict] = None,
              cwd: Optional[Union[str, os.PathLike]] = None) -> subprocess.CompletedProcess:
    """Run a one-node msrun job on 127.0.0.1 (a free port) and wait for it.

    The ``msrun`` next to the running Python is used, and that Python's folder is put first on
    ``PATH`` so the workers run in the same environment.

    Args:
        script: the worker script.
        script_args: its arguments.
        worker_num: number of worker processes.
        log_dir: folder for the workers' logs.
        timeout: seconds before the job is killed.
        env: extra environment variables.
        cwd: working directory of the job.

    Returns:
        The completed process.

    Raises:
        MsrunError: msrun is missing, timed out, or a worker failed (with the tail of every worker's log).
    """
    bindir = Path(sys.executable).parent
    exe = bindir / "msrun"
    if not exe.exists():
        found = shutil.which("msrun")
        if found is None:
            raise MsrunError("msrun was not found next to the Python interpreter or on PATH; install mindspore")
        exe = Path(found)
    cmd = msrun_command(script, script_args, worker_num=worker_num, master_port=free_port(), log_dir=log_dir)
    cmd[0] = str(exe)
    full_env = dict(os.environ)
    full_env["PATH"] = f"{bindir}{os.pathsep}{full_env.get('PATH', '')}"
    full_env.setdefault("GLOG_v", "3")
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        raise MsrunError(f"msrun job timed out after {timeout} s: {' '.join(cmd)}\n{_log_tails(log_dir)}") from e
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-20:] + proc.stderr.splitlines()[-20:])
        raise MsrunError(f"msrun job failed (exit {proc.returncode}): {' '.join(cmd)}\n{_log_tails(log_dir)}\n"
                         f"--- msrun output ---\n{tail}")
    return proc


def _log_tails(log_dir: Union[str, os.PathLike], lines: int = 40) -> str:
    out = []
    for path in sorted(Path(log_dir).glob("worker_*.log")) + sorted(Path(log_dir).glob("scheduler*.log")):
        text = path.read_text(errors="replace").splitlines()
        keep = [t for t in text if "[WARNING]" not in t and "[INFO]" not in t][-lines:]
        out.append(f"--- {path.name} ---\n" + "\n".join(keep))
    return "\n".join(out) or f"(no worker logs in {os.fspath(log_dir)})"


def init_distributed(parallel_config: Optional[ParallelConfig] = None) -> Tuple[int, int]:
    """Initialise MindSpore communication when running under msrun and check the layout against it.

    Outside msrun nothing is initialised and ``(0, 1)`` is returned. In msrun's scheduler process
    (which runs the same script) ``init()`` serves the cluster and does not return.

    Args:
        parallel_config: the run's layout; its world size must equal the number of workers.

    Returns:
        ``(rank, world_size)``.

    Raises:
        ParallelConfigError: the layout needs a different number of processes than were started.
    """
    if under_msrun():
        from mindspore.communication import get_group_size, get_rank, init

        from .comm import is_initialized

        if not is_initialized():
            init()
        rank, world = get_rank(), get_group_size()
    else:
        rank, world = 0, 1
    if parallel_config is not None and parallel_config.world_size != world:
        raise ParallelConfigError(
            f"the parallel config needs {parallel_config.world_size} processes "
            f"(data_parallel*model_parallel*pipeline_stage) but {world} were started; "
            f"launch with msrun --worker_num={parallel_config.world_size}")
    return rank, world


def data_shard(parallel_config: ParallelConfig, rank: int) -> Tuple[int, int]:
    """``(num_shards, shard_id)`` of the training data this rank reads.

    Only data-parallel replicas see different samples; the tensor-parallel peers and pipeline
    stages of one replica read the same shard. Pass the pair to
    ``mindspore.dataset.MindDataset(num_shards=..., shard_id=...)`` or slice a sample list with it.

    Example:
        >>> data_shard(ParallelConfig(data_parallel=2, model_parallel=4), rank=5)
        (2, 1)
    """
    return parallel_config.data_parallel, parallel_config.rank_coords(rank)[1]
