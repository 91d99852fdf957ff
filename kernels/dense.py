"""Attention over a strided, causally (and optionally window-) masked key prefix.

One pair of kernels serves two NSA branches (README, "dense branches"):
- compressed attention: key i sits at position i*d + l - 1 (``key_stride=d, key_offset=l-1``);
- sliding window: key s sits at position s (``key_stride=1, key_offset=0, window=w``).
Query t sees key s iff kpos(s) <= t and, with a window, t - kpos(s) < w. The window forward
can also attend the selected branch's local blocks and complete that branch's output
(``LocalBlocks``), so those blocks are loaded once per tile instead of once per token.

Tiles are group-centric: a program owns BLOCK_T query tokens x all G heads of one KV head
(rows r = token * G_PAD + head-in-group), so every K/V tile it loads serves the whole group.
Shapes: q [Tq, HQ, Dqk], k [Tk, HKV, Dqk], v [Tk, HKV, Dv], o [Tq, HQ, Dv], lse [Tq, HQ] fp32.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .host_cache import host_list
from .varlen import Varlen, new_empty, next_pow2, to_device

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# query rows per dK/dV work item (None: 1024 on GPU, unsplit in the interpreter); tests lower it
DKDV_QUERY_CHUNK = None
# per-kernel tile overrides, see dense_config
TILE_OVERRIDE: dict = {}


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dense_config(g_pad: int, dqk_p: int, dv_p: int, kernel: str = "fwd",
                 window: bool = False, local: bool = False) -> dict:
    """Tile sizes of one dense kernel ("fwd", "dq" or "dkdv"): BLOCK_T query tokens x G_PAD
    heads per row tile, BLOCK_N keys per step, warps and pipeline stages.

    GPU defaults are the spill-free shapes (ptxas report for sm_90a at Dqk = Dv = 128) that
    timed fastest on an H100 (``window``: the sliding-window branch, whose short key ranges
    favour 32-key steps in fwd and dQ); ``TILE_OVERRIDE[kernel]`` (keys ROWS, BLOCK_N, num_warps,
    num_stages, maxnreg: the register cap per thread, GPU only) replaces them, for the
    benchmark's sweep and for tests of the tile loops (``TILE_OVERRIDE["win_fwd"]``, when
    present, replaces ``"fwd"`` for the window branch; ``local``: the window forward with
    the selected branch's local blocks, ``LocalBlocks``)."""
    maxnreg = None
    if interpreting():
        rows, block_n, warps, stages = max(128, g_pad), 64, 4, 1
    else:
        big = max(dqk_p, dv_p) > 128
        if kernel == "fwd":
            rows, block_n, warps, stages = (64, 64, 4, 2) if big else (64, 64, 4, 3)
            if window and not big:  # 3.54 vs 3.77 ms at 64k (H100, round 4)
                block_n = 32
            if window and local and not big:
                # uncapped, ptxas gives the local-block kernel 248-255 registers (2 programs
                # per SM); 168 keeps 3 per SM (64 KB shared each) and no spills (round 8)
                maxnreg = 168
            # round 6: 128 rows x 32 keys on 8 warps with maxnreg=128 (2 programs per SM, half
            # the K/V bytes) measured compressed 10.08 vs 9.98 ms and window 3.31 vs 3.51 alone,
            # but the whole forward within noise of these shapes: not the default
        elif kernel == "dq":
            rows, block_n, warps, stages = (64, 32, 4, 2) if big else (128, 64, 8, 2)
            if window and not big:  # 7.42 vs 7.68 ms at 64k (H100, sweep1)
                rows, block_n, warps, stages = 64, 32, 4, 3
        else:
            rows, block_n, warps, stages = (64, 32, 4, 2) if big else (64, 128, 8, 2)
    o = TILE_OVERRIDE.get(kernel, {})
    if kernel == "fwd" and window and "win_fwd" in TILE_OVERRIDE:
        o = TILE_OVERRIDE["win_fwd"]
    rows = max(o.get("ROWS", rows), g_pad)
    maxnreg = o.get("maxnreg", maxnreg)
    cfg = dict(BLOCK_T=max(1, rows // g_pad), BLOCK_N=o.get("BLOCK_N", block_n),
               num_warps=o.get("num_warps", warps), num_stages=o.get("num_stages", stages))
    if maxnreg and not interpreting():
        cfg["maxnreg"] = maxnreg
    return cfg


@triton.jit
def _first_key(p, KSTRIDE: tl.constexpr, KOFF: tl.constexpr):
    """Index of the first key s >= 0 with position s*KSTRIDE + KOFF >= p."""
    return (tl.maximum(p - KOFF, 0) + KSTRIDE - 1) // KSTRIDE


@triton.jit
def _key_end(p, KSTRIDE: tl.constexpr, KOFF: tl.constexpr):
    """Number of keys with position s*KSTRIDE + KOFF <= p."""
    return tl.where(p >= KOFF, (p - KOFF) // KSTRIDE + 1, 0)


@triton.jit
def _key_range(lo_min, lo_max, hi_min, hi_max, k_len, KSTRIDE: tl.constexpr, KOFF: tl.constexpr,
               LOWER: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key steps of a query tile whose row r sees the key positions [lo_pos[r], hi_pos[r]]
    (lo_min/lo_max, hi_min/hi_max: their extremes over the tile's rows; LOWER False: no lower
    bound): masked steps [lo, f1), unmasked steps [f1, f2) (every key visible to every row),
    masked [f2, hi). f1 and f2 sit on lo's BLOCK_N grid, so unmasked steps never touch a
    boundary key; an empty range gives hi <= lo and no step."""
    hi = tl.minimum(_key_end(hi_max, KSTRIDE, KOFF), k_len)
    lo = hi * 0
    full_a = lo
    if LOWER:
        lo = _first_key(lo_min, KSTRIDE, KOFF)
        full_a = _first_key(lo_max, KSTRIDE, KOFF)
    full_b = tl.minimum(_key_end(hi_min, KSTRIDE, KOFF), hi)
    f1 = tl.minimum(lo + (tl.maximum(full_a - lo, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N, hi)
    f2 = f1 + tl.maximum(full_b - f1, 0) // BLOCK_N * BLOCK_N
    return lo, f1, f2, hi


@triton.jit
def _window_range(pos_min, pos_max, k_len, KSTRIDE: tl.constexpr, KOFF: tl.constexpr,
                  WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """:func:`_key_range` of causal rows at positions [pos_min, pos_max] (with WINDOW > 0:
    the window (pos - WINDOW, pos])."""
    return _key_range(pos_min - WINDOW + 1, pos_max - WINDOW + 1, pos_min, pos_max, k_len,
                      KSTRIDE, KOFF, WINDOW > 0, BLOCK_N)


@triton.jit
def _fwd_steps(acc, m_i, l_i, q, K, V, krow0, lo_pos, hi_pos, s_a, s_b, hi, qk_scale, HKV,
               DQK: tl.constexpr, DV: tl.constexpr, DQK_P: tl.constexpr, DV_P: tl.constexpr,
               BLOCK_N: tl.constexpr, KSTRIDE: tl.constexpr, KOFF: tl.constexpr,
               LOWER: tl.constexpr, MASKED: tl.constexpr):
    """Online-softmax steps over keys [s_a, s_b) (of the first ``hi``); MASKED: row r sees the
    key positions [lo_pos[r] (LOWER only), hi_pos[r]]. acc [R, DV_P]; m_i, l_i [R]: running
    max of the log2-scaled logits and sum of their exp2."""
    dq = tl.arange(0, DQK_P)
    dv = tl.arange(0, DV_P)
    for s0 in range(s_a, s_b, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)
        s_ok = s < hi
        krow = krow0 + s.to(tl.int64) * HKV
        k = tl.load(K + krow[:, None] * DQK + dq[None, :],
                    mask=s_ok[:, None] & (dq[None, :] < DQK), other=0.0)
        qk = tl.dot(q, tl.trans(k))
        if MASKED:
            kp = s * KSTRIDE + KOFF
            vis = s_ok[None, :] & (kp[None, :] <= hi_pos[:, None])
            if LOWER:
                vis = vis & (kp[None, :] >= lo_pos[:, None])
            qk = tl.where(vis, qk, float("-inf"))
        # m_i is the running max of the scaled logits; the scale goes into one fma per logit
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk * qk_scale - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + krow[:, None] * DV + dv[None, :],
                    mask=s_ok[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _fwd_keys(acc, m_i, l_i, q, K, V, krow0, lo_pos, hi_pos, lo_min, lo_max, hi_min, hi_max,
              k_len, qk_scale, HKV, DQK: tl.constexpr, DV: tl.constexpr, DQK_P: tl.constexpr,
              DV_P: tl.constexpr, BLOCK_N: tl.constexpr, KSTRIDE: tl.constexpr,
              KOFF: tl.constexpr, LOWER: tl.constexpr):
    """:func:`_fwd_steps` over every key row r may see (positions [lo_pos[r], hi_pos[r]], the
    tile's extremes lo_min .. hi_max): masked head, unmasked middle, masked tail."""
    lo, f1, f2, hi = _key_range(lo_min, lo_max, hi_min, hi_max, k_len, KSTRIDE, KOFF, LOWER,
                                BLOCK_N)
    acc, m_i, l_i = _fwd_steps(acc, m_i, l_i, q, K, V, krow0, lo_pos, hi_pos, lo, f1, hi,
                               qk_scale, HKV, DQK, DV, DQK_P, DV_P, BLOCK_N, KSTRIDE, KOFF,
                               LOWER, True)
    acc, m_i, l_i = _fwd_steps(acc, m_i, l_i, q, K, V, krow0, lo_pos, hi_pos, f1, f2, hi,
                               qk_scale, HKV, DQK, DV, DQK_P, DV_P, BLOCK_N, KSTRIDE, KOFF,
                               LOWER, False)
    acc, m_i, l_i = _fwd_steps(acc, m_i, l_i, q, K, V, krow0, lo_pos, hi_pos, f2, hi, hi,
                               qk_scale, HKV, DQK, DV, DQK_P, DV_P, BLOCK_N, KSTRIDE, KOFF,
                               LOWER, True)
    return acc, m_i, l_i


@triton.jit
def _merge_partial(acc, m_i, l_i, O, LSE, qrow, row_ok, DV: tl.constexpr, DV_P: tl.constexpr):
    """O/LSE rows (a branch's normalised partial output [R, DV] and natural-log lse [R], -inf
    where empty) <- their log-sum-exp merge with the online-softmax state (acc, m_i, l_i) of
    :func:`_fwd_steps` over keys disjoint from the partial's; o in O's dtype."""
    dv = tl.arange(0, DV_P)
    offs = qrow[:, None] * DV + dv[None, :]
    msk = row_ok[:, None] & (dv[None, :] < DV)
    lse_p = tl.load(LSE + qrow, mask=row_ok, other=float("-inf")) * 1.4426950408889634
    m = tl.maximum(m_i, lse_p)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    a = tl.exp2(m_i - m_safe)
    b = tl.exp2(lse_p - m_safe)
    l_new = l_i * a + b
    nonempty = l_new > 0
    inv = 1.0 / tl.where(nonempty, l_new, 1.0)
    o_p = tl.load(O + offs, mask=msk, other=0.0).to(tl.float32)
    o = acc * (a * inv)[:, None] + o_p * (b * inv)[:, None]
    tl.store(O + offs, o.to(O.dtype.element_ty), mask=msk)
    lse2 = m_safe + tl.log2(tl.where(nonempty, l_new, 1.0))
    tl.store(LSE + qrow, tl.where(nonempty, lse2 * 0.6931471805599453, float("-inf")), mask=row_ok)


@triton.jit
def _query_tile(TILES, Q_CU, Q_POS0, K_CU, HQ, g, G: tl.constexpr, G_PAD: tl.constexpr,
                BLOCK_T: tl.constexpr):
    """Rows of this program's query tile. Tiles run in reverse so the longest causal tiles
    (last in each sequence) start first and the short ones fill the tail."""
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.load(TILES + 2 * tile)
    t0 = tl.load(TILES + 2 * tile + 1)
    q_beg = tl.load(Q_CU + seq)
    q_len = tl.load(Q_CU + seq + 1) - q_beg
    pos0 = tl.load(Q_POS0 + seq)
    k_beg = tl.load(K_CU + seq)
    k_len = tl.load(K_CU + seq + 1) - k_beg
    r = tl.arange(0, BLOCK_T * G_PAD)
    tok = t0 + r // G_PAD
    hh = r % G_PAD
    row_ok = (tok < q_len) & (hh < G)
    pos = pos0 + tok
    qrow = (q_beg + tok).to(tl.int64) * HQ + g * G + hh
    pos_min = pos0 + t0
    pos_max = pos0 + tl.minimum(t0 + BLOCK_T, q_len) - 1
    return row_ok, pos, qrow, pos_min, pos_max, k_beg, k_len


@triton.jit
def _dense_fwd(Q, K, V, O, LSE, TILES, Q_CU, Q_POS0, K_CU, qk_scale, HQ, HKV,
               OC, OS, GATES, OUT, KSEL, VSEL, OSEL, LSEL,
               G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
               DQK: tl.constexpr, DV: tl.constexpr, DQK_P: tl.constexpr, DV_P: tl.constexpr,
               KSTRIDE: tl.constexpr, KOFF: tl.constexpr, WINDOW: tl.constexpr,
               COMBINE: tl.constexpr, LOCAL: tl.constexpr, BS: tl.constexpr,
               SHARED: tl.constexpr):
    """One query tile (BLOCK_T tokens x G heads of KV head g) over its visible keys; writes
    o [Tq, HQ, Dv], lse [Tq, HQ] and, with COMBINE, the gated sum OUT of OC, OS and o.
    LOCAL > 0 (window, KSTRIDE 1): first the rows' selected-branch local blocks with KSEL /
    VSEL, merged into the partial OSEL / LSEL in place; SHARED (KSEL, VSEL are K, V): the
    window then goes on from that state over its keys before the local blocks."""
    g = tl.program_id(1)
    row_ok, pos, qrow, pos_min, pos_max, k_beg, k_len = _query_tile(
        TILES, Q_CU, Q_POS0, K_CU, HQ, g, G, G_PAD, BLOCK_T)
    dq = tl.arange(0, DQK_P)
    dv = tl.arange(0, DV_P)
    q = tl.load(Q + qrow[:, None] * DQK + dq[None, :],
                mask=row_ok[:, None] & (dq[None, :] < DQK), other=0.0)
    krow0 = k_beg.to(tl.int64) * HKV + g
    m_i = tl.full([BLOCK_T * G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_T * G_PAD, DV_P], tl.float32)
    hi_pos, hi_min, hi_max = pos, pos_min, pos_max
    if LOCAL > 0:
        # the selected branch's local blocks: row r sees [(pos // BS - LOCAL + 1) * BS, pos]
        loc = tl.maximum(pos // BS - LOCAL + 1, 0) * BS
        loc_min = tl.maximum(pos_min // BS - LOCAL + 1, 0) * BS
        loc_max = tl.maximum(pos_max // BS - LOCAL + 1, 0) * BS
        acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, KSEL, VSEL, krow0, loc, pos, loc_min, loc_max,
                                  pos_min, pos_max, k_len, qk_scale, HKV, DQK, DV, DQK_P, DV_P,
                                  BLOCK_N, KSTRIDE, KOFF, True)
        _merge_partial(acc, m_i, l_i, OSEL, LSEL, qrow, row_ok, DV, DV_P)
        if SHARED:
            # same logits: the window goes on from this state over its keys before ``loc``
            hi_pos, hi_min, hi_max = loc - 1, loc_min - 1, loc_max - 1
        else:
            m_i = tl.full([BLOCK_T * G_PAD], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_T * G_PAD], tl.float32)
            acc = tl.zeros([BLOCK_T * G_PAD, DV_P], tl.float32)
    acc, m_i, l_i = _fwd_keys(acc, m_i, l_i, q, K, V, krow0, pos - WINDOW + 1, hi_pos,
                              pos_min - WINDOW + 1, pos_max - WINDOW + 1, hi_min, hi_max, k_len,
                              qk_scale, HKV, DQK, DV, DQK_P, DV_P, BLOCK_N, KSTRIDE, KOFF,
                              WINDOW > 0)

    if LOCAL > 0:
        # the rows again, so the merge's row addresses do not stay live through the window's
        # loops (ptxas keeps the launch's register cap without spills)
        row_ok, pos, qrow, pos_min, pos_max, k_beg, k_len = _query_tile(
            TILES, Q_CU, Q_POS0, K_CU, HQ, g, G, G_PAD, BLOCK_T)
    nonempty = l_i > 0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    o_offs = qrow[:, None] * DV + dv[None, :]
    o_msk = row_ok[:, None] & (dv[None, :] < DV)
    o = o.to(O.dtype.element_ty)
    tl.store(O + o_offs, o, mask=o_msk)
    lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(LSE + qrow, lse, mask=row_ok)
    if COMBINE:
        if LOCAL > 0:
            tl.debug_barrier()  # OS rows (= OSEL) were stored above by other threads
        # the gated sum of combine._combine_fwd, this branch's output as stored (rounded)
        g0 = tl.load(GATES + qrow * 3, mask=row_ok, other=0.0).to(tl.float32)
        g1 = tl.load(GATES + qrow * 3 + 1, mask=row_ok, other=0.0).to(tl.float32)
        g2 = tl.load(GATES + qrow * 3 + 2, mask=row_ok, other=0.0).to(tl.float32)
        out = g0[:, None] * tl.load(OC + o_offs, mask=o_msk, other=0.0).to(tl.float32)
        out += g1[:, None] * tl.load(OS + o_offs, mask=o_msk, other=0.0).to(tl.float32)
        out += g2[:, None] * o.to(tl.float32)
        tl.store(OUT + o_offs, out.to(OUT.dtype.element_ty), mask=o_msk)


@triton.jit
def _load_bwd_rows(Q, DO, LSE, DELTA, GATE, qrow, row_ok, gate_stride,
                   DQK: tl.constexpr, DV: tl.constexpr, DQK_P: tl.constexpr, DV_P: tl.constexpr,
                   HAS_GATE: tl.constexpr):
    dq = tl.arange(0, DQK_P)
    dv = tl.arange(0, DV_P)
    q = tl.load(Q + qrow[:, None] * DQK + dq[None, :],
                mask=row_ok[:, None] & (dq[None, :] < DQK), other=0.0)
    do = tl.load(DO + qrow[:, None] * DV + dv[None, :],
                 mask=row_ok[:, None] & (dv[None, :] < DV), other=0.0)
    if HAS_GATE:
        gate = tl.load(GATE + qrow * gate_stride, mask=row_ok, other=0.0).to(tl.float32)
        do = (do.to(tl.float32) * gate[:, None]).to(q.dtype)
    lse = tl.load(LSE + qrow, mask=row_ok, other=float("-inf"))
    # rows that saw nothing have lse = -inf and p = 0: push their lse to +inf
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + qrow, mask=row_ok, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _load_dq_rows(Q, DO, LSE, DELTA, GATE, OB, DGATE, DOG, qrow, row_ok, gate_stride, dgate_stride,
                  DQK: tl.constexpr, DV: tl.constexpr, DQK_P: tl.constexpr, DV_P: tl.constexpr,
                  HAS_GATE: tl.constexpr, FUSE: tl.constexpr, STORE_DOG: tl.constexpr):
    """A dQ kernel's rows. FUSE: the first step of the backward (``combine._combine_bwd`` for
    this branch) is done here, from the dO rows loaded anyway: r = rowsum(dO * O_b) goes to
    DGATE (d gate_b), delta = gate_b * r to DELTA for this branch's dK/dV kernel and, with
    STORE_DOG, the gated dO rows (as the dK/dV kernel would round them) to DOG, so that
    kernel reads them ungated."""
    if FUSE:
        # the ungated rows (delta is not read: this kernel writes it)
        q, do, lse2, _ = _load_bwd_rows(Q, DO, LSE, DELTA, GATE, qrow, row_ok, gate_stride,
                                        DQK, DV, DQK_P, DV_P, False)
        dv = tl.arange(0, DV_P)
        o_offs = qrow[:, None] * DV + dv[None, :]
        o_msk = row_ok[:, None] & (dv[None, :] < DV)
        do = do.to(tl.float32)
        r = tl.sum(do * tl.load(OB + o_offs, mask=o_msk, other=0.0).to(tl.float32), 1)
        tl.store(DGATE + qrow * dgate_stride, r.to(DGATE.dtype.element_ty), mask=row_ok)
        gate = tl.load(GATE + qrow * gate_stride, mask=row_ok, other=0.0).to(tl.float32)
        delta = gate * r
        tl.store(DELTA + qrow, delta, mask=row_ok)
        do = (do * gate[:, None]).to(q.dtype)
        if STORE_DOG:
            tl.store(DOG + o_offs, do, mask=o_msk)
    else:
        q, do, lse2, delta = _load_bwd_rows(Q, DO, LSE, DELTA, GATE, qrow, row_ok, gate_stride,
                                            DQK, DV, DQK_P, DV_P, HAS_GATE)
    return q, do, lse2, delta


@triton.jit
def _dq_steps(acc, q, do, lse2, delta, K, V, krow0, pos, s_a, s_b, hi, qk_scale, HKV,
              DQK: tl.constexpr, DV: tl.constexpr, DQK_P: tl.constexpr, DV_P: tl.constexpr,
              BLOCK_N: tl.constexpr, KSTRIDE: tl.constexpr, KOFF: tl.constexpr,
              WINDOW: tl.constexpr, MASKED: tl.constexpr):
    dq = tl.arange(0, DQK_P)
    dv = tl.arange(0, DV_P)
    for s0 in range(s_a, s_b, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)
        s_ok = s < hi
        krow = krow0 + s.to(tl.int64) * HKV
        k = tl.load(K + krow[:, None] * DQK + dq[None, :],
                    mask=s_ok[:, None] & (dq[None, :] < DQK), other=0.0)
        v = tl.load(V + krow[:, None] * DV + dv[None, :],
                    mask=s_ok[:, None] & (dv[None, :] < DV), other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.exp2(qk - lse2[:, None])
        if MASKED:
            kp = s * KSTRIDE + KOFF
            vis = s_ok[None, :] & (kp[None, :] <= pos[:, None])
            if WINDOW > 0:
                vis = vis & (kp[None, :] > pos[:, None] - WINDOW)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        acc += tl.dot(ds.to(k.dtype), k)
    return acc


@triton.jit
def _dense_bwd_dq(Q, K, V, DO, LSE, DELTA, GATE, OB, DGATE, DOG, DQ_IN, DQ, TILES, Q_CU, Q_POS0,
                  K_CU, qk_scale, scale, HQ, HKV, gate_stride, dgate_stride,
                  G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                  DQK: tl.constexpr, DV: tl.constexpr, DQK_P: tl.constexpr, DV_P: tl.constexpr,
                  KSTRIDE: tl.constexpr, KOFF: tl.constexpr, WINDOW: tl.constexpr,
                  HAS_GATE: tl.constexpr, ACCUM: tl.constexpr, FUSE: tl.constexpr,
                  STORE_DOG: tl.constexpr):
    g = tl.program_id(1)
    row_ok, pos, qrow, pos_min, pos_max, k_beg, k_len = _query_tile(
        TILES, Q_CU, Q_POS0, K_CU, HQ, g, G, G_PAD, BLOCK_T)
    q, do, lse2, delta = _load_dq_rows(Q, DO, LSE, DELTA, GATE, OB, DGATE, DOG, qrow, row_ok,
                                       gate_stride, dgate_stride, DQK, DV, DQK_P, DV_P, HAS_GATE,
                                       FUSE, STORE_DOG)
    dq = tl.arange(0, DQK_P)
    lo, f1, f2, hi = _window_range(pos_min, pos_max, k_len, KSTRIDE, KOFF, WINDOW, BLOCK_N)
    krow0 = k_beg.to(tl.int64) * HKV + g
    acc = tl.zeros([BLOCK_T * G_PAD, DQK_P], tl.float32)
    acc = _dq_steps(acc, q, do, lse2, delta, K, V, krow0, pos, lo, f1, hi, qk_scale, HKV,
                    DQK, DV, DQK_P, DV_P, BLOCK_N, KSTRIDE, KOFF, WINDOW, True)
    acc = _dq_steps(acc, q, do, lse2, delta, K, V, krow0, pos, f1, f2, hi, qk_scale, HKV,
                    DQK, DV, DQK_P, DV_P, BLOCK_N, KSTRIDE, KOFF, WINDOW, False)
    acc = _dq_steps(acc, q, do, lse2, delta, K, V, krow0, pos, f2, hi, hi, qk_scale, HKV,
                    DQK, DV, DQK_P, DV_P, BLOCK_N, KSTRIDE, KOFF, WINDOW, True)
    store_grad(DQ, DQ_IN, qrow[:, None] * DQK + dq[None, :], row_ok[:, None] & (dq[None, :] < DQK),
               acc * scale, ACCUM, False)


@triton.jit
def store_grad(OUT, IN, offs, msk, g, ACCUM: tl.constexpr, ATOMIC: tl.constexpr):
    """OUT[offs] = g (+ IN[offs] when ACCUM) in OUT's dtype; ATOMIC: OUT[offs] += g (fp32),
    relaxed: only later kernels read the sums, so no fence per atomic."""
    if ATOMIC:
        tl.atomic_add(OUT + offs, g, mask=msk, sem="relaxed")
    else:
        if ACCUM:
            g += tl.load(IN + offs, mask=msk, other=0.0)
        tl.store(OUT + offs, g.to(OUT.dtype.element_ty), mask=msk)


@triton.jit
def dkdv_step(k, v, dk, dvacc, Q, DO, LSE, DELTA, GATE, qrow, row_ok, vis, gate_stride, qk_scale,
              DQK: tl.constexpr, DV: tl.constexpr, DQK_P: tl.constexpr, DV_P: tl.constexpr,
              HAS_GATE: tl.constexpr, MASKED: tl.constexpr):
    """One query tile's contribution to a key tile's dK (unscaled) and dV, keys as the MMA
    rows: S^T = K Q^T keeps P^T and dS^T in the accumulator layout, so they feed the next
    dots from registers with no transpose through shared memory. ``vis`` [keys, rows]."""
    q, do, lse2, delta = _load_bwd_rows(Q, DO, LSE, DELTA, GATE, qrow, row_ok, gate_stride,
                                        DQK, DV, DQK_P, DV_P, HAS_GATE)
    pt = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
    if MASKED:
        pt = tl.where(vis, pt, 0.0)
    dvacc += tl.dot(pt.to(do.dtype), do)
    dpt = tl.dot(v, tl.trans(do))
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q)
    return dk, dvacc


@triton.jit
def _dkdv_steps(k, v, dk, dvacc, Q, DO, LSE, DELTA, GATE, kp, q_beg, pos0, g, t_a, t_b, tok_hi,
                qk_scale, HQ, gate_stride, G: tl.constexpr, G_PAD: tl.constexpr,
                BLOCK_T: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                DQK_P: tl.constexpr, DV_P: tl.constexpr, WINDOW: tl.constexpr,
                HAS_GATE: tl.constexpr, MASKED: tl.constexpr):
    r = tl.arange(0, BLOCK_T * G_PAD)
    for t0 in range(t_a, t_b, BLOCK_T):
        tok = t0 + r // G_PAD
        hh = r % G_PAD
        row_ok = (tok < tok_hi) & (hh < G)
        qrow = (q_beg + tok).to(tl.int64) * HQ + g * G + hh
        vis = kp[:, None] <= pos0 + tok[None, :]
        if WINDOW > 0:
            vis = vis & (kp[:, None] > pos0 + tok[None, :] - WINDOW)
        dk, dvacc = dkdv_step(k, v, dk, dvacc, Q, DO, LSE, DELTA, GATE, qrow, row_ok, vis,
                              gate_stride, qk_scale, DQK, DV, DQK_P, DV_P, HAS_GATE, MASKED)
    return dk, dvacc


@triton.jit
def _dense_bwd_dkdv(Q, K, V, DO, LSE, DELTA, GATE, DK_IN, DV_IN, DK, DV_, KTILES, Q_CU, Q_POS0, K_CU,
                    qk_scale, scale, HQ, HKV, gate_stride,
                    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_N: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                    DQK_P: tl.constexpr, DV_P: tl.constexpr, KSTRIDE: tl.constexpr,
                    KOFF: tl.constexpr, WINDOW: tl.constexpr, HAS_GATE: tl.constexpr,
                    ACCUM: tl.constexpr, ATOMIC: tl.constexpr):
    tile = tl.program_id(0)
    g = tl.program_id(1)
    seq = tl.load(KTILES + 4 * tile)
    s0 = tl.load(KTILES + 4 * tile + 1)
    tok_lo = tl.load(KTILES + 4 * tile + 2)
    tok_hi = tl.load(KTILES + 4 * tile + 3)
    q_beg = tl.load(Q_CU + seq)
    pos0 = tl.load(Q_POS0 + seq)
    k_beg = tl.load(K_CU + seq)
    k_len = tl.load(K_CU + seq + 1) - k_beg

    dq = tl.arange(0, DQK_P)
    dv = tl.arange(0, DV_P)
    s = s0 + tl.arange(0, BLOCK_N)
    s_ok = s < k_len
    krow = (k_beg + s).to(tl.int64) * HKV + g
    k = tl.load(K + krow[:, None] * DQK + dq[None, :],
                mask=s_ok[:, None] & (dq[None, :] < DQK), other=0.0)
    v = tl.load(V + krow[:, None] * DV + dv[None, :],
                mask=s_ok[:, None] & (dv[None, :] < DV), other=0.0)
    # keys past k_len are masked at the store, so only their positions matter here
    kp = s * KSTRIDE + KOFF
    kp_first = s0 * KSTRIDE + KOFF
    kp_last = (tl.minimum(s0 + BLOCK_N, k_len) - 1) * KSTRIDE + KOFF
    # query tokens that see every key of the tile: [full_a, full_b)
    full_a = tl.maximum(kp_last - pos0, tok_lo)
    full_b = tok_hi
    if WINDOW > 0:
        full_b = tl.minimum(kp_first + WINDOW - pos0, tok_hi)
    f1 = tl.minimum(tok_lo + (full_a - tok_lo + BLOCK_T - 1) // BLOCK_T * BLOCK_T, tok_hi)
    f2 = f1 + tl.maximum(full_b - f1, 0) // BLOCK_T * BLOCK_T

    dk = tl.zeros([BLOCK_N, DQK_P], tl.float32)
    dvacc = tl.zeros([BLOCK_N, DV_P], tl.float32)
    dk, dvacc = _dkdv_steps(k, v, dk, dvacc, Q, DO, LSE, DELTA, GATE, kp, q_beg, pos0, g, tok_lo,
                            f1, tok_hi, qk_scale, HQ, gate_stride,
                            G, G_PAD, BLOCK_T, DQK, DV, DQK_P, DV_P, WINDOW, HAS_GATE, True)
    dk, dvacc = _dkdv_steps(k, v, dk, dvacc, Q, DO, LSE, DELTA, GATE, kp, q_beg, pos0, g, f1,
                            f2, tok_hi, qk_scale, HQ, gate_stride,
                            G, G_PAD, BLOCK_T, DQK, DV, DQK_P, DV_P, WINDOW, HAS_GATE, False)
    dk, dvacc = _dkdv_steps(k, v, dk, dvacc, Q, DO, LSE, DELTA, GATE, kp, q_beg, pos0, g, f2,
                            tok_hi, tok_hi, qk_scale, HQ, gate_stride,
                            G, G_PAD, BLOCK_T, DQK, DV, DQK_P, DV_P, WINDOW, HAS_GATE, True)

    store_grad(DK, DK_IN, krow[:, None] * DQK + dq[None, :], s_ok[:, None] & (dq[None, :] < DQK),
               dk * scale, ACCUM, ATOMIC)
    store_grad(DV_, DV_IN, krow[:, None] * DV + dv[None, :], s_ok[:, None] & (dv[None, :] < DV),
               dvacc, ACCUM, ATOMIC)


def _common(q, k, v):
    T, HQ, DQK = q.shape
    HKV, DV = k.shape[1], v.shape[2]
    if HQ % HKV:
        raise ValueError(f"q heads ({HQ}) must be a multiple of k heads ({HKV})")
    return T, HQ, HKV, DQK, DV, HQ // HKV


class LocalBlocks(NamedTuple):
    """The selected branch's forced local blocks, attended by the window forward kernel.

    k, v: [Tk, HKV, Dqk], [Tk, HKV, Dv] the selected branch's keys/values (split by the
    window's ``k_cu``; the same tensors as the window's when the branches share them);
    o [Tq, HQ, Dv], lse [Tq, HQ] fp32: ``selected_attention_fwd(skip_local=blocks)``'s partial
    over the other blocks, completed in place; slc_block: l'; blocks: ``local_blocks``."""

    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    lse: torch.Tensor
    slc_block: int
    blocks: int


def _check_local(local: LocalBlocks, q, k, window: int, key_stride: int, key_offset: int):
    if window <= 0 or (key_stride, key_offset) != (1, 0):
        raise ValueError("local blocks need the sliding-window branch (key_stride 1, offset 0)")
    if local.blocks < 1 or local.blocks * local.slc_block > window:
        raise ValueError(f"local blocks ({local.blocks} x {local.slc_block}) must be >= 1 and "
                         f"lie inside the window ({window})")
    if local.k.shape != k.shape or local.o.shape[:2] != q.shape[:2]:
        raise ValueError("local blocks' k / o must match the window's k and the queries")


def dense_attention_fwd(q, k, v, layout: Varlen, k_cu, *, key_stride: int, key_offset: int,
                        window: int, scale: float, combine=None, local: LocalBlocks | None = None):
    """Forward of masked attention for the compressed / window branches.

    Args:
        q: [Tq, HQ, Dqk] contiguous, rows grouped by ``layout``.
        k, v: [Tk, HKV, Dqk], [Tk, HKV, Dv] contiguous, per-sequence prefixes split by
            ``k_cu`` (int32 [N+1]); key s of a sequence sits at s*key_stride + key_offset.
        window: 0 for no window, else w (query t sees kpos in (t - w, t]).
        scale: softmax scale.
        combine: None, or (o_a, o_b, gates): o_a, o_b [Tq, HQ, Dv] the other two branches'
            outputs and gates [Tq, HQ, 3] (all contiguous); the kernel then also writes the
            gated sum gates[..., 0] o_a + gates[..., 1] o_b + gates[..., 2] o (as
            ``combine.combine_fwd``, with this branch's o as stored) in o_a's dtype.
        local: None, or the selected branch's local blocks (:class:`LocalBlocks`, window
            only): each tile first attends its rows' local keys [(t // l' - L + 1) l', t]
            with local.k / local.v and merges that into local.o / local.lse in place (which
            ``combine``'s o_b then reads, completed); when local.k / local.v are k / v the
            window goes on from that state over its other keys (no extra dots).
    Returns:
        (o [Tq, HQ, Dv] in q's dtype, lse [Tq, HQ] fp32 natural log, -inf where no key is
        visible and o = 0 there); with ``combine`` also the gated sum [Tq, HQ, Dv].
    """
    T, HQ, HKV, DQK, DV, G = _common(q, k, v)
    o = new_empty(T, HQ, DV, dtype=q.dtype, device=q.device)
    lse = new_empty(T, HQ, dtype=torch.float32, device=q.device)
    out = None
    if combine is not None:
        out = new_empty(T, HQ, DV, dtype=combine[0].dtype, device=q.device)
    if T == 0:
        return (o, lse) if combine is None else (o, lse, out)
    g_pad, dqk_p, dv_p = next_pow2(G), max(16, next_pow2(DQK)), max(16, next_pow2(DV))
    cfg = dense_config(g_pad, dqk_p, dv_p, "fwd", window > 0, local is not None)
    tiles = layout.tiles(cfg["BLOCK_T"])
    oc, os_, gates = combine if combine is not None else (o, o, lse)
    if local is not None:
        _check_local(local, q, k, window, key_stride, key_offset)
    loc = local if local is not None else LocalBlocks(k, v, o, lse, 1, 0)
    _dense_fwd[(tiles.shape[0], HKV)](
        q, k, v, o, lse, tiles, layout.q_cu, layout.q_pos0, k_cu, scale * LOG2E, HQ, HKV,
        oc, os_, gates, out if out is not None else o, loc.k, loc.v, loc.o, loc.lse,
        G=G, G_PAD=g_pad, DQK=DQK, DV=DV, DQK_P=dqk_p, DV_P=dv_p,
        KSTRIDE=key_stride, KOFF=key_offset, WINDOW=window, COMBINE=combine is not None,
        LOCAL=loc.blocks, BS=loc.slc_block,
        SHARED=local is not None and loc.k is k and loc.v is v, **cfg)
    return (o, lse) if combine is None else (o, lse, out)


class GradTarget:
    """Where one backward kernel leaves ``acc + its gradient term`` for one tensor.

    ``acc``: fp32 accumulator holding the earlier branches' terms (None: this kernel's term is
    the first, so nothing is zero-filled); ``out``: tensor of any float dtype receiving the sum
    (None: ``acc``, or a new fp32 buffer). ``direct``: the kernel stores every element itself
    (no atomics, full coverage), so it reads ``acc`` and writes ``out`` in one pass; otherwise
    it adds into an fp32 buffer (``acc`` or zeros) that :meth:`result` copies to ``out``.
    """

    def __init__(self, acc, out, shape, device, direct: bool):
        self.out, self.direct = out, direct
        self.accum = acc is not None or not direct  # the kernel adds what ``src`` holds
        if not direct:
            acc = torch.zeros(*shape, dtype=torch.float32, device=device) if acc is None else acc
            self.dst = acc
        elif out is not None or acc is not None:
            self.dst = out if out is not None else acc
        else:
            self.dst = new_empty(*shape, dtype=torch.float32, device=device)
        self.src = acc if acc is not None else self.dst

    def result(self, ran: bool = True) -> torch.Tensor:
        """The summed gradient; ``ran=False`` when the kernel had nothing to do (no rows)."""
        if not ran and self.direct:
            if self.accum:
                if self.dst is not self.src:
                    self.dst.copy_(self.src)
            else:
                self.dst.zero_()
        if self.out is not None and self.out is not self.dst:
            self.out.copy_(self.dst)
            return self.out
        return self.dst


# fused backward prologue (``fuse=``): the dQ kernel also stores the gated dO rows, which the
# dK/dV kernel then reads ungated (False: dK/dV gates dO itself; kept for A/B timing)
PRESCALE_DO = True


def fused_prologue_torch(do, o_b, gate, dgate, delta, dog=None):
    """What a dQ kernel's fused prologue writes, in torch, for when that kernel does not run
    (no rows or no keys, or a launcher asked for dK/dV alone): dgate = rowsum(do * o_b),
    delta = gate * dgate (fp32) and, given ``dog``, the gated dO in dog's dtype."""
    r = (do.float() * o_b.float()).sum(-1)
    dgate.copy_(r)
    g = gate.float()
    delta.copy_(g * r)
    if dog is not None:
        dog.copy_((do.float() * g[..., None]).to(dog.dtype))


def fuse_setup(fuse, q, do, gate, delta, HQ: int, run_dq: bool, run_kv: bool):
    """Buffers of a fused backward prologue (see ``dense_attention_bwd``'s ``fuse``).

    Returns (kernel args dict for the dQ kernel, delta, dog): dog the gated dO the dK/dV
    kernel reads ungated (None: it gates ``do`` itself)."""
    T = q.shape[0]
    DV = do.shape[-1]
    if fuse is None:
        args = dict(OB=do, DGATE=do, DOG=do, dgate_stride=1, FUSE=False, STORE_DOG=False)
        return args, delta, None
    if gate is None:
        raise ValueError("fuse needs the branch gate")
    o_b, dgate = fuse
    if dgate.stride(0) != HQ * dgate.stride(1):
        raise ValueError("dgate must be a [Tq, HQ] view with row stride HQ * head stride")
    if delta is None:
        delta = new_empty(T, HQ, dtype=torch.float32, device=q.device)
    dog = new_empty(T, HQ, DV, dtype=q.dtype, device=q.device) if PRESCALE_DO and run_kv else None
    if not run_dq:
        fused_prologue_torch(do, o_b, gate, dgate, delta, dog)
    args = dict(OB=o_b, DGATE=dgate, DOG=dog if dog is not None else do,
                dgate_stride=dgate.stride(1), FUSE=run_dq, STORE_DOG=run_dq and dog is not None)
    return args, delta, dog


def dense_attention_bwd(q, k, v, do, lse, delta, layout: Varlen, k_cu, *, key_stride: int,
                        key_offset: int, window: int, scale: float, gate=None,
                        dq_acc=None, dk_acc=None, dv_acc=None, dq_out=None, dk_out=None,
                        dv_out=None, kernels=("dq", "dkdv"), fuse=None):
    """Backward of :func:`dense_attention_fwd`.

    The branch's output gradient is ``gate[..., None] * do`` (``gate`` [Tq, HQ] any float view,
    row stride = HQ * its last stride; None means 1). ``delta`` [Tq, HQ] fp32 is
    rowsum(d o_branch * o_branch). Each gradient is this branch's term plus the fp32
    accumulator ``dq_acc`` [Tq, HQ, Dqk], ``dk_acc`` [Tk, HKV, Dqk], ``dv_acc`` [Tk, HKV, Dv]
    (None: no earlier term), written to ``dq_out`` / ``dk_out`` / ``dv_out`` (same shapes, any
    float dtype; None: into the accumulator, or a new fp32 tensor); see :class:`GradTarget`.
    ``kernels`` names the kernels to run (a subset times one alone; the other's outputs are
    then left unwritten).
    ``fuse`` = (o_b [Tq, HQ, Dv] this branch's forward output, dgate [Tq, HQ] view like
    ``gate``): the dQ kernel computes the gate/delta step itself (``combine.combine_bwd`` for
    this branch): dgate = rowsum(do * o_b), and ``delta`` (None: a new buffer) is written,
    not read, as gate * dgate. Needs ``gate``. Returns (dq, dk, dv), the tensors holding the
    sums.
    """
    T, HQ, HKV, DQK, DV, G = _common(q, k, v)
    g_pad, dqk_p, dv_p = next_pow2(G), max(16, next_pow2(DQK)), max(16, next_pow2(DV))
    cfg_dq = dense_config(g_pad, dqk_p, dv_p, "dq", window > 0)
    cfg_kv = dense_config(g_pad, dqk_p, dv_p, "dkdv", window > 0)
    ktiles, split, covers = key_work(
        layout, k_cu, cfg_kv["BLOCK_N"], key_stride, key_offset, window,
        qchunk=DKDV_QUERY_CHUNK or (1 << 30 if interpreting() else 1024))
    direct_kv = not split and covers
    dqt = GradTarget(dq_acc, dq_out, (T, HQ, DQK), q.device, direct=True)
    dkt = GradTarget(dk_acc, dk_out, (k.shape[0], HKV, DQK), q.device, direct=direct_kv)
    dvt = GradTarget(dv_acc, dv_out, (v.shape[0], HKV, DV), q.device, direct=direct_kv)
    has_gate = gate is not None
    if has_gate and gate.stride(0) != HQ * gate.stride(1):
        raise ValueError("gate must be a [Tq, HQ] view with row stride HQ * head stride")
    run_dq = "dq" in kernels and T > 0 and k.shape[0] > 0
    run_kv = "dkdv" in kernels and ktiles.shape[0] > 0
    fargs, delta, dog = fuse_setup(fuse, q, do, gate, delta, HQ, run_dq, run_kv)
    gate_arg, gate_stride = (gate, gate.stride(1)) if has_gate else (delta, 1)
    common = dict(G=G, G_PAD=g_pad, DQK=DQK, DV=DV, DQK_P=dqk_p, DV_P=dv_p, KSTRIDE=key_stride,
                  KOFF=key_offset, WINDOW=window)
    if run_dq:
        tiles = layout.tiles(cfg_dq["BLOCK_T"])
        _dense_bwd_dq[(tiles.shape[0], HKV)](
            q, k, v, do, lse, delta, gate_arg, fargs["OB"], fargs["DGATE"], fargs["DOG"], dqt.src,
            dqt.dst, tiles, layout.q_cu, layout.q_pos0, k_cu, scale * LOG2E, scale, HQ, HKV,
            gate_stride, fargs["dgate_stride"], ACCUM=dqt.accum, HAS_GATE=has_gate,
            FUSE=fargs["FUSE"], STORE_DOG=fargs["STORE_DOG"], **common, **cfg_dq)
    if run_kv:
        # with the gated dO stored by the dQ kernel, dK/dV reads it as an ungated dO
        do_kv, kv_gate = (dog, False) if dog is not None else (do, has_gate)
        _dense_bwd_dkdv[(ktiles.shape[0], HKV)](
            q, k, v, do_kv, lse, delta, gate_arg, dkt.src, dvt.src, dkt.dst, dvt.dst, ktiles,
            layout.q_cu, layout.q_pos0, k_cu, scale * LOG2E, scale, HQ, HKV, gate_stride,
            ACCUM=dkt.accum, ATOMIC=split, HAS_GATE=kv_gate, **common, **cfg_kv)
    skip_dq, skip_kv = "dq" not in kernels, "dkdv" not in kernels
    return (dqt.dst if skip_dq else dqt.result(run_dq),
            dkt.dst if skip_kv else dkt.result(run_kv),
            dvt.dst if skip_kv else dvt.result(run_kv))


def key_work(layout: Varlen, k_cu, block_n: int, key_stride: int, key_offset: int, window: int,
             qchunk: int):
    """dK/dV work list: int32 [W, 4] rows (sequence, first key, first query row, end query row)
    covering, for every tile of ``block_n`` keys, the query rows that can see it, cut into
    pieces of at most ``qchunk`` rows (long causal ranges would leave a few programs doing
    most of the work). Planned on the host from the layout's lists (no device read-back).

    Returns (work, split, covers): split is True when any tile has several pieces (their
    partial dK/dV are then added atomically); covers is True when every key tile has work
    (so the kernel writes every key row)."""
    bounds = torch.tensor(host_list(k_cu), dtype=torch.int64)
    n_k = bounds[1:] - bounds[:-1]
    n_q = torch.tensor(layout.lens, dtype=torch.int64)
    p0 = torch.tensor(layout.pos0, dtype=torch.int64)
    per_seq = (n_k + block_n - 1) // block_n
    seq = torch.repeat_interleave(torch.arange(n_k.numel()), per_seq)
    s0 = (torch.arange(seq.numel()) - torch.repeat_interleave(torch.cumsum(per_seq, 0) - per_seq,
                                                              per_seq)) * block_n
    lo = (s0 * key_stride + key_offset - p0[seq]).clamp_min(0)
    hi = n_q[seq]
    if window > 0:
        last = (torch.minimum(s0 + block_n, n_k[seq]) - 1) * key_stride + key_offset
        hi = torch.minimum(hi, (last + window - p0[seq]).clamp_min(0))
    pieces = torch.where(lo < hi, (hi - lo + qchunk - 1) // qchunk, 0)
    tile = torch.repeat_interleave(torch.arange(seq.numel()), pieces)
    piece = torch.arange(tile.numel()) - torch.repeat_interleave(torch.cumsum(pieces, 0) - pieces,
                                                                 pieces)
    a = lo[tile] + piece * qchunk
    work = torch.stack([seq[tile], s0[tile], a, torch.minimum(a + qchunk, hi[tile])], 1)
    split = bool((pieces > 1).any())
    covers = bool((pieces > 0).all())
    return to_device(work.to(torch.int32), k_cu.device), split, covers


def default_scale(dqk: int) -> float:
    """Softmax scale 1/sqrt(Dqk)."""
    return 1.0 / math.sqrt(dqk)
