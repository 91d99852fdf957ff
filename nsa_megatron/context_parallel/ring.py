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
one-GPU mask, and the same prefix-keyed branch kernels apply unchanged.

The request plan is built on the device from the selection (scatters into block masks, no
sort/unique); the host learns its sizes through one small all-to-all of counts and a single
synchronisation per layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .comm import RowExchange
from .common import CPContext, static_halo
from .plan import SegLayout, take_pieces, to_device

__all__ = ["ring_attention"]

_GEOMETRY: dict = {}


def _pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)], dim=1)


def _block_table(k: torch.Tensor, v: torch.Tensor, slc_block: int) -> torch.Tensor:
    """[T/cp, HKV, D*] -> [(T/cp / l') * HKV, l' * (Dqk + Dv)]: row b*HKV + h is block b, head h."""
    def rows(x):
        nb = x.shape[0] // slc_block
        return x.view(nb, slc_block, x.shape[1], x.shape[2]).permute(0, 2, 1, 3).reshape(nb * x.shape[1], -1)
    return torch.cat([rows(k), rows(v)], dim=1)


@dataclass
class _Geometry:
    """Static block bookkeeping of the pack for one rank and HKV (device tensors; cached).

    Flat key of (global block gb, head h) = gb * HKV + h, gb = block offset of the sequence + j.
    """

    num_keys: int
    nbs: int                    # blocks tracked per segment (max first block over segments, >= 1)
    seg_block_offset: torch.Tensor  # int64 [n_seg] global block offset of each segment's sequence
    seg_first: torch.Tensor     # int64 [n_seg] first block of each segment
    perm_by_owner: torch.Tensor  # int64 [num_keys] flat keys sorted by (owner rank, key)
    owner_of_key: torch.Tensor  # int64 [num_keys]
    table_row_of_key: torch.Tensor  # int64 [num_keys] row of the owner's block table
    row_rel: torch.Tensor       # int64 [R] row index within its segment


def _geometry(ctx: CPContext, num_kv: int) -> _Geometry:
    plan, layout, ls = ctx.plan, ctx.layout, ctx.hp.slc_block
    key = (id(plan), num_kv)
    hit = _GEOMETRY.get(key)
    if hit is not None and hit[0] is plan:
        return hit[1]
    offsets, owner, lrow = [0], [], []
    for s, n in enumerate(layout.seqlens):
        nb = n // ls
        offsets.append(offsets[-1] + nb)
        r, first_row = layout.owners(s, torch.arange(nb, dtype=torch.int64) * ls)
        owner.append(r)
        lrow.append(torch.div(first_row, ls, rounding_mode="floor"))
    owner = torch.cat(owner) if owner else torch.zeros(0, dtype=torch.int64)
    lrow = torch.cat(lrow) if lrow else torch.zeros(0, dtype=torch.int64)
    keys = torch.arange(offsets[-1] * num_kv, dtype=torch.int64)
    owner_key = owner[keys // num_kv]
    row_key = lrow[keys // num_kv] * num_kv + keys % num_kv
    perm = torch.sort(owner_key, stable=True).indices
    segs = plan.segments
    q_cu = torch.tensor(plan.q_cu, dtype=torch.int64)
    lens = q_cu[1:] - q_cu[:-1]
    seg_of_row = torch.repeat_interleave(torch.arange(len(segs)), lens)
    dev = ctx.device
    geo = _Geometry(
        num_keys=int(keys.numel()), nbs=max([1] + plan.seg_first_block),
        seg_block_offset=to_device([offsets[g.seq] for g in segs], torch.int64, dev),
        seg_first=to_device(plan.seg_first_block, torch.int64, dev),
        perm_by_owner=to_device(perm, torch.int64, dev), owner_of_key=to_device(owner_key, torch.int64, dev),
        table_row_of_key=to_device(row_key, torch.int64, dev),
        row_rel=to_device(torch.arange(int(q_cu[-1])) - q_cu[:-1][seg_of_row], torch.int64, dev))
    if len(_GEOMETRY) > 16:
        _GEOMETRY.clear()
    _GEOMETRY[key] = (plan, geo)
    return geo


def _compact(mask: torch.Tensor, values: torch.Tensor, total: int):
    """(values[mask] of known size ``total`` without a sync, and each entry's rank among the
    selected, ``total`` where not selected)."""
    pos = torch.cumsum(mask.to(torch.int64), 0) - 1
    dest = torch.where(mask, pos, torch.full_like(pos, total))
    out = values.new_empty(total + 1).scatter_(0, dest, values)[:total]
    return out, dest


def ring_attention(ctx: CPContext, q, k, v, k_win: Optional[torch.Tensor], v_win: Optional[torch.Tensor],
                   gates, k_cmp, v_cmp):
    """NSA for this rank's queries, fetching only selected blocks and halos.

    Args:
        q: [T/cp, HQ, Dqk]; k, v, k_win, v_win: [T/cp, HKV, D*] local tokens (k_win/v_win None:
            the window branch reuses k, v); gates: [T/cp, HQ, 3]. Every chunk must hold a whole
            number of selection blocks (checked by the caller).
        k_cmp, v_cmp: per-segment compressed key runs from ``compress_and_gather``.
    Returns:
        o [T/cp, HQ, Dv] in q's dtype, int32 block indices [T/cp, HKV, n] (within the sequence).
    """
    hp, plan, br = ctx.hp, ctx.plan, ctx.branches
    ls = hp.slc_block
    num_kv, dk, dv = k.shape[1], k.shape[2], v.shape[2]
    kw, vw = (k, v) if k_win is None else (k_win, v_win)
    halo = static_halo(ctx, plan.win_halo, _pair(kw, vw), "win_halo")
    w_dk = math.prod(kw.shape[1:])
    kw_store = take_pieces(plan.win_pieces, halo[:, :w_dk].view(-1, *kw.shape[1:]), kw)
    vw_store = take_pieces(plan.win_pieces, halo[:, w_dk:].view(-1, *vw.shape[1:]), vw)

    cmp_out = br.compressed_and_select(q, k_cmp, v_cmp, plan.cmp_layout, hp, ctx.scale)
    blocks = cmp_out[2]

    # Which (block, head) pairs each segment reads before its chunk, and their union per rank.
    geo = _geometry(ctx, num_kv)
    n_seg, nbs, dev = len(plan.segments), geo.nbs, q.device
    b = blocks.long()
    seg = plan.row_segment[:, None, None]
    head = torch.arange(num_kv, device=dev)[None, :, None]
    first = geo.seg_first[seg]
    earlier = (b >= 0) & (b < first)
    bc = b.clamp(0, nbs - 1)
    need_seg = torch.zeros(n_seg * num_kv * nbs + 1, dtype=torch.bool, device=dev)
    need_seg[torch.where(earlier, (seg * num_kv + head) * nbs + bc, n_seg * num_kv * nbs).reshape(-1)] = True
    slot_mask = need_seg[:-1].view(n_seg, num_kv, nbs).any(1)
    need_key = torch.zeros(geo.num_keys + 1, dtype=torch.bool, device=dev)
    need_key[torch.where(earlier, (geo.seg_block_offset[seg] + bc) * num_kv + head, geo.num_keys).reshape(-1)] = True
    need_key = need_key[:-1]
    cp = ctx.layout.cp
    recv = torch.zeros(cp, dtype=torch.int64, device=dev).index_add_(0, geo.owner_of_key, need_key.to(torch.int64))
    send = torch.empty_like(recv)
    dist.all_to_all_single(send, recv, group=ctx.group)
    slots_per_seg = slot_mask.sum(1)
    sizes = torch.cat([recv, send, slots_per_seg]).tolist()  # the layer's one host synchronisation
    recv_counts, send_counts, n_slots = sizes[:cp], sizes[cp:2 * cp], sizes[2 * cp:]
    total_req, total_slots = sum(recv_counts), sum(n_slots)

    need_perm = need_key[geo.perm_by_owner]
    req_keys, dest = _compact(need_perm, geo.perm_by_owner, total_req)
    fetch_pos = torch.empty(geo.num_keys, dtype=torch.int64, device=dev)
    fetch_pos[geo.perm_by_owner] = dest  # row of every key in ``fetched`` (total_req: a zero row)
    exchange = RowExchange.planned(geo.table_row_of_key[req_keys], recv_counts, send_counts, ctx.group,
                                   ctx.counters, "slc_blocks")
    fetched = ctx.keep(exchange(_block_table(k, v, ls)))
    fetched = torch.cat([fetched, fetched.new_zeros(1, fetched.shape[1])])

    # Slots: segment-major, ascending block; store = [slots of s | own chunk of s] per segment.
    flat_slot = slot_mask.reshape(-1)
    slot_items, slot_dest = _compact(flat_slot, torch.arange(flat_slot.numel(), device=dev), total_slots)
    s_of, j_of = slot_items // nbs, slot_items % nbs
    src = fetch_pos[((geo.seg_block_offset[s_of] + j_of) * num_kv)[:, None] + torch.arange(num_kv, device=dev)]
    k_slots = fetched[:, : ls * dk].view(-1, ls, dk)[src].permute(0, 2, 1, 3).reshape(-1, num_kv, dk)
    v_slots = fetched[:, ls * dk:].view(-1, ls, dv)[src].permute(0, 2, 1, 3).reshape(-1, num_kv, dv)
    pieces, base, k_cu, pos0 = [], 0, [0], []
    for g, n in zip(plan.segments, n_slots):
        pieces += [("halo", base * ls, (base + n) * ls), ("local", g.row, g.row + g.length)]
        base += n
        k_cu.append(k_cu[-1] + n * ls + g.length)
        pos0.append(n * ls)
    ks, vs = take_pieces(pieces, k_slots, k), take_pieces(pieces, v_slots, v)

    # Block indices into the store: earlier blocks -> their slot, own chunk -> after the slots.
    slots_dev = slots_per_seg.to(torch.int64)
    slot_base = torch.cumsum(slots_dev, 0) - slots_dev
    slot_of = slot_dest.view(n_seg, nbs)
    rel = torch.where(earlier, slot_of[seg, bc] - slot_base[seg], slots_dev[seg] + b - first)
    remapped = torch.where(b >= 0, rel, torch.full_like(b, -1)).to(torch.int32)
    row_pos = (geo.row_rel + slots_dev[plan.row_segment] * ls).to(torch.int32)
    lay_s = SegLayout(plan.q_cu, pos0, k_cu, ctx.device, rows=(plan.row_segment.to(torch.int32), row_pos))
    out = br.attend(q, k_cmp, v_cmp, ks, vs, kw_store, vw_store, gates, cmp_out, remapped, plan.cmp_layout,
                    lay_s, plan.win_layout, hp, ctx.scale)
    return out, blocks
