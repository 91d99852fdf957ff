"""Start torch.distributed and Megatron's parallel groups from whatever launched us.

Launchers recognised, in order:

* ``torchrun`` (or any launcher exporting ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``);
* SLURM ``srun`` (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``; ``MASTER_ADDR`` from the
  environment or the first host of ``SLURM_JOB_NODELIST``);
* MPI (``mpirun``/``mpiexec``: ``OMPI_COMM_WORLD_*``, ``PMI_RANK``/``PMI_SIZE`` or
  ``PMIX_RANK``) through mpi4py - rank 0's host and a free port are broadcast over MPI;
* nothing: a single process on ``127.0.0.1`` with a free port.

The backend is NCCL when CUDA is available and gloo otherwise.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    """Where this process sits: global rank, world size, rank on its node, launcher name."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str
    master_addr: str
    master_port: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First host name of a SLURM node list such as ``gpu[003-005,009],cpu1`` -> ``gpu003``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _mpi_env() -> DistEnv:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise RuntimeError("launched under MPI but mpi4py is not installed: pip install mpi4py") from exc
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank).Get_rank()
    addr = os.environ.get("MASTER_ADDR") or (socket.gethostname() if rank == 0 else None)
    port = int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ else (_free_port() if rank == 0 else None)
    addr, port = comm.bcast((addr, port), root=0)
    if size == 1:
        addr = "127.0.0.1"
    return DistEnv(rank, size, local_rank, "mpi", addr, port)


def detect_env() -> DistEnv:
    """Read rank/world/master from the launcher's environment (see the module docstring)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       "torchrun", env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       "slurm", addr, int(env.get("MASTER_PORT", 29500)))
    if any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")):
        return _mpi_env()
    return DistEnv(0, 1, 0, "single", "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port())


def init_distributed(tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1, timeout_minutes: int = 30) -> DistEnv:
    """Initialise torch.distributed and ``parallel_state.initialize_model_parallel``.

    Args:
        tp, pp, cp, ep: tensor, pipeline, context and expert parallel sizes.
        timeout_minutes: collective timeout.
    Returns:
        The detected :class:`DistEnv`. On CUDA the process is bound to ``cuda:local_rank``.
    Raises:
        ValueError: the world size is not divisible by tp * pp * cp.
    """
    from megatron.core import parallel_state

    denv = detect_env()
    if denv.world_size % (tp * pp * cp) != 0:
        raise ValueError(f"world size {denv.world_size} is not divisible by tensor*pipeline*context "
                         f"parallel sizes ({tp}*{pp}*{cp})")
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(denv.local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", denv.master_addr)
        os.environ.setdefault("MASTER_PORT", str(denv.master_port))
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
            rank=denv.rank, world_size=denv.world_size, timeout=timedelta(minutes=timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            context_parallel_size=cp, expert_model_parallel_size=ep,
            distributed_timeout_minutes=timeout_minutes,
        )
    return denv


def shutdown() -> None:
    """Tear down Megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
