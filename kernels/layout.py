"""Packed-sequence ("THD") bookkeeping shared by every NSA backend.

A pack concatenates N sequences along T; ``cu_seqlens`` (int32 [N+1]) holds their
boundaries. Compressed tokens are packed the same way, sequence by sequence, with
``Lc = max(0, (L - l) // d + 1)`` of them for a sequence of length ``L``.
"""
from __future__ import annotations

import itertools

import torch

from .host_cache import host_list, memo_on
from .varlen import int32_on, to_device

__all__ = [
    "num_compressed",
    "compressed_cu_seqlens",
    "compressed_positions",
    "seqlens_from_cu",
]


def num_compressed(seq_len: int, cmp_block: int, cmp_stride: int) -> int:
    """Number of compressed tokens of one sequence of ``seq_len`` tokens.

    Compressed token i summarises tokens ``[i*d, i*d + l)``, so only whole blocks count.
    """
    if seq_len < cmp_block:
        return 0
    return (seq_len - cmp_block) // cmp_stride + 1


def seqlens_from_cu(cu_seqlens: torch.Tensor) -> list[int]:
    """Host list of sequence lengths ``[L_0, ..., L_{N-1}]`` from ``cu_seqlens`` [N+1]."""
    bounds = host_list(cu_seqlens)
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """Boundaries of the packed compressed tokens.

    Args:
        cu_seqlens: int32/int64 [N+1] token boundaries.
    Returns:
        int32 [N+1] on the same device: row ranges of each sequence in ``k_cmp``/``v_cmp``.
        Remembered on ``cu_seqlens`` (host_cache): treat it as read-only.
    """
    def build():
        counts = [num_compressed(n, cmp_block, cmp_stride) for n in seqlens_from_cu(cu_seqlens)]
        return int32_on([0, *itertools.accumulate(counts)], cu_seqlens.device)

    return memo_on(cu_seqlens, ("compressed_cu", cmp_block, cmp_stride), build)


def compressed_positions(cu_seqlens: torch.Tensor, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """Within-sequence position of each compressed token's last token, ``i*d + l - 1``.

    Compressed keys get RoPE at these positions (NSA_SPEC.md, "Compression").

    Args:
        cu_seqlens: int32/int64 [N+1].
    Returns:
        int64 [Tc] on the same device, packed like ``k_cmp``. Remembered on ``cu_seqlens``
        (host_cache): treat it as read-only.
    """
    def build():
        pieces = [
            torch.arange(num_compressed(n, cmp_block, cmp_stride), dtype=torch.int64) * cmp_stride + cmp_block - 1
            for n in seqlens_from_cu(cu_seqlens)
        ]
        if not pieces:
            return torch.zeros(0, dtype=torch.int64, device=cu_seqlens.device)
        return to_device(torch.cat(pieces), cu_seqlens.device)

    return memo_on(cu_seqlens, ("compressed_positions", cmp_block, cmp_stride), build)
