"""Gated sum of the three branches and the first step of its backward.

Forward: o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (one pass, fp32 arithmetic).
Backward: for each branch b, r_b = rowsum(do * o_b) is d gates[..., b], and
delta_b = g_b * r_b = rowsum(d o_b * o_b) is what branch b's attention backward needs.
The branch kernels then read ``do`` scaled by g_b themselves, so d o_b never reaches memory.
Rows are (token, query head) pairs: o_* [T, HQ, Dv], gates [T, HQ, 3].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dense import interpreting
from .varlen import new_empty, next_pow2


@triton.jit
def _combine_fwd(OC, OS, OW, GATES, O, n_rows, DV: tl.constexpr, DV_P: tl.constexpr,
                 ROWS: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, DV_P)
    r_ok = r < n_rows
    m = r_ok[:, None] & (d[None, :] < DV)
    off = r[:, None] * DV + d[None, :]
    g0 = tl.load(GATES + r * 3, mask=r_ok, other=0.0).to(tl.float32)
    g1 = tl.load(GATES + r * 3 + 1, mask=r_ok, other=0.0).to(tl.float32)
    g2 = tl.load(GATES + r * 3 + 2, mask=r_ok, other=0.0).to(tl.float32)
    o = g0[:, None] * tl.load(OC + off, mask=m, other=0.0).to(tl.float32)
    o += g1[:, None] * tl.load(OS + off, mask=m, other=0.0).to(tl.float32)
    o += g2[:, None] * tl.load(OW + off, mask=m, other=0.0).to(tl.float32)
    tl.store(O + off, o.to(O.dtype.element_ty), mask=m)


@triton.jit
def _combine_bwd(DO, OC, OS, OW, GATES, DGATES, DELTA, n_rows, DV: tl.constexpr,
                 DV_P: tl.constexpr, ROWS: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    d = tl.arange(0, DV_P)
    r_ok = r < n_rows
    m = r_ok[:, None] & (d[None, :] < DV)
    off = r[:, None] * DV + d[None, :]
    do = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
    for b in tl.static_range(3):
        if b == 0:
            ob = tl.load(OC + off, mask=m, other=0.0)
        elif b == 1:
            ob = tl.load(OS + off, mask=m, other=0.0)
        else:
            ob = tl.load(OW + off, mask=m, other=0.0)
        rb = tl.sum(do * ob.to(tl.float32), 1)
        gb = tl.load(GATES + r * 3 + b, mask=r_ok, other=0.0).to(tl.float32)
        tl.store(DGATES + r * 3 + b, rb.to(DGATES.dtype.element_ty), mask=r_ok)
        tl.store(DELTA + b * n_rows + r, gb * rb, mask=r_ok)


def _rows(dv_p: int) -> int:
    if interpreting():
        return 256
    return max(1, min(64, 8192 // dv_p))


def combine_fwd(o_cmp, o_slc, o_win, gates):
    """o [T, HQ, Dv] (dtype of o_cmp) = sum_b gates[..., b, None] * o_b; all inputs contiguous."""
    T, HQ, DV = o_cmp.shape
    o = new_empty(*o_cmp.shape, dtype=o_cmp.dtype, device=o_cmp.device)
    n = T * HQ
    if n:
        dv_p = next_pow2(DV)
        rows = _rows(dv_p)
        _combine_fwd[(triton.cdiv(n, rows),)](o_cmp, o_slc, o_win, gates, o, n, DV=DV, DV_P=dv_p,
                                             ROWS=rows, num_warps=4)
    return o


def combine_bwd(do, o_cmp, o_slc, o_win, gates):
    """Returns (d gates [T, HQ, 3] in gates' dtype, delta fp32 [3, T, HQ]) for output grad do."""
    T, HQ, DV = o_cmp.shape
    dgates = new_empty(*gates.shape, dtype=gates.dtype, device=gates.device)
    delta = new_empty(3, T, HQ, dtype=torch.float32, device=do.device)
    n = T * HQ
    if n:
        dv_p = next_pow2(DV)
        rows = _rows(dv_p)
        _combine_bwd[(triton.cdiv(n, rows),)](do, o_cmp, o_slc, o_win, gates, dgates, delta, n,
                                             DV=DV, DV_P=dv_p, ROWS=rows, num_warps=4)
    return dgates, delta
