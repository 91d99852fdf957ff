"""Selection: block scores from the compressed branch's probabilities, then top-n blocks.

Scores (spec "Selection" 1-3): s[t,g,j] = sum_{h in g} sum_i p[t,h,i] * overlap(i,j) / d.
Compressed token i starts in block jA = floor(i*d / l') and, since l <= l', reaches at
most block jA + 1. The score kernel therefore walks selection blocks in chunks of BJ and
gathers for each block its own R = l'/d compressed tokens; per block j it sums their own
weights a[j] and their spill b[j] into block j + 1, and writes s[j] = a[j] + b[j - 1] once
(b shifted by one block in registers, the last one carried to the next step; b[-1] = 0), so
no atomics and no read-after-write inside a kernel. The top-n kernel forces the initial and
local blocks and picks the rest by repeated arg-max (ties to the lower j).
Queries are processed in chunks so the fp32 scores stay under ``budget_bytes``. Steps whose
compressed tokens every row of the tile sees (all but the last one or two of a long tile)
skip the visibility masks; the per-slot overlap weights are loop constants.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dense import LOG2E, interpreting
from .varlen import new_empty, Varlen, next_pow2

# score kernel launch overrides (ROWS, BJ, num_warps), for tests of the step loops
TILE_OVERRIDE: dict = {}


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
def _block_scores(Q, KC, LSE, S, TILES, Q_CU, Q_POS0, KC_CU, qk_scale, HQ, HKV, row_base,
                  NB_STRIDE, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
                  DQK: tl.constexpr, DQK_P: tl.constexpr, CSTRIDE: tl.constexpr,
                  CBLOCK: tl.constexpr, SBLOCK: tl.constexpr, RPB: tl.constexpr,
                  RPB_P: tl.constexpr, BJ: tl.constexpr):
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
    # blocks whose RPB = l'/d compressed tokens all lie within every row's view
    lo_c = tl.where(pos_min >= CBLOCK - 1, (pos_min - CBLOCK + 1) // CSTRIDE + 1, 0)
    j_full = tl.minimum(lo_c, kc_len) // RPB // BJ * BJ

    # block j holds compressed tokens i = j RPB + rr, starting rr d past the block start: a
    # weight of min(l, l' - rr d) / d stays in block j and the rest spills into block j + 1
    rr = tl.arange(0, BJ * RPB_P) % RPB_P
    w_lo = tl.minimum(CBLOCK, SBLOCK - rr * CSTRIDE).to(tl.float32) / CSTRIDE
    w_hi = tl.maximum(CBLOCK - SBLOCK + rr * CSTRIDE, 0).to(tl.float32) / CSTRIDE
    tk = t0 + tl.arange(0, BLOCK_T)
    out_row = (q_beg + tk - row_base).to(tl.int64) * HKV + g
    tk_ok = tk < q_len
    krow0 = kc_beg.to(tl.int64) * HKV + g
    carry = tl.zeros([BLOCK_T], tl.float32)
    carry = _score_steps(carry, q, lse2, KC, S, krow0, pos, out_row, tk_ok, w_lo, w_hi, 0,
                         j_full, nblk, hi_c, qk_scale, HKV, NB_STRIDE, BLOCK_T, G_PAD, DQK, DQK_P,
                         CSTRIDE, CBLOCK, RPB, RPB_P, BJ, False)
    _score_steps(carry, q, lse2, KC, S, krow0, pos, out_row, tk_ok, w_lo, w_hi, j_full, nblk,
                 nblk, hi_c, qk_scale, HKV, NB_STRIDE, BLOCK_T, G_PAD, DQK, DQK_P, CSTRIDE, CBLOCK,
                 RPB, RPB_P, BJ, True)


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
    top_warps."""
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


def _score_config(g_pad: int, rpb_p: int):
    """Score kernel launch: BLOCK_T tokens x G_PAD heads per tile, BJ blocks (BJ x RPB_P
    compressed tokens) per step; ``TILE_OVERRIDE`` keys ROWS, BJ, num_warps replace them."""
    o = TILE_OVERRIDE
    # GPU: 128 rows on 8 warps measured 8.1 ms at 64k vs 9.0 for 64 rows on 4 (H100, round 4)
    rows = max(o.get("ROWS", 128), g_pad)
    bj = max(1, (128 if interpreting() else 64) // rpb_p)
    bj = max(o.get("BJ", bj), next_pow2(-(-16 // rpb_p)))
    return dict(BLOCK_T=max(1, rows // g_pad), BJ=bj,
                num_warps=o.get("num_warps", 4 if interpreting() else (8 if rows >= 128 else 4)))


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
    cfg = _score_config(g_pad, rpb_p)
    nb_stride = max(1, -(-layout.max_end // slc_block))
    max_rows = max(cfg["BLOCK_T"], budget_bytes // (4 * HKV * nb_stride))
    tiles_t = layout.tiles(cfg["BLOCK_T"])
    for first, end, row_a, row_b in _chunks(layout, cfg["BLOCK_T"], max_rows):
        scores = new_empty(row_b - row_a, HKV, nb_stride, dtype=torch.float32, device=q.device)
        _block_scores[(end - first, HKV)](
            q, k_cmp, lse_cmp, scores, tiles_t[first:end], layout.q_cu, layout.q_pos0, kc_cu,
            scale * LOG2E, HQ, HKV, row_a, nb_stride, G=G, G_PAD=g_pad, DQK=DQK, DQK_P=dqk_p,
            CSTRIDE=cmp_stride, CBLOCK=cmp_block, SBLOCK=slc_block, RPB=rpb, RPB_P=rpb_p, **cfg)
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
