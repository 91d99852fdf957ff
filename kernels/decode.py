"""NSA decode step: one query per sequence against its KV cache, batched over sequences.

Shapes (B sequences, cache capacity C tokens, Cc compressed tokens):
q [B, HQ, Dqk], gates [B, HQ, 3]; k, k_win [B, C, HKV, Dqk]; v, v_win [B, C, HKV, Dv];
k_cmp [B, Cc, HKV, Dqk], v_cmp [B, Cc, HKV, Dv]; lengths int32 [B] = cache length of each
sequence *including* the new token, so the query sits at t = lengths[b] - 1 and sees
compressed tokens 0 .. Lc(t+1)-1, selection blocks 0 .. t // l' and the window [t-w+1, t].

Four launches, every program group-centric (all G query heads of one KV head, G padded to
>= 16 rows so each K/V tile feeds one tensor-core dot):
1. ``_cmp_partial`` (B, HKV, S): compressed attention over a split of the compressed tokens
   (flash-decoding), partial (max, sum, acc) plus the scaled logits kept in fp32 scratch;
2. ``_cmp_select`` (B, HKV): merges the splits (o_cmp, lse), turns the logits into
   group-summed probabilities, block scores by overlap weights, and the top-n selection
   (forced blocks first, ties to the lower block) written ascending, -1 padded;
3. ``_slc_win_partial`` (B, HKV, n + n_win): one program per selected block or window piece
   of l' tokens, partial softmax state of each;
4. ``_combine`` (B, HKV): merges the selected and window partials and applies the gates.
Nothing syncs with the host and every shape depends only on the inputs' shapes, so a
fixed-batch step can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .dense import interpreting
from .varlen import new_empty, next_pow2

__all__ = ["nsa_decode", "decode_splits"]

LOG2E = 1.4426950408889634


@triton.jit
def _cmp_partial(Q, KC, VC, LEN, SCR_S, SCR_M, SCR_L, SCR_A, qk_scale, HQ, HKV, CCAP, KC_BS, VC_BS,
                 chunk, NSPLIT,
                 G: tl.constexpr, G_PAD: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                 DQK_P: tl.constexpr, DV_P: tl.constexpr, CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr,
                 LCAP: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    length = tl.minimum(tl.maximum(tl.load(LEN + b), 1), LCAP)
    n_cmp = tl.where(length >= CBLOCK, (length - CBLOCK) // CSTRIDE + 1, 0)
    lo = s * chunk
    hi = tl.minimum(lo + chunk, n_cmp)
    hh = tl.arange(0, G_PAD)
    h_ok = hh < G
    dq = tl.arange(0, DQK_P)
    dv = tl.arange(0, DV_P)
    qrow = b.to(tl.int64) * HQ + g * G + hh
    q = tl.load(Q + qrow[:, None] * DQK + dq[None, :], mask=h_ok[:, None] & (dq[None, :] < DQK), other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV_P], tl.float32)
    bg = b.to(tl.int64) * HKV + g
    for c0 in range(lo, hi, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < hi
        krow = b.to(tl.int64) * KC_BS + (c.to(tl.int64) * HKV + g) * DQK
        k = tl.load(KC + krow[:, None] + dq[None, :], mask=c_ok[:, None] & (dq[None, :] < DQK), other=0.0)
        sc = tl.dot(q, tl.trans(k)) * qk_scale
        sc = tl.where(c_ok[None, :], sc, float("-inf"))
        tl.store(SCR_S + (bg * G_PAD + hh[:, None]) * CCAP + c[None, :], sc, mask=h_ok[:, None] & c_ok[None, :])
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vrow = b.to(tl.int64) * VC_BS + (c.to(tl.int64) * HKV + g) * DV
        v = tl.load(VC + vrow[:, None] + dv[None, :], mask=c_ok[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    part = (bg * NSPLIT + s) * G_PAD + hh
    tl.store(SCR_M + part, m_i)
    tl.store(SCR_L + part, l_i)
    tl.store(SCR_A + part[:, None] * DV_P + dv[None, :], acc)


@triton.jit
def _cmp_select(LEN, SCR_S, SCR_M, SCR_L, SCR_A, SCR_P, OC, LSEC, BI, HQ, HKV, CCAP, NSPLIT,
                G: tl.constexpr, G_PAD: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr,
                CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr, SBLOCK: tl.constexpr, LCAP: tl.constexpr,
                TOPK: tl.constexpr, TOPK_P: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
                NB_P: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    length = tl.minimum(tl.maximum(tl.load(LEN + b), 1), LCAP)
    t = length - 1
    n_cmp = tl.where(length >= CBLOCK, (length - CBLOCK) // CSTRIDE + 1, 0)
    hh = tl.arange(0, G_PAD)
    h_ok = hh < G
    dv = tl.arange(0, DV_P)
    bg = b.to(tl.int64) * HKV + g

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV_P], tl.float32)
    for s in range(0, NSPLIT):
        part = (bg * NSPLIT + s) * G_PAD + hh
        ms = tl.load(SCR_M + part)
        ls = tl.load(SCR_L + part)
        accs = tl.load(SCR_A + part[:, None] * DV_P + dv[None, :])
        m_new = tl.maximum(m_i, ms)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a1 = tl.exp2(m_i - m_safe)
        a2 = tl.exp2(ms - m_safe)
        l_i = l_i * a1 + ls * a2
        acc = acc * a1[:, None] + accs * a2[:, None]
        m_i = m_new
    nonempty = l_i > 0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    qrow = b.to(tl.int64) * HQ + g * G + hh
    tl.store(OC + qrow[:, None] * DV + dv[None, :], o, mask=h_ok[:, None] & (dv[None, :] < DV))
    lse2 = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    tl.store(LSEC + qrow, lse2 * 0.6931471805599453, mask=h_ok)

    # group-summed probabilities of every compressed token (rows without keys: lse -> +inf)
    lse_p = tl.where(h_ok & nonempty, lse2, float("inf"))
    for c0 in range(0, n_cmp, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < n_cmp
        sc = tl.load(SCR_S + (bg * G_PAD + hh[:, None]) * CCAP + c[None, :], mask=h_ok[:, None] & c_ok[None, :],
                     other=float("-inf"))
        p = tl.sum(tl.exp2(sc - lse_p[:, None]), 0)
        tl.store(SCR_P + bg * CCAP + c, p, mask=c_ok)
    tl.debug_barrier()

    # block scores: compressed token i overlaps block j iff j*R - C + 1 <= i <= (j+1)*R - 1
    R: tl.constexpr = SBLOCK // CSTRIDE
    C: tl.constexpr = CBLOCK // CSTRIDE
    j = tl.arange(0, NB_P)
    score = tl.zeros([NB_P], tl.float32)
    for o_ in tl.static_range(R + C - 1):
        i = j * R - C + 1 + o_
        i_ok = (i >= 0) & (i < n_cmp)
        shared = tl.minimum(i * CSTRIDE + CBLOCK, (j + 1) * SBLOCK) - tl.maximum(i * CSTRIDE, j * SBLOCK)
        w = tl.maximum(shared, 0).to(tl.float32) / CSTRIDE
        p = tl.load(SCR_P + bg * CCAP + i, mask=i_ok, other=0.0)
        score += p * w
    cur = t // SBLOCK
    vis = j <= cur
    forced = vis & ((j < INIT) | (j > cur - LOCAL))
    key = tl.where(forced, float("inf"), tl.where(vis, score, float("-inf")))
    chosen = j < 0
    for _r in tl.static_range(TOPK):
        mx = tl.max(key, 0)
        pick = tl.min(tl.where(key == mx, j, NB_P), 0)
        hit = (j == pick) & (key > float("-inf"))  # key[pick] == max: false once nothing is left
        chosen = chosen | hit
        key = tl.where(j == pick, float("-inf"), key)
    rank = tl.cumsum(chosen.to(tl.int32), 0) - 1
    count = tl.sum(chosen.to(tl.int32), 0)
    tl.store(BI + bg * TOPK + rank, j, mask=chosen)
    slot = tl.arange(0, TOPK_P)
    tl.store(BI + bg * TOPK + slot, tl.full([TOPK_P], -1, tl.int32), mask=(slot >= count) & (slot < TOPK))


@triton.jit
def _slc_win_partial(Q, K, V, KW, VW, LEN, BI, SCR_M, SCR_L, SCR_A, qk_scale, HQ, HKV,
                     K_BS, V_BS, KW_BS, VW_BS,
                     G: tl.constexpr, G_PAD: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                     DQK_P: tl.constexpr, DV_P: tl.constexpr, SBLOCK: tl.constexpr, PIECE: tl.constexpr,
                     WINDOW: tl.constexpr, LCAP: tl.constexpr, TOPK: tl.constexpr, NPART: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    part = tl.program_id(2)
    length = tl.minimum(tl.maximum(tl.load(LEN + b), 1), LCAP)
    t = length - 1
    bg = b.to(tl.int64) * HKV + g
    r = tl.arange(0, PIECE)
    if part < TOPK:
        blk = tl.load(BI + bg * TOPK + part)
        tok = blk * SBLOCK + r
        ok = (blk >= 0) & (r < SBLOCK) & (tok <= t)
        kbase = K + b.to(tl.int64) * K_BS
        vbase = V + b.to(tl.int64) * V_BS
    else:
        w0 = tl.maximum(t - WINDOW + 1, 0)
        tok = w0 + (part - TOPK) * PIECE + r
        ok = tok <= t
        kbase = KW + b.to(tl.int64) * KW_BS
        vbase = VW + b.to(tl.int64) * VW_BS
    hh = tl.arange(0, G_PAD)
    h_ok = hh < G
    dq = tl.arange(0, DQK_P)
    dv = tl.arange(0, DV_P)
    qrow = b.to(tl.int64) * HQ + g * G + hh
    q = tl.load(Q + qrow[:, None] * DQK + dq[None, :], mask=h_ok[:, None] & (dq[None, :] < DQK), other=0.0)
    row = tl.where(ok, tok, 0).to(tl.int64) * HKV + g
    k = tl.load(kbase + row[:, None] * DQK + dq[None, :], mask=ok[:, None] & (dq[None, :] < DQK), other=0.0)
    sc = tl.dot(q, tl.trans(k)) * qk_scale
    sc = tl.where(ok[None, :], sc, float("-inf"))
    m = tl.max(sc, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2(sc - m_safe[:, None])
    v = tl.load(vbase + row[:, None] * DV + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
    acc = tl.dot(p.to(v.dtype), v)
    slot = (bg * NPART + part) * G_PAD + hh
    tl.store(SCR_M + slot, m)
    tl.store(SCR_L + slot, tl.sum(p, 1))
    tl.store(SCR_A + slot[:, None] * DV_P + dv[None, :], acc)


@triton.jit
def _merge_parts(SCR_M, SCR_L, SCR_A, bg, first, last, hh, dv, NPART: tl.constexpr, G_PAD: tl.constexpr,
                 DV_P: tl.constexpr):
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV_P], tl.float32)
    for part in range(first, last):
        slot = (bg * NPART + part) * G_PAD + hh
        ms = tl.load(SCR_M + slot)
        ls = tl.load(SCR_L + slot)
        accs = tl.load(SCR_A + slot[:, None] * DV_P + dv[None, :])
        m_new = tl.maximum(m_i, ms)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a1 = tl.exp2(m_i - m_safe)
        a2 = tl.exp2(ms - m_safe)
        l_i = l_i * a1 + ls * a2
        acc = acc * a1[:, None] + accs * a2[:, None]
        m_i = m_new
    return acc / tl.where(l_i > 0, l_i, 1.0)[:, None]


@triton.jit
def _combine(OC, GATES, SCR_M, SCR_L, SCR_A, O, HQ, HKV,
             G: tl.constexpr, G_PAD: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr,
             TOPK: tl.constexpr, NPART: tl.constexpr):
    b = tl.program_id(0)
    g = tl.program_id(1)
    bg = b.to(tl.int64) * HKV + g
    hh = tl.arange(0, G_PAD)
    h_ok = hh < G
    dv = tl.arange(0, DV_P)
    o_slc = _merge_parts(SCR_M, SCR_L, SCR_A, bg, 0, TOPK, hh, dv, NPART, G_PAD, DV_P)
    o_win = _merge_parts(SCR_M, SCR_L, SCR_A, bg, TOPK, NPART, hh, dv, NPART, G_PAD, DV_P)
    qrow = b.to(tl.int64) * HQ + g * G + hh
    omask = h_ok[:, None] & (dv[None, :] < DV)
    o_cmp = tl.load(OC + qrow[:, None] * DV + dv[None, :], mask=omask, other=0.0)
    g0 = tl.load(GATES + qrow * 3, mask=h_ok, other=0.0).to(tl.float32)
    g1 = tl.load(GATES + qrow * 3 + 1, mask=h_ok, other=0.0).to(tl.float32)
    g2 = tl.load(GATES + qrow * 3 + 2, mask=h_ok, other=0.0).to(tl.float32)
    o = g0[:, None] * o_cmp + g1[:, None] * o_slc + g2[:, None] * o_win
    tl.store(O + qrow[:, None] * DV + dv[None, :], o.to(O.dtype.element_ty), mask=omask)


def decode_splits(batch: int, num_kv_heads: int, cmp_capacity: int, block_c: int) -> int:
    """Splits of the compressed tokens per (sequence, KV head): ~2 programs per SM in total."""
    if interpreting() or not torch.cuda.is_available():
        return min(2, max(1, triton.cdiv(cmp_capacity, block_c)))
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    want = triton.cdiv(2 * sms, batch * num_kv_heads)
    return max(1, min(want, triton.cdiv(cmp_capacity, block_c)))


def _check_cache(name, x, batch, heads, dim, device, dtype):
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] != batch or x.shape[2] != heads \
            or x.shape[3] != dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be [{batch}, capacity, {heads}, {dim}], got {shape}")
    if x.device != device or x.dtype != dtype:
        raise ValueError(f"{name} must be {dtype} on {device}, got {x.dtype} on {x.device}")
    if x.stride(3) != 1 or x.stride(2) != dim or x.stride(1) != heads * dim:
        raise ValueError(f"{name} must be contiguous within each sequence ([capacity, HKV, D] rows)")


def nsa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
               gates: torch.Tensor, lengths: torch.Tensor, *, cmp_block: int = 32, cmp_stride: int = 16,
               slc_block: int = 64, topk: int = 16, window: int = 512, init_blocks: int = 1,
               local_blocks: int = 2, scale: Optional[float] = None, k_win: Optional[torch.Tensor] = None,
               v_win: Optional[torch.Tensor] = None, return_block_indices: bool = False,
               num_splits: Optional[int] = None):
    """One NSA decode step for B sequences of different cache lengths (module docstring).

    Args:
        q: [B, HQ, Dqk] the query of each sequence at position lengths[b] - 1 (RoPE applied).
        k, v: [B, C, HKV, Dqk], [B, C, HKV, Dv] selection-branch cache (token s of sequence b
            at [b, s]); k_win, v_win: window-branch cache, same shapes (None: k, v).
        k_cmp, v_cmp: [B, Cc, HKV, Dqk], [B, Cc, HKV, Dv] compressed tokens of each sequence.
        gates: [B, HQ, 3] (cmp, slc, win) in [0, 1].
        lengths: int32 [B] cache lengths including the new token, 1 <= lengths[b] <= C
            (not checked on the host: clamped into that range in the kernels).
        cmp_block, cmp_stride, slc_block, topk, window, init_blocks, local_blocks, scale: as
            ``nsa_attention``.
        num_splits: splits of the compressed tokens (None: from the GPU size).
    Returns:
        o [B, HQ, Dv] in q's dtype; with ``return_block_indices`` also int32 [B, HKV, topk]
        (ascending, -1 padded).
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [B, HQ, Dqk], got shape {tuple(q.shape)}")
    B, HQ, DQK = q.shape
    if k.dim() != 4:
        raise ValueError(f"k must be [B, capacity, HKV, Dqk], got shape {tuple(k.shape)}")
    HKV, DV, LCAP = k.shape[2], v.shape[-1], k.shape[1]
    if HKV < 1 or HQ % HKV:
        raise ValueError(f"q: {HQ} heads is not a multiple of the {HKV} KV heads of k")
    k_win = k if k_win is None else k_win
    v_win = v if v_win is None else v_win
    dev, dt = q.device, q.dtype
    for name, x, dim in (("k", k, DQK), ("v", v, DV), ("k_win", k_win, DQK), ("v_win", v_win, DV)):
        _check_cache(name, x, B, HKV, dim, dev, dt)
        if x.shape[1] != LCAP:
            raise ValueError(f"{name}: capacity {x.shape[1]} differs from k's {LCAP}")
    CCAP = k_cmp.shape[1] if k_cmp.dim() == 4 else 0
    _check_cache("k_cmp", k_cmp, B, HKV, DQK, dev, dt)
    _check_cache("v_cmp", v_cmp, B, HKV, DV, dev, dt)
    if v_cmp.shape[1] != CCAP or CCAP < max(1, (LCAP - cmp_block) // cmp_stride + 1 if LCAP >= cmp_block else 1):
        raise ValueError(f"k_cmp/v_cmp: capacity {CCAP} cannot hold the compressed tokens of {LCAP} tokens")
    if gates.shape != (B, HQ, 3) or gates.device != dev:
        raise ValueError(f"gates must be [{B}, {HQ}, 3] on {dev}, got {tuple(gates.shape)} on {gates.device}")
    if lengths.shape != (B,) or lengths.dtype != torch.int32 or lengths.device != dev:
        raise ValueError(f"lengths must be int32 [{B}] on {dev}, got {lengths.dtype} {tuple(lengths.shape)}")
    for name, val in (("cmp_block", cmp_block), ("cmp_stride", cmp_stride), ("slc_block", slc_block),
                      ("topk", topk), ("window", window), ("local_blocks", local_blocks)):
        if int(val) < 1:
            raise ValueError(f"{name} must be >= 1, got {val}")
    if init_blocks < 0:
        raise ValueError(f"init_blocks must be >= 0, got {init_blocks}")
    if cmp_block % cmp_stride or slc_block % cmp_stride or cmp_block > slc_block:
        raise ValueError(f"cmp_stride={cmp_stride} must divide cmp_block={cmp_block} and slc_block={slc_block}, "
                         "and cmp_block <= slc_block")
    scale = 1.0 / math.sqrt(DQK) if scale is None else float(scale)
    q, gates = q.contiguous(), gates.contiguous()

    G = HQ // HKV
    g_pad, dqk_p, dv_p = max(16, next_pow2(G)), max(16, next_pow2(DQK)), max(16, next_pow2(DV))
    block_c = 16 if interpreting() else 64
    splits = num_splits or decode_splits(B, HKV, CCAP, block_c)
    chunk = triton.cdiv(triton.cdiv(CCAP, splits), block_c) * block_c
    piece = max(16, next_pow2(slc_block))
    n_win = triton.cdiv(window, piece)
    npart = topk + n_win
    f32 = dict(dtype=torch.float32, device=dev)
    scr_s = torch.empty(B * HKV * g_pad * CCAP, **f32)
    scr_m = torch.empty(B * HKV * max(splits, npart) * g_pad, **f32)
    scr_l = torch.empty_like(scr_m)
    scr_a = torch.empty(scr_m.numel() * dv_p, **f32)
    scr_p = torch.empty(B * HKV * CCAP, **f32)
    o_cmp = torch.empty(B, HQ, DV, **f32)
    lse_cmp = torch.empty(B, HQ, **f32)
    bi = new_empty(B, HKV, topk, dtype=torch.int32, device=dev)
    o = new_empty(B, HQ, DV, dtype=dt, device=dev)
    warps = 4 if g_pad * max(dqk_p, dv_p) <= 4096 else 8
    common = dict(G=G, G_PAD=g_pad, DV=DV, DV_P=dv_p)
    _cmp_partial[(B, HKV, splits)](
        q, k_cmp, v_cmp, lengths, scr_s, scr_m, scr_l, scr_a, scale * LOG2E, HQ, HKV, CCAP,
        k_cmp.stride(0), v_cmp.stride(0), chunk, splits, DQK=DQK, DQK_P=dqk_p, CBLOCK=cmp_block,
        CSTRIDE=cmp_stride, LCAP=LCAP, BLOCK_C=block_c, num_warps=warps, **common)
    _cmp_select[(B, HKV)](
        lengths, scr_s, scr_m, scr_l, scr_a, scr_p, o_cmp, lse_cmp, bi, HQ, HKV, CCAP, splits,
        CBLOCK=cmp_block, CSTRIDE=cmp_stride, SBLOCK=slc_block, LCAP=LCAP, TOPK=topk, TOPK_P=next_pow2(topk),
        INIT=init_blocks, LOCAL=local_blocks, NB_P=next_pow2(triton.cdiv(LCAP, slc_block)), BLOCK_C=block_c,
        num_warps=4, **common)
    _slc_win_partial[(B, HKV, npart)](
        q, k, v, k_win, v_win, lengths, bi, scr_m, scr_l, scr_a, scale * LOG2E, HQ, HKV,
        k.stride(0), v.stride(0), k_win.stride(0), v_win.stride(0), DQK=DQK, DQK_P=dqk_p,
        SBLOCK=slc_block, PIECE=piece, WINDOW=window, LCAP=LCAP, TOPK=topk, NPART=npart,
        num_warps=warps, **common)
    _combine[(B, HKV)](o_cmp, gates, scr_m, scr_l, scr_a, o, HQ, HKV, TOPK=topk, NPART=npart, num_warps=4,
                       **common)
    return (o, bi) if return_block_indices else o
