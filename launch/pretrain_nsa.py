"""Pretrain an NSA GPT with megatron-core.

    python launch/pretrain_nsa.py --config configs/tiny_cpu.yaml [key=value ...] [--megatron-flags]
    torchrun --nproc-per-node 8 launch/pretrain_nsa.py --config configs/nsa_1b_64k_h100.yaml

Config keys and overrides are described in ``launch/config_loader.py``; launchers for
torchrun, SLURM and MPI live beside this file (see ``launch/README.md``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import List, Optional


# MKL picks GEMM code paths by memory alignment unless told otherwise; AUTO makes results
# independent of where tensors land, so a resumed run matches the uninterrupted one bit for bit.
os.environ.setdefault("MKL_CBWR", "AUTO")


def parse_cli(argv: Optional[List[str]]):
    """``--config PATH`` plus free-form overrides (``key=value`` / ``--flag [value]``)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--config", default=None, help="YAML config (see configs/)")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print it, exit")
    return p.parse_known_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Run training; returns the process exit code (2 for configuration errors)."""
    # megatron-core warns at import about optional TE/apex fall-backs; they are expected here.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    args, overrides = parse_cli(argv)
    from nsa_launch.config_loader import ConfigError, build_model_config, load_config, to_flat_dict

    try:
        cfg = load_config(args.config, overrides)
        import torch

        config = build_model_config(cfg, use_cpu_initialization=not torch.cuda.is_available())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for key, value in to_flat_dict(cfg).items():
            print(f"{key} = {value!r}")
        return 0
    try:
        return _train(cfg, config, to_flat_dict(cfg))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _train(cfg, config, flat) -> int:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    from nsa_launch import checkpointing, distributed, training
    from nsa_launch.config_loader import ConfigError
    from nsa_launch.data import build_datasets, resolve_data_paths
    from nsa_launch.flops import train_flops_per_sequence
    from nsa_launch.logging_utils import TrainLogger
    from nsa_tools.tokenizer import load_tokenizer

    if not torch.cuda.is_available():
        from nsa_megatron.compat import apply_cpu_compat

        apply_cpu_compat()
    p, d = cfg.parallel, cfg.data
    denv = distributed.init_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                                        p.context_parallel_size, p.expert_model_parallel_size)
    dp = parallel_state.get_data_parallel_world_size()
    if d.global_batch_size % (d.micro_batch_size * dp) != 0:
        raise ConfigError(f"data.global_batch_size={d.global_batch_size}: must be a multiple of "
                          f"micro_batch_size * data-parallel size ({d.micro_batch_size}*{dp})")
    log_rank = denv.world_size - 1
    logger_on = denv.rank == log_rank
    try:
        tokenizer = load_tokenizer(d.tokenizer)
    except ValueError as exc:
        raise ConfigError(f"data.tokenizer: {exc}") from None
    train_prefix, valid_prefix = resolve_data_paths(cfg)
    train_ds, valid_ds = build_datasets(cfg, tokenizer, train_prefix, valid_prefix)
    vocab = training.padded_vocab_size(tokenizer.vocab_size, d.make_vocab_size_divisible_by,
                                       p.tensor_model_parallel_size)
    training.reseed(cfg.training.seed, 0)
    model = training.build_model(cfg, config, vocab)
    optimizer, scheduler = training.build_optimizer(cfg, config, model)
    training.wire_config(config, model, optimizer)

    c = cfg.checkpoint
    load_dir = None if c.no_load else (c.load or c.save)
    resumed = checkpointing.load_checkpoint(load_dir, model, optimizer, scheduler) if load_dir else None
    start = resumed["iteration"] if resumed else 0
    logger = TrainLogger(logger_on, cfg.training.train_iters, start, cfg.logging.progress_bar,
                         cfg.logging.tensorboard_dir, cfg.logging.metrics_file)
    n_params = sum(prm.numel() for prm in model.parameters())
    flops_seq = train_flops_per_sequence(config, d.seq_length, vocab)
    logger.print(f"> {config.attention_type} GPT: {config.num_layers} layers, hidden {config.hidden_size}, "
                 f"{n_params / 1e6:.2f}M parameters on this rank, vocab {vocab}, seq {d.seq_length}; "
                 f"world {denv.world_size} ({denv.launcher}, {dist.get_backend()}): tp {p.tensor_model_parallel_size} "
                 f"pp {p.pipeline_model_parallel_size} cp {p.context_parallel_size} dp {dp}")
    logger.print(f"> data: train {train_prefix} ({len(train_ds)} samples), valid {valid_prefix}")
    if resumed:
        logger.print(f"> resumed from {checkpointing.iteration_dir(load_dir, start)} (iteration {start})")

    def save_fn(it: int) -> None:
        t0 = time.perf_counter()
        path = checkpointing.save_checkpoint(c.save, it, model, optimizer, scheduler,
                                             {"config": flat, "consumed_samples": it * d.global_batch_size})
        logger.print(f"> saved checkpoint {path} ({time.perf_counter() - t0:.1f} s)")

    summary = training.loop(cfg, model, optimizer, scheduler, start, train_ds, valid_ds, logger,
                            flops_seq, save_fn, parallel_state.get_data_parallel_rank(), dp)
    if summary.get("iterations"):
        logger.print(
            f"> summary: {summary['iterations']} iterations (to {start + summary['iterations']}) in "
            f"{summary['seconds']:.1f} s, {summary['tokens_per_s']:.0f} tokens/s | train loss "
            f"{summary['first_loss']:.4f} -> {summary['last_loss']:.4f} (mean of last 10: "
            f"{summary['tail_mean_loss']:.4f}) | valid loss "
            + (f"{summary['valid_loss']:.4f}" if summary["valid_loss"] is not None else "n/a")
            + (f" | checkpoint {c.save}" if c.save else "") + f" | stop: {summary['stop']}")
    else:
        logger.print(f"> nothing to do: already at iteration {start} of {cfg.training.train_iters}")
    logger.close()
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
