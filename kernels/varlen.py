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

from .host_cache import host_list, memo_on, remember_host


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
        """Layout from query boundaries ``q_cu`` (int32 [N+1]) and optional first positions.

        Reads ``q_cu`` (and ``q_pos0`` when given) to the host once per tensor version
        (``host_cache``); nothing after that waits for the device. Without ``q_pos0`` the
        layout itself, with every plan it caches, is remembered on ``q_cu``, so the layers
        sharing one ``cu_seqlens`` plan once."""
        if q_cu.dim() != 1 or q_cu.numel() < 2:
            raise ValueError("q_cu must be a 1-D tensor with at least two entries")
        if q_pos0 is None:
            return memo_on(q_cu, "varlen", lambda: cls._build(q_cu, None))
        return cls._build(q_cu, q_pos0)

    @classmethod
    def _build(cls, q_cu: torch.Tensor, q_pos0: torch.Tensor | None) -> "Varlen":
        bounds = host_list(q_cu)
        lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        if any(n < 0 for n in lens):
            raise ValueError("q_cu must be non-decreasing")
        if q_pos0 is None:
            pos0 = [0] * len(lens)
            q_pos0 = torch.zeros(len(lens), dtype=torch.int32, device=q_cu.device)
        else:
            pos0 = host_list(q_pos0)
        if len(pos0) != len(lens) or any(p < 0 for p in pos0):
            raise ValueError("q_pos0 must hold one non-negative position per sequence")
        layout = cls(q_cu.to(torch.int32).contiguous(),
                     q_pos0.to(q_cu.device, torch.int32).contiguous(), lens, pos0)
        remember_host(layout.q_cu, bounds)
        return layout

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

    def cached(self, key, build):
        """``build()``, computed once per layout and ``key`` (plans derived from the layout)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def tiles_host(self, block: int) -> torch.Tensor:
        """int32 CPU [num_tiles, 2]: (sequence, first row within the sequence) of each tile of
        ``block`` consecutive query rows; tiles never cross a sequence boundary."""
        def build():
            lens = torch.tensor(self.lens, dtype=torch.int64)
            per_seq = (lens + block - 1) // block
            seq = torch.repeat_interleave(torch.arange(len(self.lens)), per_seq)
            first = torch.repeat_interleave(torch.cumsum(per_seq, 0) - per_seq, per_seq)
            t0 = (torch.arange(seq.numel()) - first) * block
            return torch.stack([seq, t0], 1).to(torch.int32)

        return self.cached(("tiles_host", block), build)

    def tiles(self, block: int) -> torch.Tensor:
        """:meth:`tiles_host` on the layout's device (int32 [num_tiles, 2])."""
        return self.cached(("tiles", block), lambda: to_device(self.tiles_host(block), self.device))

    def row_info(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(seq, pos): int32 [rows] sequence index and position of every query row."""
        def build():
            counts = torch.tensor(self.lens, dtype=torch.int64)
            shift = torch.tensor(self.pos0, dtype=torch.int64) - (torch.cumsum(counts, 0) - counts)
            counts, shift = to_device(counts, self.device), to_device(shift, self.device)
            rows = self.num_rows
            seq = torch.repeat_interleave(torch.arange(len(self.lens), device=self.device), counts,
                                          output_size=rows)
            pos = torch.arange(rows, device=self.device) + torch.repeat_interleave(
                shift, counts, output_size=rows)
            return seq.to(torch.int32), pos.to(torch.int32)

        return self.cached("rows", build)


def int32_on(values: list, device) -> torch.Tensor:
    """int32 [len(values)] tensor of the ints ``values`` on ``device`` (pinned asynchronous
    copy), its host copy remembered (``host_cache``), so no reader waits for the device."""
    return remember_host(to_device(torch.tensor(values, dtype=torch.int32), device), values)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """CPU tensor ``t`` on ``device``; to a GPU through pinned memory without a host sync."""
    device = torch.device(device)
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


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
