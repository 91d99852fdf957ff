"""``allgather`` CP mode: every rank all-gathers the full K/V (selection and window sets),
computes its own queries against them, and reduce-scatters dK/dV back in backward.

Simple and balanced (zig-zag), it moves (cp-1)/cp of the pack's K/V per rank each way; the
compressed tokens and compressor halos are exchanged exactly as in ``ring`` mode.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .comm import all_gather_rows
from .common import CPContext, compressed_and_selection, gated_sum

__all__ = ["allgather_attention"]


def _gather_natural(ctx: CPContext, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-gather same-length local token tensors in one collective; return them in natural order."""
    widths = [math.prod(t.shape[1:]) for t in tensors]
    flat = torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)
    counts = [ctx.layout.local_tokens] * ctx.layout.cp
    gathered = ctx.keep(all_gather_rows(flat, counts, ctx.group, ctx.counters, "kv_allgather"))
    gathered = gathered[ctx.layout.merge_index(gathered.device)]
    out, col = [], 0
    for t, w in zip(tensors, widths):
        out.append(gathered[:, col:col + w].view(-1, *t.shape[1:]))
        col += w
    return out


def allgather_attention(ctx: CPContext, q, k, v, k_win: Optional[torch.Tensor], v_win: Optional[torch.Tensor],
                        gates, k_cmp, v_cmp, cu_cmp: list[int]):
    """NSA for this rank's queries with the full K/V gathered.

    Args:
        q: [T/cp, HQ, Dqk]; k, v, k_win, v_win: [T/cp, HKV, D*] local tokens (k_win/v_win None:
            the window branch reuses k, v); gates: [T/cp, HQ, 3].
        k_cmp, v_cmp, cu_cmp: the pack's compressed tokens from ``compress_and_gather``.
    Returns:
        o [T/cp, HQ, Dv] (float32, float64 for float64 inputs), int32 block indices [T/cp, HKV, n].
    """
    hp, layout = ctx.hp, ctx.layout
    shared_win = k_win is None
    full = _gather_natural(ctx, [k, v] if shared_win else [k, v, k_win, v_win])
    k_full, v_full = full[0], full[1]
    kw_full, vw_full = (k_full, v_full) if shared_win else (full[2], full[3])
    offsets = [0]
    for n in layout.seqlens:
        offsets.append(offsets[-1] + n)

    outs, picks = [], []
    for g in ctx.segments:
        rows = slice(g.row, g.row + g.length)
        q_c = q[rows]
        q_pos = torch.arange(g.start, g.end, device=q.device)
        kc = k_cmp[cu_cmp[g.seq]:cu_cmp[g.seq + 1]]
        vc = v_cmp[cu_cmp[g.seq]:cu_cmp[g.seq + 1]]
        o_cmp, blocks = compressed_and_selection(ctx, q_c, kc, vc, g)
        prefix = slice(offsets[g.seq], offsets[g.seq] + g.end)
        o_slc, _ = ctx.branches.selected_attention(q_c, k_full[prefix], v_full[prefix], q_pos, blocks,
                                                   slc_block=hp.slc_block, scale=ctx.scale)
        o_win, _ = ctx.branches.window_attention(q_c, kw_full[prefix], vw_full[prefix], q_pos, window=hp.window,
                                                 scale=ctx.scale)
        outs.append(gated_sum(gates[rows], o_cmp, o_slc, o_win))
        picks.append(blocks)
    return torch.cat(outs), torch.cat(picks)
