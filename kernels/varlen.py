"""Packed variable-length layout helpers shared by the NSA kernel launchers.

Every launcher sees queries as rows of a packed tensor split into sequences by ``q_cu``
(int32 [N+1]); the first query row of sequence b sits at position ``q_pos0[b]`` of that
sequence (0 for a whole sequence, > 0 for a context-parallel chunk or a decode step). Keys
of sequence b (plain or compressed) are the sequence's prefix starting at position 0, rows
``k_cu[b] .. k_cu[b+1]`` of their packed tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def next_pow2(x: int) -> int:
    """Smallest power of two >= max(x, 1)."""
    return 1 << (max(int(x), 1) - 1).bit_length()


@dataclass
class Varlen:
    """Query layout of one launch: per-sequence query rows and the position of their first row.

    Attributes:
        q_cu: int32 [N+1] query row boundaries (on the kernels' device).
        q_pos0: int32 [N] position within its sequence of each sequence's first query row.
        lens: python list of the N query counts.
        pos0: python list of the N first positions.
    """

    q_cu: torch.Tensor
    q_pos0: torch.Tensor
    lens: list
    pos0: list
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, q_cu: torch.Tensor, q_pos0: torch.Tensor | None = None) -> "Varlen":
        """Layout from query boundaries ``q_cu`` (int32 [N+1]) and optional first positions."""
        if q_cu.dim() != 1 or q_cu.numel() < 2:
            raise ValueError("q_cu must be a 1-D tensor with at least two entries")
        cu = q_cu.detach().to("cpu", torch.int64)
        lens = (cu[1:] - cu[:-1]).tolist()
        if any(n < 0 for n in lens):
            raise ValueError("q_cu must be non-decreasing")
        if q_pos0 is None:
            q_pos0 = torch.zeros(len(lens), dtype=torch.int32, device=q_cu.device)
        pos0 = q_pos0.detach().to("cpu", torch.int64).tolist()
        if len(pos0) != len(lens) or any(p < 0 for p in pos0):
            raise ValueError("q_pos0 must hold one non-negative position per sequence")
        return cls(q_cu.to(torch.int32).contiguous(), q_pos0.to(q_cu.device, torch.int32).contiguous(),
                   lens, pos0)

    @property
    def device(self) -> torch.device:
        return self.q_cu.device

    @property
    def num_rows(self) -> int:
        return int(sum(self.lens))

    @property
    def max_end(self) -> int:
        """Largest query position + 1 over all sequences (0 when there are no queries)."""
        return max((p + n for p, n in zip(self.pos0, self.lens) if n > 0), default=0)

    def tiles(self, block: int) -> torch.Tensor:
        """int32 [num_tiles, 2]: (sequence, first row within the sequence) of each tile of
        ``block`` consecutive query rows; tiles never cross a sequence boundary."""
        key = ("tiles", block)
        if key not in self._cache:
            rows = [(b, s) for b, n in enumerate(self.lens) for s in range(0, n, block)]
            t = torch.tensor(rows if rows else [[0, 0]], dtype=torch.int32).reshape(-1, 2)
            self._cache[key] = t[: len(rows)].to(self.device)
        return self._cache[key]

    def row_info(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(seq, pos): int32 [rows] sequence index and position of every query row."""
        if "rows" not in self._cache:
            counts = torch.tensor(self.lens, dtype=torch.int64)
            seq = torch.repeat_interleave(torch.arange(len(self.lens)), counts)
            first = torch.cumsum(counts, 0) - counts
            pos = torch.arange(int(counts.sum())) - first[seq] + torch.tensor(self.pos0)[seq]
            self._cache["rows"] = (seq.to(self.device, torch.int32), pos.to(self.device, torch.int32))
        return self._cache["rows"]


_POISON = {"on": False}


def new_empty(*shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty for every kernel output; NaN (floats) / -7 (ints) while :class:`poisoned_outputs`
    is active, so tests catch elements a kernel never wrote."""
    if not _POISON["on"]:
        return torch.empty(*shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -7
    return torch.full(shape, fill, dtype=dtype, device=device)


class poisoned_outputs:
    """Context manager: kernel launchers allocate their outputs pre-filled with poison."""

    def __enter__(self):
        self._prev = _POISON["on"]
        _POISON["on"] = True
        return self

    def __exit__(self, *exc):
        _POISON["on"] = self._prev
        return False
