"""A tiny NSA GPTModel trained one step under any Megatron layout, for equality tests.

``reference_worker`` runs the model in a world of one and saves its weights, loss and
gradients; ``layout_worker`` builds the same model under TP/PP/DP/EP/recompute, loads the
reference weights (each rank its slice), runs one forward/backward through Megatron's
DDP + pipeline schedule + ``finalize_model_grads`` and returns the largest relative
differences from the reference. Both run inside ``tests.distributed_utils.run_distributed``.

Context parallelism (``context_parallel_size`` in the overrides): each micro batch is cut
with Megatron's ``get_batch_on_this_cp_rank`` (zig-zag, 2*cp chunks) and the loss follows
Megatron's legacy convention (local token mean / cp; the schedule multiplies by cp and DDP
averages over DP x CP), so every layout optimises the same global token mean. The override
``seq_length`` (not a config field) changes the sequence length from ``SEQ``;
``packed_seqlens`` (lengths summing to MICRO_BATCH * seq_length) turns every micro batch into
one THD pack of those sequences (Megatron ``PackedSeqParams`` with global ``cu_seqlens``;
under CP each sequence is split zig-zag, as Megatron does for THD).
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

PARALLEL_KEYS = (
    "tensor_model_parallel_size",
    "pipeline_model_parallel_size",
    "expert_model_parallel_size",
    "context_parallel_size",
)
HARNESS_KEYS = ("seq_length", "packed_seqlens")
"""Override keys the harness consumes itself (not NSAConfig fields)."""


def split_overrides(overrides: dict) -> tuple[dict, int]:
    """(NSAConfig overrides, sequence length) from a test's overrides."""
    cfg = {k: v for k, v in overrides.items() if k not in HARNESS_KEYS}
    return cfg, int(overrides.get("seq_length", SEQ))


def _packed_micro(tok, lab, seqlens, cp: int, cp_rank: int):
    """A micro batch [MICRO_BATCH, s] as one THD pack [1, T/cp] of ``seqlens``, this CP rank's share."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from nsa_megatron.context_parallel import zigzag_split

    if sum(seqlens) != tok.numel():
        raise ValueError(f"packed_seqlens={list(seqlens)}: must sum to {tok.numel()} tokens per micro batch")
    cu = torch.tensor([0] + list(seqlens)).cumsum(0).to(torch.int32)
    pos = torch.cat([torch.arange(n) for n in seqlens])
    tok, lab, pos = (zigzag_split(x.reshape(-1), cu, cp, cp_rank)[None] for x in (tok, lab, pos))
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=max(seqlens), max_seqlen_kv=max(seqlens))
    return tok, lab, pos, psp


def make_config(**overrides):
    """NSAConfig of the tiny test model (fields of TINY overridden by ``overrides``)."""
    from nsa_megatron.config import NSAConfig

    return NSAConfig(**{**TINY, **overrides})


def global_batch(seed: int = 0, seq_length: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens, labels: int64 [GLOBAL_BATCH, seq_length] (labels = next token)."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, VOCAB, (GLOBAL_BATCH, seq_length + 1), generator=g)
    return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()


def _build(cfg, seq_length: int = SEQ):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from nsa_megatron.model import gpt_model_provider

    model = gpt_model_provider(
        cfg, VOCAB, seq_length, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
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


def _train_step(cfg, model, ddp, seq_length: int = SEQ, packed_seqlens=None) -> float:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_batch_on_this_cp_rank

    tokens, labels = global_batch(seq_length=seq_length)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    cp = ps.get_context_parallel_world_size()
    per_dp = GLOBAL_BATCH // dp
    tokens, labels = (x[dp_rank * per_dp : (dp_rank + 1) * per_dp] for x in (tokens, labels))
    micro = list(zip(tokens.split(MICRO_BATCH), labels.split(MICRO_BATCH)))
    positions = torch.arange(seq_length).expand(MICRO_BATCH, seq_length)

    def loss_func(output):
        loss = output.float().mean() / cp  # the schedule multiplies by cp; DDP averages over DP x CP
        reported = loss.detach().clone()  # the schedule scales loss in place
        if cp > 1:
            torch.distributed.all_reduce(reported, group=ps.get_context_parallel_group())
        return loss, {"lm loss": reported}

    def forward_step(data_iterator, module):
        tok, lab = next(data_iterator)
        if packed_seqlens is not None:
            tok, lab, pos, psp = _packed_micro(tok, lab, packed_seqlens, cp, ps.get_context_parallel_rank())
            return module(tok, pos, None, labels=lab, packed_seq_params=psp), loss_func
        batch = {"tokens": tok, "labels": lab, "position_ids": positions}
        if cp > 1:
            batch = get_batch_on_this_cp_rank(batch)  # zig-zag: chunks r and 2cp-1-r of 2cp
        return module(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]), loss_func

    ddp.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(micro),
        model=[ddp],
        num_microbatches=len(micro),
        # global lengths; the schedule divides by cp for the pipeline's p2p shapes
        seq_length=seq_length if packed_seqlens is None else MICRO_BATCH * seq_length,
        micro_batch_size=MICRO_BATCH if packed_seqlens is None else 1,
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
    cfg_overrides, seq_length = split_overrides(overrides)
    cfg = make_config(**cfg_overrides)
    model, ddp = _build(cfg, max([seq_length, *overrides.get("packed_seqlens", ())]))
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = _train_step(cfg, model, ddp, seq_length, overrides.get("packed_seqlens"))
    grads = {n: p.main_grad.detach().clone() for n, p in model.named_parameters()}
    torch.save({"weights": weights, "grads": grads, "loss": loss}, path)
    return loss


def layout_worker(rank: int, world_size: int, overrides: dict, ref_path: str) -> dict:
    """One rank of a parallel layout: load the reference slice, step, compare.

    Returns {"loss": float | None (non-last PP stages), "grad_err": {name: rel err},
    "checked": number of parameters compared, "cp_bytes": ``collect_cp_bytes`` of the step}.
    """
    parallel = {k: overrides.get(k, 1) for k in PARALLEL_KEYS}
    init_megatron(**parallel)
    from megatron.core import parallel_state as ps

    from nsa_megatron.context_parallel import collect_cp_bytes

    cfg_overrides, seq_length = split_overrides(overrides)
    cfg = make_config(**cfg_overrides)
    ref = torch.load(ref_path, weights_only=False)
    model, ddp = _build(cfg, max([seq_length, *overrides.get("packed_seqlens", ())]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_local_slice(ref["weights"][_global_name(model, name)], p))
    loss = _train_step(cfg, model, ddp, seq_length, overrides.get("packed_seqlens"))
    errors = {}
    for name, p in model.named_parameters():
        want = _local_slice(ref["grads"][_global_name(model, name)], p)
        errors[name] = float((p.main_grad - want).norm() / want.norm().clamp_min(1e-12))
    return {
        "loss": loss if ps.is_pipeline_last_stage() else None,
        "grad_err": errors,
        "checked": len(errors),
        "cp_bytes": collect_cp_bytes(model, reset=True),
    }
