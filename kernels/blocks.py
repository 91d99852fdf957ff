"""Compression blocks of the token compressors: gather (+ intra-block position embedding) and
its backward, on Triton kernels.

Compressed token c of sequence b summarises the l tokens from ``tok0[c] = off_b + i*d``
(i = c - cbeg_b, its index in the sequence). :func:`gather_blocks` writes the blocks
head-major, ``out[h, c, p*D + e] = x[tok0[c] + p, h, e] + pos[h, p, e]`` ([HKV, Tc, l*D], the
operand of the compressor's per-head GEMM, so nothing is permuted or copied after it). Its
backward gives token t the sum of the at most l/d block slots holding it, gathered and added
in fp32 (fp64 for fp64) in a fixed order: deterministic, one rounding, no atomics and no
index sort; d pos is the sum of d out over the blocks.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .layout import num_compressed
from .varlen import new_empty, next_pow2, to_device


@dataclass
class BlockPlan:
    """Block layout of one pack on the device (built on the host from the lengths).

    Attributes:
        tok0: int32 [Tc] packed row of each block's first token.
        seq: int32 [T] sequence of each token; off, cbeg, nblk: int32 [N] first token, first
            block and block count of each sequence.
        cmp_block, cmp_stride: l and d.
    """

    tok0: torch.Tensor
    seq: torch.Tensor
    off: torch.Tensor
    cbeg: torch.Tensor
    nblk: torch.Tensor
    cmp_block: int
    cmp_stride: int

    @classmethod
    def build(cls, bounds: list, cmp_block: int, cmp_stride: int, device) -> "BlockPlan":
        """Plan for host pack boundaries ``bounds`` ([N+1] ints from 0); per-token and per-block
        tables are expanded on the device (no host loop over tokens, no sync)."""
        lens = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
        nblk = [num_compressed(n, cmp_block, cmp_stride) for n in lens]
        cbeg = [0, *itertools.accumulate(nblk)][:-1]
        host = torch.tensor([bounds[:-1], cbeg, nblk, lens,
                             [o - c * cmp_stride for o, c in zip(bounds[:-1], cbeg)]],
                            dtype=torch.int32)
        off, cbeg_d, nblk_d, lens_d, first = to_device(host, device).unbind(0)
        n_blk, n_tok = sum(nblk), sum(lens)
        tok0 = (torch.repeat_interleave(first, nblk_d, output_size=n_blk)
                + torch.arange(n_blk, dtype=torch.int32, device=device) * cmp_stride)
        seq = torch.repeat_interleave(torch.arange(len(lens), dtype=torch.int32, device=device),
                                      lens_d, output_size=n_tok)
        return cls(tok0, seq, off, cbeg_d, nblk_d, cmp_block, cmp_stride)


def _accumulator(dtype: torch.dtype):
    """Triton accumulation type: fp64 for fp64 tensors, fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _gather_blocks(X, POS, OUT, TOK0, Tc, HKV, D: tl.constexpr, D_P: tl.constexpr,
                   L: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    h = tl.program_id(1)
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    c_ok = c < Tc
    e = tl.arange(0, D_P)
    msk = c_ok[:, None] & (e[None, :] < D)
    tok0 = tl.load(TOK0 + c, mask=c_ok, other=0)
    out = OUT + (h * Tc + c).to(tl.int64)[:, None] * (L * D) + e[None, :]
    for p in range(L):
        x = tl.load(X + ((tok0 + p).to(tl.int64) * HKV + h)[:, None] * D + e[None, :], mask=msk)
        pe = tl.load(POS + (h * L + p) * D + e, mask=e < D)
        # as torch adds two low-precision tensors: in fp32, one rounding
        y = x.to(ACC) + pe.to(ACC)[None, :]
        tl.store(out + p * D, y.to(OUT.dtype.element_ty), mask=msk)


@triton.jit
def _fold_blocks(DOUT, DX, SEQ, OFF, CBEG, NBLK, T, Tc, HKV, D: tl.constexpr,
                 D_P: tl.constexpr, L: tl.constexpr, STRIDE: tl.constexpr, BT: tl.constexpr,
                 ACC: tl.constexpr):
    h = tl.program_id(1)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    t_ok = t < T
    e = tl.arange(0, D_P)
    b = tl.load(SEQ + t, mask=t_ok, other=0)
    s = t - tl.load(OFF + b, mask=t_ok, other=0)
    cbeg = tl.load(CBEG + b, mask=t_ok, other=0)
    nblk = tl.load(NBLK + b, mask=t_ok, other=0)
    acc = tl.zeros([BT, D_P], ACC)
    for k in tl.static_range(L // STRIDE):
        i = s // STRIDE - k  # blocks i*d <= s < i*d + l of the token's sequence
        ok = t_ok & (i >= 0) & (i < nblk)
        row = (h * Tc + cbeg + i).to(tl.int64) * (L * D) + (s - i * STRIDE) * D
        acc += tl.load(DOUT + row[:, None] + e[None, :], mask=ok[:, None] & (e[None, :] < D),
                       other=0.0).to(ACC)
    tl.store(DX + (t.to(tl.int64) * HKV + h)[:, None] * D + e[None, :],
             acc.to(DX.dtype.element_ty), mask=t_ok[:, None] & (e[None, :] < D))


class _GatherBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, pos, plan: BlockPlan):
        T, HKV, D = x.shape
        L, Tc = plan.cmp_block, plan.tok0.numel()
        out = new_empty(HKV, Tc, L * D, dtype=x.dtype, device=x.device)
        if Tc:
            _gather_blocks[(triton.cdiv(Tc, 16), HKV)](x, pos, out, plan.tok0, Tc, HKV, D=D,
                                                      D_P=next_pow2(D), L=L, BC=16,
                                                      ACC=_accumulator(x.dtype), num_warps=4)
        ctx.plan, ctx.shape = plan, x.shape
        return out

    @staticmethod
    def backward(ctx, dout):
        plan, (T, HKV, D) = ctx.plan, ctx.shape
        dout = dout.contiguous()
        dx = dpos = None
        if ctx.needs_input_grad[0]:
            dx = new_empty(T, HKV, D, dtype=dout.dtype, device=dout.device)
            if T:
                _fold_blocks[(triton.cdiv(T, 32), HKV)](
                    dout, dx, plan.seq, plan.off, plan.cbeg, plan.nblk, T, plan.tok0.numel(),
                    HKV, D=D, D_P=next_pow2(D), L=plan.cmp_block, STRIDE=plan.cmp_stride, BT=32,
                    ACC=_accumulator(dout.dtype), num_warps=4)
        if ctx.needs_input_grad[1]:
            dpos = dout.sum(1).view(HKV, plan.cmp_block, D)
        return dx, dpos, None


def gather_blocks(x: torch.Tensor, pos: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """Compression blocks plus position embedding, head-major, differentiable.

    Args:
        x: [T, HKV, D] contiguous (packed tokens); pos: [HKV, l, D] in x's dtype;
        plan: :class:`BlockPlan` of the pack (l must be a multiple of d).
    Returns:
        [HKV, Tc, l*D] in x's dtype: ``out[h, c, p*D + e] = x[tok0[c] + p, h, e] + pos[h, p, e]``.
    """
    return _GatherBlocks.apply(x, pos.contiguous(), plan)
