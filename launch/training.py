"""The training loop on megatron-core: model, DDP, optimizer, schedule, eval, checkpoints.

Pieces, in the order :func:`run_training` uses them:
``build_model`` (NSA GPT from ``nsa_megatron.model``, Float16Module for bf16, Megatron DDP)
-> ``build_optimizer`` (``get_megatron_optimizer``, optionally distributed, plus
``OptimizerParamScheduler`` for warm-up/decay) -> ``train_step`` (``get_forward_backward_func``
schedule, gradient clipping inside ``optimizer.step``) -> ``evaluate`` -> checkpoints.

Every iteration starts by re-seeding the RNGs from (seed, iteration): dropout and any other
randomness then depend only on the step, so a run resumed from a checkpoint reproduces the
uninterrupted run bit for bit without storing per-rank RNG states.
"""
from __future__ import annotations

import math
import time
from functools import partial
from typing import Any, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from nsa_launch.config_loader import ConfigError, RunConfig


def device() -> torch.device:
    """The device this rank computes on."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Round the vocabulary up to a multiple of ``divisible_by * tp`` (Megatron's rule)."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def build_model(cfg: RunConfig, config, vocab_size: int):
    """NSA GPT for this pipeline stage, on this rank's device, wrapped in Megatron DDP."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module
    from nsa_megatron.model import gpt_model_provider

    model = gpt_model_provider(
        config, vocab_size, cfg.data.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        position_embedding_type=cfg.model.get("position_embedding_type", "rope"),
    )
    model.to(device())
    if config.bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    model.broadcast_params()
    return model


def build_optimizer(cfg: RunConfig, config, model):
    """Adam (``get_megatron_optimizer``) and the LR/WD scheduler, counted in iterations."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = cfg.training
    opt_config = OptimizerConfig(
        optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
        clip_grad=t.clip_grad, bf16=t.bf16, params_dtype=config.params_dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_config, [model])
    decay = t.lr_decay_iters or t.train_iters
    if t.lr_warmup_iters >= decay:
        raise ConfigError(f"training.lr_warmup_iters={t.lr_warmup_iters}: must be < the decay "
                          f"length ({decay}, training.lr_decay_iters or train_iters)")
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters, lr_decay_steps=decay, lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=t.train_iters,
        wd_incr_style="constant", wsd_decay_steps=decay // 10 if t.lr_decay_style == "WSD" else None,
        lr_wsd_decay_style="linear" if t.lr_decay_style == "WSD" else None,
    )
    return optimizer, scheduler


def reseed(seed: int, iteration: int) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker from (seed, iteration)."""
    from megatron.core import tensor_parallel

    step_seed = seed + 7919 * iteration
    torch.manual_seed(step_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(step_seed)


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Token-mean LM loss; also returns [loss sum, tokens] for exact cross-rank averaging."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss_sum = (losses * mask).sum()
    n_tokens = mask.sum()
    return loss_sum, n_tokens.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), n_tokens])}


def _batch_on_this_cp_rank(batch: Dict[str, torch.Tensor], cp_size: int) -> Dict[str, torch.Tensor]:
    """Megatron's zig-zag share ([b, s] -> [b, s/cp]: chunks r and 2cp-1-r of every row).

    Done here rather than with ``megatron.core.utils.get_batch_on_this_cp_rank``, whose
    signature changed between megatron-core 0.16 and 0.19.
    """
    from megatron.core import parallel_state

    from nsa_megatron.context_parallel import zigzag_split

    rank = parallel_state.get_context_parallel_rank()
    return {k: zigzag_split(v.transpose(0, 1), None, cp_size, rank).transpose(0, 1).contiguous()
            for k, v in batch.items()}


def _forward_step(data_iterator: Iterator, model, cp_size: int = 1):
    batch = {k: v.to(device(), non_blocking=True) for k, v in next(data_iterator).items()}
    if cp_size > 1:
        batch = _batch_on_this_cp_rank(batch, cp_size)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _reduce_loss(store: List[Dict[str, torch.Tensor]]) -> float:
    """Mean loss over all micro batches and data(+context)-parallel ranks; nan off the last stage."""
    from megatron.core import parallel_state

    if not store:
        return float("nan")
    total = torch.stack([d["lm loss"] for d in store]).sum(0).to(device())
    dist.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return (total[0] / total[1].clamp(min=1)).item()


def train_step(cfg: RunConfig, model, optimizer, scheduler, data_iter, num_microbatches: int):
    """One optimizer step. Returns (loss, grad norm, update applied?)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    store = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, cp_size=cfg.parallel.context_parallel_size),
        data_iterator=data_iter, model=[model], num_microbatches=num_microbatches,
        seq_length=cfg.data.seq_length, micro_batch_size=cfg.data.micro_batch_size,
        decoder_seq_length=cfg.data.seq_length, forward_only=False,
    )
    ok, grad_norm, _ = optimizer.step()
    if ok:
        scheduler.step(increment=1)
    return _reduce_loss(store), float(grad_norm) if grad_norm is not None else float("nan"), ok


@torch.no_grad()
def evaluate(cfg: RunConfig, model, make_iter, num_microbatches: int) -> float:
    """Mean validation loss over the fixed first ``eval_iters`` global batches."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.eval()
    data_iter = make_iter()
    store = []
    for _ in range(cfg.training.eval_iters):
        store += get_forward_backward_func()(
            forward_step_func=partial(_forward_step, cp_size=cfg.parallel.context_parallel_size),
            data_iterator=data_iter, model=[model], num_microbatches=num_microbatches,
            seq_length=cfg.data.seq_length, micro_batch_size=cfg.data.micro_batch_size,
            decoder_seq_length=cfg.data.seq_length, forward_only=True,
        )
    model.train()
    return _reduce_loss(store)


def wire_config(config, model, optimizer) -> None:
    """Give the schedules the hooks Megatron-LM sets: grad scaling, no_sync, grad finalisation."""
    from megatron.core.distributed import finalize_model_grads

    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.param_sync_func = None


def summarize(history: List[Dict[str, Any]]) -> Dict[str, float]:
    """First/last/mean-of-last-10 training loss of a run's history."""
    losses = [h["lm_loss"] for h in history if not math.isnan(h["lm_loss"])]
    if not losses:
        return {}
    tail = losses[-10:]
    return {"first_loss": losses[0], "last_loss": losses[-1], "tail_mean_loss": sum(tail) / len(tail)}


def timed(fn, *args):
    """Run ``fn(*args)``; return (result, seconds), synchronising CUDA around it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def loop(cfg: RunConfig, model, optimizer, scheduler, start_iter: int, train_ds, valid_ds,
         logger, flops_per_seq: float, save_fn, dp_rank: int, dp_size: int) -> Dict[str, Any]:
    """Iterate from ``start_iter`` to ``train_iters``; log, evaluate and checkpoint on schedule.

    Returns a summary dict (iterations run, seconds, losses, validation loss, stop reason).
    """
    from nsa_launch.data import micro_batches
    from nsa_launch.logging_utils import memory_mb

    d, t, c = cfg.data, cfg.training, cfg.checkpoint
    nmb = d.global_batch_size // (d.micro_batch_size * dp_size)
    data_iter = micro_batches(train_ds, start_iter * d.global_batch_size, d.global_batch_size,
                              d.micro_batch_size, dp_rank, dp_size, d.loss_from_token)
    make_valid = (lambda: micro_batches(valid_ds, 0, d.global_batch_size, d.micro_batch_size,
                                        dp_rank, dp_size, d.loss_from_token)) if valid_ds is not None else None
    world = dist.get_world_size()
    history, val_loss, stop, t_start = [], None, "done", time.perf_counter()
    for it in range(start_iter + 1, t.train_iters + 1):
        reseed(t.seed, it)
        (loss, gnorm, ok), sec = timed(train_step, cfg, model, optimizer, scheduler, data_iter, nmb)
        tokens = d.global_batch_size * d.seq_length
        values = {"lm_loss": loss, "lr": scheduler.get_lr(optimizer.param_groups[0]),
                  "grad_norm": gnorm, "iter_ms": sec * 1e3, "tokens_per_s": tokens / sec,
                  "tflops_per_gpu": flops_per_seq * d.global_batch_size / sec / world / 1e12,
                  "consumed_samples": it * d.global_batch_size,
                  "global_batch_size": d.global_batch_size, "skipped": not ok, **memory_mb()}
        history.append(values)
        logger.step(it, values, print_line=(it % cfg.logging.log_interval == 0 or it == t.train_iters))
        if make_valid is not None and t.eval_interval and it % t.eval_interval == 0 and it < t.train_iters:
            val_loss = evaluate(cfg, model, make_valid, nmb)
            logger.record("valid", it, {"lm_loss": val_loss})
            logger.print(f" validation loss at iteration {it}: {val_loss:.6E} | ppl: {math.exp(min(val_loss, 50)):.3f}")
        if c.save and ((c.save_interval and it % c.save_interval == 0) or it == t.train_iters):
            save_fn(it)
        if t.exit_interval and it % t.exit_interval == 0 and it < t.train_iters:
            if c.save and not (c.save_interval and it % c.save_interval == 0):
                save_fn(it)
            stop = f"exit_interval={t.exit_interval}"
            break
    if make_valid is not None and stop == "done":
        val_loss = evaluate(cfg, model, make_valid, nmb)
        logger.record("valid", t.train_iters, {"lm_loss": val_loss})
    summary = {"iterations": len(history), "seconds": time.perf_counter() - t_start,
               "valid_loss": val_loss, "stop": stop, **summarize(history)}
    if history:
        summary["tokens_per_s"] = len(history) * d.global_batch_size * d.seq_length / summary["seconds"]
    return summary
