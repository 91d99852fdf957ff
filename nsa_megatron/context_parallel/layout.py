"""Megatron's load-balanced ("zig-zag") context-parallel token layout, and its inverse.

Every sequence of a pack, of length L, is cut into 2*cp equal chunks of S = L / (2*cp)
tokens; CP rank r holds chunks r and 2*cp-1-r of every sequence. A rank's local tensor is,
sequence after sequence, [chunk r, chunk 2cp-1-r] (the THD split Megatron applies per
sequence; for one sequence it is ``get_batch_on_this_cp_rank``'s split). Every rank holds
T / cp tokens, so collectives over local tensors need no padding.

Names: a *segment* is one (sequence, chunk) piece held by one rank; positions are within
their sequence (0-based), rows are indices into a rank's local tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from nsa_kernels.host_cache import host_list

__all__ = ["Segment", "ZigzagLayout", "zigzag_split", "zigzag_merge", "zigzag_positions"]


@dataclass(frozen=True)
class Segment:
    """One chunk of one sequence as held by its owner rank.

    Attributes:
        seq: index of the sequence in the pack.
        chunk: zig-zag chunk index in [0, 2*cp).
        start: C, position within the sequence of the chunk's first token.
        length: S, tokens in the chunk (L / (2*cp)).
        row: first row of the chunk in its owner's local tensor.
        seq_len: L, the whole sequence's length.
    """

    seq: int
    chunk: int
    start: int
    length: int
    row: int
    seq_len: int

    @property
    def end(self) -> int:
        """One past the chunk's last position."""
        return self.start + self.length


class ZigzagLayout:
    """Where every token of a pack lives under Megatron's zig-zag CP split.

    Args:
        seqlens: global lengths of the packed sequences; each must be divisible by 2*cp.
        cp: context-parallel size (>= 1).
    Raises:
        ValueError naming the sequence whose length is not divisible by 2*cp.
    """

    def __init__(self, seqlens: Sequence[int], cp: int):
        if not isinstance(cp, int) or cp < 1:
            raise ValueError(f"cp_size must be a positive int, got {cp!r}")
        self.cp = cp
        self.seqlens = [int(n) for n in seqlens]
        for i, n in enumerate(self.seqlens):
            if n < 0 or n % (2 * cp):
                raise ValueError(
                    f"cu_seqlens: sequence {i} has {n} tokens, not divisible by 2 * context_parallel_size "
                    f"({2 * cp}); pad every sequence to a multiple of {2 * cp} (Megatron's CP split)"
                )
        self.local_tokens = sum(self.seqlens) // cp
        self.segments: list[list[Segment]] = [[] for _ in range(cp)]
        # chunk_rank[s][k], chunk_row[s][k]: owner rank and its first local row of chunk k of sequence s.
        self.chunk_rank: list[list[int]] = []
        self.chunk_row: list[list[int]] = []
        rows = [0] * cp
        for s, n in enumerate(self.seqlens):
            size = n // (2 * cp)
            ranks, firsts = [0] * (2 * cp), [0] * (2 * cp)
            for r in range(cp):
                for k in (r, 2 * cp - 1 - r):
                    self.segments[r].append(Segment(s, k, k * size, size, rows[r], n))
                    ranks[k], firsts[k] = r, rows[r]
                    rows[r] += size
            self.chunk_rank.append(ranks)
            self.chunk_row.append(firsts)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, cp: int) -> "ZigzagLayout":
        """Layout from global boundaries ``cu_seqlens`` (int [N+1], last = total tokens)."""
        bounds = host_list(cu_seqlens)
        return cls([b - a for a, b in zip(bounds[:-1], bounds[1:])], cp)

    def owners(self, seq: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Owner rank and local row of tokens ``positions`` (int64 [P]) of sequence ``seq``."""
        size = self.seqlens[seq] // (2 * self.cp)
        chunk = torch.div(positions, size, rounding_mode="floor")
        ranks = torch.tensor(self.chunk_rank[seq], dtype=torch.int64, device=positions.device)[chunk]
        firsts = torch.tensor(self.chunk_row[seq], dtype=torch.int64, device=positions.device)[chunk]
        return ranks, firsts + positions - chunk * size

    def local_positions(self, rank: int, device=None) -> torch.Tensor:
        """int64 [T/cp]: within-sequence position of each of ``rank``'s local tokens."""
        parts = [torch.arange(g.start, g.end, dtype=torch.int64) for g in self.segments[rank]]
        out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return out.to(device) if device is not None else out

    def global_to_local_index(self, rank: int, device=None) -> torch.Tensor:
        """int64 [T/cp]: packed global row of each of ``rank``'s local rows."""
        offsets = [0]
        for n in self.seqlens:
            offsets.append(offsets[-1] + n)
        parts = [torch.arange(g.start, g.end, dtype=torch.int64) + offsets[g.seq] for g in self.segments[rank]]
        out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return out.to(device) if device is not None else out

    def merge_index(self, device=None) -> torch.Tensor:
        """int64 [T]: row of the rank-major concatenation of all local tensors holding each
        packed global row (so ``cat(locals)[merge_index]`` is the natural order)."""
        src = torch.cat([self.global_to_local_index(r) for r in range(self.cp)])
        inv = torch.empty_like(src)
        inv[src] = torch.arange(src.numel(), dtype=torch.int64)
        return inv.to(device) if device is not None else inv


def _layout(cu_seqlens: Optional[torch.Tensor], total: int, cp: int) -> ZigzagLayout:
    if cu_seqlens is None:
        return ZigzagLayout([total], cp)
    if int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])}, but x has {total} tokens")
    return ZigzagLayout.from_cu_seqlens(cu_seqlens, cp)


def zigzag_split(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor], cp_size: int, cp_rank: int) -> torch.Tensor:
    """This rank's share of a global packed tensor.

    Args:
        x: [T, ...] tokens of the whole pack in natural order.
        cu_seqlens: int [N+1] global boundaries (None: one sequence).
        cp_size, cp_rank: CP group size and this rank.
    Returns:
        [T/cp, ...]: for every sequence, chunk ``cp_rank`` then chunk ``2*cp_size-1-cp_rank``.
    """
    layout = _layout(cu_seqlens, x.shape[0], cp_size)
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank}: must be in [0, {cp_size})")
    return x[layout.global_to_local_index(cp_rank, x.device)]


def zigzag_merge(parts: Sequence[torch.Tensor], cu_seqlens: Optional[torch.Tensor]) -> torch.Tensor:
    """Inverse of ``zigzag_split``: the natural-order pack from every rank's local tensor.

    Args:
        parts: cp tensors [T/cp, ...], index = rank.
        cu_seqlens: int [N+1] global boundaries (None: one sequence).
    Returns:
        [T, ...] in natural (global) order.
    """
    cp = len(parts)
    total = sum(p.shape[0] for p in parts)
    layout = _layout(cu_seqlens, total, cp)
    return torch.cat(list(parts))[layout.merge_index(parts[0].device)]


def zigzag_positions(cu_seqlens: Optional[torch.Tensor], total: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """int64 [T/cp]: within-sequence position of each local token of ``cp_rank`` (for RoPE).

    Args:
        cu_seqlens: int [N+1] global boundaries, or None for one sequence of ``total`` tokens.
    """
    return _layout(cu_seqlens, total, cp_size).local_positions(cp_rank)
