"""Differentiable CP exchanges with byte counters.

Two primitives carry every tensor NSA's context parallelism moves:

* ``all_gather_rows``: every rank contributes a few rows (counts may differ per rank: padded
  to the largest); forward all-gathers, backward reduce-scatters the gradient back.
* ``RowExchange``: a planned all-to-all where each rank names the rows it wants from each
  peer's table (``want[p]``); forward delivers them, backward sends their gradients back to
  the owners, which add them into their table's gradient.

Both record the bytes *this rank sends to other ranks* in a ``CommCounters``
(``"<name>.fwd"``, ``"<name>.bwd"``, and ``"<name>.index"`` for the request lists), so a
training log can show what CP costs per layer and step.
"""
from __future__ import annotations

import math
import warnings
from collections import defaultdict
from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["CommCounters", "GLOBAL_COUNTERS", "all_gather_rows", "RowExchange", "fetch_rows"]


class CommCounters:
    """Bytes this rank sent to other ranks, by exchange (``name.fwd`` / ``name.bwd`` / ``name.index``)."""

    def __init__(self):
        self.bytes: dict[str, int] = defaultdict(int)

    def add(self, key: str, nbytes: int) -> None:
        """Add ``nbytes`` to counter ``key``."""
        self.bytes[key] += int(nbytes)

    def reset(self) -> None:
        """Zero every counter (call once per step to get per-step numbers)."""
        self.bytes.clear()

    def snapshot(self) -> dict[str, int]:
        """A plain dict copy of the counters."""
        return dict(self.bytes)

    def total(self, direction: Optional[str] = None) -> int:
        """Sum of all counters, or of those ending in ``.<direction>`` ("fwd", "bwd", "index")."""
        return sum(v for k, v in self.bytes.items() if direction is None or k.endswith("." + direction))

    def __repr__(self) -> str:
        return f"CommCounters({dict(sorted(self.bytes.items()))})"


GLOBAL_COUNTERS = CommCounters()
"""Default counters of ``nsa_attention_cp`` when the caller passes none."""


def _row_bytes(x: torch.Tensor) -> int:
    return math.prod(x.shape[1:]) * x.element_size()


def _reduce_scatter(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated name, still the portable one
        dist.reduce_scatter_tensor(out, inp, group=group)


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, group, counters, name):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        width = max(counts) if counts else 0
        padded = x.new_zeros((width,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        gathered = x.new_empty((world * width,) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(gathered, padded.contiguous(), group=group)
        keep = torch.cat([torch.arange(r * width, r * width + c, device=x.device) for r, c in enumerate(counts)])
        ctx.save_for_backward(keep)
        ctx.meta = (counts, width, world, rank, group, counters, name, tuple(x.shape))
        counters.add(name + ".fwd", (world - 1) * width * _row_bytes(x))
        return gathered[keep]

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        counts, width, world, rank, group, counters, name, shape = ctx.meta
        full = grad.new_zeros((world * width,) + tuple(grad.shape[1:]))
        full[keep] = grad
        out = grad.new_empty((width,) + tuple(grad.shape[1:]))
        _reduce_scatter(out, full.contiguous(), group)
        counters.add(name + ".bwd", (world - 1) * width * _row_bytes(out))
        return out[: shape[0]], None, None, None, None


def all_gather_rows(x: torch.Tensor, counts: Sequence[int], group, counters: CommCounters, name: str) -> torch.Tensor:
    """All-gather rows of unequal count; backward reduce-scatters (sums) gradients to owners.

    Args:
        x: [counts[rank], ...] this rank's rows.
        counts: rows held by every rank of ``group`` (the same list on every rank).
        group: the CP process group.
    Returns:
        [sum(counts), ...]: every rank's rows, rank-major.
    """
    world = dist.get_world_size(group)
    if len(counts) != world or x.shape[0] != counts[dist.get_rank(group)]:
        raise ValueError(f"counts={list(counts)}: must list {world} row counts, this rank's = {x.shape[0]}")
    return _AllGatherRows.apply(x, list(counts), group, counters, name)


class _ExchangeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, plan):
        ctx.plan = plan
        ctx.table_shape = tuple(table.shape)
        flat = table.reshape(table.shape[0], -1)
        send = flat[plan.send_idx]
        out = flat.new_empty(sum(plan.recv_counts), flat.shape[1])
        dist.all_to_all_single(out, send.contiguous(), plan.recv_counts, plan.send_counts, group=plan.group)
        plan.counters.add(plan.name + ".fwd", plan.remote_send_rows * flat.shape[1] * flat.element_size())
        return out.view((out.shape[0],) + ctx.table_shape[1:])

    @staticmethod
    def backward(ctx, grad):
        plan = ctx.plan
        flat = grad.reshape(grad.shape[0], -1).contiguous()
        back = flat.new_empty(sum(plan.send_counts), flat.shape[1])
        dist.all_to_all_single(back, flat, plan.send_counts, plan.recv_counts, group=plan.group)
        plan.counters.add(plan.name + ".bwd", plan.remote_recv_rows * flat.shape[1] * flat.element_size())
        out = flat.new_zeros(ctx.table_shape[0], flat.shape[1]).index_add_(0, plan.send_idx, back)
        return out.view(ctx.table_shape), None


class RowExchange:
    """A planned all-to-all of table rows between the ranks of a CP group.

    Building the plan exchanges the request lists (``name.index`` bytes); calling it moves the
    data. Every rank must build and call it collectively, in the same order.

    Args:
        want: one int64 tensor per rank p: the rows of rank p's table this rank needs (may be
            empty; requests to itself are served locally by the collective).
        group: the CP process group.
        device: device of the index tensors (the tables' device; CUDA for NCCL).
        counters, name: where and under which name to count bytes.
    """

    def __init__(self, want: Sequence[torch.Tensor], group, device, counters: CommCounters, name: str):
        world = dist.get_world_size(group)
        if len(want) != world:
            raise ValueError(f"want: needs one request tensor per rank ({world}), got {len(want)}")
        recv_counts = [int(w.numel()) for w in want]
        recv = torch.tensor(recv_counts, dtype=torch.int64, device=device)
        send = torch.empty_like(recv)
        dist.all_to_all_single(send, recv, group=group)
        requests = torch.cat([w.to(device=device, dtype=torch.int64).reshape(-1) for w in want])
        self._setup(requests, recv_counts, [int(c) for c in send.tolist()], group, counters, name, None)

    @classmethod
    def planned(cls, requests: Optional[torch.Tensor], recv_counts: Sequence[int], send_counts: Sequence[int],
                group, counters: CommCounters, name: str, send_idx: Optional[torch.Tensor] = None) -> "RowExchange":
        """An exchange whose counts are already known on the host (no count exchange, no sync).

        Args:
            requests: int64 rows wanted from each peer, peer-major (``recv_counts[p]`` for peer p);
                ignored when ``send_idx`` (the rows the peers want of this rank, peer-major) is given.
            recv_counts, send_counts: host lists, rows this rank receives from / sends to each peer.
        """
        self = cls.__new__(cls)
        self._setup(requests, list(recv_counts), list(send_counts), group, counters, name, send_idx)
        return self

    def _setup(self, requests, recv_counts, send_counts, group, counters, name, send_idx):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        self.group, self.counters, self.name, self.rank = group, counters, name, rank
        self.recv_counts, self.send_counts = [int(c) for c in recv_counts], [int(c) for c in send_counts]
        if send_idx is None:
            send_idx = torch.empty(sum(self.send_counts), dtype=torch.int64, device=requests.device)
            dist.all_to_all_single(send_idx, requests.to(torch.int64).contiguous(), self.send_counts,
                                   self.recv_counts, group=group)
            counters.add(name + ".index", 8 * (world - 1 + sum(c for p, c in enumerate(self.recv_counts)
                                                                if p != rank)))
        self.send_idx = send_idx
        self.remote_send_rows = sum(c for p, c in enumerate(self.send_counts) if p != rank)
        self.remote_recv_rows = sum(c for p, c in enumerate(self.recv_counts) if p != rank)

    def __call__(self, table: torch.Tensor) -> torch.Tensor:
        """Rows of the peers' ``table`` [R_p, ...] this rank asked for: [sum(want sizes), ...],
        peer-major, each peer's rows in request order. Differentiable."""
        return _ExchangeRows.apply(table, self)


def fetch_rows(table: torch.Tensor, ranks: torch.Tensor, rows: torch.Tensor, group,
               counters: CommCounters, name: str) -> torch.Tensor:
    """Rows ``rows[i]`` of rank ``ranks[i]``'s ``table``, in request order. Differentiable.

    Collective: every rank of ``group`` calls it once (with its own, possibly empty, requests).

    Args:
        table: [R, ...] this rank's table (same trailing shape on every rank).
        ranks, rows: int64 [P] owner rank and row of each requested row.
    Returns:
        [P, ...] the requested rows.
    """
    world = dist.get_world_size(group)
    ranks = ranks.to(table.device, torch.int64)
    rows = rows.to(table.device, torch.int64)
    order = torch.sort(ranks, stable=True).indices
    want = [rows[order[ranks[order] == p]] for p in range(world)]
    received = RowExchange(want, group, table.device, counters, name)(table)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return received[inverse]
