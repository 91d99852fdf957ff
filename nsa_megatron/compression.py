"""Token compressors phi: one learned summary per block of l tokens, stride d (NSA_SPEC.md).

Every compressor keeps one weight set per KV head, with the KV-head dimension first in each
parameter, so tensor parallelism shards them by slicing the local KV heads. Keys are
compressed before RoPE; the caller rotates compressed keys at
``nsa_kernels.layout.compressed_positions``.

The learned compressors gather their blocks head-major ([HKV, Tc, l*D], the per-head GEMM
operand): on a GPU through ``nsa_kernels.blocks`` (one pass each way, deterministic fp32
backward), elsewhere with torch indexing. Either way the pack's lengths are read back once.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from nsa_kernels.host_cache import host_list, memo_on
from nsa_kernels.layout import num_compressed
from nsa_kernels.varlen import to_device

__all__ = ["build_compressor", "MLPCompressor", "LinearCompressor", "MeanCompressor",
           "compression_block_index", "COMPRESSOR_KINDS"]

COMPRESSOR_KINDS = ("mlp", "mean", "linear")
# gather blocks with the Triton kernels: None = on CUDA tensors; tests force True / False
USE_KERNELS: Optional[bool] = None


def _block_index(bounds: list, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """int64 CPU [Tc, l]: packed token of every slot of every block, from host boundaries."""
    starts = [offset + torch.arange(num_compressed(end - offset, cmp_block, cmp_stride),
                                    dtype=torch.int64) * cmp_stride
              for offset, end in zip(bounds[:-1], bounds[1:])]
    start = torch.cat(starts) if starts else torch.zeros(0, dtype=torch.int64)
    return start[:, None] + torch.arange(cmp_block, dtype=torch.int64)[None, :]


def compression_block_index(cu_seqlens: torch.Tensor, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """Token index of every slot of every compression block.

    Args:
        cu_seqlens: int [N+1] pack boundaries.
    Returns:
        int64 [Tc, l] on cu_seqlens' device: row c lists the packed positions of the l tokens
        compressed token c summarises (tokens [i*d, i*d + l) of its sequence).
    """
    return _block_index(host_list(cu_seqlens), cmp_block, cmp_stride).to(cu_seqlens.device)


def _pack_bounds(x: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> list:
    """Host pack boundaries of ``x`` [T, HKV, D] (read back once per ``cu_seqlens`` tensor
    version and remembered on it, so the layers sharing it do not wait for the device)."""
    if x.dim() != 3:
        raise ValueError(f"x must be [T, HKV, D], got shape {tuple(x.shape)}")
    bounds = [0, x.shape[0]] if cu_seqlens is None else host_list(cu_seqlens)
    if bounds[-1] != x.shape[0]:
        raise ValueError(f"cu_seqlens must end at T={x.shape[0]}, got {bounds[-1]}")
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    return bounds


def _use_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda if USE_KERNELS is None else USE_KERNELS


def _block_plan(bounds: list, cu_seqlens: Optional[torch.Tensor], cmp_block: int, cmp_stride: int,
                device):
    """The gather kernels' BlockPlan of a pack, remembered on ``cu_seqlens`` when given."""
    from nsa_kernels.blocks import BlockPlan

    def build():
        return BlockPlan.build(bounds, cmp_block, cmp_stride, device)

    if cu_seqlens is None:
        return build()
    return memo_on(cu_seqlens, ("block_plan", cmp_block, cmp_stride, str(device)), build)


def _flat_blocks(x: torch.Tensor, bounds: list, pos: torch.Tensor, cmp_block: int,
                 cmp_stride: int, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Blocks + position embedding ``pos`` [HKV, l, D], head-major: [HKV, Tc, l*D] in x's dtype
    (``bounds``: host pack boundaries; ``cu_seqlens``: their device tensor, if any)."""
    pos = pos.to(x.dtype)
    if _use_kernels(x):
        from nsa_kernels.blocks import gather_blocks

        plan = _block_plan(bounds, cu_seqlens, cmp_block, cmp_stride, x.device)
        return gather_blocks(x.contiguous(), pos, plan)
    blocks = x[to_device(_block_index(bounds, cmp_block, cmp_stride), x.device)] + pos.transpose(0, 1)
    return blocks.permute(2, 0, 1, 3).flatten(2)  # [Tc, l, HKV, D] -> [HKV, Tc, l*D]


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

    def _bounds(self, x, cu_seqlens) -> list:
        bounds = _pack_bounds(x, cu_seqlens)
        if x.shape[1] != self.num_kv_heads or x.shape[2] != self.head_dim:
            raise ValueError(f"x must be [T, {self.num_kv_heads}, {self.head_dim}], got {tuple(x.shape)}")
        return bounds

    def _flat_blocks(self, x, cu_seqlens, pos):
        """[HKV, Tc, l*D]: every block of ``x`` plus ``pos`` [HKV, l, D], head-major."""
        return _flat_blocks(x, self._bounds(x, cu_seqlens), pos, self.cmp_block, self.cmp_stride,
                            cu_seqlens)


class MeanCompressor(_PerHeadCompressor):
    """phi = mean of the block's tokens (no parameters)."""

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [T, HKV, D] -> [Tc, HKV, D]."""
        idx = _block_index(self._bounds(x, cu_seqlens), self.cmp_block, self.cmp_stride)
        return x[idx.to(x.device)].mean(dim=1)


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
        flat = self._flat_blocks(x, cu_seqlens, self.pos_emb)  # [HKV, Tc, l*D]
        out = torch.bmm(flat, self.weight.to(x.dtype)) + self.bias.to(x.dtype)[:, None]
        return out.transpose(0, 1)


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
        flat = self._flat_blocks(x, cu_seqlens, self.pos_emb)  # [HKV, Tc, l*D]
        hidden = F.gelu(torch.bmm(flat, self.fc1_weight.to(dtype)) + self.fc1_bias.to(dtype)[:, None])
        out = torch.bmm(hidden, self.fc2_weight.to(dtype)) + self.fc2_bias.to(dtype)[:, None]
        return out.transpose(0, 1)


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
