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

Two ``pretrain()`` APIs exist and ``main()`` detects which one is installed:

* classic Megatron-LM: ``pretrain(datasets_provider, model_provider, model_type, forward_step,
  extra_args_provider=..., args_defaults=...)`` parses the command line itself;
* config container (the ``megatron.training`` shipped in the megatron-core 0.19 wheel):
  ``pretrain(cfg_container, datasets_provider, model_type, forward_step, model_provider=...)``;
  the command line is parsed first (``parse_and_validate_args`` with ``add_nsa_args``) and
  turned into a ``PretrainConfigContainer`` whose ``model`` is left empty, so Megatron builds
  the model with ``nsa_model_provider``.

In your own script on the container API::

    args = parse_megatron_args()
    pretrain(build_config_container(args), datasets_provider, ModelType.encoder_or_decoder,
             forward_step, model_provider=nsa_model_provider)

Without TransformerEngine and Apex, add ``--transformer-impl local --no-rope-fusion
--no-gradient-accumulation-fusion --no-persist-layer-norm`` (Megatron's defaults ask for their
fused kernels). On megatron-core 0.19 also pass ``--eval-interval`` (its default, None, breaks
the sample-count arithmetic inside ``pretrain()``).

``megatron.training`` (Megatron-LM, shipped in the megatron-core wheel from 0.19 on Python
3.12) is imported only inside functions, so this module imports anywhere.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
from functools import partial
from typing import Any, Callable, Dict, Optional

ARGS_DEFAULTS: Dict[str, Any] = {"tokenizer_type": "GPT2BPETokenizer"}
"""Defaults applied to Megatron-LM's parsed args when the command line leaves them unset."""

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
    ``--transformer-impl local`` builds Megatron's local modules even where
    TransformerEngine imports; any other value uses TE when it imports.
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
        use_te=False if getattr(margs, "transformer_impl", None) == "local" else None,
    )


def _loss_func(loss_mask, output_tensor):
    import torch

    losses = output_tensor.view(-1).float()
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask)
    num_tokens = mask.sum().clone().detach().to(torch.int)
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


_BATCH_DTYPES = {"tokens": "int64", "labels": "int64", "loss_mask": "float32", "position_ids": "int64"}


def get_batch(data_iterator) -> Optional[Dict[str, Any]]:
    """This rank's micro batch: read on TP rank 0, broadcast over TP, zig-zag sliced over CP.

    Written against ``parallel_state`` and ``torch.distributed`` only, because the batch
    helpers of ``megatron.training`` / ``megatron.core.utils`` changed signature between
    versions. Returns None on pipeline stages that are neither first nor last (they receive
    activations, not tokens).

    Returns:
        dict with ``tokens``, ``labels``, ``position_ids`` (int64 [b, s]), ``loss_mask``
        (float32 [b, s]) and ``attention_mask`` (bool [b, 1, s, s], or None unless
        ``--create-attention-mask-in-dataloader``), on the current CUDA device (CPU without CUDA).
    """
    import torch
    from megatron.core import parallel_state as ps
    from megatron.training import get_args

    from nsa_megatron.context_parallel.layout import ZigzagLayout

    if not (ps.is_pipeline_first_stage() or ps.is_pipeline_last_stage()):
        return None
    args = get_args()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    b, s = args.micro_batch_size, args.seq_length
    shapes = {k: ((b, s), getattr(torch, d)) for k, d in _BATCH_DTYPES.items()}
    if args.create_attention_mask_in_dataloader:
        shapes["attention_mask"] = ((b, 1, s, s), torch.bool)
    if ps.get_tensor_model_parallel_rank() == 0:
        data = next(data_iterator)
        batch = {k: data[k].to(device=device, dtype=dtype, non_blocking=True) for k, (_, dtype) in shapes.items()}
    else:
        batch = {k: torch.empty(shape, dtype=dtype, device=device) for k, (shape, dtype) in shapes.items()}
    if ps.get_tensor_model_parallel_world_size() > 1:
        src, group = ps.get_tensor_model_parallel_src_rank(), ps.get_tensor_model_parallel_group()
        for tensor in batch.values():
            torch.distributed.broadcast(tensor, src, group=group)
    cp = ps.get_context_parallel_world_size()
    if cp > 1:
        index = ZigzagLayout([batch["tokens"].shape[1]], cp).global_to_local_index(
            ps.get_context_parallel_rank(), device)
        for key in _BATCH_DTYPES:
            batch[key] = batch[key].index_select(1, index)
        if "attention_mask" in batch:
            batch["attention_mask"] = batch["attention_mask"].index_select(2, index)
    batch.setdefault("attention_mask", None)
    return batch


def forward_step(data_iterator, model):
    """Megatron-LM forward step: TP-broadcast batch, CP slice, model, token-summed loss."""
    batch = get_batch(data_iterator)
    if batch is None:
        tokens = labels = loss_mask = attention_mask = position_ids = None
    else:
        tokens, labels, loss_mask = batch["tokens"], batch["labels"], batch["loss_mask"]
        attention_mask, position_ids = batch["attention_mask"], batch["position_ids"]
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


def pretrain_api(pretrain_fn: Callable) -> str:
    """Which ``megatron.training.pretrain`` signature ``pretrain_fn`` has.

    Returns:
        ``"classic"`` (``extra_args_provider`` / ``args_defaults`` keywords, parses the
        command line itself) or ``"container"`` (first parameter ``cfg_container``).
    Raises:
        RuntimeError naming the signature when it is neither.
    """
    params = inspect.signature(pretrain_fn).parameters
    if "extra_args_provider" in params:
        return "classic"
    if next(iter(params), None) == "cfg_container":
        return "container"
    raise RuntimeError(f"megatron.training.pretrain{inspect.signature(pretrain_fn)}: unknown pretrain() API, "
                       "expected extra_args_provider= (Megatron-LM) or a leading cfg_container")


def parse_megatron_args(args_defaults: Optional[Dict[str, Any]] = None):
    """Container API: parse and validate the command line (Megatron-LM flags + NSA flags).

    Sets Megatron's global args, tokenizer and timers, as ``pretrain()`` of the classic API
    does internally. Only for the container API (``megatron.training.arguments`` with
    ``parse_and_validate_args``).

    Args:
        args_defaults: values for args the command line leaves unset (default ``ARGS_DEFAULTS``).
    Returns:
        The validated ``argparse.Namespace`` (also ``megatron.training.get_args()``).
    """
    from megatron.training.arguments import parse_and_validate_args

    defaults = dict(ARGS_DEFAULTS if args_defaults is None else args_defaults)
    return parse_and_validate_args(extra_args_provider=add_nsa_args, args_defaults=defaults)


def build_config_container(args):
    """Container API: the ``PretrainConfigContainer`` for ``pretrain()`` from parsed args.

    ``model`` is left None on purpose: Megatron's ``setup_model_and_optimizer`` then builds
    the model with the ``model_provider`` passed to ``pretrain()`` (``nsa_model_provider``,
    which makes the NSAConfig from the same args), instead of its own GPT builder that knows
    no NSA layers. Building the container without a model config makes Megatron warn that
    a ModelConfig is recommended; that warning is expected here.

    Args:
        args: namespace from ``parse_megatron_args``.
    Returns:
        PretrainConfigContainer (train, optimizer, scheduler, DDP, checkpoint, logger ... configs).
    """
    import warnings

    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*recommended to use a ModelConfig")
        return pretrain_cfg_container_from_args(args, None)


def use_prebuilt_dataset_helpers() -> bool:
    """Skip Megatron's run-time ``make`` of the dataset helpers when the wheel ships them built.

    megatron-core wheels carry ``helpers_cpp`` compiled but no Makefile, so
    ``compile_helpers()`` (called by ``initialize_megatron``) fails there. Returns True when
    the prebuilt extension imports and the compile step was replaced.
    """
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return False
    import megatron.core.datasets.utils as dataset_utils

    dataset_utils.compile_helpers = lambda: None
    return True


def main() -> None:
    """``pretrain_gpt.py`` with NSA: all Megatron-LM flags plus the NSA ones, either pretrain API."""
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    use_prebuilt_dataset_helpers()

    if pretrain_api(pretrain) == "classic":
        pretrain(datasets_provider, nsa_model_provider, ModelType.encoder_or_decoder, forward_step,
                 args_defaults=dict(ARGS_DEFAULTS), extra_args_provider=add_nsa_args)
        return
    cfg_container = build_config_container(parse_megatron_args())
    pretrain(cfg_container, datasets_provider, ModelType.encoder_or_decoder, forward_step,
             model_provider=nsa_model_provider)


if __name__ == "__main__":
    main()
