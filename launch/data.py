"""Training and validation data: Megatron GPT datasets over indexed ``.bin``/``.idx`` files.

Sample order is a pure function of (seed, consumed samples), so a resumed run reads exactly
the batches the uninterrupted run would have read.
"""
from __future__ import annotations

import os
from typing import Dict, Iterator, Optional, Tuple

import torch
import torch.distributed as dist

from nsa_launch.config_loader import ConfigError, RunConfig

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def resolve_data_paths(cfg: RunConfig) -> Tuple[str, Optional[str]]:
    """Return (train prefix, valid prefix or None); build the embedded corpus when none is given.

    Global rank 0 builds the corpus (into ``data.cache_dir``, which must be visible to every
    node) and broadcasts the prefixes; call it on every rank.
    """
    d = cfg.data
    if d.train_data_path:
        for prefix in (d.train_data_path, d.valid_data_path):
            if prefix and not (os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")):
                raise ConfigError(f"data path {prefix!r}: {prefix}.bin / {prefix}.idx not found")
        return d.train_data_path, d.valid_data_path
    from nsa_tools.build_corpus import ensure_corpus

    paths = [None, None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        paths = list(ensure_corpus(d.cache_dir, d.tokenizer, d.corpus_max_mb))
    if dist.is_initialized():
        dist.broadcast_object_list(paths, src=0)
    return paths[0], paths[1]


def build_datasets(cfg: RunConfig, tokenizer, train_prefix: str, valid_prefix: Optional[str]):
    """Build Megatron ``GPTDataset`` objects for the train split and (optionally) validation.

    The train set holds ``train_iters * global_batch_size`` samples (epochs repeat as needed);
    the validation set ``eval_iters * global_batch_size`` fixed samples, so every evaluation
    sees the same tokens.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    d, t = cfg.data, cfg.training
    if t.eval_iters == 0:
        valid_prefix = None  # evaluation switched off
    n_train = t.train_iters * d.global_batch_size
    n_valid = t.eval_iters * d.global_batch_size if valid_prefix else 0
    ds_config = GPTDatasetConfig(
        random_seed=t.seed,
        sequence_length=d.seq_length,
        blend_per_split=[([train_prefix], None), ([valid_prefix], None) if valid_prefix else None, None],
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=os.path.join(d.cache_dir, "index"),
        mid_level_dataset_surplus=0.005,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [n_train, n_valid, None], lambda: True, ds_config
    ).build()
    return train, valid


def mask_loss_before(batch: Dict[str, torch.Tensor], token: int) -> Dict[str, torch.Tensor]:
    """Zero ``loss_mask`` [b, s] before the first ``token`` in each row of ``tokens`` [b, s]
    (rows without it get no loss), so only the labels from that token on are trained."""
    hit = batch["tokens"] == token
    seen = hit.cumsum(dim=1) > 0
    batch["loss_mask"] = batch["loss_mask"] * seen.to(batch["loss_mask"].dtype)
    return batch


def micro_batches(dataset, start_sample: int, global_batch_size: int, micro_batch_size: int,
                  dp_rank: int, dp_size: int, loss_from_token: Optional[int] = None
                  ) -> Iterator[Dict[str, torch.Tensor]]:
    """Yield this data-parallel rank's micro batches, global batch after global batch.

    Global batch k covers samples ``[start + k*G, start + (k+1)*G)``; DP rank r takes the
    r-th contiguous slice of G / dp_size samples, cut into micro batches of
    ``micro_batch_size``. Indices wrap around the dataset's length. With ``loss_from_token``
    the loss mask starts at that token's first occurrence (:func:`mask_loss_before`).

    Yields:
        dict of int64 ``tokens``/``labels``/``position_ids`` and float ``loss_mask``, each [b, s].
    """
    per_rank = global_batch_size // dp_size
    base = start_sample
    n = len(dataset)
    while True:
        first = base + dp_rank * per_rank
        for m in range(0, per_rank, micro_batch_size):
            samples = [dataset[(first + m + i) % n] for i in range(micro_batch_size)]
            batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in BATCH_KEYS}
            yield batch if loss_from_token is None else mask_loss_before(batch, loss_from_token)
        base += global_batch_size
