"""What both CP modes share: compression with a halo, the compressed-token all-gather and the
per-segment compressed key runs (index plans in ``plan.py``).

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

from nsa_kernels.validation import NSAHyperParams

from .comm import CommCounters, RowExchange, all_gather_rows
from .layout import Segment, ZigzagLayout
from .plan import StaticExchange, StaticPlan, take_pieces

__all__ = ["CPContext", "first_compressed", "compress_and_gather", "static_halo", "tie_outputs"]

RopeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class CPContext:
    """Everything a CP mode needs besides the tensors.

    Attributes:
        layout: the pack's zig-zag layout; rank: this rank in ``group``.
        hp: NSA hyper-parameters; scale: softmax scale.
        counters: byte counters; device: device of the tensors.
        branches: branch functions (``branches.get_branches``).
        plan: the layout's cached ``plan.StaticPlan`` for this rank.
    """

    layout: ZigzagLayout
    rank: int
    group: object
    hp: NSAHyperParams
    scale: float
    counters: CommCounters
    device: torch.device
    branches: object = None
    plan: Optional[StaticPlan] = None
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


def _flat_pair(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)], dim=1)


def static_halo(ctx: CPContext, exchange: StaticExchange, table: torch.Tensor, name: str) -> torch.Tensor:
    """Rows of the peers' ``table`` this rank's plan asks for, in the plan's natural order (no sync)."""
    ex = RowExchange.planned(None, exchange.recv_counts, exchange.send_counts, ctx.group, ctx.counters, name,
                             send_idx=exchange.send_idx)
    return ctx.keep(ex(table))[exchange.natural]


def compress_and_gather(ctx: CPContext, k_src: torch.Tensor, v_src: torch.Tensor, compress_k, compress_v,
                        rope: Optional[RopeFn]) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress this rank's segments (with halos), all-gather the compressed tokens, and lay out
    every segment's visible compressed prefix (``ctx.plan.cmp_layout``'s key runs).

    Args:
        k_src, v_src: [T/cp, HKV, Dqk], [T/cp, HKV, Dv] local compressor inputs (keys pre-RoPE).
        compress_k, compress_v: ``forward(x [T, HKV, D], cu_seqlens) -> [Tc, HKV, D]`` modules; they
            get ``cu_seqlens`` as a CPU int32 tensor (host bookkeeping without a device sync).
        rope: ``rope(k_cmp, positions, local_rows)`` rotating compressed keys at their
            within-sequence positions (whose tokens are this rank's ``local_rows``), or None.
    Returns:
        k_cmp [Kc, HKV, Dqk], v_cmp [Kc, HKV, Dv]: segment after segment, the compressed tokens of the
        segment's sequence visible to its last query (duplicated across segments of one sequence).
    """
    plan = ctx.plan
    num_kv, dk, dv = k_src.shape[1], k_src.shape[2], v_src.shape[2]
    halo = static_halo(ctx, plan.cmp_halo, _flat_pair(k_src, v_src), "cmp_halo")
    if len(plan.cmp_cu) > 1:
        cu_ext = torch.tensor(plan.cmp_cu, dtype=torch.int32)
        k_in = take_pieces(plan.cmp_pieces, halo[:, : num_kv * dk].view(-1, num_kv, dk), k_src)
        v_in = take_pieces(plan.cmp_pieces, halo[:, num_kv * dk:].view(-1, num_kv, dv), v_src)
        k_loc = compress_k(k_in, cu_ext)
        v_loc = compress_v(v_in, cu_ext)
        if rope is not None:
            k_loc = rope(k_loc, plan.cmp_positions, plan.cmp_local_rows)
    else:
        k_loc = k_src.new_zeros(0, num_kv, dk)
        v_loc = v_src.new_zeros(0, num_kv, dv)
    gathered = ctx.keep(all_gather_rows(_flat_pair(k_loc, v_loc), plan.cmp_counts, ctx.group, ctx.counters,
                                        "cmp_tokens"))
    k_cmp = gathered[:, : num_kv * dk][plan.kc_index].view(-1, num_kv, dk)
    v_cmp = gathered[:, num_kv * dk:][plan.kc_index].view(-1, num_kv, dv)
    return k_cmp, v_cmp


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
