"""Selection: block scores from the compressed branch's probabilities, then top-n blocks.

Scores (spec "Selection" 1-3): s[t,g,j] = sum_{h in g} sum_i p[t,h,i] * overlap(i,j) / d.
Compressed token i starts in block jA = floor(i*d / l') and, since l <= l', reaches at
most block jA + 1, so block j collects tokens j R - (C - 1) .. j R + R - 1 (R = l'/d,
C = l/d). A program owns BLOCK_T query tokens x the G heads of one KV head (rows = token *
G_PAD + head) and walks the blocks in steps; scores are written once, no atomics.

Two paths, one function:
- bf16/fp16 inputs (tensor-core path): step n computes P for a window of NC compressed
  tokens starting at n BJE R - (C - 1), which holds every token of blocks n BJE .. n BJE +
  BJE - 1 (BJE = (NC - C + 1) // R; windows overlap by NC - BJE R tokens), so each block's
  score is complete within its step. The overlap weights are a constant [NC, BJ_P] matrix
  W of small integers, and the block sums P W run on the tensor cores, by default as one
  fp16 dot of P scaled by 2^15 (each p rounded to 11 significant bits, 2^-11; 64k forward
  39.2 vs 40.3-41.1 ms, H100, kernels-2026-11-26-v9-head) or, with SCORE_SPLIT, with P split
  into bf16 hi + lo (each p to 2^-15); fp32 accumulation. Both keep the scores far inside
  bf16 rounding (2^-8), where NSA_SPEC.md lets bf16 selections differ. A register sum over
  each token's G_PAD rows then gives the scores.
- fp32 inputs (exact path): the head sums and the overlap-weighted block sums are fp32 adds
  in registers over windows of BJ blocks, each block's spill into the next carried in
  registers (s[j] = a[j] + b[j - 1]).
The top-n kernel forces the initial and local blocks and picks the rest by repeated arg-max
(ties to the lower j). Queries are processed in chunks so the fp32 scores stay under
``budget_bytes``. Steps whose compressed tokens every row of the tile sees (all but the
last one or two of a long tile, and the tensor-core path's first step, whose window starts
before token 0) skip the visibility masks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dense import LOG2E, interpreting
from .varlen import new_empty, Varlen, next_pow2

# score kernel launch overrides (keys: see _score_config), for tests and sweeps
TILE_OVERRIDE: dict = {}
# tensor-core block sums with P split into bf16 hi + lo (2^-15) instead of one fp16 dot
# (2^-11): ~1 ms more at 64k (H100, kernels-2026-11-26-v9-head, --ab scores_split)
SCORE_SPLIT = False
# single-pass (fp16) tensor-core block sums: p scaled by 2^P_LOG2 (<= 32768 < 65504), so
# probabilities down to 2^-39 stay normal fp16 numbers
P_LOG2 = tl.constexpr(15)
P_SCALE = tl.constexpr(32768.0)


@triton.jit
def _score_steps(carry, q, lse2, KC, S, krow0, pos, out_row, tk_ok, w_lo, w_hi, j_a, j_b, nblk,
                 hi_c, qk_scale, HKV, NB_STRIDE, BLOCK_T: tl.constexpr, G_PAD: tl.constexpr,
                 DQK: tl.constexpr, DQK_P: tl.constexpr, CSTRIDE: tl.constexpr,
                 CBLOCK: tl.constexpr, RPB: tl.constexpr, RPB_P: tl.constexpr, BJ: tl.constexpr,
                 MASKED: tl.constexpr):
    """Scores of blocks [j_a, j_b), BJ per step; ``carry`` [BLOCK_T] is the spill of block
    j_a - 1, the returned one that of block j_b - 1. Unmasked steps hold only compressed
    tokens every row sees (rows without a visible token have lse2 = +inf, so p = 0 there)."""
    dq = tl.arange(0, DQK_P)
    e = tl.arange(0, BJ * RPB_P)
    rr = e % RPB_P
    jb = tl.arange(0, BJ)
    for j0 in range(j_a, j_b, BJ):
        i = j0 * RPB + (e // RPB_P) * RPB + rr
        i_ok = rr < RPB
        if MASKED:
            i_ok = i_ok & (i < hi_c)
        kc = tl.load(KC + (krow0 + i.to(tl.int64) * HKV)[:, None] * DQK + dq[None, :],
                     mask=i_ok[:, None] & (dq[None, :] < DQK), other=0.0)
        qk = tl.dot(q, tl.trans(kc)) * qk_scale
        p = tl.exp2(qk - lse2[:, None])
        if MASKED:
            p = tl.where(i_ok[None, :] & (i * CSTRIDE + CBLOCK - 1 <= pos[:, None]), p, 0.0)
        elif RPB_P > RPB:
            p = tl.where(i_ok[None, :], p, 0.0)
        ps = tl.sum(tl.reshape(p, (BLOCK_T, G_PAD, BJ * RPB_P)), axis=1)
        a = tl.sum(tl.reshape(ps * w_lo[None, :], (BLOCK_T, BJ, RPB_P)), axis=2)
        b = tl.sum(tl.reshape(ps * w_hi[None, :], (BLOCK_T, BJ, RPB_P)), axis=2)
        b_prev = tl.gather(b, tl.maximum(jb - 1, 0)[None, :] + tl.zeros([BLOCK_T, BJ], tl.int32), 1)
        s = a + tl.where(jb[None, :] == 0, carry[:, None], b_prev)
        carry = tl.sum(tl.where(jb[None, :] == BJ - 1, b, 0.0), 1)
        j = j0 + jb
        tl.store(S + out_row[:, None] * NB_STRIDE + j[None, :], s,
                 mask=tk_ok[:, None] & (j[None, :] < nblk))
    return carry


@triton.jit
def _overlap_weights(NC: tl.constexpr, BJ_P: tl.constexpr, BJE: tl.constexpr,
                     CSTRIDE: tl.constexpr, CBLOCK: tl.constexpr, SBLOCK: tl.constexpr,
                     CSPAN: tl.constexpr):
    """W [NC, BJ_P] fp32, overlap(i, j) / d of window slot e and block column c: slot e holds
    compressed token i = j0 RPB - (CSPAN - 1) + e, column c block j = j0 + c (0 for c >= BJE).
    Integers <= l / d, so exact in bf16; the same for every window (a loop constant)."""
    e = tl.arange(0, NC)[:, None]
    c = tl.arange(0, BJ_P)[None, :]
    tok_a = (e - (CSPAN - 1)) * CSTRIDE  # first token of slot e, relative to block j0
    blk_a = c * SBLOCK
    ov = tl.minimum(tok_a + CBLOCK, blk_a + SBLOCK) - tl.maximum(tok_a, blk_a)
    return tl.where(c < BJE, tl.maximum(ov, 0) // CSTRIDE, 0).to(tl.float32)


@triton.jit
def _block_sums(p, w, SPLIT: tl.constexpr):
    """Overlap-weighted block sums P W of p [ROWS, NC] fp32 on the tensor cores; w [NC, BJ_P]
    (exact small integers). SPLIT: p enters as hi = p truncated to bf16 plus lo = bf16(p -
    hi), two dots, relative error of each term <= 2^-15. Otherwise one fp16 dot of p
    (the caller scales p by 2^15 so it stays clear of fp16 subnormals): error <= 2^-11.
    Accumulated in fp32. Returns [ROWS, BJ_P] fp32."""
    if SPLIT:
        hi = (p.to(tl.uint32, bitcast=True) & 0xFFFF0000).to(tl.float32, bitcast=True)
        y = tl.dot(hi.to(tl.bfloat16), w.to(tl.bfloat16))
        y = tl.dot((p - hi).to(tl.bfloat16), w.to(tl.bfloat16), y)
    else:
        y = tl.dot(p.to(tl.float16), w.to(tl.float16))
    return y


@triton.jit
def _mma_score_steps(q, lse2, w, KC, S, krow0, pos, out_row, tk_ok, n_a, n_b, nblk, hi_c,
                     qk_scale, HKV, NB_STRIDE, BLOCK_T: tl.constexpr, G_PAD: tl.constexpr,
                     DQK: tl.constexpr, DQK_P: tl.constexpr, CSTRIDE: tl.constexpr,
                     CBLOCK: tl.constexpr, RPB: tl.constexpr, CSPAN: tl.constexpr,
                     NC: tl.constexpr, BJE: tl.constexpr, BJ_P: tl.constexpr,
                     SPLIT: tl.constexpr, MASKED: tl.constexpr):
    """Scores of blocks [n_a BJE, n_b BJE) (capped at nblk), BJE per step. Step n reads the
    NC compressed tokens from j0 RPB - (CSPAN - 1) (j0 = n BJE): every token that reaches
    blocks j0 .. j0 + BJE - 1, so each block's score is complete within one step (windows
    overlap by NC - BJE RPB tokens; no carry). P W sums each row's blocks on the tensor
    cores, then the G_PAD rows of a token add up. Unmasked steps hold only tokens >= 0
    that every row sees (rows without a visible token have lse2 = +inf, so p = 0 there)."""
    dq = tl.arange(0, DQK_P)
    c = tl.arange(0, BJ_P)
    i = n_a * (BJE * RPB) - (CSPAN - 1) + tl.arange(0, NC)
    kp = KC + (krow0 + i.to(tl.int64) * HKV)[:, None] * DQK + dq[None, :]
    j = n_a * BJE + c
    sp = S + out_row[:, None] * NB_STRIDE + j[None, :]
    s_ok = tk_ok[:, None] & (c[None, :] < BJE)
    for _ in range(n_a, n_b):
        if MASKED:
            i_ok = (i >= 0) & (i < hi_c)
            kc = tl.load(kp, mask=i_ok[:, None] & (dq[None, :] < DQK), other=0.0)
        elif DQK_P > DQK:
            kc = tl.load(kp, mask=dq[None, :] < DQK, other=0.0)
        else:
            kc = tl.load(kp)
        qk = tl.dot(q, tl.trans(kc)) * qk_scale
        p = tl.exp2(qk - lse2[:, None])
        if MASKED:
            p = tl.where(i_ok[None, :] & (i * CSTRIDE + CBLOCK - 1 <= pos[:, None]), p, 0.0)
        s = tl.sum(tl.reshape(_block_sums(p, w, SPLIT), (BLOCK_T, G_PAD, BJ_P)), axis=1)
        if not SPLIT:
            s = s * (1.0 / P_SCALE)
        if MASKED:
            tl.store(sp, s, mask=s_ok & (j[None, :] < nblk))
        else:
            tl.store(sp, s, mask=s_ok)
        i += BJE * RPB
        kp += BJE * RPB * HKV * DQK
        j += BJE
        sp += BJE


@triton.jit
def _exact_scores(q, lse2, KC, S, krow0, pos, out_row, tk_ok, nblk, hi_c, lo_c, qk_scale, HKV,
                  NB_STRIDE, BLOCK_T: tl.constexpr, G_PAD: tl.constexpr, DQK: tl.constexpr,
                  DQK_P: tl.constexpr, CSTRIDE: tl.constexpr, CBLOCK: tl.constexpr,
                  SBLOCK: tl.constexpr, RPB: tl.constexpr, RPB_P: tl.constexpr,
                  BJ: tl.constexpr):
    """fp32 scores of one tile (fp32 inputs): head and block sums as fp32 adds in registers,
    unmasked steps over blocks whose tokens every row sees, then the masked rest."""
    j_full = lo_c // RPB // BJ * BJ
    # block j holds compressed tokens i = j RPB + rr, starting rr d past the block start: a
    # weight of min(l, l' - rr d) / d stays in block j and the rest spills into block j + 1
    rr = tl.arange(0, BJ * RPB_P) % RPB_P
    w_lo = tl.minimum(CBLOCK, SBLOCK - rr * CSTRIDE).to(tl.float32) / CSTRIDE
    w_hi = tl.maximum(CBLOCK - SBLOCK + rr * CSTRIDE, 0).to(tl.float32) / CSTRIDE
    carry = tl.zeros([BLOCK_T], tl.float32)
    carry = _score_steps(carry, q, lse2, KC, S, krow0, pos, out_row, tk_ok, w_lo, w_hi, 0,
                         j_full, nblk, hi_c, qk_scale, HKV, NB_STRIDE, BLOCK_T, G_PAD, DQK, DQK_P,
                         CSTRIDE, CBLOCK, RPB, RPB_P, BJ, False)
    _score_steps(carry, q, lse2, KC, S, krow0, pos, out_row, tk_ok, w_lo, w_hi, j_full, nblk,
                 nblk, hi_c, qk_scale, HKV, NB_STRIDE, BLOCK_T, G_PAD, DQK, DQK_P, CSTRIDE, CBLOCK,
                 RPB, RPB_P, BJ, True)


@triton.jit
def _mma_scores(q, lse2, KC, S, krow0, pos, out_row, tk_ok, nblk, hi_c, lo_c, qk_scale, HKV,
                NB_STRIDE, BLOCK_T: tl.constexpr, G_PAD: tl.constexpr, DQK: tl.constexpr,
                DQK_P: tl.constexpr, CSTRIDE: tl.constexpr, CBLOCK: tl.constexpr,
                SBLOCK: tl.constexpr, RPB: tl.constexpr, CSPAN: tl.constexpr, NC: tl.constexpr,
                BJE: tl.constexpr, BJ_P: tl.constexpr, SPLIT: tl.constexpr):
    """Scores of one tile (bf16/fp16 inputs), block sums on the tensor cores: step 0 masked
    (its window starts before token 0), then the steps whose window lies within the lo_c
    tokens every row sees, unmasked, then the masked rest."""
    w = _overlap_weights(NC, BJ_P, BJE, CSTRIDE, CBLOCK, SBLOCK, CSPAN)
    if not SPLIT:
        lse2 = lse2 - P_LOG2
    n_end = tl.cdiv(nblk, BJE)
    # step n is unmasked iff its last token n BJE RPB - (CSPAN - 1) + NC - 1 < lo_c
    room = lo_c + CSPAN - 1 - NC
    n_mid = tl.minimum(tl.maximum(tl.where(room >= 0, room // (BJE * RPB) + 1, 0), 1), n_end)
    _mma_score_steps(q, lse2, w, KC, S, krow0, pos, out_row, tk_ok, 0, 1, nblk, hi_c, qk_scale,
                     HKV, NB_STRIDE, BLOCK_T, G_PAD, DQK, DQK_P, CSTRIDE, CBLOCK, RPB, CSPAN, NC,
                     BJE, BJ_P, SPLIT, True)
    _mma_score_steps(q, lse2, w, KC, S, krow0, pos, out_row, tk_ok, 1, n_mid, nblk, hi_c,
                     qk_scale, HKV, NB_STRIDE, BLOCK_T, G_PAD, DQK, DQK_P, CSTRIDE, CBLOCK, RPB,
                     CSPAN, NC, BJE, BJ_P, SPLIT, False)
    _mma_score_steps(q, lse2, w, KC, S, krow0, pos, out_row, tk_ok, n_mid, n_end, nblk, hi_c,
                     qk_scale, HKV, NB_STRIDE, BLOCK_T, G_PAD, DQK, DQK_P, CSTRIDE, CBLOCK, RPB,
                     CSPAN, NC, BJE, BJ_P, SPLIT, True)


@triton.jit
def _block_scores(Q, KC, LSE, S, TILES, Q_CU, Q_POS0, KC_CU, qk_scale, HQ, HKV, row_base,
                  NB_STRIDE, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                  DQK: tl.constexpr, DQK_P: tl.constexpr, CSTRIDE: tl.constexpr,
                  CBLOCK: tl.constexpr, SBLOCK: tl.constexpr, RPB: tl.constexpr,
                  RPB_P: tl.constexpr, BJ: tl.constexpr, MMA: tl.constexpr,
                  CSPAN: tl.constexpr, NC: tl.constexpr, BJE: tl.constexpr,
                  BJ_P: tl.constexpr, SPLIT: tl.constexpr):
    """Scores S [rows, HKV, NB_STRIDE] of BLOCK_T query tokens x the G heads of KV head
    program_id(1) (rows = token * G_PAD + head), blocks 0 .. nblk - 1 of the tile."""
    # longest (last) tiles first, so the short ones fill the tail
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    g = tl.program_id(1)
    seq = tl.load(TILES + 2 * tile)
    t0 = tl.load(TILES + 2 * tile + 1)
    q_beg = tl.load(Q_CU + seq)
    q_len = tl.load(Q_CU + seq + 1) - q_beg
    pos0 = tl.load(Q_POS0 + seq)
    kc_beg = tl.load(KC_CU + seq)
    kc_len = tl.load(KC_CU + seq + 1) - kc_beg

    r = tl.arange(0, BLOCK_T * G_PAD)
    tok = t0 + r // G_PAD
    hh = r % G_PAD
    row_ok = (tok < q_len) & (hh < G)
    pos = pos0 + tok
    qrow = (q_beg + tok).to(tl.int64) * HQ + g * G + hh
    dq = tl.arange(0, DQK_P)
    q = tl.load(Q + qrow[:, None] * DQK + dq[None, :],
                mask=row_ok[:, None] & (dq[None, :] < DQK), other=0.0)
    lse = tl.load(LSE + qrow, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)

    pos_min = pos0 + t0
    pos_max = pos0 + tl.minimum(t0 + BLOCK_T, q_len) - 1
    nblk = pos_max // SBLOCK + 1
    hi_c = tl.where(pos_max >= CBLOCK - 1, (pos_max - CBLOCK + 1) // CSTRIDE + 1, 0)
    hi_c = tl.minimum(hi_c, kc_len)
    # compressed tokens every row of the tile sees
    lo_c = tl.where(pos_min >= CBLOCK - 1, (pos_min - CBLOCK + 1) // CSTRIDE + 1, 0)
    lo_c = tl.minimum(lo_c, kc_len)
    tk = t0 + tl.arange(0, BLOCK_T)
    out_row = (q_beg + tk - row_base).to(tl.int64) * HKV + g
    tk_ok = tk < q_len
    krow0 = kc_beg.to(tl.int64) * HKV + g
    if MMA:
        _mma_scores(q, lse2, KC, S, krow0, pos, out_row, tk_ok, nblk, hi_c, lo_c, qk_scale, HKV,
                    NB_STRIDE, BLOCK_T, G_PAD, DQK, DQK_P, CSTRIDE, CBLOCK, SBLOCK, RPB, CSPAN, NC,
                    BJE, BJ_P, SPLIT)
    else:
        _exact_scores(q, lse2, KC, S, krow0, pos, out_row, tk_ok, nblk, hi_c, lo_c, qk_scale, HKV,
                      NB_STRIDE, BLOCK_T, G_PAD, DQK, DQK_P, CSTRIDE, CBLOCK, SBLOCK, RPB, RPB_P,
                      BJ)


@triton.jit
def _top_blocks(S, BI, ROWPOS, n_rows, HKV, row_base, NB_STRIDE,
                SBLOCK: tl.constexpr, NSEL: tl.constexpr, NSEL_P: tl.constexpr,
                INIT: tl.constexpr, LOCAL: tl.constexpr, ROWS: tl.constexpr,
                NB_P: tl.constexpr):
    """Top-n of ROWS query rows (rows of S [n_rows, HKV, NB_STRIDE], KV head program_id(1)):
    forced blocks (the first INIT and the last LOCAL visible ones) plus repeated arg-max over
    the other visible blocks, ties to the lower j; ascending block ids, -1 padded, to BI.

    When the forced blocks always fit (INIT + LOCAL <= NSEL) they are marked selected up front
    and only min(NSEL, visible) - forced arg-max passes run per row (the program runs the most
    any of its rows needs): the same set as NSEL passes over keys with forced = +inf."""
    g = tl.program_id(1)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_ok = rows < n_rows
    pos = tl.load(ROWPOS + row_base + rows, mask=r_ok, other=0)
    cur = pos // SBLOCK
    j = tl.arange(0, NB_P)
    vis = r_ok[:, None] & (j[None, :] <= cur[:, None])
    base = (rows.to(tl.int64) * HKV + g) * NB_STRIDE
    s = tl.load(S + base[:, None] + j[None, :], mask=vis, other=0.0)
    forced = vis & ((j[None, :] < INIT) | (j[None, :] > cur[:, None] - LOCAL))
    if INIT + LOCAL <= NSEL:
        # -2: selected; -1: invisible; -3: consumed by a pass without being selected (NaN)
        key = tl.where(forced, -2.0, tl.where(vis, s, -1.0))
        n_vis = tl.where(r_ok, tl.minimum(cur + 1, NB_P), 0)
        need = tl.minimum(n_vis, NSEL) - tl.sum(forced.to(tl.int32), 1)
        for it in range(0, tl.max(need, 0)):
            best, arg = tl.max(key, 1, return_indices=True, return_indices_tie_break_left=True)
            take = (j[None, :] == arg[:, None]) & (it < need)[:, None]
            key = tl.where(take, tl.where(best[:, None] >= 0, -2.0, -3.0), key)
        sel = key == -2.0
    else:
        key = tl.where(forced, float("inf"), tl.where(vis, s, -1.0))
        sel = key < -10.0
        for _ in range(NSEL):
            best, arg = tl.max(key, 1, return_indices=True, return_indices_tie_break_left=True)
            hit = (j[None, :] == arg[:, None]) & (best[:, None] >= 0)
            sel = sel | hit
            key = tl.where(j[None, :] == arg[:, None], -2.0, key)
    sel_i = sel.to(tl.int32)
    count = tl.sum(sel_i, 1)
    slot = tl.cumsum(sel_i, 1) - 1
    out = BI + ((row_base + rows).to(tl.int64) * HKV + g) * NSEL
    tl.store(out[:, None] + slot, j[None, :] + 0 * slot, mask=sel & r_ok[:, None])
    k = tl.arange(0, NSEL_P)
    tl.store(out[:, None] + k[None, :], tl.full([ROWS, NSEL_P], -1, tl.int32),
             mask=r_ok[:, None] & (k[None, :] >= count[:, None]) & (k[None, :] < NSEL))


def _top_config(nb_p: int) -> dict:
    """Top-n launch: ROWS rows per program and its warps. On a GPU one warp holds one row
    up to 2048 blocks (NB_P / 32 keys per thread), so each arg-max is a warp-shuffle
    reduction with no shared memory or barrier (local sm_90a compile: 96 registers at
    NB_P = 1024; two rows per warp need 255 and unroll); ``TILE_OVERRIDE`` keys top_rows,
    top_warps. (A bitonic top-n per row measured no faster: kernels-analysis.md round 10.)"""
    if interpreting():
        rows, warps = 4, 4
    else:
        rows, warps = 1, max(1, min(8, nb_p // 2048))
    return dict(ROWS=TILE_OVERRIDE.get("top_rows", rows),
                num_warps=TILE_OVERRIDE.get("top_warps", warps))


def _top_launch(scores, out, row_pos, n_rows, row_a, nb_stride, *, slc_block, topk, init_blocks,
                local_blocks, nb_vis=None):
    """Top-n kernel over ``n_rows`` rows of ``scores`` [n_rows, HKV, nb_stride] (global rows
    from ``row_a``); ``nb_vis``: most blocks any of these rows sees (None: nb_stride), which
    sets the kernel's row width, so early query chunks scan fewer blocks."""
    hkv = scores.shape[1]
    nb_p = next_pow2(min(nb_stride, nb_vis or nb_stride))
    cfg = _top_config(nb_p)
    _top_blocks[(triton.cdiv(n_rows, cfg["ROWS"]), hkv)](
        scores, out, row_pos, n_rows, hkv, row_a, nb_stride, SBLOCK=slc_block, NSEL=topk,
        NSEL_P=next_pow2(topk), INIT=init_blocks, LOCAL=local_blocks, NB_P=nb_p, **cfg)


def top_blocks_triton(scores, q_pos, *, slc_block: int, topk: int, init_blocks: int,
                      local_blocks: int):
    """Top-n selection from given block scores (the selection's second kernel alone).

    Args:
        scores: fp32 [Tq, HKV, NB] contiguous, >= 0 where visible; q_pos: int32 [Tq] query
            positions (block j is visible to a query at p iff j <= p // slc_block < NB).
    Returns:
        int32 [Tq, HKV, topk]: ascending block ids, -1 padded (as ``reference.select_blocks``).
    """
    T, HKV, nb = scores.shape
    out = new_empty(T, HKV, topk, dtype=torch.int32, device=scores.device)
    if T:
        _top_launch(scores.contiguous(), out, q_pos.to(torch.int32).contiguous(), T, 0, nb,
                    slc_block=slc_block, topk=topk, init_blocks=init_blocks,
                    local_blocks=local_blocks)
    return out


def _score_config(g_pad: int, rpb: int, cspan: int, dqk_p: int, mma: bool):
    """Score kernel launch: BLOCK_T tokens x G_PAD heads per tile; exact path: BJ blocks
    (BJ x RPB_P compressed tokens) per step; tensor-core path (``mma``): NC compressed tokens
    per step complete BJE blocks (BJ_P columns), P split into bf16 hi + lo (SPLIT) or not.
    ``TILE_OVERRIDE`` keys ROWS, BJ, NC, num_warps, num_stages, maxnreg, mma, split replace
    them."""
    o = TILE_OVERRIDE
    # GPU: 128 rows on 8 warps measured 8.1 ms at 64k vs 9.0 for 64 rows on 4 (H100, round 4)
    rows = max(o.get("ROWS", 128), g_pad)
    rpb_p = next_pow2(rpb)
    bj = max(1, (128 if interpreting() else 64) // rpb_p)
    bj = max(o.get("BJ", bj), next_pow2(-(-16 // rpb_p)))
    # a window must hold one whole block (rpb + cspan - 1 tokens)
    nc = max(o.get("NC", 128 if interpreting() else 64), 16, next_pow2(rpb + cspan - 1))
    bje = (nc - cspan + 1) // rpb
    mma = bool(o.get("mma", mma))
    # tensor-core path, Dqk <= 128: 80 registers and 2 stages (67 KB of shared memory) fit 3
    # programs of 8 warps per SM; H100, 64k: 6.51 ms vs 6.66-6.81 with 3 stages (round 9)
    three = mma and dqk_p <= 128 and not interpreting()
    cap = o.get("maxnreg", 80 if three else None)
    return dict(BLOCK_T=max(1, rows // g_pad), BJ=bj, MMA=mma, NC=nc, BJE=bje,
                BJ_P=max(16, next_pow2(bje)), SPLIT=bool(o.get("split", SCORE_SPLIT)),
                num_warps=o.get("num_warps", 4 if interpreting() else (8 if rows >= 128 else 4)),
                num_stages=o.get("num_stages", 2 if three else 3),
                **({"maxnreg": cap} if cap and not interpreting() else {}))


def _chunks(layout: Varlen, block_t: int, max_rows: int):
    """Split the layout's tiles of ``block_t`` rows into runs by first row // ``max_rows``
    (a run spans < max_rows + block_t rows), planned on the host.

    Returns a list of (first_tile, end_tile, row_begin, row_end) in global query rows."""
    tiles = layout.tiles_host(block_t).long()
    if tiles.shape[0] == 0:
        return []
    lens = torch.tensor(layout.lens, dtype=torch.int64)
    q_beg = torch.cumsum(lens, 0) - lens
    seq, t0 = tiles[:, 0], tiles[:, 1]
    row_a = q_beg[seq] + t0
    row_b = q_beg[seq] + torch.minimum(t0 + block_t, lens[seq])
    _, counts = torch.unique_consecutive(row_a // max_rows, return_counts=True)
    ends = torch.cumsum(counts, 0)
    firsts = ends - counts
    return [(f, e, int(row_a[f]), int(row_b[e - 1])) for f, e in zip(firsts.tolist(), ends.tolist())]


def _scores_chunks(q, k_cmp, lse_cmp, layout: Varlen, kc_cu, *, cmp_block, cmp_stride,
                   slc_block, scale, budget_bytes):
    """Run the score kernel chunk by chunk; yields (row_a, row_b, scores, nb_stride)."""
    T, HQ, DQK = q.shape
    HKV = k_cmp.shape[1]
    G = HQ // HKV
    g_pad, dqk_p = next_pow2(G), max(16, next_pow2(DQK))
    rpb = slc_block // cmp_stride
    rpb_p = next_pow2(rpb)
    cfg = _score_config(g_pad, rpb, cmp_block // cmp_stride, dqk_p,
                        q.dtype in (torch.bfloat16, torch.float16))
    nb_stride = max(1, -(-layout.max_end // slc_block))
    max_rows = max(cfg["BLOCK_T"], budget_bytes // (4 * HKV * nb_stride))
    tiles_t = layout.tiles(cfg["BLOCK_T"])
    chunks = layout.cached(("score_chunks", cfg["BLOCK_T"], max_rows),
                           lambda: _chunks(layout, cfg["BLOCK_T"], max_rows))
    for first, end, row_a, row_b in chunks:
        scores = new_empty(row_b - row_a, HKV, nb_stride, dtype=torch.float32, device=q.device)
        _block_scores[(end - first, HKV)](
            q, k_cmp, lse_cmp, scores, tiles_t[first:end], layout.q_cu, layout.q_pos0, kc_cu,
            scale * LOG2E, HQ, HKV, row_a, nb_stride, G=G, G_PAD=g_pad, DQK=DQK, DQK_P=dqk_p,
            CSTRIDE=cmp_stride, CBLOCK=cmp_block, SBLOCK=slc_block, RPB=rpb, RPB_P=rpb_p,
            CSPAN=cmp_block // cmp_stride, **cfg)
        yield row_a, row_b, scores, nb_stride


def select_blocks_triton(q, k_cmp, lse_cmp, layout: Varlen, kc_cu, *, cmp_block: int,
                         cmp_stride: int, slc_block: int, topk: int, init_blocks: int,
                         local_blocks: int, scale: float, budget_bytes: int = 256 << 20):
    """Selected blocks per (query, KV head).

    Args:
        q: [Tq, HQ, Dqk]; k_cmp: [Tc, HKV, Dqk] (split by ``kc_cu`` int32 [N+1]);
        lse_cmp: [Tq, HQ] fp32 from the compressed branch; layout: query layout.
    Returns:
        int32 [Tq, HKV, topk]: ascending block indices (within the sequence), -1 padded.
    """
    T, HKV = q.shape[0], k_cmp.shape[1]
    out = new_empty(T, HKV, topk, dtype=torch.int32, device=q.device)
    if T == 0:
        return out
    _, row_pos = layout.row_info()
    for row_a, row_b, scores, nb_stride in _scores_chunks(
            q, k_cmp, lse_cmp, layout, kc_cu, cmp_block=cmp_block, cmp_stride=cmp_stride,
            slc_block=slc_block, scale=scale, budget_bytes=budget_bytes):
        _top_launch(scores, out, row_pos, row_b - row_a, row_a, nb_stride, slc_block=slc_block,
                    topk=topk, init_blocks=init_blocks, local_blocks=local_blocks,
                    nb_vis=_visible_blocks(layout, row_a, row_b, slc_block))
    return out


def _visible_blocks(layout: Varlen, row_a: int, row_b: int, slc_block: int) -> int:
    """Most selection blocks a query row in [row_a, row_b) sees (from the host lists)."""
    top, beg = 0, 0
    for n, p0 in zip(layout.lens, layout.pos0):
        a, b = max(row_a, beg), min(row_b, beg + n)
        if a < b:
            top = max(top, (p0 + b - 1 - beg) // slc_block + 1)
        beg += n
        if beg >= row_b:
            break
    return max(top, 1)


def block_scores_triton(q, k_cmp, lse_cmp, layout: Varlen, kc_cu, *, cmp_block: int,
                        cmp_stride: int, slc_block: int, scale: float):
    """Block scores [Tq, HKV, NB] fp32 (NB = ceil(max query end / l')), 0 for blocks after
    the query's own block. For tests and inspection; selection never materialises this."""
    T, HKV = q.shape[0], k_cmp.shape[1]
    _, row_pos = layout.row_info()
    nb = max(1, -(-layout.max_end // slc_block))
    out = torch.zeros(T, HKV, nb, dtype=torch.float32, device=q.device)
    j = torch.arange(nb, device=q.device)
    for row_a, row_b, scores, _ in _scores_chunks(
            q, k_cmp, lse_cmp, layout, kc_cu, cmp_block=cmp_block, cmp_stride=cmp_stride,
            slc_block=slc_block, scale=scale, budget_bytes=256 << 20):
        vis = (j[None, :] <= (row_pos[row_a:row_b, None].long() // slc_block))[:, None, :]
        out[row_a:row_b] = torch.where(vis, scores, 0.0)
    return out
