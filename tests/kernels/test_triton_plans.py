"""Host-side plans and device-side glue of the Triton path, each against a plain-Python version:
tile tables, row info, dK/dV work lists, score chunks, the counting-sort inversion of the
selection, and the gradient targets (first kernel stores, last kernel writes the out dtype)."""
import random

import pytest
import torch

from nsa_kernels import dense
from nsa_kernels.dense import dense_attention_bwd, key_work
from nsa_kernels.interpreter import enable_interpreter_bf16_dot
from nsa_kernels.selected import block_work_list, selected_attention_bwd
from nsa_kernels.selection import _chunks
from nsa_kernels.varlen import Varlen, poisoned_outputs

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if DEV == "cpu":
    enable_interpreter_bf16_dot()  # round fp32 -> bf16 stores to nearest even, as a GPU does


def _same(x, y, exact: bool) -> bool:
    """Bitwise equal, or (results of GPU atomics in a varying order) within one bf16 ulp."""
    if exact:
        return torch.equal(x, y)
    return bool(((x.double() - y.double()).abs() <= 2 ** -7 * y.double().abs() + 1e-6).all())


def _layout(lens, pos0=None):
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    p0 = None if pos0 is None else torch.tensor(pos0, dtype=torch.int32, device=DEV)
    return Varlen.build(cu, p0), cu


def _key_work_loop(lens, pos0, k_bounds, block_n, stride, offset, window, qchunk):
    """The dK/dV work list as one loop per key tile."""
    rows, split, tiles, used = [], False, 0, set()
    for b, (n_q, p0) in enumerate(zip(lens, pos0)):
        n_k = k_bounds[b + 1] - k_bounds[b]
        for s0 in range(0, n_k, block_n):
            tiles += 1
            lo = max(s0 * stride + offset - p0, 0)
            hi = n_q
            if window > 0:
                hi = min(n_q, max((min(s0 + block_n, n_k) - 1) * stride + offset + window - p0, 0))
            if lo < hi:
                used.add((b, s0))
                split = split or hi - lo > qchunk
                rows += [[b, s0, a, min(a + qchunk, hi)] for a in range(lo, hi, qchunk)]
    return rows, split, len(used) == tiles


def test_layout_tables_and_key_work():
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 4)
        lens = [rng.choice([0, 1, 5, 17, 64, 130]) for _ in range(n)]
        pos0 = [rng.choice([0, 0, 3, 40]) for _ in range(n)]
        lay, _ = _layout(lens, pos0)
        for block in (1, 4, 16):
            want = [[b, s] for b, m in enumerate(lens) for s in range(0, m, block)]
            assert lay.tiles_host(block).tolist() == want
            assert lay.tiles(block).cpu().tolist() == want
        seq, pos = lay.row_info()
        assert seq.cpu().tolist() == [b for b, m in enumerate(lens) for _ in range(m)]
        assert pos.cpu().tolist() == [p + i for p, m in zip(pos0, lens) for i in range(m)]
        for stride, offset, window in ((1, 0, rng.choice([0, 7, 40])), (4, 7, 0)):
            n_k = [p + m if stride == 1 else max(0, (p + m - offset - 1) // stride + 1)
                   for p, m in zip(pos0, lens)]
            bounds = [0, *torch.tensor(n_k).cumsum(0).tolist()]
            k_cu = torch.tensor(bounds, dtype=torch.int32, device=DEV)
            for block_n, qchunk in ((16, 16), (16, 1 << 30), (128, 48)):
                work, split, covers = key_work(lay, k_cu, block_n, stride, offset, window, qchunk)
                rows, split_ref, covers_ref = _key_work_loop(lens, pos0, bounds, block_n, stride,
                                                             offset, window, qchunk)
                assert work.cpu().tolist() == rows
                assert (split, covers) == (split_ref, covers_ref)


def test_score_chunks_partition_the_tiles():
    lay, _ = _layout([37, 0, 5, 130])
    for block_t, max_rows in ((1, 4), (4, 8), (4, 50), (8, 1000)):
        runs = _chunks(lay, block_t, max_rows)
        n_tiles = lay.tiles_host(block_t).shape[0]
        assert runs[0][0] == 0 and runs[-1][1] == n_tiles
        assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
        assert all(0 < end - beg < max_rows + block_t for _, _, beg, end in runs)


def _random_selection(lay, hkv, n, slc_block, rng):
    T = lay.num_rows
    bi = torch.full((T, hkv, n), -1, dtype=torch.int32)
    pos = lay.row_info()[1].cpu()
    for t in range(T):
        nb = int(pos[t]) // slc_block + 1
        for g in range(hkv):
            m = rng.randint(0, min(n, nb))
            bi[t, g, :m] = torch.tensor(sorted(rng.sample(range(nb), m)), dtype=torch.int32)
    return bi


@pytest.mark.parametrize("lens,pos0,hkv,n,segment", [
    ([300], None, 2, 4, 7),          # several 64-token chunks, pieces of 7 tokens
    ([37, 1, 150], None, 3, 3, 512),  # varlen, HKV * n = 9 (not a power of two)
    ([90, 40], [10, 0], 1, 16, 5),   # query chunks starting inside their sequences
])
def test_block_work_list_inverts_the_selection(lens, pos0, hkv, n, segment):
    slc = 16
    lay, _ = _layout(lens, pos0)
    k_bounds = [0, *torch.tensor([p + m for p, m in zip(pos0 or [0] * len(lens), lens)])
                .cumsum(0).tolist()]
    k_cu = torch.tensor(k_bounds, dtype=torch.int32, device=DEV)
    bi = _random_selection(lay, hkv, n, slc, random.Random(len(lens)))
    seq_of = lay.row_info()[0].cpu()
    with poisoned_outputs():
        work, tokens = block_work_list(bi.to(DEV), lay, k_cu, slc, segment)
    work, tokens = work.cpu().tolist(), tokens.cpu()
    want = {}
    for t in range(bi.shape[0]):
        for g in range(hkv):
            for j in bi[t, g].tolist():
                if j >= 0:
                    want.setdefault((g, int(seq_of[t]), j), []).append(t)
    got = {}
    for g, s, j, lo, hi in work:
        if lo == hi:
            assert j * slc >= 1 << 29, "surplus work items must point past every sequence"
            continue
        assert 0 < hi - lo <= segment
        got.setdefault((g, s, j), []).extend(tokens[lo:hi].tolist())
    assert got == want


def _bwd_inputs(lens, pos0, hkv, g, dqk, dv, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lay, _ = _layout(lens, pos0)
    T = lay.num_rows
    n_k = [p + m for p, m in zip(pos0, lens)]
    k_cu = torch.tensor([0, *torch.tensor(n_k).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(DEV)  # noqa: E731
    q, do = rnd(T, hkv * g, dqk), rnd(T, hkv * g, dv)
    k, v = rnd(sum(n_k), hkv, dqk), rnd(sum(n_k), hkv, dv)
    lse = torch.logsumexp(rnd(T, hkv * g, 8), -1) + 3.0
    delta = rnd(T, hkv * g)
    gate = torch.rand(T, hkv * g, 3, generator=gen).to(DEV)[:, :, 2]
    return lay, k_cu, q, k, v, do, lse, delta, gate


@pytest.mark.parametrize("qchunk", [None, 8])
def test_dense_grad_targets(monkeypatch, qchunk):
    """Store-first and out-dtype writes equal the add-into-fp32 path; keys no query sees (a
    query chunk after the window) and split work (atomics) fall back to an fp32 buffer."""
    monkeypatch.setattr(dense, "DKDV_QUERY_CHUNK", qchunk)
    lay, k_cu, q, k, v, do, lse, delta, gate = _bwd_inputs([50, 30], [150, 0], 2, 2, 16, 24)
    exact = DEV == "cpu" or qchunk is None
    kw = dict(key_stride=1, key_offset=0, window=20, scale=0.3, gate=gate)
    gen = torch.Generator().manual_seed(5)
    accs = [torch.randn(*x.shape[:2], x.shape[2], generator=gen).to(DEV) for x in (q, k, v)]
    ref = dense_attention_bwd(q, k, v, do, lse, delta, lay, k_cu,
                              dq_acc=accs[0].clone(), dk_acc=accs[1].clone(), dv_acc=accs[2].clone(),
                              **kw)
    first = dense_attention_bwd(q, k, v, do, lse, delta, lay, k_cu,
                                dq_acc=torch.zeros_like(accs[0]), dk_acc=torch.zeros_like(accs[1]),
                                dv_acc=torch.zeros_like(accs[2]), **kw)
    for out_dtype in (torch.float32, torch.bfloat16):
        outs = [torch.full_like(a, float("nan"), dtype=out_dtype) for a in accs]
        with poisoned_outputs():
            got = dense_attention_bwd(q, k, v, do, lse, delta, lay, k_cu, dq_acc=accs[0].clone(),
                                      dk_acc=accs[1].clone(), dv_acc=accs[2].clone(),
                                      dq_out=outs[0], dk_out=outs[1], dv_out=outs[2], **kw)
            fresh = dense_attention_bwd(q, k, v, do, lse, delta, lay, k_cu, **kw)
        for x, y, z in zip(got, ref, outs):
            assert x is z and _same(x, y.to(out_dtype), exact)
        assert all(_same(x, y, exact) for x, y in zip(fresh, first))


def test_grad_targets_without_keys_and_selected_atomics():
    lay, k_cu, q, k, v, do, lse, delta, gate = _bwd_inputs([20, 9], [0, 0], 1, 3, 16, 8, seed=1)
    empty_cu = torch.zeros(3, dtype=torch.int32, device=DEV)
    kw = dict(key_stride=4, key_offset=7, window=0, scale=0.3, gate=gate)
    acc = torch.randn(q.shape).to(DEV)
    out = torch.empty(q.shape, dtype=torch.float16, device=DEV)
    with poisoned_outputs():
        dq, dk, dv = dense_attention_bwd(q, k[:0], v[:0], do, lse, delta, lay, empty_cu, **kw)
        dq2, _, _ = dense_attention_bwd(q, k[:0], v[:0], do, lse, delta, lay, empty_cu,
                                        dq_acc=acc, dq_out=out, **kw)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.numel() == 0 and dv.numel() == 0
    assert dq2 is out and torch.equal(out, acc.half())
    bi = _random_selection(lay, 1, 2, 8, random.Random(3)).to(DEV)
    args = (q, k, v, do, lse, delta, bi, lay, k_cu)
    skw = dict(slc_block=8, scale=0.3, gate=gate)
    ref = selected_attention_bwd(*args, **skw)
    outs = [torch.empty(x.shape, dtype=torch.bfloat16, device=DEV) for x in (q, k, v)]
    with poisoned_outputs():
        got = selected_attention_bwd(*args, dq_out=outs[0], dk_out=outs[1], dv_out=outs[2], **skw)
    for x, y, z in zip(got, ref, outs):
        assert x is z and torch.equal(x, y.bfloat16())


def _close(x, y, tol=1e-5):
    return bool(((x.double() - y.double()).abs() <= tol * (y.double().abs() + 1.0)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_prologue_matches_separate_delta_pass(monkeypatch, dtype):
    """fuse=(o_b, dgate): the dQ kernels write d gate = rowsum(dO * O_b) and delta = gate *
    that, and dK/dV reads the gated dO the dQ kernel stored (PRESCALE_DO) or gates dO itself;
    all equal the separate pass (combine_bwd's maths) on the dense (window, strided) and
    selected kernels; without a dQ kernel (dK/dV alone, or no keys) torch fills them."""
    lay, k_cu, q, k, v, do, lse, _, _ = _bwd_inputs([50, 30], [150, 0], 2, 2, 16, 24, seed=2)
    gen = torch.Generator().manual_seed(9)
    o_b = torch.randn(do.shape, generator=gen).to(DEV)
    gates = torch.rand(*do.shape[:2], 3, generator=gen).to(DEV)
    q, k, v, do, o_b, gates = (x.to(dtype) for x in (q, k, v, do, o_b, gates))
    gate = gates[:, :, 1]
    r_ref = (do.double() * o_b.double()).sum(-1)
    delta_ref = (gate.double() * r_ref).float()
    bi = _random_selection(lay, 2, 3, 8, random.Random(4)).to(DEV)
    runs = [
        (dense_attention_bwd, (q, k, v, do, lse), (lay, k_cu),
         dict(key_stride=1, key_offset=0, window=20, scale=0.3)),
        (dense_attention_bwd, (q, k[:57], v[:57], do, lse), (lay, k_cu // 4),
         dict(key_stride=4, key_offset=7, window=0, scale=0.3)),
        (selected_attention_bwd, (q, k, v, do, lse), (bi, lay, k_cu), dict(slc_block=8, scale=0.3)),
    ]
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    for fn, head, tail, kw in runs:
        ref = fn(*head, delta_ref, *tail, gate=gate, **kw)
        got = {}
        for prescale in (True, False):
            monkeypatch.setattr(dense, "PRESCALE_DO", prescale)
            dgates = torch.full_like(gates, float("nan"))
            delta = torch.full_like(delta_ref, float("nan"))
            got[prescale] = fn(*head, delta, *tail, gate=gate, fuse=(o_b, dgates[:, :, 1]), **kw)
            assert _close(dgates[:, :, 1], r_ref, tol) and dgates[:, :, [0, 2]].isnan().all()
            assert _close(delta, delta_ref, tol)
            for x, y in zip(got[prescale], ref):
                assert _close(x, y, 1e-4 if dtype == torch.float32 else 2 ** -6)
        # the stored gated dO is what dK/dV rounds itself: same dK/dV bits either way
        exact = DEV == "cpu" or fn is dense_attention_bwd
        assert all(_same(x, y, exact) for x, y in zip(got[True], got[False]))
        # dK/dV alone: the prologue runs in torch
        dgates = torch.full_like(gates, float("nan"))
        alone = fn(*head, None, *tail, gate=gate, fuse=(o_b, dgates[:, :, 1]), kernels=("dkdv",),
                   **kw)
        assert _close(dgates[:, :, 1], r_ref, tol)
        for x, y in zip(alone[1:], ref[1:]):
            assert _close(x, y, 1e-4 if dtype == torch.float32 else 2 ** -6)
    # no keys: no dQ kernel runs, d gate still written
    empty_cu = torch.zeros(3, dtype=torch.int32, device=DEV)
    dgates = torch.full_like(gates, float("nan"))
    dense_attention_bwd(q, k[:0], v[:0], do, lse, None, lay, empty_cu, key_stride=4, key_offset=7,
                        window=0, scale=0.3, gate=gate, fuse=(o_b, dgates[:, :, 1]))
    assert _close(dgates[:, :, 1], r_ref, tol)
    with pytest.raises(ValueError):
        dense_attention_bwd(q, k, v, do, lse, None, lay, k_cu, key_stride=1, key_offset=0,
                            window=20, scale=0.3, fuse=(o_b, dgates[:, :, 1]))
