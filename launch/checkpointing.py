"""Distributed checkpoints with ``megatron.core.dist_checkpointing``, and automatic resume.

Layout of a checkpoint folder (the same as Megatron-LM's)::

    <save>/latest_checkpointed_iteration.txt     the last complete iteration, written last
    <save>/iter_0000020/                         one dist_checkpointing directory per save

Each save holds the model and optimizer as sharded tensors (every rank writes its own
shards) and, in the common part, the iteration, consumed samples, the LR scheduler state and
the flattened run config.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

TRACKER = "latest_checkpointed_iteration.txt"
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def iteration_dir(root: str, iteration: int) -> str:
    """``<root>/iter_0000123``."""
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: Optional[str]) -> Optional[int]:
    """Iteration named in ``root``'s tracker file, or None when there is no complete checkpoint."""
    if not root:
        return None
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ValueError(f"{path}: expected an iteration number, found {text!r}")
    return int(text)


def _unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _sharded_state(model, optimizer, is_loading: bool) -> Dict[str, Any]:
    model_sd = _unwrap(model).sharded_state_dict()
    return {"model": model_sd,
            "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                      metadata=OPTIM_METADATA)}


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler,
                    extra: Dict[str, Any]) -> str:
    """Write ``iter_<iteration>`` under ``root`` on every rank, then update the tracker.

    Args:
        root: checkpoint folder (created).
        iteration: completed optimizer steps.
        model, optimizer, scheduler: the training objects (Megatron DDP model, MegatronOptimizer,
            OptimizerParamScheduler).
        extra: small picklable values stored once (e.g. consumed samples, the config).
    Returns:
        The iteration folder written.
    """
    from megatron.core import dist_checkpointing

    path = iteration_dir(root, iteration)
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    state = _sharded_state(model, optimizer, is_loading=False)
    state.update(iteration=iteration, opt_param_scheduler=scheduler.state_dict(), extra=extra)
    dist_checkpointing.save(state, path)
    dist.barrier()
    if dist.get_rank() == 0:
        tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(root, TRACKER))
    dist.barrier()
    return path


def load_checkpoint(root: str, model, optimizer, scheduler) -> Optional[Dict[str, Any]]:
    """Restore the latest checkpoint under ``root`` into the training objects, if there is one.

    Returns:
        ``{"iteration": int, "extra": dict}`` of the loaded checkpoint, or None when ``root``
        holds no complete checkpoint.
    """
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root)
    if iteration is None:
        return None
    path = iteration_dir(root, iteration)
    state = _sharded_state(model, optimizer, is_loading=True)
    state.update(iteration=None, opt_param_scheduler=None, extra=None)
    loaded = dist_checkpointing.load(state, path)
    _unwrap(model).load_state_dict(loaded["model"])
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["opt_param_scheduler"])
    torch.distributed.barrier()
    return {"iteration": int(loaded["iteration"]), "extra": loaded["extra"]}
