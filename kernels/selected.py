"""Selected-block attention (NSA branch 2), forward and backward.

Group-centric: one program serves one query token and all G heads of a KV group, so
each selected 64-token K/V block (contiguous rows) is fetched once for the whole group.
Backward dQ uses the same walk. dK/dV inverts the selection: a CSR list of the tokens that
chose each (KV head, block) is built by one stable sort, and each program owns one block
and a segment of that list, so it loads its K/V block once and gathers the queries
(tokens x G heads) that read it. Segments of one block add into fp32 buffers atomically.
Shapes: q [Tq, HQ, Dqk], k [Tk, HKV, Dqk], v [Tk, HKV, Dv], block_indices [Tq, HKV, n].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dense import LOG2E, _load_bwd_rows, dkdv_step, interpreting
from .varlen import new_empty, Varlen, next_pow2

# launch overrides {"fwd"|"dq": {num_warps, num_stages}, "dkdv": {ROWS, SEGMENT, num_warps,
# num_stages}} for the benchmark's sweep; see _launch
TILE_OVERRIDE: dict = {}


def _launch(kernel: str, g_pad: int, wide: bool) -> dict:
    """Launch shape of one selected-branch kernel (``wide``: fwd/dq GR x max(Dqk, Dv) > 4096,
    dK/dV max(Dqk, Dv) > 128). dK/dV: ROWS = tokens x G_PAD rows per step, SEGMENT = most
    tokens per program; 4 warps own the l' = 64 key rows (8 would split them, measured
    1.6x slower on an H100), 32 rows keep that spill-free at head dim 128."""
    if kernel == "dkdv":
        cfg = dict(ROWS=128, SEGMENT=1 << 30, num_warps=4, num_stages=1) if interpreting() else \
            dict(ROWS=64 if wide else 32, SEGMENT=512, num_warps=8 if wide else 4, num_stages=2)
        cfg["ROWS"] = max(cfg["ROWS"], g_pad)
    else:
        cfg = dict(num_warps=8 if wide else 4, num_stages=2)
    cfg.update(TILE_OVERRIDE.get(kernel, {}))
    return cfg


@triton.jit
def _slc_fwd(Q, K, V, O, LSE, BI, ROWSEQ, ROWPOS, K_CU, qk_scale, HQ, HKV,
             G: tl.constexpr, GR: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
             DQK_P: tl.constexpr, DV_P: tl.constexpr, BS: tl.constexpr, BS_P: tl.constexpr,
             NSEL: tl.constexpr):
    t = tl.program_id(0)
    g = tl.program_id(1)
    seq = tl.load(ROWSEQ + t)
    pos = tl.load(ROWPOS + t)
    k_beg = tl.load(K_CU + seq)
    hh = tl.arange(0, GR)
    row_ok = hh < G
    qrow = t.to(tl.int64) * HQ + g * G + hh
    dq = tl.arange(0, DQK_P)
    dv = tl.arange(0, DV_P)
    q = tl.load(Q + qrow[:, None] * DQK + dq[None, :],
                mask=row_ok[:, None] & (dq[None, :] < DQK), other=0.0)
    m_i = tl.full([GR], float("-inf"), tl.float32)
    l_i = tl.zeros([GR], tl.float32)
    acc = tl.zeros([GR, DV_P], tl.float32)
    bi = BI + (t.to(tl.int64) * HKV + g) * NSEL
    for n in range(NSEL):
        j = tl.load(bi + n)
        s = j * BS + tl.arange(0, BS_P)
        s_ok = (j >= 0) & (s <= pos) & (tl.arange(0, BS_P) < BS)
        krow = (k_beg + s).to(tl.int64) * HKV + g
        k = tl.load(K + krow[:, None] * DQK + dq[None, :],
                    mask=s_ok[:, None] & (dq[None, :] < DQK), other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        qk = tl.where(s_ok[None, :], qk, float("-inf"))
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
def _slc_bwd_dq(Q, K, V, DO, LSE, DELTA, GATE, DQ, BI, ROWSEQ, ROWPOS, K_CU, qk_scale, scale,
                HQ, HKV, gate_stride, G: tl.constexpr, GR: tl.constexpr, DQK: tl.constexpr,
                DV: tl.constexpr, DQK_P: tl.constexpr, DV_P: tl.constexpr, BS: tl.constexpr,
                BS_P: tl.constexpr, NSEL: tl.constexpr, HAS_GATE: tl.constexpr):
    t = tl.program_id(0)
    g = tl.program_id(1)
    seq = tl.load(ROWSEQ + t)
    pos = tl.load(ROWPOS + t)
    k_beg = tl.load(K_CU + seq)
    hh = tl.arange(0, GR)
    row_ok = hh < G
    qrow = t.to(tl.int64) * HQ + g * G + hh
    q, do, lse2, delta = _load_bwd_rows(Q, DO, LSE, DELTA, GATE, qrow, row_ok, gate_stride,
                                        DQK, DV, DQK_P, DV_P, HAS_GATE)
    dq = tl.arange(0, DQK_P)
    dv = tl.arange(0, DV_P)
    acc = tl.zeros([GR, DQK_P], tl.float32)
    bi = BI + (t.to(tl.int64) * HKV + g) * NSEL
    for n in range(NSEL):
        j = tl.load(bi + n)
        s = j * BS + tl.arange(0, BS_P)
        s_ok = (j >= 0) & (s <= pos) & (tl.arange(0, BS_P) < BS)
        krow = (k_beg + s).to(tl.int64) * HKV + g
        k = tl.load(K + krow[:, None] * DQK + dq[None, :],
                    mask=s_ok[:, None] & (dq[None, :] < DQK), other=0.0)
        v = tl.load(V + krow[:, None] * DV + dv[None, :],
                    mask=s_ok[:, None] & (dv[None, :] < DV), other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(s_ok[None, :], tl.exp2(qk - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        acc += tl.dot(ds.to(k.dtype), k)
    ptrs = DQ + qrow[:, None] * DQK + dq[None, :]
    msk = row_ok[:, None] & (dq[None, :] < DQK)
    tl.store(ptrs, tl.load(ptrs, mask=msk, other=0.0) + acc * scale, mask=msk)


@triton.jit
def _slc_bwd_dkdv(Q, K, V, DO, LSE, DELTA, GATE, DK, DV_, WORK, TOKENS, ROWPOS, K_CU,
                  qk_scale, scale, HQ, HKV, gate_stride, G: tl.constexpr, G_PAD: tl.constexpr,
                  BLOCK_T: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
                  DQK_P: tl.constexpr, DV_P: tl.constexpr, BS: tl.constexpr, BS_P: tl.constexpr,
                  HAS_GATE: tl.constexpr):
    w = tl.program_id(0).to(tl.int64) * 5
    g = tl.load(WORK + w)
    seq = tl.load(WORK + w + 1)
    j = tl.load(WORK + w + 2)
    lo = tl.load(WORK + w + 3)
    hi = tl.load(WORK + w + 4)
    k_beg = tl.load(K_CU + seq)
    k_len = tl.load(K_CU + seq + 1) - k_beg
    dq = tl.arange(0, DQK_P)
    dv = tl.arange(0, DV_P)
    s = j * BS + tl.arange(0, BS_P)
    s_ok = (s < k_len) & (tl.arange(0, BS_P) < BS)
    krow = (k_beg + s).to(tl.int64) * HKV + g
    k = tl.load(K + krow[:, None] * DQK + dq[None, :],
                mask=s_ok[:, None] & (dq[None, :] < DQK), other=0.0)
    v = tl.load(V + krow[:, None] * DV + dv[None, :],
                mask=s_ok[:, None] & (dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BS_P, DQK_P], tl.float32)
    dvacc = tl.zeros([BS_P, DV_P], tl.float32)
    r = tl.arange(0, BLOCK_T * G_PAD)
    for c0 in range(lo, hi, BLOCK_T):
        ti = c0 + r // G_PAD
        hh = r % G_PAD
        t_ok = ti < hi
        row_ok = t_ok & (hh < G)
        t = tl.load(TOKENS + ti, mask=t_ok, other=0)
        pos = tl.load(ROWPOS + t, mask=t_ok, other=-1)
        qrow = t.to(tl.int64) * HQ + g * G + hh
        vis = s_ok[:, None] & (s[:, None] <= pos[None, :])
        dk, dvacc = dkdv_step(k, v, dk, dvacc, Q, DO, LSE, DELTA, GATE, qrow, row_ok, vis,
                              gate_stride, qk_scale, DQK, DV, DQK_P, DV_P, HAS_GATE, True)
    tl.atomic_add(DK + krow[:, None] * DQK + dq[None, :], dk * scale,
                  mask=s_ok[:, None] & (dq[None, :] < DQK))
    tl.atomic_add(DV_ + krow[:, None] * DV + dv[None, :], dvacc,
                  mask=s_ok[:, None] & (dv[None, :] < DV))


def _dims(q, k, v):
    T, HQ, DQK = q.shape
    HKV, DV = k.shape[1], v.shape[2]
    G = HQ // HKV
    return T, HQ, HKV, DQK, DV, G, max(16, next_pow2(G)), max(16, next_pow2(DQK)), max(16, next_pow2(DV))


def selected_attention_fwd(q, k, v, block_indices, layout: Varlen, k_cu, *, slc_block: int,
                           scale: float):
    """Forward of branch 2.

    Args:
        q: [Tq, HQ, Dqk]; k, v: [Tk, HKV, Dqk], [Tk, HKV, Dv] per-sequence prefixes split by
            ``k_cu``; block_indices: int32 [Tq, HKV, n] (within-sequence block ids, -1 empty).
    Returns:
        (o [Tq, HQ, Dv] in q's dtype, lse [Tq, HQ] fp32, -inf where nothing is selected).
    """
    T, HQ, HKV, DQK, DV, G, GR, dqk_p, dv_p = _dims(q, k, v)
    o = new_empty(T, HQ, DV, dtype=q.dtype, device=q.device)
    lse = new_empty(T, HQ, dtype=torch.float32, device=q.device)
    if T == 0:
        return o, lse
    row_seq, row_pos = layout.row_info()
    cfg = _launch("fwd", GR, GR * max(dqk_p, dv_p) > 4096)
    _slc_fwd[(T, HKV)](q, k, v, o, lse, block_indices, row_seq, row_pos, k_cu, scale * LOG2E,
                       HQ, HKV, G=G, GR=GR, DQK=DQK, DV=DV, DQK_P=dqk_p, DV_P=dv_p, BS=slc_block,
                       BS_P=max(16, next_pow2(slc_block)), NSEL=block_indices.shape[-1], **cfg)
    return o, lse


def block_work_list(block_indices, layout: Varlen, k_cu, slc_block: int, segment: int):
    """CSR inversion of the selection for the dK/dV kernel.

    Returns (work int32 [W, 5] rows (kv head, sequence, block, lo, hi) with hi - lo <= segment,
    tokens int32 [E]: query rows sorted by (kv head, block), ascending within each block).
    """
    T, HKV, n = block_indices.shape
    dev = block_indices.device
    row_seq, _ = layout.row_info()
    k_lens = (k_cu[1:] - k_cu[:-1]).long()
    nb_seq = (k_lens + slc_block - 1) // slc_block
    blk_off = torch.cumsum(nb_seq, 0) - nb_seq
    nb_tot = int(nb_seq.sum())
    bi = block_indices.long()
    valid = bi >= 0
    gid = (torch.arange(HKV, device=dev)[None, :, None] * nb_tot + blk_off[row_seq.long()][:, None, None] + bi)
    keys = gid[valid]
    toks = torch.arange(T, device=dev)[:, None, None].expand_as(bi)[valid]
    keys, order = torch.sort(keys, stable=True)
    tokens = toks[order].to(torch.int32)
    counts = torch.bincount(keys, minlength=HKV * nb_tot)
    starts = torch.cumsum(counts, 0) - counts
    segs = (counts + segment - 1) // segment
    item_gid = torch.repeat_interleave(torch.arange(HKV * nb_tot, device=dev), segs)
    first_item = torch.cumsum(segs, 0) - segs
    item_k = torch.arange(item_gid.numel(), device=dev) - first_item[item_gid]
    lo = starts[item_gid] + item_k * segment
    hi = torch.minimum(lo + segment, starts[item_gid] + counts[item_gid])
    blk = item_gid % max(nb_tot, 1)
    blk_seq = torch.repeat_interleave(torch.arange(nb_seq.numel(), device=dev), nb_seq)
    seq = blk_seq[blk]
    work = torch.stack([item_gid // max(nb_tot, 1), seq, blk - blk_off[seq], lo, hi], 1)
    return work.to(torch.int32).contiguous(), tokens.contiguous()


def selected_attention_bwd(q, k, v, do, lse, delta, block_indices, layout: Varlen, k_cu, *,
                           slc_block: int, scale: float, gate=None, dq_acc=None, dk_acc=None,
                           dv_acc=None, kernels=("dq", "dkdv")):
    """Backward of :func:`selected_attention_fwd`; conventions as ``dense_attention_bwd``
    (branch output gradient ``gate * do``, ``delta`` = rowsum(d o_branch * o_branch), grads
    added into fp32 accumulators; ``kernels`` the subset to run). Returns (dq_acc, dk_acc, dv_acc)."""
    T, HQ, HKV, DQK, DV, G, GR, dqk_p, dv_p = _dims(q, k, v)
    f32 = dict(dtype=torch.float32, device=q.device)
    dq_acc = torch.zeros(T, HQ, DQK, **f32) if dq_acc is None else dq_acc
    dk_acc = torch.zeros(k.shape[0], HKV, DQK, **f32) if dk_acc is None else dk_acc
    dv_acc = torch.zeros(v.shape[0], HKV, DV, **f32) if dv_acc is None else dv_acc
    if T == 0 or k.shape[0] == 0:
        return dq_acc, dk_acc, dv_acc
    has_gate = gate is not None
    gate_arg, gate_stride = (gate, gate.stride(1)) if has_gate else (delta, 1)
    if has_gate and gate.stride(0) != HQ * gate.stride(1):
        raise ValueError("gate must be a [Tq, HQ] view with row stride HQ * head stride")
    row_seq, row_pos = layout.row_info()
    nsel = block_indices.shape[-1]
    bs_p = max(16, next_pow2(slc_block))
    cfg = _launch("dq", GR, GR * max(dqk_p, dv_p) > 4096)
    if "dq" in kernels:
        _slc_bwd_dq[(T, HKV)](q, k, v, do, lse, delta, gate_arg, dq_acc, block_indices, row_seq,
                              row_pos, k_cu, scale * LOG2E, scale, HQ, HKV, gate_stride, G=G,
                              GR=GR, DQK=DQK, DV=DV, DQK_P=dqk_p, DV_P=dv_p, BS=slc_block,
                              BS_P=bs_p, NSEL=nsel, HAS_GATE=has_gate, **cfg)
    if "dkdv" not in kernels:
        return dq_acc, dk_acc, dv_acc
    g_pad = next_pow2(G)
    cfg = _launch("dkdv", g_pad, max(dqk_p, dv_p) > 128)
    block_t = max(1, cfg.pop("ROWS") // g_pad)
    work, tokens = block_work_list(block_indices, layout, k_cu, slc_block, cfg.pop("SEGMENT"))
    if work.shape[0]:
        _slc_bwd_dkdv[(work.shape[0],)](
            q, k, v, do, lse, delta, gate_arg, dk_acc, dv_acc, work, tokens, row_pos, k_cu,
            scale * LOG2E, scale, HQ, HKV, gate_stride, G=G, G_PAD=g_pad, BLOCK_T=block_t,
            DQK=DQK, DV=DV, DQK_P=dqk_p, DV_P=dv_p, BS=slc_block, BS_P=bs_p, HAS_GATE=has_gate,
            **cfg)
    return dq_acc, dk_acc, dv_acc
