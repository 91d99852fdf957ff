"""``allgather`` CP mode: every rank all-gathers the full K/V (selection and window sets),
computes its own queries against them, and reduce-scatters dK/dV back in backward.

Simple and balanced (zig-zag), it moves (cp-1)/cp of the pack's K/V per rank each way; the
compressed tokens and compressor halos are exchanged exactly as in ``ring`` mode. Every segment
attends to its sequence's prefix up to its last query: one gather builds those prefixes, packed
segment after segment, straight from the rank-major all-gather (the index is cached per layout),
and each branch runs once over all segments.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .comm import all_gather_rows
from .common import CPContext
from .plan import SegLayout, ranges, to_device

__all__ = ["allgather_attention"]

_PREFIX_CACHE: dict = {}


def _prefix_plan(ctx: CPContext) -> tuple[torch.Tensor, SegLayout]:
    """Gather index (rank-major rows -> packed per-segment prefixes) and the key layout (cached)."""
    layout, plan = ctx.layout, ctx.plan
    key = (id(plan),)
    hit = _PREFIX_CACHE.get(key)
    if hit is not None and hit[0] is plan:
        return hit[1], hit[2]
    merge = layout.merge_index()
    offsets = [0]
    for n in layout.seqlens:
        offsets.append(offsets[-1] + n)
    segs = plan.segments
    index = merge[ranges([offsets[g.seq] for g in segs], [g.end for g in segs])]
    k_cu = [0]
    for g in segs:
        k_cu.append(k_cu[-1] + g.end)
    lay = SegLayout(plan.q_cu, [g.start for g in segs], k_cu, ctx.device)
    if len(_PREFIX_CACHE) > 16:
        _PREFIX_CACHE.clear()
    _PREFIX_CACHE[key] = (plan, to_device(index, torch.int64, ctx.device), lay)
    return _PREFIX_CACHE[key][1], lay


def allgather_attention(ctx: CPContext, q, k, v, k_win: Optional[torch.Tensor], v_win: Optional[torch.Tensor],
                        gates, k_cmp, v_cmp):
    """NSA for this rank's queries with the full K/V gathered.

    Args:
        q: [T/cp, HQ, Dqk]; k, v, k_win, v_win: [T/cp, HKV, D*] local tokens (k_win/v_win None:
            the window branch reuses k, v); gates: [T/cp, HQ, 3].
        k_cmp, v_cmp: per-segment compressed key runs from ``compress_and_gather``.
    Returns:
        o [T/cp, HQ, Dv] in q's dtype, int32 block indices [T/cp, HKV, n] (within the sequence).
    """
    plan = ctx.plan
    shared_win = k_win is None
    tensors = [k, v] if shared_win else [k, v, k_win, v_win]
    widths = [math.prod(t.shape[1:]) for t in tensors]
    flat = torch.cat([t.reshape(t.shape[0], -1) for t in tensors], dim=1)
    counts = [ctx.layout.local_tokens] * ctx.layout.cp
    gathered = ctx.keep(all_gather_rows(flat, counts, ctx.group, ctx.counters, "kv_allgather"))
    index, lay = _prefix_plan(ctx)
    stores, col = [], 0
    for t, w in zip(tensors, widths):
        stores.append(gathered[:, col:col + w][index].view(-1, *t.shape[1:]))
        col += w
    ks, vs = stores[0], stores[1]
    kw, vw = (ks, vs) if shared_win else (stores[2], stores[3])

    br = ctx.branches
    cmp_out = br.compressed_and_select(q, k_cmp, v_cmp, plan.cmp_layout, ctx.hp, ctx.scale)
    blocks = cmp_out[2]
    out = br.attend(q, k_cmp, v_cmp, ks, vs, kw, vw, gates, cmp_out, blocks, plan.cmp_layout, lay, lay,
                    ctx.hp, ctx.scale)
    return out, blocks
