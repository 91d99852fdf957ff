"""What both CP modes share: compression with a halo, the compressed-token all-gather,
branch 1 + block selection per segment, and the gated sum.

Compressed token i of a sequence (block [i*d, i*d + l)) is produced by the rank holding its
block's *last* token, i*d + l - 1. So a segment [C, C+S) produces tokens
i_lo .. i_hi with i_lo = ceil((C - l + 1) / d) and i_hi = floor((C + S - l) / d), and needs the
halo [i_lo*d, C) (at most l-1 tokens, l-d when d | C) from the preceding chunk's owner. The
rotation point of every compressed key is then one of the rank's own tokens, so RoPE can use
the rank's local frequency table (Megatron slices it per CP rank).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from nsa_kernels.layout import num_compressed
from nsa_kernels.validation import NSAHyperParams

from .comm import CommCounters, all_gather_rows, fetch_rows
from .layout import Segment, ZigzagLayout

__all__ = ["CPContext", "first_compressed", "compress_and_gather", "compressed_and_selection", "gated_sum",
           "tie_outputs"]

RopeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class CPContext:
    """Everything a CP mode needs besides the tensors.

    Attributes:
        layout: the pack's zig-zag layout; rank: this rank in ``group``.
        hp: NSA hyper-parameters; scale: softmax scale.
        counters: byte counters; device: device of the tensors.
        branches: branch functions (``branches.get_branches``).
    """

    layout: ZigzagLayout
    rank: int
    group: object
    hp: NSAHyperParams
    scale: float
    counters: CommCounters
    device: torch.device
    branches: object = None
    received: list = field(default_factory=list)

    def keep(self, t: torch.Tensor) -> torch.Tensor:
        """Register an exchange's output so the final output is tied to it (see ``tie_outputs``)."""
        self.received.append(t)
        return t

    @property
    def segments(self) -> list[Segment]:
        """This rank's segments in local-row order."""
        return self.layout.segments[self.rank]


def first_compressed(start: int, cmp_block: int, cmp_stride: int) -> int:
    """Index of the first compressed token whose block ends at or after position ``start``."""
    return max(0, -((cmp_block - 1 - start) // cmp_stride))


def _segment_cmp_count(g: Segment, hp: NSAHyperParams) -> tuple[int, int]:
    i_lo = first_compressed(g.start, hp.cmp_block, hp.cmp_stride)
    return i_lo, num_compressed(g.end - i_lo * hp.cmp_stride, hp.cmp_block, hp.cmp_stride)


def _flat_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)], dim=1)


def compress_and_gather(ctx: CPContext, k_src: torch.Tensor, v_src: torch.Tensor, compress_k, compress_v,
                        rope: Optional[RopeFn]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Compress this rank's segments (with halos) and all-gather every sequence's compressed tokens.

    Args:
        k_src, v_src: [T/cp, HKV, Dqk], [T/cp, HKV, Dv] local compressor inputs (keys pre-RoPE).
        compress_k, compress_v: ``forward(x [T, HKV, D], cu_seqlens) -> [Tc, HKV, D]`` modules.
        rope: ``rope(k_cmp, positions, local_rows)`` rotating compressed keys at their
            within-sequence positions (whose tokens are this rank's ``local_rows``), or None.
    Returns:
        k_cmp [Tc, HKV, Dqk], v_cmp [Tc, HKV, Dv] of the whole pack in natural order (packed per
        sequence), and the host list cu_cmp [N+1] of their sequence boundaries.
    """
    hp, layout = ctx.hp, ctx.layout
    l, d = hp.cmp_block, hp.cmp_stride
    num_kv, dk, dv = k_src.shape[1], k_src.shape[2], v_src.shape[2]
    plans = [(g, *_segment_cmp_count(g, hp)) for g in ctx.segments]

    halo_ranks, halo_rows, halo_len = [], [], []
    for g, i_lo, count in plans:
        n_halo = g.start - i_lo * d if count else 0
        halo_len.append(n_halo)
        if n_halo:
            ranks, rows = layout.owners(g.seq, torch.arange(i_lo * d, g.start, device=ctx.device))
            halo_ranks.append(ranks)
            halo_rows.append(rows)
    empty = torch.zeros(0, dtype=torch.int64, device=ctx.device)
    halo = ctx.keep(fetch_rows(_flat_pair(k_src, v_src), torch.cat(halo_ranks) if halo_ranks else empty,
                      torch.cat(halo_rows) if halo_rows else empty, ctx.group, ctx.counters, "cmp_halo"))
    halo_k = halo[:, : num_kv * dk].view(-1, num_kv, dk)
    halo_v = halo[:, num_kv * dk:].view(-1, num_kv, dv)

    parts_k, parts_v, ext_lens, positions, local_rows = [], [], [], [], []
    used = 0
    for (g, i_lo, count), n_halo in zip(plans, halo_len):
        if not count:
            continue
        parts_k += [halo_k[used:used + n_halo], k_src[g.row:g.row + g.length]]
        parts_v += [halo_v[used:used + n_halo], v_src[g.row:g.row + g.length]]
        used += n_halo
        ext_lens.append(n_halo + g.length)
        pos = (i_lo + torch.arange(count, device=ctx.device)) * d + l - 1
        positions.append(pos)
        local_rows.append(g.row + pos - g.start)
    if parts_k:
        cu_ext = torch.tensor([0] + ext_lens, dtype=torch.int64).cumsum(0).to(device=ctx.device, dtype=torch.int32)
        k_loc = compress_k(torch.cat(parts_k), cu_ext)
        v_loc = compress_v(torch.cat(parts_v), cu_ext)
        if rope is not None:
            k_loc = rope(k_loc, torch.cat(positions), torch.cat(local_rows))
    else:
        k_loc = k_src.new_zeros(0, num_kv, dk)
        v_loc = v_src.new_zeros(0, num_kv, dv)

    counts = [sum(_segment_cmp_count(g, hp)[1] for g in layout.segments[r]) for r in range(layout.cp)]
    gathered = ctx.keep(all_gather_rows(_flat_pair(k_loc, v_loc), counts, ctx.group, ctx.counters, "cmp_tokens"))
    return _natural_compressed(ctx, gathered, num_kv, dk, dv)


def _natural_compressed(ctx: CPContext, gathered: torch.Tensor, num_kv: int, dk: int, dv: int):
    """Reorder the rank-major gathered compressed tokens into natural per-sequence order."""
    layout, hp = ctx.layout, ctx.hp
    where: dict[tuple[int, int], tuple[int, int]] = {}
    offset = 0
    for r in range(layout.cp):
        for g in layout.segments[r]:
            count = _segment_cmp_count(g, hp)[1]
            where[(g.seq, g.chunk)] = (offset, count)
            offset += count
    index, cu_cmp = [], [0]
    for s in range(len(layout.seqlens)):
        for k in range(2 * layout.cp):
            start, count = where.get((s, k), (0, 0))
            index.append(torch.arange(start, start + count, dtype=torch.int64))
        cu_cmp.append(cu_cmp[-1] + num_compressed(layout.seqlens[s], hp.cmp_block, hp.cmp_stride))
    index = torch.cat(index).to(gathered.device) if index else torch.zeros(0, dtype=torch.int64, device=gathered.device)
    if index.numel() != cu_cmp[-1]:
        raise RuntimeError(f"compressed tokens: gathered {index.numel()}, expected {cu_cmp[-1]}")
    flat = gathered[index]
    return flat[:, : num_kv * dk].view(-1, num_kv, dk), flat[:, num_kv * dk:].view(-1, num_kv, dv), cu_cmp


def compressed_and_selection(ctx: CPContext, q_c: torch.Tensor, k_cmp_s: torch.Tensor, v_cmp_s: torch.Tensor,
                             g: Segment):
    """Branch 1 and the top-n block choice of one segment's queries, exactly as on one GPU.

    Args:
        q_c: [S, HQ, Dqk] the segment's queries; k_cmp_s, v_cmp_s: the sequence's compressed tokens.
    Returns:
        o_cmp [S, HQ, Dv] and int32 [S, HKV, n] global block indices.
    """
    hp = ctx.hp
    q_pos = torch.arange(g.start, g.end, device=q_c.device)
    visible = num_compressed(g.end, hp.cmp_block, hp.cmp_stride)
    kc, vc = k_cmp_s[:visible], v_cmp_s[:visible]
    o_cmp, lse = ctx.branches.compressed_attention(q_c, kc, vc, q_pos, cmp_block=hp.cmp_block,
                                                   cmp_stride=hp.cmp_stride, scale=ctx.scale)
    blocks = ctx.branches.select(q_c, kc, q_pos, lse, cmp_block=hp.cmp_block, cmp_stride=hp.cmp_stride,
                                 slc_block=hp.slc_block, topk=hp.topk, init_blocks=hp.init_blocks,
                                 local_blocks=hp.local_blocks, scale=ctx.scale)
    return o_cmp, blocks


def gated_sum(gates_c: torch.Tensor, o_cmp: torch.Tensor, o_slc: torch.Tensor, o_win: torch.Tensor) -> torch.Tensor:
    """gates[..., 0] * o_cmp + gates[..., 1] * o_slc + gates[..., 2] * o_win, in float32 (float64 for float64)."""
    acc = torch.promote_types(o_cmp.dtype, torch.float32)
    g = gates_c.to(acc)
    return g[..., 0:1] * o_cmp.to(acc) + g[..., 1:2] * o_slc.to(acc) + g[..., 2:3] * o_win.to(acc)


class _Tie(torch.autograd.Function):
    """Identity on ``out`` that makes every exchange output part of the graph.

    An exchange whose output happens not to reach the loss on one rank (e.g. an empty halo)
    would skip its backward collective there while its peers wait in theirs; tying gives it a
    zero gradient instead, so every rank runs every backward exchange, in the same order.
    """

    @staticmethod
    def forward(ctx, out, *received):
        ctx.shapes = [(t.shape, t.dtype, t.device) for t in received]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        zeros = [torch.zeros((), dtype=dt, device=dev).expand(shape) for shape, dt, dev in ctx.shapes]
        return (grad, *zeros)


def tie_outputs(out: torch.Tensor, ctx: CPContext) -> torch.Tensor:
    """``out`` unchanged, with every tensor registered by ``ctx.keep`` in its backward graph."""
    live = [t for t in ctx.received if t.requires_grad]
    return _Tie.apply(out, *live) if live and out.requires_grad else out
