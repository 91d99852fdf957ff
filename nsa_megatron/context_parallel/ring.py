"""``ring`` (selected-block) CP mode: move only what NSA reads.

Per rank and step: the compressed tokens (all-gathered, ~K/V / d), the compressor halo
(< l tokens per chunk), the window halo (w-1 tokens before each chunk, from their owners),
and the selected blocks - each rank asks the owners for exactly the (block, KV head) pairs
its queries selected before their chunk, once per pair, in one all-to-all. Backward sends
the gradients of those rows back along the same routes. Nothing close to the full
sequence's K/V is materialised unless the queries select it.

Every segment then computes against a compact key store: the fetched blocks (ascending,
packed into slots) followed by the segment's own chunk. Block indices and query positions
are remapped into the store so causality (which only cuts the query's own block) is the
one-GPU mask, and the same prefix-keyed branch functions apply unchanged.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .comm import fetch_rows
from .common import CPContext, compressed_and_selection, gated_sum

__all__ = ["ring_attention"]


def _pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)], dim=1)


def _block_table(k: torch.Tensor, v: torch.Tensor, slc_block: int) -> torch.Tensor:
    """[T/cp, HKV, D*] -> [(T/cp / l') * HKV, l' * (Dqk + Dv)]: row b*HKV + h is block b, head h."""
    def rows(x):
        nb = x.shape[0] // slc_block
        return x.view(nb, slc_block, x.shape[1], x.shape[2]).permute(0, 2, 1, 3).reshape(nb * x.shape[1], -1)
    return torch.cat([rows(k), rows(v)], dim=1)


def _window_halo(ctx: CPContext, kw: torch.Tensor, vw: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Fetch the w-1 tokens before every segment; returns (rows [P, HKV*(Dqk+Dv)], per-segment counts)."""
    ranks, rows, counts = [], [], []
    for g in ctx.segments:
        lo = max(0, g.start - ctx.hp.window + 1)
        counts.append(g.start - lo)
        if g.start > lo:
            r, w = ctx.layout.owners(g.seq, torch.arange(lo, g.start, device=ctx.device))
            ranks.append(r)
            rows.append(w)
    empty = torch.zeros(0, dtype=torch.int64, device=ctx.device)
    halo = fetch_rows(_pair(kw, vw), torch.cat(ranks) if ranks else empty, torch.cat(rows) if rows else empty,
                      ctx.group, ctx.counters, "win_halo")
    return ctx.keep(halo), counts


def _block_requests(ctx: CPContext, picks: list[torch.Tensor], num_kv: int):
    """Unique (sequence block, head) keys selected before each segment's chunk.

    Returns (per-segment sorted unique keys, all unique keys sorted, seq block offsets); key =
    (first block of the sequence in the pack + j) * HKV + h.
    """
    ls = ctx.hp.slc_block
    offsets = [0]
    for n in ctx.layout.seqlens:
        offsets.append(offsets[-1] + n // ls)
    per_seg = []
    for g, blocks in zip(ctx.segments, picks):
        b = blocks.long()
        head = torch.arange(num_kv, device=b.device)[None, :, None].expand_as(b)
        earlier = (b >= 0) & (b < g.start // ls)
        per_seg.append(torch.unique((offsets[g.seq] + b[earlier]) * num_kv + head[earlier]))
    every = torch.unique(torch.cat(per_seg)) if per_seg else torch.zeros(0, dtype=torch.int64, device=ctx.device)
    return per_seg, every, offsets


def _fetch_blocks(ctx: CPContext, table: torch.Tensor, keys: torch.Tensor, offsets: list[int], num_kv: int):
    """Fetch rows ``keys`` (see ``_block_requests``) of the owners' block tables."""
    ls = ctx.hp.slc_block
    block = torch.div(keys, num_kv, rounding_mode="floor")
    head = keys - block * num_kv
    ranks = torch.empty_like(keys)
    rows = torch.empty_like(keys)
    bounds = torch.tensor(offsets, dtype=torch.int64, device=keys.device)
    seq = torch.searchsorted(bounds, block, right=True) - 1
    for s in torch.unique(seq).tolist():
        m = seq == s
        r, first_row = ctx.layout.owners(s, (block[m] - offsets[s]) * ls)
        ranks[m] = r
        rows[m] = torch.div(first_row, ls, rounding_mode="floor") * num_kv + head[m]
    return ctx.keep(fetch_rows(table, ranks, rows, ctx.group, ctx.counters, "slc_blocks"))


def _selected_store(ctx: CPContext, g, keys_g, every, fetched, k, v, blocks, offset: int):
    """Key store of one segment and the remapped block indices / query positions."""
    ls = ctx.hp.slc_block
    num_kv, dk, dv = k.shape[1], k.shape[2], v.shape[2]
    rows_g = fetched[torch.searchsorted(every, keys_g)]
    j = torch.div(keys_g, num_kv, rounding_mode="floor") - offset
    head = keys_g - torch.div(keys_g, num_kv, rounding_mode="floor") * num_kv
    slots_blocks = torch.unique(j)
    slot = torch.searchsorted(slots_blocks, j)
    num_slots = slots_blocks.numel()
    own = slice(g.row, g.row + g.length)

    def store(x_rows, local, dim):
        packed = local.new_zeros(num_slots, num_kv, ls, dim).index_put((slot, head), x_rows.view(-1, ls, dim))
        return torch.cat([packed.permute(0, 2, 1, 3).reshape(num_slots * ls, num_kv, dim), local[own]])

    k_store = store(rows_g[:, : ls * dk], k, dk)
    v_store = store(rows_g[:, ls * dk:], v, dv)
    first_own = g.start // ls
    lut = torch.full((g.end // ls,), -1, dtype=torch.int64, device=k.device)
    lut[slots_blocks] = torch.arange(num_slots, device=k.device)
    lut[first_own:] = num_slots + torch.arange(g.end // ls - first_own, device=k.device)
    b = blocks.long()
    remapped = torch.where(b >= 0, lut[b.clamp_min(0)], torch.full_like(b, -1))
    q_pos = torch.arange(g.length, device=k.device) + num_slots * ls
    return k_store, v_store, remapped, q_pos


def ring_attention(ctx: CPContext, q, k, v, k_win: Optional[torch.Tensor], v_win: Optional[torch.Tensor],
                   gates, k_cmp, v_cmp, cu_cmp: list[int]):
    """NSA for this rank's queries, fetching only selected blocks and halos.

    Args:
        q: [T/cp, HQ, Dqk]; k, v, k_win, v_win: [T/cp, HKV, D*] local tokens (k_win/v_win None:
            the window branch reuses k, v); gates: [T/cp, HQ, 3]. Every chunk must hold a whole
            number of selection blocks (checked by the caller).
        k_cmp, v_cmp, cu_cmp: the pack's compressed tokens from ``compress_and_gather``.
    Returns:
        o [T/cp, HQ, Dv] (float32, float64 for float64 inputs), int32 block indices [T/cp, HKV, n].
    """
    hp = ctx.hp
    num_kv = k.shape[1]
    kw, vw = (k, v) if k_win is None else (k_win, v_win)
    halo, halo_counts = _window_halo(ctx, kw, vw)

    firsts = []
    for g in ctx.segments:
        kc = k_cmp[cu_cmp[g.seq]:cu_cmp[g.seq + 1]]
        vc = v_cmp[cu_cmp[g.seq]:cu_cmp[g.seq + 1]]
        firsts.append(compressed_and_selection(ctx, q[g.row:g.row + g.length], kc, vc, g))
    picks = [blocks for _, blocks in firsts]
    per_seg, every, offsets = _block_requests(ctx, picks, num_kv)
    fetched = _fetch_blocks(ctx, _block_table(k, v, hp.slc_block), every, offsets, num_kv)

    outs, used = [], 0
    w_dk = math.prod(kw.shape[1:])
    for g, (o_cmp, blocks), keys_g, n_halo in zip(ctx.segments, firsts, per_seg, halo_counts):
        rows = slice(g.row, g.row + g.length)
        q_c = q[rows]
        k_store, v_store, remapped, q_rel = _selected_store(ctx, g, keys_g, every, fetched, k, v, blocks,
                                                            offsets[g.seq])
        o_slc, _ = ctx.branches.selected_attention(q_c, k_store, v_store, q_rel, remapped,
                                                   slc_block=hp.slc_block, scale=ctx.scale)
        h = halo[used:used + n_halo]
        used += n_halo
        kw_store = torch.cat([h[:, :w_dk].view(-1, *kw.shape[1:]), kw[rows]])
        vw_store = torch.cat([h[:, w_dk:].view(-1, *vw.shape[1:]), vw[rows]])
        q_win = torch.arange(g.length, device=q.device) + n_halo
        o_win, _ = ctx.branches.window_attention(q_c, kw_store, vw_store, q_win, window=hp.window,
                                                 scale=ctx.scale)
        outs.append(gated_sum(gates[rows], o_cmp, o_slc, o_win))
    return torch.cat(outs), torch.cat(picks)
