"""NSA decode step: one query per sequence against its KV cache, batched over sequences.

Shapes (B sequences, cache capacity C tokens, Cc compressed tokens):
q [B, HQ, Dqk], gates [B, HQ, 3]; k, k_win [B, C, HKV, Dqk]; v, v_win [B, C, HKV, Dv];
k_cmp [B, Cc, HKV, Dqk], v_cmp [B, Cc, HKV, Dv]; lengths int32 [B] = cache length of each
sequence *including* the new token, so the query sits at t = lengths[b] - 1 and sees
compressed tokens 0 .. Lc(t+1)-1, selection blocks 0 .. t // l' and the window [t-w+1, t].

Every attention program is group-centric (all G query heads of one KV head, G padded to
G_PAD >= 16 rows so each K/V tile feeds one tensor-core dot) and leaves a *partial* softmax
state (max m, sum l, unnormalised acc [G_PAD, Dv]) in fp32 scratch; the last launch merges
them. Five launches:

1. ``_cmp_partial`` (B, HKV, S): flash-decoding over S splits of the compressed tokens, in
   tiles of TT = TB * l'/d tokens (TB whole selection blocks). Besides its partial, each
   tile writes the block-score partials of its own TB blocks,
   ``A[h, j] = sum_i exp2(logit[h, i] - M[h]) * overlap(i, j) / d`` (M = the tile's running
   max), its M and ``E[h]``, the same sum for the next tile's first block (the spill of its
   last tokens). No per-token logits go to memory.
2. ``_block_scores`` (B, HKV, NB_P / BJ), BJ = 128 blocks at G = 16: each program merges the
   S (m, l) pairs into the heads' lse itself, rescales A and E by exp2(M - lse), sums over
   the heads and writes one int64 key per block: (fp32 score bits << 32) | reversed block
   index, forced blocks scored +inf and invisible ones -1, so one integer max is an arg-max
   with ties to the lower block.
3. ``_topk`` (B, HKV): a bitonic top-n of the NB_P keys (or n integer max-reductions, see
   TOPK_BITONIC); the chosen blocks are written ascending, -1 padded.
4. ``_slc_win_partial`` (B, HKV, NWP + NSP): the first NWP programs of a group each take
   PPP window pieces of l' tokens, the last NSP each take PPP selection slots (online softmax
   over them).
5. ``_combine`` (B, HQ): one program per query head merges its S + NSP + NWP partials
   branch by branch and applies the gates.

On sm_90+ launches 2-5 are programmatic dependent launches (PDL): each kernel lets its
successor's programs start once its own last reads are issued (``_signal``), and the
successor does its input-only prologue (program ids, lengths, q, gates, address math; the
window programs of launch 4 their whole attention) before ``gdc_wait``, which returns when
the predecessor has finished and its writes are visible. Every program of launches 2-5
reaches ``gdc_wait``, so each launch ends after all earlier ones; the only stores before a
wait (the window partials) go to scratch slots no earlier launch of the step touches.
Launch 1 is a plain launch (it follows foreign work and overwrites the previous step's
scratch) and launch 5 signals no one (a following kernel must not overlap its reads).

S and PPP follow the SM count (one wave of compressed splits, enough selection programs to
fill the GPU, few partials to merge). Scratch per group: S + NSP + NWP partials, A [G_PAD,
NB] and M, E [NT, G_PAD] in fp32 (72 KB at 64k tokens and G = 16), NB_P int64 keys.
Nothing syncs with the host and every launch shape depends only on the inputs' shapes, so
a fixed-batch step can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from .dense import interpreting
from .varlen import new_empty, next_pow2

__all__ = ["nsa_decode", "decode_plan"]

LOG2E = 1.4426950408889634
CMP_PROGRAMS_PER_SM = 1  # _cmp_partial: at most this many splits per SM in all (one wave)
PART_PROGRAMS_PER_SM = 2  # _slc_win_partial: slots per program so that its grid is ~ this many per SM
BLOCK_J = 128  # _block_scores: blocks per program at G_PAD = 16
CMP_TILE = 64  # _cmp_partial: compressed tokens per tile (rounded to whole selection blocks)
CMP_STAGES = 3  # _cmp_partial: software-pipeline depth of its K/V loads
TOPK_KEYS_PER_THREAD = 8  # _topk: keys per thread of its n serial max-reductions (more warps: no faster)
TOPK_BITONIC = 1  # _topk: one bitonic top-n sort (0: n serial max-reductions; same blocks, ~1.4 us slower)
PDL = 1  # launches 2-5 as programmatic dependent launches on sm_90+ (0: plain launches)
PDL_ENTRY_MASK = 0  # bit i set: launch i (0 cmp, 1 scores, 2 top-n, 3 selected/window) lets its successor
#                     start at its entry (all: ~4 us faster at B=32, slower at B=8); clear: after its last reads


@triton.jit
def _signal(SIGNAL: tl.constexpr, WHERE: tl.constexpr):
    """Lets the next launch start (its programs run up to their gdc_wait) if this is the place
    SIGNAL chose: 2 a kernel's entry, 1 after its last reads, 0 never (no PDL)."""
    if SIGNAL == WHERE:
        gdc_launch_dependents()


@triton.jit
def _wait(PDL: tl.constexpr):
    """Blocks until the previous launch has finished and its writes are visible (PDL launches only)."""
    if PDL > 0:
        gdc_wait()


@triton.jit
def _cmp_partial(Q, KC, VC, LEN, SCR_M, SCR_L, SCR_A, BLK_A, BLK_M, BLK_E, qk_scale, HQ, HKV, KC_BS, VC_BS,
                 chunk, NPT, NBA, NTA,
                 G: tl.constexpr, G_PAD: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                 DQK_P: tl.constexpr, DV_P: tl.constexpr, CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr,
                 SBLOCK: tl.constexpr, LCAP: tl.constexpr, BLOCK_C: tl.constexpr, TB: tl.constexpr,
                 TB_P: tl.constexpr, SIGNAL: tl.constexpr):
    _signal(SIGNAL, 2)
    b = tl.program_id(0)
    g = tl.program_id(1)
    s = tl.program_id(2)
    TT: tl.constexpr = TB * (SBLOCK // CSTRIDE)
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

    # overlap(i, j) / d of a tile's token i with its block j (wt) and with the next tile's first
    # block (ws); tiles start on block boundaries, so the weights are the same for every tile
    cc = tl.arange(0, BLOCK_C)
    jj = tl.arange(0, TB_P)
    start = cc * CSTRIDE
    ov = tl.minimum(start[:, None] + CBLOCK, (jj[None, :] + 1) * SBLOCK) - tl.maximum(start[:, None],
                                                                                      jj[None, :] * SBLOCK)
    wt = tl.where((cc[:, None] < TT) & (jj[None, :] < TB), tl.maximum(ov, 0), 0).to(tl.float32) / CSTRIDE
    ov_s = tl.minimum(start + CBLOCK, (TB + 1) * SBLOCK) - tl.maximum(start, TB * SBLOCK)
    ws = tl.where(cc < TT, tl.maximum(ov_s, 0), 0).to(tl.float32) / CSTRIDE

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV_P], tl.float32)
    bg = b.to(tl.int64) * HKV + g
    for c0 in range(lo, hi, TT):
        c = c0 + cc
        c_ok = (cc < TT) & (c < hi)
        krow = b.to(tl.int64) * KC_BS + (c.to(tl.int64) * HKV + g) * DQK
        k = tl.load(KC + krow[:, None] + dq[None, :], mask=c_ok[:, None] & (dq[None, :] < DQK), other=0.0)
        sc = tl.dot(q, tl.trans(k)) * qk_scale
        sc = tl.where(c_ok[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vrow = b.to(tl.int64) * VC_BS + (c.to(tl.int64) * HKV + g) * DV
        v = tl.load(VC + vrow[:, None] + dv[None, :], mask=c_ok[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        tile = c0 // TT
        blk_a = tl.dot(p, wt, input_precision="ieee")
        tl.store(BLK_A + (bg * G_PAD + hh[:, None]) * NBA + tile * TB + jj[None, :], blk_a,
                 mask=jj[None, :] < TB)
        tl.store(BLK_M + (bg * NTA + tile) * G_PAD + hh, m_safe)
        tl.store(BLK_E + (bg * NTA + tile) * G_PAD + hh, tl.sum(p * ws[None, :], 1))
    _signal(SIGNAL, 1)
    part = (bg * NPT + s) * G_PAD + hh
    tl.store(SCR_M + part, m_i)
    tl.store(SCR_L + part, l_i)
    tl.store(SCR_A + part[:, None] * DV_P + dv[None, :], acc)


@triton.jit
def _block_scores(LEN, SCR_M, SCR_L, BLK_A, BLK_M, BLK_E, KEYS, HKV, NSPLIT, NPT, NBA, NTA,
                  G: tl.constexpr, G_PAD: tl.constexpr, CBLOCK: tl.constexpr, CSTRIDE: tl.constexpr,
                  SBLOCK: tl.constexpr, LCAP: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr,
                  TB: tl.constexpr, S_P: tl.constexpr, NB_P: tl.constexpr, BJ: tl.constexpr, PDL: tl.constexpr,
                  SIGNAL: tl.constexpr):
    _signal(SIGNAL, 2)
    b = tl.program_id(0)
    g = tl.program_id(1)
    pj = tl.program_id(2)
    TT: tl.constexpr = TB * (SBLOCK // CSTRIDE)
    length = tl.minimum(tl.maximum(tl.load(LEN + b), 1), LCAP)
    t = length - 1
    n_cmp = tl.where(length >= CBLOCK, (length - CBLOCK) // CSTRIDE + 1, 0)
    bg = b.to(tl.int64) * HKV + g
    hh = tl.arange(0, G_PAD)
    ss = tl.arange(0, S_P)
    part = (bg * NPT + ss[:, None]) * G_PAD + hh[None, :]
    j = pj * BJ + tl.arange(0, BJ)
    tile = j // TB
    _wait(PDL)

    # log2-sum-exp of every head over all splits; heads without keys take no part
    ms = tl.load(SCR_M + part, mask=ss[:, None] < NSPLIT, other=float("-inf"))
    ls = tl.load(SCR_L + part, mask=ss[:, None] < NSPLIT, other=0.0)
    m = tl.max(ms, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.sum(ls * tl.exp2(ms - m_safe[None, :]), 0)
    use = (hh < G) & (l_sum > 0)
    lse = m_safe + tl.log2(tl.where(use, l_sum, 1.0))

    own = use[:, None] & (tile * TT < n_cmp)[None, :]
    a = tl.load(BLK_A + (bg * G_PAD + hh[:, None]) * NBA + j[None, :], mask=own, other=0.0)
    ma = tl.load(BLK_M + (bg * NTA + tile[None, :]) * G_PAD + hh[:, None], mask=own, other=0.0)
    score = tl.sum(tl.where(own, a * tl.exp2(ma - lse[:, None]), 0.0), 0)
    spill = use[:, None] & ((j % TB == 0) & (tile >= 1) & ((tile - 1) * TT < n_cmp))[None, :]
    prev = (bg * NTA + tile[None, :] - 1) * G_PAD + hh[:, None]
    e = tl.load(BLK_E + prev, mask=spill, other=0.0)
    me = tl.load(BLK_M + prev, mask=spill, other=0.0)
    _signal(SIGNAL, 1)
    score += tl.sum(tl.where(spill, e * tl.exp2(me - lse[:, None]), 0.0), 0)

    cur = t // SBLOCK
    vis = j <= cur
    forced = vis & ((j < INIT) | (j > cur - LOCAL))
    bits = tl.where(forced, float("inf"), score).to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(vis, (bits << 32) | (NB_P - 1 - j).to(tl.int64), -1)
    tl.store(KEYS + bg * NB_P + j, key)


@triton.jit
def _topk(KEYS, BI, HKV, TOPK: tl.constexpr, TOPK_P: tl.constexpr, NB_P: tl.constexpr, BITONIC: tl.constexpr,
          PDL: tl.constexpr, SIGNAL: tl.constexpr):
    _signal(SIGNAL, 2)
    b = tl.program_id(0)
    g = tl.program_id(1)
    bg = b.to(tl.int64) * HKV + g
    j = tl.arange(0, NB_P)
    _wait(PDL)
    key = tl.load(KEYS + bg * NB_P + j)
    _signal(SIGNAL, 1)
    if BITONIC:
        # visible keys are unique and >= 0: the n largest are those >= the n-th largest
        top = tl.topk(key, TOPK_P)
        nth = tl.max(tl.where(tl.arange(0, TOPK_P) == TOPK - 1, top, -1), 0)
        chosen = (key >= nth) & (key >= 0)
    else:
        chosen = j < 0
        for _r in tl.static_range(TOPK):
            mx = tl.max(key, 0)
            hit = (key == mx) & (mx >= 0)  # keys are unique; mx < 0: nothing visible is left
            chosen = chosen | hit
            key = tl.where(hit, -1, key)
    rank = tl.cumsum(chosen.to(tl.int32), 0) - 1
    count = tl.sum(chosen.to(tl.int32), 0)
    tl.store(BI + bg * TOPK + rank, j, mask=chosen)
    slot = tl.arange(0, TOPK_P)
    tl.store(BI + bg * TOPK + slot, tl.full([TOPK_P], -1, tl.int32), mask=(slot >= count) & (slot < TOPK))


@triton.jit
def _slc_win_partial(Q, K, V, KW, VW, LEN, BI, SCR_M, SCR_L, SCR_A, qk_scale, HQ, HKV,
                     K_BS, V_BS, KW_BS, VW_BS, NPT, P0,
                     G: tl.constexpr, G_PAD: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                     DQK_P: tl.constexpr, DV_P: tl.constexpr, SBLOCK: tl.constexpr, PIECE: tl.constexpr,
                     WINDOW: tl.constexpr, LCAP: tl.constexpr, TOPK: tl.constexpr, NSP: tl.constexpr,
                     NWP: tl.constexpr, PPP: tl.constexpr, PDL: tl.constexpr, SIGNAL: tl.constexpr):
    _signal(SIGNAL, 2)
    b = tl.program_id(0)
    g = tl.program_id(1)
    # the NWP window programs come first in the grid: they read nothing an earlier launch wrote,
    # so under PDL they run before the wait; unit numbers selection programs 0.. then window ones
    prog = tl.program_id(2)
    unit = tl.where(prog < NWP, prog + NSP, prog - NWP)
    length = tl.minimum(tl.maximum(tl.load(LEN + b), 1), LCAP)
    t = length - 1
    w0 = tl.maximum(t - WINDOW + 1, 0)
    bg = b.to(tl.int64) * HKV + g
    is_slc = unit < NSP
    if is_slc:
        kbase = K + b.to(tl.int64) * K_BS
        vbase = V + b.to(tl.int64) * V_BS
    else:
        kbase = KW + b.to(tl.int64) * KW_BS
        vbase = VW + b.to(tl.int64) * VW_BS
    r = tl.arange(0, PIECE)
    hh = tl.arange(0, G_PAD)
    h_ok = hh < G
    dq = tl.arange(0, DQK_P)
    dv = tl.arange(0, DV_P)
    qrow = b.to(tl.int64) * HQ + g * G + hh
    q = tl.load(Q + qrow[:, None] * DQK + dq[None, :], mask=h_ok[:, None] & (dq[None, :] < DQK), other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, DV_P], tl.float32)
    if is_slc:
        _wait(PDL)
    for i in range(PPP):
        # selection slot or window piece number unit * PPP + i (pieces past the window: tok > t)
        slot = unit * PPP + i
        blk = tl.load(BI + bg * TOPK + slot, mask=is_slc & (slot < TOPK), other=-1)
        tok_w = w0 + (slot - NSP * PPP) * PIECE + r
        tok = tl.where(is_slc, blk * SBLOCK + r, tok_w)
        ok = ((blk >= 0) & (r < SBLOCK) | (unit >= NSP)) & (tok <= t)
        row = tl.where(ok, tok, 0).to(tl.int64) * HKV + g
        k = tl.load(kbase + row[:, None] * DQK + dq[None, :], mask=ok[:, None] & (dq[None, :] < DQK), other=0.0)
        sc = tl.dot(q, tl.trans(k)) * qk_scale
        sc = tl.where(ok[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(sc - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vbase + row[:, None] * DV + dv[None, :], mask=ok[:, None] & (dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    _signal(SIGNAL, 1)
    part = (bg * NPT + P0 + unit) * G_PAD + hh
    tl.store(SCR_M + part, m_i)
    tl.store(SCR_L + part, l_i)
    tl.store(SCR_A + part[:, None] * DV_P + dv[None, :], acc)
    _wait(PDL)  # window programs too: this launch ends only after the previous one


@triton.jit
def _combine(GATES, SCR_M, SCR_L, SCR_A, O, HQ, HKV, NPT, P_SLC, P_WIN,
             G: tl.constexpr, G_PAD: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr, NPT_P: tl.constexpr,
             PDL: tl.constexpr):
    # no _signal: a later launch of other code must not overlap this one's reads of the scratch
    b = tl.program_id(0)
    h = tl.program_id(1)
    bg = b.to(tl.int64) * HKV + h // G
    qrow = b.to(tl.int64) * HQ + h
    g_cmp = tl.load(GATES + qrow * 3).to(tl.float32)
    g_slc = tl.load(GATES + qrow * 3 + 1).to(tl.float32)
    g_win = tl.load(GATES + qrow * 3 + 2).to(tl.float32)
    pp = tl.arange(0, NPT_P)
    p_ok = pp < NPT
    part = (bg * NPT + pp) * G_PAD + h % G
    _wait(PDL)
    m = tl.load(SCR_M + part, mask=p_ok, other=float("-inf"))
    l_p = tl.load(SCR_L + part, mask=p_ok, other=0.0)
    branch = (pp >= P_SLC).to(tl.int32) + (pp >= P_WIN).to(tl.int32)  # 0 cmp, 1 slc, 2 win
    coef = tl.zeros([NPT_P], tl.float32)
    for x in tl.static_range(3):
        mine = p_ok & (branch == x)
        mx = tl.max(tl.where(mine, m, float("-inf")), 0)
        w = tl.where(mine, tl.exp2(m - tl.where(mx == float("-inf"), 0.0, mx)), 0.0)
        lx = tl.sum(w * l_p, 0)
        gate = tl.where(x == 0, g_cmp, tl.where(x == 1, g_slc, g_win))
        coef += w * (gate / tl.where(lx > 0, lx, 1.0))
    dv = tl.arange(0, DV_P)
    acc = tl.load(SCR_A + part[:, None] * DV_P + dv[None, :], mask=p_ok[:, None], other=0.0)
    o = tl.sum(acc * coef[:, None], 0)
    tl.store(O + qrow * DV + dv, o.to(O.dtype.element_ty), mask=dv < DV)


def _num_sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def pdl_mode(device: torch.device) -> int:
    """1 where PDL (module constant) is on and programmatic dependent launch exists: a CUDA device
    of compute capability >= 9.0, not the interpreter (which has no gdc ops); else 0."""
    if not PDL or interpreting() or device.type != "cuda":
        return 0
    return int(torch.cuda.get_device_capability(device)[0] >= 9)


def _signals(pdl: int) -> list:
    """SIGNAL of launches 1-4 (the kernels' ``_signal``): 0 without PDL, else 2 where
    PDL_ENTRY_MASK has the launch's bit, 1 elsewhere."""
    return [0 if not pdl else 2 if PDL_ENTRY_MASK >> i & 1 else 1 for i in range(4)]


def decode_plan(batch: int, num_kv_heads: int, cmp_capacity: int, tile_tokens: int, topk: int,
                window_pieces: int, sms: Optional[int] = None) -> tuple[int, int]:
    """Work split of one decode step: (S, PPP) of the module docstring.

    S: splits of the compressed tokens per (sequence, KV head), at most CMP_PROGRAMS_PER_SM
    programs per SM in all (one wave), at least one tile of ``tile_tokens`` each. PPP:
    selection slots (and window pieces) per ``_slc_win_partial`` program, the largest power of
    two that still leaves PART_PROGRAMS_PER_SM programs per SM. ``sms`` None: the current
    GPU's (the interpreter: S = PPP = 2).
    """
    groups = batch * num_kv_heads
    max_splits = max(1, triton.cdiv(cmp_capacity, tile_tokens))
    if sms is None and (interpreting() or not torch.cuda.is_available()):
        return min(2, max_splits), 2
    sms = sms or _num_sms()
    splits = max(1, min(CMP_PROGRAMS_PER_SM * sms // groups, max_splits))
    ppp = 1
    while ppp < topk and groups * (triton.cdiv(topk, 2 * ppp) + triton.cdiv(window_pieces, 2 * ppp)) \
            >= PART_PROGRAMS_PER_SM * sms:
        ppp *= 2
    return splits, ppp


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
               num_splits: Optional[int] = None, parts_per_program: Optional[int] = None):
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
        num_splits, parts_per_program: S and PPP of the module docstring (None: ``decode_plan``).
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
    for name, val in (("num_splits", num_splits), ("parts_per_program", parts_per_program)):
        if val is not None and int(val) < 1:
            raise ValueError(f"{name} must be >= 1, got {val}")
    scale = 1.0 / math.sqrt(DQK) if scale is None else float(scale)
    q, gates = q.contiguous(), gates.contiguous()

    G = HQ // HKV
    g_pad, dqk_p, dv_p = max(16, next_pow2(G)), max(16, next_pow2(DQK)), max(16, next_pow2(DV))
    # compressed tiles of TB whole selection blocks (R = l'/d compressed tokens each)
    rpb = slc_block // cmp_stride
    block_c = max(16 if interpreting() else CMP_TILE, next_pow2(rpb))
    tb = block_c // rpb
    tile = tb * rpb
    piece = max(16, next_pow2(slc_block))
    n_win = triton.cdiv(window, piece)
    splits, ppp = decode_plan(B, HKV, CCAP, tile, topk, n_win)
    splits, ppp = num_splits or splits, min(parts_per_program or ppp, max(topk, n_win))
    chunk = triton.cdiv(triton.cdiv(CCAP, splits), tile) * tile
    splits = triton.cdiv(CCAP, chunk)  # no empty splits
    nsp, nwp = triton.cdiv(topk, ppp), triton.cdiv(n_win, ppp)
    npt = splits + nsp + nwp
    nta = triton.cdiv(CCAP, tile)
    nba = nta * tb
    nb_p = next_pow2(triton.cdiv(LCAP, slc_block))
    bj = min(BLOCK_J * 16 // g_pad, nb_p)

    groups = B * HKV
    sizes = (groups * npt * g_pad, groups * npt * g_pad, groups * npt * g_pad * dv_p, groups * g_pad * nba,
             groups * nta * g_pad, groups * nta * g_pad)
    scr_m, scr_l, scr_a, blk_a, blk_m, blk_e = torch.empty(sum(sizes), dtype=torch.float32, device=dev).split(sizes)
    keys = torch.empty(groups * nb_p, dtype=torch.int64, device=dev)
    bi = new_empty(B, HKV, topk, dtype=torch.int32, device=dev)
    o = new_empty(B, HQ, DV, dtype=dt, device=dev)
    warps = 4 if g_pad * max(dqk_p, dv_p) <= 4096 else 8
    pdl = pdl_mode(dev)
    sig = _signals(pdl)
    common = dict(G=G, G_PAD=g_pad)
    chained = dict(common, PDL=pdl, launch_pdl=pdl > 0)  # launches 2-5 may start before their predecessor ends
    _cmp_partial[(B, HKV, splits)](
        q, k_cmp, v_cmp, lengths, scr_m, scr_l, scr_a, blk_a, blk_m, blk_e, scale * LOG2E, HQ, HKV,
        k_cmp.stride(0), v_cmp.stride(0), chunk, npt, nba, nta, DQK=DQK, DV=DV, DQK_P=dqk_p, DV_P=dv_p,
        CBLOCK=cmp_block, CSTRIDE=cmp_stride, SBLOCK=slc_block, LCAP=LCAP, BLOCK_C=block_c, TB=tb,
        TB_P=max(16, next_pow2(tb)), SIGNAL=sig[0], num_warps=warps, num_stages=CMP_STAGES, **common)
    _block_scores[(B, HKV, nb_p // bj)](
        lengths, scr_m, scr_l, blk_a, blk_m, blk_e, keys, HKV, splits, npt, nba, nta, CBLOCK=cmp_block,
        CSTRIDE=cmp_stride, SBLOCK=slc_block, LCAP=LCAP, INIT=init_blocks, LOCAL=local_blocks, TB=tb,
        S_P=next_pow2(splits), NB_P=nb_p, BJ=bj, SIGNAL=sig[1], num_warps=4, **chained)
    _topk[(B, HKV)](keys, bi, HKV, TOPK=topk, TOPK_P=next_pow2(topk), NB_P=nb_p,
                    BITONIC=bool(TOPK_BITONIC) and topk <= nb_p, PDL=pdl, SIGNAL=sig[2], launch_pdl=pdl > 0,
                    num_warps=min(16, max(4, nb_p // (32 * TOPK_KEYS_PER_THREAD))))
    _slc_win_partial[(B, HKV, nsp + nwp)](
        q, k, v, k_win, v_win, lengths, bi, scr_m, scr_l, scr_a, scale * LOG2E, HQ, HKV,
        k.stride(0), v.stride(0), k_win.stride(0), v_win.stride(0), npt, splits, DQK=DQK, DV=DV,
        DQK_P=dqk_p, DV_P=dv_p, SBLOCK=slc_block, PIECE=piece, WINDOW=window, LCAP=LCAP, TOPK=topk, NSP=nsp,
        NWP=nwp, PPP=ppp, SIGNAL=sig[3], num_warps=warps, **chained)
    _combine[(B, HQ)](gates, scr_m, scr_l, scr_a, o, HQ, HKV, npt, splits, splits + nsp, DV=DV, DV_P=dv_p,
                      NPT_P=next_pow2(npt), num_warps=min(16, max(4, next_pow2(npt) * dv_p // 2048)), **chained)
    return (o, bi) if return_block_indices else o
