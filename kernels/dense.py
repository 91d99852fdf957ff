"""Attention over a strided, causally (and optionally window-) masked key prefix.

One pair of kernels serves two NSA branches (README, "dense branches"):
- compressed attention: key i sits at position i*d + l - 1 (``key_stride=d, key_offset=l-1``);
- sliding window: key s sits at position s (``key_stride=1, key_offset=0, window=w``).
Query t sees key s iff kpos(s) <= t and, with a window, t - kpos(s) < w.

Tiles are group-centric: a program owns BLOCK_T query tokens x all G heads of one KV head
(rows r = token * G_PAD + head-in-group), so every K/V tile it loads serves the whole group.
Shapes: q [Tq, HQ, Dqk], k [Tk, HKV, Dqk], v [Tk, HKV, Dv], o [Tq, HQ, Dv], lse [Tq, HQ] fp32.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .varlen import Varlen, new_empty, next_pow2

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
# query rows per dK/dV work item (None: 1024 on GPU, unsplit in the interpreter); tests lower it
DKDV_QUERY_CHUNK = None


def interpreting() -> bool:
    """True when Triton runs in its CPU interpreter (TRITON_INTERPRET=1)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dense_config(g_pad: int, dqk_p: int, dv_p: int, backward: bool = False) -> dict:
    """Tile sizes: rows per tile (BLOCK_T tokens x G_PAD heads), keys per step, warps."""
    if interpreting():
        rows, block_n, warps, stages = max(128, g_pad), 64, 4, 1
    else:
        big = max(dqk_p, dv_p) > 128
        rows = 64 if (big or backward) else 128
        rows = max(rows, g_pad)
        block_n = 64 if not (big and backward) else 32
        warps, stages = (8 if rows >= 128 else 4), (2 if big else 3)
    return dict(BLOCK_T=max(1, rows // g_pad), BLOCK_N=block_n, num_warps=warps, num_stages=stages)


@triton.jit
def _dense_fwd(Q, K, V, O, LSE, TILES, Q_CU, Q_POS0, K_CU, qk_scale, HQ, HKV,
               G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
               DQK: tl.constexpr, DV: tl.constexpr, DQK_P: tl.constexpr, DV_P: tl.constexpr,
               KSTRIDE: tl.constexpr, KOFF: tl.constexpr, WINDOW: tl.constexpr):
    tile = tl.program_id(0)
    g = tl.program_id(1)
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
    dq = tl.arange(0, DQK_P)
    dv = tl.arange(0, DV_P)
    q = tl.load(Q + qrow[:, None] * DQK + dq[None, :],
                mask=row_ok[:, None] & (dq[None, :] < DQK), other=0.0)

    pos_min = pos0 + t0
    pos_max = pos0 + tl.minimum(t0 + BLOCK_T, q_len) - 1
    hi = tl.where(pos_max >= KOFF, (pos_max - KOFF) // KSTRIDE + 1, 0)
    hi = tl.minimum(hi, k_len)
    lo = 0
    if WINDOW > 0:
        lo = (tl.maximum(pos_min - WINDOW + 1 - KOFF, 0) + KSTRIDE - 1) // KSTRIDE

    m_i = tl.full([BLOCK_T * G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_T * G_PAD], tl.float32)
    acc = tl.zeros([BLOCK_T * G_PAD, DV_P], tl.float32)
    for s0 in range(lo, hi, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)
        s_ok = s < hi
        krow = (k_beg + s).to(tl.int64) * HKV + g
        k = tl.load(K + krow[:, None] * DQK + dq[None, :],
                    mask=s_ok[:, None] & (dq[None, :] < DQK), other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        kp = s * KSTRIDE + KOFF
        vis = s_ok[None, :] & (kp[None, :] <= pos[:, None])
        if WINDOW > 0:
            vis = vis & (kp[None, :] > pos[:, None] - WINDOW)
        qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + krow[:, None] * DV + dv[None, :],
                    mask=s_ok[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    nonempty = l_i > 0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    tl.store(O + qrow[:, None] * DV + dv[None, :], o.to(O.dtype.element_ty),
             mask=row_ok[:, None] & (dv[None, :] < DV))
    lse = tl.where(nonempty, (m_i + tl.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(LSE + qrow, lse, mask=row_ok)


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
def _dense_bwd_dq(Q, K, V, DO, LSE, DELTA, GATE, DQ, TILES, Q_CU, Q_POS0, K_CU,
                  qk_scale, scale, HQ, HKV, gate_stride,
                  G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                  DQK: tl.constexpr, DV: tl.constexpr, DQK_P: tl.constexpr, DV_P: tl.constexpr,
                  KSTRIDE: tl.constexpr, KOFF: tl.constexpr, WINDOW: tl.constexpr,
                  HAS_GATE: tl.constexpr):
    tile = tl.program_id(0)
    g = tl.program_id(1)
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
    q, do, lse2, delta = _load_bwd_rows(Q, DO, LSE, DELTA, GATE, qrow, row_ok, gate_stride,
                                        DQK, DV, DQK_P, DV_P, HAS_GATE)
    dq = tl.arange(0, DQK_P)
    dv = tl.arange(0, DV_P)

    pos_min = pos0 + t0
    pos_max = pos0 + tl.minimum(t0 + BLOCK_T, q_len) - 1
    hi = tl.where(pos_max >= KOFF, (pos_max - KOFF) // KSTRIDE + 1, 0)
    hi = tl.minimum(hi, k_len)
    lo = 0
    if WINDOW > 0:
        lo = (tl.maximum(pos_min - WINDOW + 1 - KOFF, 0) + KSTRIDE - 1) // KSTRIDE

    acc = tl.zeros([BLOCK_T * G_PAD, DQK_P], tl.float32)
    for s0 in range(lo, hi, BLOCK_N):
        s = s0 + tl.arange(0, BLOCK_N)
        s_ok = s < hi
        krow = (k_beg + s).to(tl.int64) * HKV + g
        k = tl.load(K + krow[:, None] * DQK + dq[None, :],
                    mask=s_ok[:, None] & (dq[None, :] < DQK), other=0.0)
        v = tl.load(V + krow[:, None] * DV + dv[None, :],
                    mask=s_ok[:, None] & (dv[None, :] < DV), other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        kp = s * KSTRIDE + KOFF
        vis = s_ok[None, :] & (kp[None, :] <= pos[:, None])
        if WINDOW > 0:
            vis = vis & (kp[None, :] > pos[:, None] - WINDOW)
        p = tl.where(vis, tl.exp2(qk - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        acc += tl.dot(ds.to(k.dtype), k)

    ptrs = DQ + qrow[:, None] * DQK + dq[None, :]
    msk = row_ok[:, None] & (dq[None, :] < DQK)
    prev = tl.load(ptrs, mask=msk, other=0.0)
    tl.store(ptrs, prev + acc * scale, mask=msk)


@triton.jit
def _dense_bwd_dkdv(Q, K, V, DO, LSE, DELTA, GATE, DK, DV_, KTILES, Q_CU, Q_POS0, K_CU,
                    qk_scale, scale, HQ, HKV, gate_stride,
                    G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                    BLOCK_N: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                    DQK_P: tl.constexpr, DV_P: tl.constexpr, KSTRIDE: tl.constexpr,
                    KOFF: tl.constexpr, WINDOW: tl.constexpr, HAS_GATE: tl.constexpr,
                    ATOMIC: tl.constexpr):
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
    kp = s * KSTRIDE + KOFF

    dk = tl.zeros([BLOCK_N, DQK_P], tl.float32)
    dvacc = tl.zeros([BLOCK_N, DV_P], tl.float32)
    r = tl.arange(0, BLOCK_T * G_PAD)
    for t0 in range(tok_lo, tok_hi, BLOCK_T):
        tok = t0 + r // G_PAD
        hh = r % G_PAD
        row_ok = (tok < tok_hi) & (hh < G)
        pos = pos0 + tok
        qrow = (q_beg + tok).to(tl.int64) * HQ + g * G + hh
        q, do, lse2, delta = _load_bwd_rows(Q, DO, LSE, DELTA, GATE, qrow, row_ok, gate_stride,
                                            DQK, DV, DQK_P, DV_P, HAS_GATE)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        vis = row_ok[:, None] & s_ok[None, :] & (kp[None, :] <= pos[:, None])
        if WINDOW > 0:
            vis = vis & (kp[None, :] > pos[:, None] - WINDOW)
        p = tl.where(vis, tl.exp2(qk - lse2[:, None]), 0.0)
        dvacc += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)

    kmask = s_ok[:, None] & (dq[None, :] < DQK)
    vmask = s_ok[:, None] & (dv[None, :] < DV)
    dk_ptrs = DK + krow[:, None] * DQK + dq[None, :]
    dv_ptrs = DV_ + krow[:, None] * DV + dv[None, :]
    if ATOMIC:
        tl.atomic_add(dk_ptrs, dk * scale, mask=kmask)
        tl.atomic_add(dv_ptrs, dvacc, mask=vmask)
    else:
        tl.store(dk_ptrs, tl.load(dk_ptrs, mask=kmask, other=0.0) + dk * scale, mask=kmask)
        tl.store(dv_ptrs, tl.load(dv_ptrs, mask=vmask, other=0.0) + dvacc, mask=vmask)


def _common(q, k, v):
    T, HQ, DQK = q.shape
    HKV, DV = k.shape[1], v.shape[2]
    if HQ % HKV:
        raise ValueError(f"q heads ({HQ}) must be a multiple of k heads ({HKV})")
    return T, HQ, HKV, DQK, DV, HQ // HKV


def dense_attention_fwd(q, k, v, layout: Varlen, k_cu, *, key_stride: int, key_offset: int,
                        window: int, scale: float):
    """Forward of masked attention for the compressed / window branches.

    Args:
        q: [Tq, HQ, Dqk] contiguous, rows grouped by ``layout``.
        k, v: [Tk, HKV, Dqk], [Tk, HKV, Dv] contiguous, per-sequence prefixes split by
            ``k_cu`` (int32 [N+1]); key s of a sequence sits at s*key_stride + key_offset.
        window: 0 for no window, else w (query t sees kpos in (t - w, t]).
        scale: softmax scale.
    Returns:
        (o [Tq, HQ, Dv] in q's dtype, lse [Tq, HQ] fp32 natural log, -inf where no key is
        visible and o = 0 there).
    """
    T, HQ, HKV, DQK, DV, G = _common(q, k, v)
    o = new_empty(T, HQ, DV, dtype=q.dtype, device=q.device)
    lse = new_empty(T, HQ, dtype=torch.float32, device=q.device)
    if T == 0:
        return o, lse
    g_pad, dqk_p, dv_p = next_pow2(G), max(16, next_pow2(DQK)), max(16, next_pow2(DV))
    cfg = dense_config(g_pad, dqk_p, dv_p)
    tiles = layout.tiles(cfg["BLOCK_T"])
    _dense_fwd[(tiles.shape[0], HKV)](
        q, k, v, o, lse, tiles, layout.q_cu, layout.q_pos0, k_cu, scale * LOG2E, HQ, HKV,
        G=G, G_PAD=g_pad, DQK=DQK, DV=DV, DQK_P=dqk_p, DV_P=dv_p,
        KSTRIDE=key_stride, KOFF=key_offset, WINDOW=window, **cfg)
    return o, lse


def dense_attention_bwd(q, k, v, do, lse, delta, layout: Varlen, k_cu, *, key_stride: int,
                        key_offset: int, window: int, scale: float, gate=None,
                        dq_acc=None, dk_acc=None, dv_acc=None):
    """Backward of :func:`dense_attention_fwd`.

    The branch's output gradient is ``gate[..., None] * do`` (``gate`` [Tq, HQ] any float view,
    row stride = HQ * its last stride; None means 1). ``delta`` [Tq, HQ] fp32 is
    rowsum(d o_branch * o_branch). Gradients are *added* into the fp32 accumulators
    ``dq_acc`` [Tq, HQ, Dqk], ``dk_acc`` [Tk, HKV, Dqk], ``dv_acc`` [Tk, HKV, Dv] (fresh zero
    buffers when None). Returns (dq_acc, dk_acc, dv_acc).
    """
    T, HQ, HKV, DQK, DV, G = _common(q, k, v)
    f32 = dict(dtype=torch.float32, device=q.device)
    dq_acc = torch.zeros(T, HQ, DQK, **f32) if dq_acc is None else dq_acc
    dk_acc = torch.zeros(k.shape[0], HKV, DQK, **f32) if dk_acc is None else dk_acc
    dv_acc = torch.zeros(v.shape[0], HKV, DV, **f32) if dv_acc is None else dv_acc
    if T == 0 or k.shape[0] == 0:
        return dq_acc, dk_acc, dv_acc
    g_pad, dqk_p, dv_p = next_pow2(G), max(16, next_pow2(DQK)), max(16, next_pow2(DV))
    cfg = dense_config(g_pad, dqk_p, dv_p, backward=True)
    has_gate = gate is not None
    gate_arg, gate_stride = (gate, gate.stride(1)) if has_gate else (delta, 1)
    if has_gate and gate.stride(0) != HQ * gate.stride(1):
        raise ValueError("gate must be a [Tq, HQ] view with row stride HQ * head stride")
    common = dict(G=G, G_PAD=g_pad, DQK=DQK, DV=DV, DQK_P=dqk_p, DV_P=dv_p, KSTRIDE=key_stride,
                  KOFF=key_offset, WINDOW=window, HAS_GATE=has_gate, **cfg)
    tiles = layout.tiles(cfg["BLOCK_T"])
    _dense_bwd_dq[(tiles.shape[0], HKV)](
        q, k, v, do, lse, delta, gate_arg, dq_acc, tiles, layout.q_cu, layout.q_pos0, k_cu,
        scale * LOG2E, scale, HQ, HKV, gate_stride, **common)
    ktiles, split = key_work(layout, k_cu, cfg["BLOCK_N"], key_stride, key_offset, window,
                             qchunk=DKDV_QUERY_CHUNK or (1 << 30 if interpreting() else 1024))
    if ktiles.shape[0]:
        _dense_bwd_dkdv[(ktiles.shape[0], HKV)](
            q, k, v, do, lse, delta, gate_arg, dk_acc, dv_acc, ktiles, layout.q_cu,
            layout.q_pos0, k_cu, scale * LOG2E, scale, HQ, HKV, gate_stride, ATOMIC=split,
            **common)
    return dq_acc, dk_acc, dv_acc


def key_work(layout: Varlen, k_cu, block_n: int, key_stride: int, key_offset: int, window: int,
             qchunk: int):
    """dK/dV work list: int32 [W, 4] rows (sequence, first key, first query row, end query row)
    covering, for every tile of ``block_n`` keys, the query rows that can see it, cut into
    pieces of at most ``qchunk`` rows (long causal ranges would leave a few programs doing
    most of the work). Returns (work, split) with split True when any tile has several pieces
    (their partial dK/dV are then added atomically)."""
    rows, split = [], False
    k_bounds = k_cu.tolist()
    for b, (n_q, p0) in enumerate(zip(layout.lens, layout.pos0)):
        n_k = k_bounds[b + 1] - k_bounds[b]
        for s0 in range(0, n_k, block_n):
            lo = max(s0 * key_stride + key_offset - p0, 0)
            hi = n_q
            if window > 0:
                last = (min(s0 + block_n, n_k) - 1) * key_stride + key_offset
                hi = min(n_q, max(last + window - p0, 0))
            if lo >= hi:
                continue
            split = split or hi - lo > qchunk
            rows += [(b, s0, a, min(a + qchunk, hi)) for a in range(lo, hi, qchunk)]
    work = torch.tensor(rows if rows else [[0, 0, 0, 0]], dtype=torch.int32).reshape(-1, 4)
    return work[: len(rows)].to(k_cu.device), split


def default_scale(dqk: int) -> float:
    """Softmax scale 1/sqrt(Dqk)."""
    return 1.0 / math.sqrt(dqk)
