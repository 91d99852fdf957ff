"""Token compressors phi: one learned summary per block of l tokens, stride d (NSA_SPEC.md).

Every compressor keeps one weight set per KV head, with the KV-head dimension first in each
parameter, so tensor parallelism shards them by slicing the local KV heads. Keys are
compressed before RoPE; the caller rotates compressed keys at
``nsa_kernels.layout.compressed_positions``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nsa_kernels.layout import num_compressed, seqlens_from_cu

__all__ = ["build_compressor", "MLPCompressor", "LinearCompressor", "MeanCompressor",
           "compression_block_index", "COMPRESSOR_KINDS"]

COMPRESSOR_KINDS = ("mlp", "mean", "linear")


def compression_block_index(cu_seqlens: torch.Tensor, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """Token index of every slot of every compression block.

    Args:
        cu_seqlens: int [N+1] pack boundaries.
    Returns:
        int64 [Tc, l] on cu_seqlens' device: row c lists the packed positions of the l tokens
        compressed token c summarises (tokens [i*d, i*d + l) of its sequence).
    """
    starts = []
    for offset, seq_len in zip(cu_seqlens.tolist()[:-1], seqlens_from_cu(cu_seqlens)):
        count = num_compressed(seq_len, cmp_block, cmp_stride)
        starts.append(offset + torch.arange(count, dtype=torch.int64) * cmp_stride)
    start = torch.cat(starts) if starts else torch.zeros(0, dtype=torch.int64)
    return (start[:, None] + torch.arange(cmp_block, dtype=torch.int64)[None, :]).to(cu_seqlens.device)


def _gather_blocks(x: torch.Tensor, cu_seqlens: torch.Tensor, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    if x.dim() != 3:
        raise ValueError(f"x must be [T, HKV, D], got shape {tuple(x.shape)}")
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, x.shape[0]], dtype=torch.int32, device=x.device)
    if int(cu_seqlens[-1]) != x.shape[0]:
        raise ValueError(f"cu_seqlens must end at T={x.shape[0]}, got {int(cu_seqlens[-1])}")
    return x[compression_block_index(cu_seqlens, cmp_block, cmp_stride)]  # [Tc, l, HKV, D]


def _mark_kv_sharded(module: nn.Module) -> None:
    for param in module.parameters(recurse=False):
        param.nsa_kv_head_dim = 0


class _PerHeadCompressor(nn.Module):
    """Shared shape checks of the compressors."""

    def __init__(self, num_kv_heads: int, head_dim: int, cmp_block: int, cmp_stride: int):
        super().__init__()
        if num_kv_heads < 1 or head_dim < 1:
            raise ValueError(f"num_kv_heads and head_dim must be positive, got {num_kv_heads}, {head_dim}")
        if cmp_block < 1 or cmp_stride < 1 or cmp_block % cmp_stride:
            raise ValueError(f"cmp_stride ({cmp_stride}) must be positive and divide cmp_block ({cmp_block})")
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.cmp_block, self.cmp_stride = cmp_block, cmp_stride

    def _blocks(self, x, cu_seqlens):
        if x.shape[1] != self.num_kv_heads or x.shape[2] != self.head_dim:
            raise ValueError(f"x must be [T, {self.num_kv_heads}, {self.head_dim}], got {tuple(x.shape)}")
        return _gather_blocks(x, cu_seqlens, self.cmp_block, self.cmp_stride)


class MeanCompressor(_PerHeadCompressor):
    """phi = mean of the block's tokens (no parameters)."""

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [T, HKV, D] -> [Tc, HKV, D]."""
        return self._blocks(x, cu_seqlens).mean(dim=1)


class LinearCompressor(_PerHeadCompressor):
    """phi = Linear(l*D -> D) of (block + intra-block position embedding); starts as mean pooling."""

    def __init__(self, num_kv_heads, head_dim, cmp_block, cmp_stride, *, params_dtype=torch.float32,
                 init_method: Optional[Callable] = None):
        super().__init__(num_kv_heads, head_dim, cmp_block, cmp_stride)
        self.pos_emb = nn.Parameter(torch.zeros(num_kv_heads, cmp_block, head_dim, dtype=params_dtype))
        eye = torch.eye(head_dim, dtype=params_dtype).repeat(cmp_block, 1) / cmp_block
        self.weight = nn.Parameter(eye[None].repeat(num_kv_heads, 1, 1).contiguous())
        self.bias = nn.Parameter(torch.zeros(num_kv_heads, head_dim, dtype=params_dtype))
        _mark_kv_sharded(self)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [T, HKV, D] -> [Tc, HKV, D]."""
        blocks = self._blocks(x, cu_seqlens) + self.pos_emb.transpose(0, 1).to(x.dtype)
        flat = blocks.permute(0, 2, 1, 3).flatten(2)  # [Tc, HKV, l*D]
        return torch.einsum("chi,hio->cho", flat, self.weight.to(x.dtype)) + self.bias.to(x.dtype)


class MLPCompressor(_PerHeadCompressor):
    """phi = Linear(D -> D) o GELU o Linear(l*D -> D) of (block + intra-block position embedding).

    The paper's default compressor ("learnable MLP with intra-block position encoding").
    """

    def __init__(self, num_kv_heads, head_dim, cmp_block, cmp_stride, *, params_dtype=torch.float32,
                 init_method: Optional[Callable] = None):
        super().__init__(num_kv_heads, head_dim, cmp_block, cmp_stride)
        fan_in = cmp_block * head_dim
        self.pos_emb = nn.Parameter(torch.empty(num_kv_heads, cmp_block, head_dim, dtype=params_dtype))
        self.fc1_weight = nn.Parameter(torch.empty(num_kv_heads, fan_in, head_dim, dtype=params_dtype))
        self.fc1_bias = nn.Parameter(torch.zeros(num_kv_heads, head_dim, dtype=params_dtype))
        self.fc2_weight = nn.Parameter(torch.empty(num_kv_heads, head_dim, head_dim, dtype=params_dtype))
        self.fc2_bias = nn.Parameter(torch.zeros(num_kv_heads, head_dim, dtype=params_dtype))
        with torch.no_grad():
            if init_method is not None:
                for weight in (self.pos_emb, self.fc1_weight, self.fc2_weight):
                    init_method(weight)
            else:
                self.pos_emb.normal_(0.0, 0.02)
                self.fc1_weight.normal_(0.0, 1.0 / math.sqrt(fan_in))
                self.fc2_weight.normal_(0.0, 1.0 / math.sqrt(head_dim))
        _mark_kv_sharded(self)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [T, HKV, D] -> [Tc, HKV, D]."""
        dtype = x.dtype
        blocks = self._blocks(x, cu_seqlens) + self.pos_emb.transpose(0, 1).to(dtype)
        flat = blocks.permute(0, 2, 1, 3).flatten(2)  # [Tc, HKV, l*D]
        hidden = torch.einsum("chi,hio->cho", flat, self.fc1_weight.to(dtype)) + self.fc1_bias.to(dtype)
        hidden = F.gelu(hidden)
        return torch.einsum("chi,hio->cho", hidden, self.fc2_weight.to(dtype)) + self.fc2_bias.to(dtype)


def build_compressor(kind: str, num_kv_heads: int, head_dim: int, cmp_block: int, cmp_stride: int, *,
                     params_dtype: torch.dtype = torch.float32, init_method: Optional[Callable] = None) -> nn.Module:
    """Make a compressor ``forward(x [T, HKV, D], cu_seqlens int [N+1]) -> [Tc, HKV, D]``.

    Args:
        kind: "mlp" (paper default), "linear" or "mean".
        num_kv_heads: KV heads held by this rank (the local count under tensor parallelism).
        head_dim: D of the tensor compressed (Dqk for keys, Dv for values).
        init_method: optional in-place initialiser for weight tensors (Megatron's init_method).
    """
    if kind == "mlp":
        return MLPCompressor(num_kv_heads, head_dim, cmp_block, cmp_stride,
                             params_dtype=params_dtype, init_method=init_method)
    if kind == "linear":
        return LinearCompressor(num_kv_heads, head_dim, cmp_block, cmp_stride,
                                params_dtype=params_dtype, init_method=init_method)
    if kind == "mean":
        return MeanCompressor(num_kv_heads, head_dim, cmp_block, cmp_stride)
    raise ValueError(f"kind must be one of {COMPRESSOR_KINDS}, got {kind!r}")
