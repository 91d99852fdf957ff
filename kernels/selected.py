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

from .dense import (LOG2E, GradTarget, _load_dq_rows, dkdv_step, fuse_setup, interpreting,
                    store_grad)
from .host_cache import host_list
from .varlen import new_empty, Varlen, next_pow2, to_device

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
             NSEL: tl.constexpr, LOCAL: tl.constexpr):
    """One token x G heads over its selected blocks; LOCAL > 0: over the non-local ones only
    (j <= pos // BS - LOCAL: the selection lists them, ascending, in its first NSEL - LOCAL
    entries), the local blocks being left to the window kernel (dense ``LocalBlocks``)."""
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
    for n in range(NSEL - LOCAL):
        j = tl.load(bi + n)
        j_ok = j >= 0
        if LOCAL > 0:
            j_ok = j_ok & (j <= pos // BS - LOCAL)
        s = j * BS + tl.arange(0, BS_P)
        s_ok = j_ok & (s <= pos) & (tl.arange(0, BS_P) < BS)
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
def _slc_bwd_dq(Q, K, V, DO, LSE, DELTA, GATE, OB, DGATE, DOG, DQ_IN, DQ, BI, ROWSEQ, ROWPOS, K_CU,
                qk_scale, scale, HQ, HKV, gate_stride, dgate_stride, G: tl.constexpr,
                GR: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr, DQK_P: tl.constexpr,
                DV_P: tl.constexpr, BS: tl.constexpr, BS_P: tl.constexpr, NSEL: tl.constexpr,
                HAS_GATE: tl.constexpr, ACCUM: tl.constexpr, FUSE: tl.constexpr,
                STORE_DOG: tl.constexpr):
    t = tl.program_id(0)
    g = tl.program_id(1)
    seq = tl.load(ROWSEQ + t)
    pos = tl.load(ROWPOS + t)
    k_beg = tl.load(K_CU + seq)
    hh = tl.arange(0, GR)
    row_ok = hh < G
    qrow = t.to(tl.int64) * HQ + g * G + hh
    q, do, lse2, delta = _load_dq_rows(Q, DO, LSE, DELTA, GATE, OB, DGATE, DOG, qrow, row_ok,
                                       gate_stride, dgate_stride, DQK, DV, DQK_P, DV_P, HAS_GATE,
                                       FUSE, STORE_DOG)
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
    store_grad(DQ, DQ_IN, qrow[:, None] * DQK + dq[None, :], row_ok[:, None] & (dq[None, :] < DQK),
               acc * scale, ACCUM, False)


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
    store_grad(DK, DK, krow[:, None] * DQK + dq[None, :], s_ok[:, None] & (dq[None, :] < DQK),
               dk * scale, False, True)
    store_grad(DV_, DV_, krow[:, None] * DV + dv[None, :], s_ok[:, None] & (dv[None, :] < DV),
               dvacc, False, True)


def _dims(q, k, v):
    T, HQ, DQK = q.shape
    HKV, DV = k.shape[1], v.shape[2]
    G = HQ // HKV
    return T, HQ, HKV, DQK, DV, G, max(16, next_pow2(G)), max(16, next_pow2(DQK)), max(16, next_pow2(DV))


def selected_attention_fwd(q, k, v, block_indices, layout: Varlen, k_cu, *, slc_block: int,
                           scale: float, skip_local: int = 0):
    """Forward of branch 2.

    Args:
        q: [Tq, HQ, Dqk]; k, v: [Tk, HKV, Dqk], [Tk, HKV, Dv] per-sequence prefixes split by
            ``k_cu``; block_indices: int32 [Tq, HKV, n] (within-sequence block ids, -1 empty).
        skip_local: L > 0 leaves out the local blocks j > t // l' - L (for the window kernel,
            ``dense.LocalBlocks``); the selection must force them (``local_blocks`` = L and
            n >= init_blocks + L), so the other blocks are its first n - L entries.
    Returns:
        (o [Tq, HQ, Dv] in q's dtype, lse [Tq, HQ] fp32, -inf where nothing is selected).
    """
    T, HQ, HKV, DQK, DV, G, GR, dqk_p, dv_p = _dims(q, k, v)
    if not 0 <= skip_local <= block_indices.shape[-1]:
        raise ValueError(f"skip_local ({skip_local}) must lie in [0, n]")
    o = new_empty(T, HQ, DV, dtype=q.dtype, device=q.device)
    lse = new_empty(T, HQ, dtype=torch.float32, device=q.device)
    if T == 0:
        return o, lse
    row_seq, row_pos = layout.row_info()
    cfg = _launch("fwd", GR, GR * max(dqk_p, dv_p) > 4096)
    _slc_fwd[(T, HKV)](q, k, v, o, lse, block_indices, row_seq, row_pos, k_cu, scale * LOG2E,
                       HQ, HKV, G=G, GR=GR, DQK=DQK, DV=DV, DQK_P=dqk_p, DV_P=dv_p, BS=slc_block,
                       BS_P=max(16, next_pow2(slc_block)), NSEL=block_indices.shape[-1],
                       LOCAL=skip_local, **cfg)
    return o, lse


@triton.jit
def _sel_keys(BI, ROWSEQ, BLK_OFF, KEYS, HIST, E, CT, K, NBT, HKV: tl.constexpr,
              NSEL: tl.constexpr, BLOCK: tl.constexpr):
    """Key of every selection entry e (flat index into block_indices [T, HKV, n]):
    kv head * NBT + the block's index among all sequences' blocks, -1 if empty; and
    HIST[c, key] += 1 for the chunk c = token // CT holding the entry."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = e < E
    j = tl.load(BI + e, mask=ok, other=-1)
    t = e // (HKV * NSEL)
    seq = tl.load(ROWSEQ + t, mask=ok, other=0)
    key = ((e // NSEL) % HKV * NBT + tl.load(BLK_OFF + seq, mask=ok, other=0) + j).to(tl.int32)
    key = tl.where(j >= 0, key, -1)
    tl.store(KEYS + e, key, mask=ok)
    tl.atomic_add(HIST + (t // CT) * K + key, 1, mask=ok & (j >= 0), sem="relaxed")


@triton.jit
def _sel_scatter(KEYS, CURSOR, TOKENS, T, CT, K, HKVN: tl.constexpr, HKVN_P: tl.constexpr):
    """Stable counting-sort scatter of chunk c's tokens, one token per step (its keys are
    distinct): slot = CURSOR[c, key]++ (CURSOR[c] starts at the chunk's first free slot of
    each key), TOKENS[slot] = token. Every increment has returned before its thread reaches
    the barrier (the store needs it), so the steps' increments stay ordered and tokens stay
    ascending within each key; relaxed atomics suffice."""
    c = tl.program_id(0)
    row = CURSOR + c.to(tl.int64) * K
    i = tl.arange(0, HKVN_P)
    for t in range(c * CT, tl.minimum(c * CT + CT, T)):
        key = tl.load(KEYS + t * HKVN + i, mask=i < HKVN, other=-1)
        ok = key >= 0
        slot = tl.atomic_add(row + key, 1, mask=ok, sem="relaxed")
        tl.store(TOKENS + slot, t + i * 0, mask=ok)
        tl.debug_barrier()


@triton.jit
def _sel_work(CUM, COUNTS, STARTS, BLK_SEQ, BLK_OFF, WORK, W_MAX, K, NBT, SEGMENT, NO_BLOCK,
              STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """Work item w -> row (kv head, sequence, block, lo, hi): the key is the first with
    CUM[key] > w (CUM = inclusive cumsum of pieces per key, binary search in STEPS steps);
    items past the last piece get lo = hi = 0 and block NO_BLOCK, whose keys lie past every
    sequence, so the dK/dV kernel loads and adds nothing for them."""
    w = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lo = tl.zeros([BLOCK], tl.int32)
    hi = tl.zeros([BLOCK], tl.int32) + K
    for _ in range(STEPS):
        mid = (lo + hi) // 2
        right = tl.load(CUM + mid, mask=mid < K, other=0) <= w
        lo = tl.where((lo < hi) & right, mid + 1, lo)
        hi = tl.where((lo < hi) & ~right, mid, hi)
    valid = lo < K
    key = tl.minimum(lo, K - 1)
    count = tl.load(COUNTS + key)
    start = tl.load(STARTS + key)
    piece = w - (tl.load(CUM + key) - (count + SEGMENT - 1) // SEGMENT)
    a = tl.where(valid, start + piece * SEGMENT, 0)
    b = tl.where(valid, tl.minimum(a + SEGMENT, start + count), 0)
    blk = key % NBT
    seq = tl.load(BLK_SEQ + blk)
    out = WORK + w.to(tl.int64) * 5
    ok = w < W_MAX
    tl.store(out, key // NBT, mask=ok)
    tl.store(out + 1, seq, mask=ok)
    tl.store(out + 2, tl.where(valid, blk - tl.load(BLK_OFF + seq), NO_BLOCK), mask=ok)
    tl.store(out + 3, a, mask=ok)
    tl.store(out + 4, b, mask=ok)


def block_work_list(block_indices, layout: Varlen, k_cu, slc_block: int, segment: int):
    """CSR inversion of the selection for the dK/dV kernel, by a stable counting sort on the
    device (key histograms per chunk of tokens, their prefix sums, then each chunk scatters
    its tokens in order); no host sync.

    Returns (work int32 [W, 5] rows (kv head, sequence, block, lo, hi) with hi - lo <= segment,
    W an upper bound whose surplus rows have lo = hi = 0 and a block past every sequence
    (sequences must stay under 2^30 keys); tokens int32 [T * HKV * n]: first the query rows
    of every selection entry sorted by (kv head, block), ascending within each block).
    """
    T, HKV, n = block_indices.shape
    dev = block_indices.device
    E = T * HKV * n
    if E >= 1 << 31:
        raise ValueError(f"{E} selection entries: the counting sort counts them in int32")
    row_seq, _ = layout.row_info()
    bounds = host_list(k_cu)
    nb_seq = torch.tensor([-(-(b - a) // slc_block) for a, b in zip(bounds[:-1], bounds[1:])],
                          dtype=torch.int64)
    nbt = int(nb_seq.sum())
    K = HKV * nbt
    blk_off = to_device((torch.cumsum(nb_seq, 0) - nb_seq).to(torch.int32), dev)
    blk_seq = to_device(torch.repeat_interleave(torch.arange(nb_seq.numel(), dtype=torch.int32),
                                                nb_seq), dev)
    ct = max(64, -(-T // max(1, (1 << 24) // max(K, 1))))
    nch = -(-T // ct)
    hist = torch.zeros(nch, K, dtype=torch.int32, device=dev)
    keys = new_empty(E, dtype=torch.int32, device=dev)
    _sel_keys[(triton.cdiv(E, 1024),)](block_indices, row_seq, blk_off, keys, hist, E, ct, K, nbt,
                                       HKV=HKV, NSEL=n, BLOCK=1024, num_warps=4)
    counts = hist.sum(0, dtype=torch.int32)
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    cursor = torch.cumsum(hist, 0, dtype=torch.int32).sub_(hist).add_(starts)
    tokens = new_empty(E, dtype=torch.int32, device=dev)
    hkvn_p = next_pow2(HKV * n)
    _sel_scatter[(nch,)](keys, cursor, tokens, T, ct, K, HKVN=HKV * n, HKVN_P=hkvn_p,
                         num_warps=max(1, min(4, hkvn_p // 32)))
    cum = torch.cumsum((counts + segment - 1) // segment, 0, dtype=torch.int32)
    w_max = K + E // segment + 1
    work = new_empty(w_max, 5, dtype=torch.int32, device=dev)
    _sel_work[(triton.cdiv(w_max, 1024),)](cum, counts, starts, blk_seq, blk_off, work, w_max, K,
                                           nbt, segment, (1 << 30) // slc_block,
                                           STEPS=max(1, K.bit_length()), BLOCK=1024, num_warps=4)
    return work, tokens


def selected_attention_bwd(q, k, v, do, lse, delta, block_indices, layout: Varlen, k_cu, *,
                           slc_block: int, scale: float, gate=None, dq_acc=None, dk_acc=None,
                           dv_acc=None, dq_out=None, dk_out=None, dv_out=None,
                           kernels=("dq", "dkdv"), fuse=None):
    """Backward of :func:`selected_attention_fwd`; conventions as ``dense_attention_bwd``
    (branch output gradient ``gate * do``, ``delta`` = rowsum(d o_branch * o_branch), each
    gradient = this branch's term + the optional fp32 accumulator, written to the optional
    ``*_out``; ``kernels`` the subset to run; ``fuse`` = (o_b, dgate): the dQ kernel writes
    dgate and ``delta`` itself). dK/dV add atomically into fp32 buffers.
    Returns (dq, dk, dv), the tensors holding the sums."""
    T, HQ, HKV, DQK, DV, G, GR, dqk_p, dv_p = _dims(q, k, v)
    dqt = GradTarget(dq_acc, dq_out, (T, HQ, DQK), q.device, direct=True)
    dkt = GradTarget(dk_acc, dk_out, (k.shape[0], HKV, DQK), q.device, direct=False)
    dvt = GradTarget(dv_acc, dv_out, (v.shape[0], HKV, DV), q.device, direct=False)
    has_gate = gate is not None
    if has_gate and gate.stride(0) != HQ * gate.stride(1):
        raise ValueError("gate must be a [Tq, HQ] view with row stride HQ * head stride")
    row_seq, row_pos = layout.row_info()
    nsel = block_indices.shape[-1]
    bs_p = max(16, next_pow2(slc_block))
    run = T > 0 and k.shape[0] > 0
    fargs, delta, dog = fuse_setup(fuse, q, do, gate, delta, HQ, run and "dq" in kernels,
                                   run and "dkdv" in kernels)
    gate_arg, gate_stride = (gate, gate.stride(1)) if has_gate else (delta, 1)
    if run and "dq" in kernels:
        cfg = _launch("dq", GR, GR * max(dqk_p, dv_p) > 4096)
        _slc_bwd_dq[(T, HKV)](q, k, v, do, lse, delta, gate_arg, fargs["OB"], fargs["DGATE"],
                              fargs["DOG"], dqt.src, dqt.dst, block_indices, row_seq, row_pos,
                              k_cu, scale * LOG2E, scale, HQ, HKV, gate_stride,
                              fargs["dgate_stride"], G=G, GR=GR, DQK=DQK, DV=DV, DQK_P=dqk_p,
                              DV_P=dv_p, BS=slc_block, BS_P=bs_p, NSEL=nsel, HAS_GATE=has_gate,
                              ACCUM=dqt.accum, FUSE=fargs["FUSE"], STORE_DOG=fargs["STORE_DOG"],
                              **cfg)
    if dog is not None:  # the dQ kernel stored the gated dO: dK/dV reads it ungated
        do, has_gate = dog, False
    if run and "dkdv" in kernels:
        g_pad = next_pow2(G)
        cfg = _launch("dkdv", g_pad, max(dqk_p, dv_p) > 128)
        block_t = max(1, cfg.pop("ROWS") // g_pad)
        work, tokens = block_work_list(block_indices, layout, k_cu, slc_block, cfg.pop("SEGMENT"))
        if work.shape[0]:
            _slc_bwd_dkdv[(work.shape[0],)](
                q, k, v, do, lse, delta, gate_arg, dkt.dst, dvt.dst, work, tokens, row_pos, k_cu,
                scale * LOG2E, scale, HQ, HKV, gate_stride, G=G, G_PAD=g_pad, BLOCK_T=block_t,
                DQK=DQK, DV=DV, DQK_P=dqk_p, DV_P=dv_p, BS=slc_block, BS_P=bs_p,
                HAS_GATE=has_gate, **cfg)
    dq = dqt.result(run) if "dq" in kernels else dqt.dst
    if "dkdv" not in kernels:
        return dq, dkt.dst, dvt.dst
    return dq, dkt.result(), dvt.result()
