"""Host-side plans of the CP exchanges that depend only on the pack's layout, built once and cached.

Everything here is a function of (sequence lengths, cp, rank, hyper-parameters, device), which every
rank knows, so each rank computes what it receives *and* what every peer asks of it without any
collective or host synchronisation; index tensors are built vectorised on the host and copied to the
device asynchronously (pinned memory). A model calls every layer with the same pack, so the plan is
built once per distinct pack (an LRU of ``_CACHE_SIZE`` plans).

Segment layouts (``SegLayout``) describe one launch over all of this rank's segments: queries are
the local rows (segments are contiguous, in local-row order), segment b's queries start at
position ``pos0[b]`` of its key run ``k_cu[b] .. k_cu[b+1]`` (a prefix from position 0 of the
sequence, or of a CP key store).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch

from nsa_kernels.layout import num_compressed

from .layout import Segment, ZigzagLayout

__all__ = ["to_device", "ranges", "SegLayout", "StaticExchange", "StaticPlan", "static_plan"]

_CACHE_SIZE = 16
_CACHE: "OrderedDict[tuple, StaticPlan]" = OrderedDict()


def to_device(values, dtype: torch.dtype, device) -> torch.Tensor:
    """A host list / CPU tensor on ``device`` without a host synchronisation (pinned async copy)."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    t = t.to(dtype)
    device = torch.device(device)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def ranges(starts, lengths) -> torch.Tensor:
    """int64 CPU tensor: concatenation of ``arange(s, s + n)`` over (starts, lengths), vectorised."""
    starts = torch.as_tensor(starts, dtype=torch.int64)
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    total = int(lengths.sum()) if lengths.numel() else 0
    if total == 0:
        return torch.zeros(0, dtype=torch.int64)
    first = torch.cumsum(lengths, 0) - lengths
    seg = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    return starts[seg] + torch.arange(total) - first[seg]


@dataclass
class SegLayout:
    """One launch over this rank's segments: query rows ``q_cu``, first positions ``pos0``, key
    runs ``k_cu`` (host lists) and, on demand, their device forms and the kernels' ``Varlen``."""

    q_cu: list
    pos0: list
    k_cu: list
    device: torch.device
    rows: Optional[tuple] = None  # (seq int32 [R], pos int32 [R]) on device, to pre-fill Varlen.row_info
    _varlen: object = field(default=None, repr=False)
    _k_cu_dev: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def num_segments(self) -> int:
        return len(self.pos0)

    def varlen(self):
        """The kernels' ``Varlen`` (built without host synchronisation, cached)."""
        if self._varlen is None:
            from nsa_kernels.varlen import Varlen

            lens = [b - a for a, b in zip(self.q_cu[:-1], self.q_cu[1:])]
            cache = {}
            if self.rows is not None:
                cache["rows"] = self.rows
            self._varlen = Varlen(to_device(self.q_cu, torch.int32, self.device),
                                  to_device(self.pos0, torch.int32, self.device), lens, list(self.pos0),
                                  _cache=cache)
        return self._varlen

    def k_cu_dev(self) -> torch.Tensor:
        """int32 key boundaries on the device (cached)."""
        if self._k_cu_dev is None:
            self._k_cu_dev = to_device(self.k_cu, torch.int32, self.device)
        return self._k_cu_dev

    def row_info(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(segment int64 [R], position int64 [R]) of every query row, on the device (no sync)."""
        lens = [b - a for a, b in zip(self.q_cu[:-1], self.q_cu[1:])]
        seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens, dtype=torch.int64))
        pos = ranges(self.pos0, lens)
        return to_device(seg, torch.int64, self.device), to_device(pos, torch.int64, self.device)


@dataclass
class StaticExchange:
    """A row exchange fixed by the layout: what this rank receives from each peer (``recv_counts``,
    peer-major), what it sends (``send_counts``, rows ``send_idx`` of its table), and
    ``natural[i]``: the received row holding this rank's i-th request in its own (natural) order."""

    recv_counts: list
    send_counts: list
    send_idx: torch.Tensor
    natural: torch.Tensor


def _static_exchange(requests: list, rank: int, device) -> StaticExchange:
    """``requests[p]`` = (owner ranks, owner rows) of rank p's requests in p's natural order."""
    cp = len(requests)
    own_owner, _ = requests[rank]
    order = torch.sort(own_owner, stable=True).indices
    natural = torch.empty_like(order)
    natural[order] = torch.arange(order.numel())
    recv_counts = torch.bincount(own_owner, minlength=cp).tolist() if own_owner.numel() else [0] * cp
    send, send_counts = [], []
    for p in range(cp):
        owner, rows = requests[p]
        mine = rows[owner == rank]
        send.append(mine)
        send_counts.append(int(mine.numel()))
    send_idx = torch.cat(send) if send else torch.zeros(0, dtype=torch.int64)
    return StaticExchange(recv_counts, send_counts, to_device(send_idx, torch.int64, device),
                          to_device(natural, torch.int64, device))


def _owners(layout: ZigzagLayout, seq: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return layout.owners(seq, positions)


def _halo_requests(layout: ZigzagLayout, rank: int, spans: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(owners, rows) of positions [lo, hi) of sequence s for every (s, lo, hi) in ``spans``."""
    owners, rows = [], []
    for s, lo, hi in spans:
        if hi > lo:
            r, w = _owners(layout, s, torch.arange(lo, hi, dtype=torch.int64))
            owners.append(r)
            rows.append(w)
    if not owners:
        z = torch.zeros(0, dtype=torch.int64)
        return z, z
    return torch.cat(owners), torch.cat(rows)


def cmp_span(g: Segment, cmp_block: int, cmp_stride: int) -> tuple[int, int]:
    """(first compressed token, count) produced by segment ``g``: tokens whose block ends in it."""
    i_lo = max(0, -((cmp_block - 1 - g.start) // cmp_stride))
    return i_lo, num_compressed(g.end - i_lo * cmp_stride, cmp_block, cmp_stride)


@dataclass
class StaticPlan:
    """Layout-only plan of one rank (see module docstring). Built by ``static_plan``."""

    segments: list
    q_cu: list
    # compression
    cmp_halo: StaticExchange
    cmp_pieces: list      # [(source, start, stop)] with source "halo" / "local", concatenated
    cmp_cu: list          # host boundaries of the compressor's input sequences
    cmp_positions: torch.Tensor   # int64 positions of this rank's compressed tokens (device)
    cmp_local_rows: torch.Tensor  # int64 local rows of those positions (device)
    cmp_max_position: int
    cmp_counts: list      # compressed tokens produced per rank
    kc_index: torch.Tensor        # gathered rank-major compressed rows -> per-segment visible prefixes
    cmp_layout: SegLayout
    # window halo (ring)
    win_halo: StaticExchange
    win_pieces: list
    win_layout: SegLayout
    # selection geometry
    seg_first_block: list         # first selection block of every segment (start // l')
    row_segment: torch.Tensor     # int64 [R] segment of every local row (device)
    row_first_block: torch.Tensor  # int64 [R] first block of the row's segment (device)


def static_plan(layout: ZigzagLayout, rank: int, hp, device) -> StaticPlan:
    """The cached ``StaticPlan`` of ``rank`` for ``layout`` and hyper-parameters ``hp``."""
    device = torch.device(device)
    key = (tuple(layout.seqlens), layout.cp, rank, hp.cmp_block, hp.cmp_stride, hp.slc_block, hp.window,
           str(device))
    plan = _CACHE.get(key)
    if plan is None:
        plan = _build(layout, rank, hp, device)
        _CACHE[key] = plan
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return plan


def _build(layout: ZigzagLayout, rank: int, hp, device) -> StaticPlan:
    l, d, ls, w = hp.cmp_block, hp.cmp_stride, hp.slc_block, hp.window
    cp = layout.cp
    segs = layout.segments[rank]
    q_cu = [0]
    for g in segs:
        q_cu.append(q_cu[-1] + g.length)

    # Compressor halos: [i_lo*d, start) before every segment that produces tokens (every rank's).
    def cmp_spans(r):
        out = []
        for g in layout.segments[r]:
            i_lo, count = cmp_span(g, l, d)
            out.append((g.seq, i_lo * d, g.start) if count else (g.seq, 0, 0))
        return out

    cmp_req = [_halo_requests(layout, r, cmp_spans(r)) for r in range(cp)]
    cmp_halo = _static_exchange(cmp_req, rank, device)
    pieces, cmp_cu, positions, local_rows, used = [], [0], [], [], 0
    for g, (_, lo, hi) in zip(segs, cmp_spans(rank)):
        i_lo, count = cmp_span(g, l, d)
        if not count:
            continue
        pieces += [("halo", used, used + hi - lo), ("local", g.row, g.row + g.length)]
        used += hi - lo
        cmp_cu.append(cmp_cu[-1] + hi - lo + g.length)
        pos = (i_lo + torch.arange(count, dtype=torch.int64)) * d + l - 1
        positions.append(pos)
        local_rows.append(g.row + pos - g.start)
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.int64)  # noqa: E731
    positions, local_rows = cat(positions), cat(local_rows)

    # Compressed tokens: rank-major after the all-gather; natural order per sequence; then every
    # segment's visible prefix, packed (the compressed branch and the selection read these).
    counts, where, offset = [], {}, 0
    for r in range(cp):
        n_r = 0
        for g in layout.segments[r]:
            i_lo, count = cmp_span(g, l, d)
            where[(g.seq, g.chunk)] = (offset + n_r, count)
            n_r += count
        counts.append(n_r)
        offset += n_r
    natural = []
    for s in range(len(layout.seqlens)):
        starts, lens = zip(*[where[(s, k)] for k in range(2 * cp)])
        natural.append(ranges(starts, lens))
    kc_parts, kc_cu = [], [0]
    for g in segs:
        visible = num_compressed(g.end, l, d)
        kc_parts.append(natural[g.seq][:visible])
        kc_cu.append(kc_cu[-1] + visible)
    cmp_layout = SegLayout(q_cu, [g.start for g in segs], kc_cu, device)

    # Window halo: the w-1 positions before every segment.
    def win_spans(r):
        return [(g.seq, max(0, g.start - w + 1), g.start) for g in layout.segments[r]]

    win_req = [_halo_requests(layout, r, win_spans(r)) for r in range(cp)]
    win_halo = _static_exchange(win_req, rank, device)
    win_pieces, win_cu, win_pos0, used = [], [0], [], 0
    for g, (_, lo, hi) in zip(segs, win_spans(rank)):
        win_pieces += [("halo", used, used + hi - lo), ("local", g.row, g.row + g.length)]
        used += hi - lo
        win_cu.append(win_cu[-1] + hi - lo + g.length)
        win_pos0.append(hi - lo)
    win_layout = SegLayout(q_cu, win_pos0, win_cu, device)

    lens = torch.tensor([g.length for g in segs], dtype=torch.int64)
    row_seg = torch.repeat_interleave(torch.arange(len(segs)), lens)
    first_block = [g.start // ls for g in segs]
    return StaticPlan(
        segments=segs, q_cu=q_cu, cmp_halo=cmp_halo, cmp_pieces=pieces, cmp_cu=cmp_cu,
        cmp_positions=to_device(positions, torch.int64, device),
        cmp_local_rows=to_device(local_rows, torch.int64, device),
        cmp_max_position=int(positions.max()) if positions.numel() else -1, cmp_counts=counts,
        kc_index=to_device(cat(kc_parts), torch.int64, device), cmp_layout=cmp_layout,
        win_halo=win_halo, win_pieces=win_pieces, win_layout=win_layout, seg_first_block=first_block,
        row_segment=to_device(row_seg, torch.int64, device),
        row_first_block=to_device(torch.tensor(first_block, dtype=torch.int64)[row_seg], torch.int64, device))


def take_pieces(pieces: list, halo: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Concatenate row ranges of ``halo`` / ``local`` listed in ``pieces`` (one copy)."""
    parts = [(halo if src == "halo" else local)[a:b] for src, a, b in pieces if b > a]
    if not parts:
        return local[:0]
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()
