"""``nsa_attention_cp``: NSA attention over a CP group, each rank holding its zig-zag share."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist

from nsa_kernels.host_cache import host_list
from nsa_kernels.validation import NSAHyperParams

from .allgather import allgather_attention
from .branches import get_branches
from .comm import GLOBAL_COUNTERS, CommCounters
from .common import CPContext, compress_and_gather, tie_outputs
from .layout import ZigzagLayout
from .plan import static_plan
from .ring import ring_attention

__all__ = ["nsa_attention_cp", "CP_MODES"]

CP_MODES = ("ring", "allgather")
_HP_NAMES = ("cmp_block", "cmp_stride", "slc_block", "topk", "window", "init_blocks", "local_blocks")


def _check(name: str, x, rows: int, heads: Optional[int], ref: torch.Tensor, last: Optional[int] = None):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[0] != rows or (heads is not None and x.shape[1] != heads):
        raise ValueError(f"{name} must be [{rows}, {heads if heads is not None else 'H'}, D] "
                         f"(this rank's tokens), got {tuple(x.shape)}")
    if last is not None and x.shape[2] != last:
        raise ValueError(f"{name} must have last dim {last}, got {tuple(x.shape)}")
    if x.device != ref.device or x.dtype != ref.dtype:
        raise ValueError(f"{name} is {x.dtype} on {x.device}, q is {ref.dtype} on {ref.device}")




def _host_bounds(cu_seqlens: torch.Tensor) -> list[int]:
    """Host copy of ``cu_seqlens``; a device tensor is read once for all the layers that share it
    (Megatron passes one tensor per micro-batch), saving a synchronisation per layer."""
    return host_list(cu_seqlens)


def _global_cu(cu_seqlens: Optional[torch.Tensor], local: int, cp: int) -> list[int]:
    """Global sequence boundaries from global (last = cp*T_local) or local (last = T_local) ones."""
    if cu_seqlens is None:
        return [0, local * cp]
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D int tensor [N+1]")
    bounds = _host_bounds(cu_seqlens)
    if bounds[0] != 0 or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {bounds}")
    if bounds[-1] == local * cp:
        return bounds
    if bounds[-1] == local:
        return [b * cp for b in bounds]
    raise ValueError(f"cu_seqlens ends at {bounds[-1]}: expected the global token count {local * cp} "
                     f"or this rank's {local} (context_parallel_size={cp})")


def _hparams(core, overrides: dict) -> NSAHyperParams:
    values = dict(core.hparams) if core is not None else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    hp = NSAHyperParams(**{k: values[k] for k in _HP_NAMES if k in values})
    hp.check()
    return hp


def _megatron_rope(core, rotary_pos_emb: torch.Tensor, packed: bool, layout: ZigzagLayout, group,
                   max_position: int):
    """RoPE of compressed keys from the freqs Megatron hands a CP layer.

    BSHD: the table holds this rank's positions of one sequence ([S/cp, 1, 1, D], zig-zag
    sliced), indexed by local row within the sequence. THD: the table is per position
    ([max_seqlen, 1, 1, D]), indexed by within-sequence position.
    """
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    from nsa_megatron.compat import yarn_mscale

    per_seq = layout.local_tokens // max(1, len(layout.seqlens))
    mscale = yarn_mscale(core.config)

    needed = (max_position + 1) if packed else min(per_seq, layout.local_tokens)
    if max_position >= 0 and needed > rotary_pos_emb.shape[0]:
        raise ValueError(f"rotary_pos_emb: {rotary_pos_emb.shape[0]} rows, compressed keys need {needed}")

    def rotate(x, positions, local_rows):
        index = positions if packed else local_rows % per_seq
        f = rotary_pos_emb[index.to(rotary_pos_emb.device)]
        return apply_rotary_pos_emb(x.unsqueeze(1), f, config=core.config, cu_seqlens=None, mscale=mscale,
                                    cp_group=group).squeeze(1)

    return rotate


def nsa_attention_cp(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_win: Optional[torch.Tensor], v_win: Optional[torch.Tensor],
    k_for_cmp: torch.Tensor, v_for_cmp: torch.Tensor, gates: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor] = None, *,
    cp_group, cp_mode: str = "ring", compress_k=None, compress_v=None,
    rope_cmp: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    core=None, rotary_pos_emb: Optional[torch.Tensor] = None, packed_seq_params=None,
    cmp_block: Optional[int] = None, cmp_stride: Optional[int] = None, slc_block: Optional[int] = None,
    topk: Optional[int] = None, window: Optional[int] = None, init_blocks: Optional[int] = None,
    local_blocks: Optional[int] = None, scale: Optional[float] = None,
    backend: Optional[str] = None, counters: Optional[CommCounters] = None, return_block_indices: bool = False,
):
    """NSA attention (NSA_SPEC.md) with the sequence split over a context-parallel group.

    Every token tensor holds this rank's share in Megatron's zig-zag layout (``zigzag_split``:
    per sequence, chunks r and 2cp-1-r of 2cp). The result equals ``nsa_attention`` on the
    whole pack restricted to this rank's tokens, selected blocks included; gradients reach
    every input and the compressors' parameters. All ranks of ``cp_group`` must call it
    together (it runs collectives in forward and backward).

    Args:
        q: [T/cp, HQ, Dqk] queries, RoPE applied at global positions.
        k, v: [T/cp, HKV, Dqk], [T/cp, HKV, Dv] selection-branch keys (RoPE) / values.
        k_win, v_win: window-branch K/V like k, v, or both None to reuse k, v.
        k_for_cmp, v_for_cmp: [T/cp, HKV, Dqk], [T/cp, HKV, Dv] compressor inputs (keys before RoPE).
        gates: [T/cp, HQ, 3] sigmoided gates (cmp, slc, win).
        cu_seqlens: int [N+1] boundaries of the *global* pack (last = cp * T/cp), or this rank's
            boundaries (last = T/cp; Megatron's BSHD view), which are scaled by cp. Every
            sequence length must be divisible by 2*cp; in ``ring`` mode by 2*cp*slc_block.
            None: one sequence.
        cp_group: the CP process group (``torch.distributed`` group of size cp >= 1).
        cp_mode: ``"ring"`` (fetch only selected blocks and halos) or ``"allgather"``
            (gather the full K/V, reduce-scatter dK/dV).
        compress_k, compress_v: compressor modules ``(x [T, HKV, D], cu_seqlens) -> [Tc, HKV, D]``
            (default: ``core.k_compressor`` / ``core.v_compressor``).
        rope_cmp: ``rope_cmp(k_cmp [Tc, HKV, Dqk], positions int64 [Tc]) -> k_cmp`` rotating
            compressed keys at within-sequence positions; None with ``rotary_pos_emb`` and
            ``core``: Megatron's RoPE from that table; None otherwise: no RoPE.
        core: an ``NSACoreAttention`` supplying compressors, hyper-parameters and scale.
        rotary_pos_emb: the RoPE freqs Megatron passed to the layer (see ``_megatron_rope``).
        packed_seq_params: Megatron's THD params (only its presence matters: table indexing).
        cmp_block .. local_blocks, scale: NSA hyper-parameters (default: core's, else the spec's).
        backend: branch kernels, "reference", "triton" or "auto" (Triton on CUDA; default:
            core's ``backend``, else "auto").
        counters: where to count bytes sent (default ``GLOBAL_COUNTERS``).
        return_block_indices: also return this rank's selected blocks.
    Returns:
        o [T/cp, HQ, Dv] in q's dtype; with ``return_block_indices`` also int32
        [T/cp, HKV, topk] global block indices (ascending, -1 padded).
    Raises:
        ValueError naming the argument on bad shapes, dtypes, modes or sequence lengths.
    """
    if cp_mode not in CP_MODES:
        raise ValueError(f"cp_mode must be one of {CP_MODES}, got {cp_mode!r}")
    if cp_group is None or not dist.is_initialized():
        raise ValueError("cp_group: a torch.distributed process group is required")
    hp = _hparams(core, dict(cmp_block=cmp_block, cmp_stride=cmp_stride, slc_block=slc_block, topk=topk,
                             window=window, init_blocks=init_blocks, local_blocks=local_blocks))
    if core is not None:
        compress_k = compress_k if compress_k is not None else core.k_compressor
        compress_v = compress_v if compress_v is not None else core.v_compressor
        scale = scale if scale is not None else core.softmax_scale
        backend = backend if backend is not None else getattr(core, "backend", None)
    if compress_k is None or compress_v is None:
        raise ValueError("compress_k/compress_v: pass the compressor modules (or core=)")
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q must be [T/cp, HQ, Dqk], got {getattr(q, 'shape', type(q).__name__)}")
    rows, num_q_heads, dqk = q.shape
    _check("k", k, rows, None, q, dqk)
    num_kv = k.shape[1]
    if num_kv < 1 or num_q_heads % num_kv:
        raise ValueError(f"q has {num_q_heads} heads, k has {num_kv}: HQ must be a multiple of HKV")
    _check("v", v, rows, num_kv, q)
    dv = v.shape[2]
    if (k_win is None) != (v_win is None):
        raise ValueError("k_win/v_win: pass both or neither")
    if k_win is not None:
        _check("k_win", k_win, rows, num_kv, q, dqk)
        _check("v_win", v_win, rows, num_kv, q, dv)
    _check("k_for_cmp", k_for_cmp, rows, num_kv, q, dqk)
    _check("v_for_cmp", v_for_cmp, rows, num_kv, q, dv)
    _check("gates", gates, rows, num_q_heads, q, 3)

    cp, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    bounds = _global_cu(cu_seqlens, rows, cp)
    layout = ZigzagLayout([b - a for a, b in zip(bounds[:-1], bounds[1:])], cp)
    if cp_mode == "ring":
        for i, n in enumerate(layout.seqlens):
            if n % (2 * cp * hp.slc_block):
                raise ValueError(
                    f"cu_seqlens: sequence {i} has {n} tokens; cp_mode='ring' needs every length divisible "
                    f"by 2 * cp * slc_block = {2 * cp * hp.slc_block} (whole selection blocks per chunk); "
                    "pad the sequence or use cp_mode='allgather'")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(dqk)
    branches = get_branches(backend if backend is not None else "auto", q.device)
    ctx = CPContext(layout, rank, cp_group, hp, scale, counters if counters is not None else GLOBAL_COUNTERS,
                    q.device, branches, static_plan(layout, rank, hp, q.device))

    rope = None
    if rope_cmp is not None:
        rope = lambda x, positions, local_rows: rope_cmp(x, positions)  # noqa: E731
    elif rotary_pos_emb is not None and core is not None:
        table = rotary_pos_emb[1] if isinstance(rotary_pos_emb, tuple) else rotary_pos_emb
        rope = _megatron_rope(core, table, packed_seq_params is not None, layout, cp_group,
                              ctx.plan.cmp_max_position)

    k_cmp, v_cmp = compress_and_gather(ctx, k_for_cmp, v_for_cmp, compress_k, compress_v, rope)
    mode_fn = ring_attention if cp_mode == "ring" else allgather_attention
    out, picks = mode_fn(ctx, q, k, v, k_win, v_win, gates, k_cmp, v_cmp)
    out = tie_outputs(out, ctx).to(q.dtype)
    return (out, picks) if return_block_indices else out
