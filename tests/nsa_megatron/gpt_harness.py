"""A tiny NSA GPTModel trained one step under any Megatron layout, for equality tests.

``reference_worker`` runs the model in a world of one and saves its weights, loss and
gradients; ``layout_worker`` builds the same model under TP/PP/DP/EP/recompute, loads the
reference weights (each rank its slice), runs one forward/backward through Megatron's
DDP + pipeline schedule + ``finalize_model_grads`` and returns the largest relative
differences from the reference. Both run inside ``tests.distributed_utils.run_distributed``.
"""
from __future__ import annotations

import re
from functools import partial

import torch

# Imported here (not lazily) so forked workers inherit them instead of re-importing.
from megatron.core import parallel_state  # noqa: F401
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads  # noqa: F401
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: F401
from megatron.core.transformer.moe import moe_layer  # noqa: F401

import nsa_megatron.model  # noqa: F401
from nsa_megatron.compat import apply_cpu_compat  # noqa: F401
from tests.distributed_utils import init_megatron

VOCAB, SEQ, GLOBAL_BATCH, MICRO_BATCH = 128, 128, 4, 2

TINY = dict(
    num_layers=2,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_query_groups=2,
    nsa_cmp_block=16,
    nsa_cmp_stride=8,
    nsa_slc_block=32,
    nsa_topk=4,
    nsa_window=64,
    nsa_v_head_dim=24,
    nsa_backend="reference",
    hidden_dropout=0.0,
    attention_dropout=0.0,
    use_cpu_initialization=True,
    params_dtype=torch.float32,
    pipeline_dtype=torch.float32,
    init_method_std=0.05,
)

MOE = dict(
    num_moe_experts=4,
    moe_router_topk=2,
    moe_aux_loss_coeff=0.0,
    moe_router_load_balancing_type="none",
    moe_token_dispatcher_type="allgather",  # alltoall passes tensor split sizes, which gloo rejects
    moe_ffn_hidden_size=64,
    add_bias_linear=False,  # megatron 0.16 SequentialMLP adds expert bias in place on a TP view
)

PARALLEL_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")


def make_config(**overrides):
    """NSAConfig of the tiny test model (fields of TINY overridden by ``overrides``)."""
    from nsa_megatron.config import NSAConfig

    return NSAConfig(**{**TINY, **overrides})


def global_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens, labels: int64 [GLOBAL_BATCH, SEQ] (labels = next token)."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def _build(cfg):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from nsa_megatron.model import gpt_model_provider

    model = gpt_model_provider(
        cfg, VOCAB, SEQ, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
    )
    ddp = DistributedDataParallel(
        config=cfg,
        ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False),
        module=model,
    )
    return model, ddp


def _global_name(model, name: str) -> str:
    """Local parameter name -> the name it has in the one-rank reference model."""
    from megatron.core import parallel_state as ps

    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if m:
        layer = model.decoder.layers[int(m.group(1))]
        name = f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"
        e = re.match(r"(.*mlp\.experts\.local_experts\.)(\d+)\.(.*)", name)
        if e:
            local = len(layer.mlp.experts.local_experts)
            idx = ps.get_expert_model_parallel_rank() * local + int(e.group(2))
            name = f"{e.group(1)}{idx}.{e.group(3)}"
    return name


def _local_slice(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a reference tensor (TP-sharded params split along partition_dim)."""
    from megatron.core import parallel_state as ps

    if tuple(full.shape) == tuple(param.shape):
        return full
    dim = getattr(param, "partition_dim", 0)
    parts = full.shape[dim] // param.shape[dim]
    if getattr(param, "allreduce", True) is False:  # expert weights: expert-TP rank
        rank = ps.get_expert_tensor_parallel_rank()
    else:
        rank = ps.get_tensor_model_parallel_rank()
    return full.chunk(parts, dim=dim)[rank % parts]


def _train_step(cfg, model, ddp) -> float:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tokens, labels = global_batch()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_dp = GLOBAL_BATCH // dp
    tokens, labels = (x[dp_rank * per_dp : (dp_rank + 1) * per_dp] for x in (tokens, labels))
    micro = list(zip(tokens.split(MICRO_BATCH), labels.split(MICRO_BATCH)))
    positions = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach().clone()}  # the schedule scales loss in place

    def forward_step(data_iterator, module):
        tok, lab = next(data_iterator)
        return module(tok, positions, None, labels=lab), loss_func

    ddp.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=[ddp],
        num_microbatches=len(micro),
        seq_length=SEQ,
        micro_batch_size=MICRO_BATCH,
        forward_only=False,
    )
    finalize_model_grads([ddp])
    loss = torch.zeros(1)
    if ps.is_pipeline_last_stage():
        loss += torch.stack([d["lm loss"] for d in losses]).mean()
        torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
        loss /= dp
    return float(loss)


def reference_worker(rank: int, world_size: int, overrides: dict, path: str) -> float:
    """World of one: build, save weights/grads/loss to ``path``; returns the loss."""
    init_megatron()
    cfg = make_config(**overrides)
    model, ddp = _build(cfg)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = _train_step(cfg, model, ddp)
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
    torch.save({"weights": weights, "grads": grads, "loss": loss}, path)
    return loss


def layout_worker(rank: int, world_size: int, overrides: dict, ref_path: str) -> dict:
    """One rank of a parallel layout: load the reference slice, step, compare.

    Returns {"loss": float | None (non-last PP stages), "grad_err": {name: rel err},
    "checked": number of parameters compared}.
    """
    parallel = {k: overrides.get(k, 1) for k in PARALLEL_KEYS}
    init_megatron(
        tensor_model_parallel_size=parallel["tensor_model_parallel_size"],
        pipeline_model_parallel_size=parallel["pipeline_model_parallel_size"],
        expert_model_parallel_size=parallel["expert_model_parallel_size"],
    )
    from megatron.core import parallel_state as ps

    cfg = make_config(**overrides)
    ref = torch.load(ref_path, weights_only=False)
    model, ddp = _build(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_local_slice(ref["weights"][_global_name(model, name)], p))
    loss = _train_step(cfg, model, ddp)
    errors = {}
    for name, p in model.named_parameters():
        want = _local_slice(ref["grads"][_global_name(model, name)], p)
        errors[name] = float((p.main_grad - want).norm() / want.norm().clamp_min(1e-12))
    return {
        "loss": loss if ps.is_pipeline_last_stage() else None,
        "grad_err": errors,
        "checked": len(errors),
    }
