"""Spawn small gloo worlds on CPU for distributed tests.

``run_distributed(fn, world_size, *args)`` forks ``world_size`` processes, sets up a gloo
process group in each, runs ``fn(rank, world_size, *args)`` and returns the per-rank
results (anything ``torch.save`` can store), re-raising the first worker error with its
traceback. ``init_megatron(...)`` then brings up Megatron's model-parallel state on CPU.

Fork (not spawn) is used so workers inherit the already-imported torch / megatron, unless a
CUDA device is present (a forked child cannot use CUDA once the parent touched it, which
imports such as Triton's device query do without `torch.cuda.is_initialized()`): then spawn. A
worker uses one intra-op thread so two ranks fit on a 2-core machine.
"""
from __future__ import annotations

import faulthandler
import os
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["run_distributed", "init_megatron", "destroy_megatron", "free_port"]


def free_port() -> int:
    """An unused localhost TCP port for the gloo rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple, timeout: float
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    # a hung rank prints its stack (to the test's stderr) shortly before the parent kills it
    faulthandler.dump_traceback_later(max(1.0, timeout - 2.0), exit=False)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, path)
    except BaseException:  # report everything, including assertion errors, to the parent
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
    finally:
        faulthandler.cancel_dump_traceback_later()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` forked gloo ranks.

    Args:
        fn: a module-level function (it runs in the children).
        world_size: number of ranks (>= 1).
        timeout: seconds before the workers are killed and RuntimeError is raised.
    Returns:
        list of the per-rank return values, index = rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size}: must be >= 1")
    ctx = mp.get_context("spawn" if torch.cuda.is_available() else "fork")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="nsa_dist_") as out_dir:
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, port, out_dir, fn, args, timeout), daemon=False)
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        if hung:
            raise RuntimeError(f"ranks {hung} did not finish within {timeout} s")
        results = []
        for r in range(world_size):
            path = os.path.join(out_dir, f"rank{r}.pt")
            if not os.path.exists(path):
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            rec = torch.load(path, weights_only=False)
            if not rec["ok"]:
                raise RuntimeError(f"rank {r} failed:\n{rec['error']}")
            results.append(rec["result"])
    return results


def init_megatron(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    seed: int = 1234,
) -> None:
    """Initialise Megatron's parallel state (CPU-compatible) inside a gloo world.

    Applies ``nsa_megatron.compat.apply_cpu_compat()`` when CUDA is absent, then
    ``initialize_model_parallel``, ``torch.manual_seed(seed)`` and
    ``model_parallel_cuda_manual_seed(seed)``. Seeding the default generator makes model
    initialisation the same in every launch: otherwise each pytest run draws new weights,
    and a draw with a near-tie between two selection blocks flips under CP's different
    summation order (the loss agrees to 1e-5, gradients then differ by ~1e-3).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from nsa_megatron.compat import apply_cpu_compat

    apply_cpu_compat()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        context_parallel_size=context_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_megatron() -> None:
    """Tear down Megatron's parallel state (the process group stays)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
