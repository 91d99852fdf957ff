"""NSA for Megatron-LM users: a model provider and ``extra_args_provider`` for
``megatron.training.pretrain()``, plus a ready ``pretrain_gpt``-style main.

Keep your own Megatron-LM launcher and flags, and add the NSA ones::

    torchrun --nproc-per-node 8 launch/megatron_lm.py <your usual pretrain_gpt.py flags> \\
        --attention-type nsa --nsa-cmp-block 32 --nsa-cmp-stride 16 --nsa-slc-block 64 \\
        --nsa-topk 16 --nsa-window 512

or, in your own script::

    from nsa_launch.megatron_lm import add_nsa_args, nsa_model_provider
    pretrain(datasets_provider, nsa_model_provider, ModelType.encoder_or_decoder, forward_step,
             extra_args_provider=add_nsa_args)

``megatron.training`` (Megatron-LM, shipped in the megatron-core wheel from 0.19 on Python
3.12) is imported only inside functions, so this module imports anywhere.
"""
from __future__ import annotations

import argparse
import dataclasses
from functools import partial

NSA_FLAGS = ("cmp_block", "cmp_stride", "slc_block", "topk", "window", "init_blocks",
             "local_blocks", "compressor", "branch_kv", "backend", "v_head_dim", "cp_mode")


def add_nsa_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``extra_args_provider``: ``--attention-type`` and ``--nsa-*`` flags, defaults from NSAConfig.

    Each flag's destination equals the NSAConfig field name, so Megatron-LM's
    ``core_transformer_config_from_args(args, NSAConfig)`` copies them into the config.
    """
    from nsa_megatron.config import NSAConfig

    defaults = {f.name: f.default for f in dataclasses.fields(NSAConfig)}
    group = parser.add_argument_group("NSA", "Native Sparse Attention (nsa_megatron)")
    group.add_argument("--attention-type", choices=("nsa", "full"), default=defaults["attention_type"],
                       help="nsa: sparse attention in every layer not in --nsa-dense-layers; full: dense baseline")
    for name in NSA_FLAGS:
        field = f"nsa_{name}"
        default = defaults[field]
        kind = str if isinstance(default, str) else int
        group.add_argument(f"--nsa-{name.replace('_', '-')}", dest=field, type=kind, default=default,
                           help=f"NSAConfig.{field} (default {default!r})")
    group.add_argument("--nsa-dense-layers", dest="nsa_dense_layers", type=int, nargs="*", default=None,
                       help="0-based layers that keep full attention")
    return parser


def nsa_model_provider(pre_process: bool = True, post_process: bool = True, vp_stage=None, **_unused):
    """Model provider for ``megatron.training.pretrain``: an NSA GPTModel from the parsed args.

    Extra keyword arguments newer Megatron-LM versions pass (``config``, ``pg_collection``)
    are accepted and ignored: the config is rebuilt from the args as NSAConfig.
    """
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    from nsa_megatron.config import NSAConfig
    from nsa_megatron.model import gpt_model_provider

    margs = get_args()
    config = core_transformer_config_from_args(margs, NSAConfig)
    return gpt_model_provider(
        config, margs.padded_vocab_size, margs.max_position_embeddings,
        pre_process=pre_process, post_process=post_process, parallel_output=True,
        position_embedding_type=margs.position_embedding_type,
        share_embeddings_and_output_weights=not margs.untie_embeddings_and_output_weights,
        rotary_base=margs.rotary_base, vp_stage=vp_stage,
    )


def _loss_func(loss_mask, output_tensor):
    import torch

    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model):
    """Megatron-LM forward step: TP-broadcast batch, CP slice, model, token-summed loss."""
    from megatron.core import parallel_state
    from megatron.training.utils import get_batch_on_this_cp_rank, get_batch_on_this_tp_rank

    if parallel_state.is_pipeline_first_stage() or parallel_state.is_pipeline_last_stage():
        batch = get_batch_on_this_cp_rank(get_batch_on_this_tp_rank(data_iterator))
        tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch["loss_mask"]
        attention_mask, position_ids = batch.get("attention_mask"), batch["position_ids"]
    else:
        tokens = labels = loss_mask = attention_mask = position_ids = None
    output = model(tokens, position_ids, attention_mask, labels=labels)
    return output, partial(_loss_func, loss_mask)


def datasets_provider(train_val_test_num_samples, vp_stage=None):
    """GPT datasets from Megatron-LM's ``--data-path`` / ``--split`` / ``--*-data-path`` args."""
    from megatron.core import parallel_state
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
    from megatron.training import get_args, get_tokenizer
    from megatron.training.utils import get_blend_and_blend_per_split

    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend,
        blend_per_split=blend_per_split, split=args.split, path_to_cache=args.data_cache_path,
        tokenizer=get_tokenizer(), reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask, eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
    )

    def built_here():
        first_or_last = parallel_state.is_pipeline_first_stage() or parallel_state.is_pipeline_last_stage()
        return first_or_last and parallel_state.get_tensor_model_parallel_rank() == 0

    cls = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, train_val_test_num_samples, built_here, config).build()


datasets_provider.is_distributed = True


def main() -> None:
    """``pretrain_gpt.py`` with NSA: all Megatron-LM flags plus the NSA ones."""
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    pretrain(datasets_provider, nsa_model_provider, ModelType.encoder_or_decoder, forward_step,
             args_defaults={"tokenizer_type": "GPT2BPETokenizer"}, extra_args_provider=add_nsa_args)


if __name__ == "__main__":
    main()
