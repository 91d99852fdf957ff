"""The vectorised reference against the naive oracle, gradcheck, and the spec's invariants."""
import pytest
import torch

from nsa_kernels.reference import (compressed_attention, nsa_attention_reference, select_blocks,
                                   selected_attention, selection_scores, window_attention)
from tests.kernels.inputs import PAPER_HP, SMALL_HP, make_inputs, rel_err
from tests.kernels.naive_oracle import naive_nsa

# (seqlens, HQ, HKV, Dqk, Dv, hyper-parameters)
ORACLE_CASES = [
    ([1], 2, 1, 8, 8, SMALL_HP),                       # one token
    ([5], 4, 2, 8, 8, SMALL_HP),                       # shorter than a compression block
    ([61], 4, 4, 8, 6, SMALL_HP),                      # G=1, length divisible by nothing
    ([77], 8, 4, 12, 8, SMALL_HP),                     # G=2
    ([3, 40, 1, 66, 17], 8, 2, 8, 8, SMALL_HP),        # pack of 5, G=4
    ([50, 33], 16, 1, 8, 8, SMALL_HP),                 # G=16
    ([45], 4, 2, 192, 128, SMALL_HP),                  # the paper's Dqk=192 / Dv=128
    ([2, 90], 4, 1, 8, 8, dict(SMALL_HP, topk=5, init_blocks=2, local_blocks=2, window=7)),
    ([70], 4, 2, 8, 8, dict(SMALL_HP, cmp_block=16, cmp_stride=16, slc_block=16, topk=2, local_blocks=0)),
    ([300], 4, 2, 8, 8, dict(PAPER_HP, topk=3, window=40)),  # paper's l, d, l'
]


@pytest.mark.parametrize("case", range(len(ORACLE_CASES)))
def test_reference_matches_naive_oracle_float64(case):
    seqlens, hq, hkv, dqk, dv, hp = ORACLE_CASES[case]
    tensors, cu = make_inputs(seqlens, hq, hkv, dqk, dv, hp, seed=case)
    out, idx = nsa_attention_reference(**tensors, cu_seqlens=cu, **hp, return_block_indices=True)
    ref_out, ref_idx = naive_nsa(**tensors, seqlens=seqlens, **hp)
    assert out.dtype == torch.float64 and out.shape == ref_out.shape
    assert torch.equal(idx, ref_idx)
    assert rel_err(out, ref_out) <= 1e-10


def test_shared_window_kv_matches_oracle():
    tensors, cu = make_inputs([40, 29], 4, 2, 8, 8, SMALL_HP, window_kv=False, seed=11)
    out = nsa_attention_reference(**tensors, cu_seqlens=cu, **SMALL_HP)
    ref, _ = naive_nsa(**tensors, seqlens=[40, 29], **SMALL_HP)
    assert rel_err(out, ref) <= 1e-10


def test_gradcheck_every_input():
    hp = dict(cmp_block=4, cmp_stride=2, slc_block=8, topk=2, window=5, init_blocks=1, local_blocks=1)
    tensors, cu = make_inputs([13, 9], 4, 2, 4, 3, hp, seed=3, requires_grad=True)
    names = list(tensors)

    def fn(*xs):
        return nsa_attention_reference(**dict(zip(names, xs)), cu_seqlens=cu, **hp)

    assert torch.autograd.gradcheck(fn, tuple(tensors.values()), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_future_tokens_never_change_past_outputs():
    hp, seq = SMALL_HP, 70
    tensors, cu = make_inputs([seq], 4, 2, 8, 8, hp, seed=5)
    cut = 37
    base = nsa_attention_reference(**tensors, cu_seqlens=cu, **hp)
    changed = {name: t.clone() for name, t in tensors.items()}
    for name in ("q", "k", "v", "k_win", "v_win", "gates"):
        changed[name][cut + 1:] = torch.rand_like(changed[name][cut + 1:])
    first_future_cmp = (cut + 1 - hp["cmp_block"] + 1 + hp["cmp_stride"] - 1) // hp["cmp_stride"]
    for name in ("k_cmp", "v_cmp"):
        changed[name][first_future_cmp:] = torch.randn_like(changed[name][first_future_cmp:])
    after = nsa_attention_reference(**changed, cu_seqlens=cu, **hp)
    assert torch.equal(base[: cut + 1], after[: cut + 1])
    assert not torch.equal(base[cut + 1:], after[cut + 1:])


def test_pack_equals_sequences_run_separately():
    seqlens = [23, 1, 64, 40]
    tensors, cu = make_inputs(seqlens, 8, 2, 8, 8, SMALL_HP, seed=7)
    packed, packed_idx = nsa_attention_reference(**tensors, cu_seqlens=cu, **SMALL_HP, return_block_indices=True)
    from nsa_kernels.layout import compressed_cu_seqlens
    ccu = compressed_cu_seqlens(cu, SMALL_HP["cmp_block"], SMALL_HP["cmp_stride"])
    for i in range(len(seqlens)):
        a, b, ca, cb = int(cu[i]), int(cu[i + 1]), int(ccu[i]), int(ccu[i + 1])
        part = {n: (t[ca:cb] if n in ("k_cmp", "v_cmp") else t[a:b]) for n, t in tensors.items()}
        alone, idx = nsa_attention_reference(**part, **SMALL_HP, return_block_indices=True)
        assert torch.equal(alone, packed[a:b])
        assert torch.equal(idx, packed_idx[a:b])


def _positions(n):
    return torch.arange(n)


@pytest.mark.parametrize("branch", [0, 1, 2])
def test_one_hot_gates_isolate_each_branch(branch):
    hp, seq = SMALL_HP, 57
    tensors, cu = make_inputs([seq], 4, 2, 8, 6, hp, seed=9)
    gates = torch.zeros_like(tensors["gates"])
    gates[..., branch] = 1.0
    tensors["gates"] = gates
    out, idx = nsa_attention_reference(**tensors, cu_seqlens=cu, **hp, return_block_indices=True)
    pos, scale = _positions(seq), 8 ** -0.5
    o_cmp, lse = compressed_attention(tensors["q"], tensors["k_cmp"], tensors["v_cmp"], pos,
                                      cmp_block=hp["cmp_block"], cmp_stride=hp["cmp_stride"], scale=scale)
    if branch == 0:
        expected = o_cmp
    elif branch == 1:
        scores = selection_scores(tensors["q"], tensors["k_cmp"], pos, lse, cmp_block=hp["cmp_block"],
                                  cmp_stride=hp["cmp_stride"], slc_block=hp["slc_block"], scale=scale,
                                  num_blocks=-(-seq // hp["slc_block"]))
        blocks = select_blocks(scores, pos, slc_block=hp["slc_block"], topk=hp["topk"],
                               init_blocks=hp["init_blocks"], local_blocks=hp["local_blocks"])
        assert torch.equal(blocks, idx)
        expected, _ = selected_attention(tensors["q"], tensors["k"], tensors["v"], pos, blocks,
                                         slc_block=hp["slc_block"], scale=scale)
    else:
        expected, _ = window_attention(tensors["q"], tensors["k_win"], tensors["v_win"], pos,
                                       window=hp["window"], scale=scale)
    assert rel_err(out, expected) <= 1e-12


def _dense_causal(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = torch.einsum("thd,shd->hts", q, k) / q.shape[-1] ** 0.5
    mask = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).tril()
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hts,shd->thd", probs, v)


@pytest.mark.parametrize("branch", [1, 2])
def test_full_coverage_branches_equal_dense_causal_attention(branch):
    seq = 75
    hp = dict(SMALL_HP, topk=-(-seq // SMALL_HP["slc_block"]), window=seq)
    tensors, cu = make_inputs([seq], 4, 2, 8, 8, hp, seed=13)
    gates = torch.zeros_like(tensors["gates"])
    gates[..., branch] = 1.0
    tensors["gates"] = gates
    out = nsa_attention_reference(**tensors, cu_seqlens=cu, **hp)
    keys = ("k", "v") if branch == 1 else ("k_win", "v_win")
    expected = _dense_causal(tensors["q"], tensors[keys[0]], tensors[keys[1]])
    assert rel_err(out, expected) <= 1e-12


def test_forced_blocks_always_returned():
    hp = dict(SMALL_HP, topk=4, init_blocks=2, local_blocks=2)
    seqlens = [130, 47]
    tensors, cu = make_inputs(seqlens, 4, 2, 8, 8, hp, seed=17)
    tensors["k_cmp"] = tensors["k_cmp"] * 8  # peaky scores: forced blocks rarely win on merit
    _, idx = nsa_attention_reference(**tensors, cu_seqlens=cu, **hp, return_block_indices=True)
    start = 0
    for seq_len in seqlens:
        for t in range(seq_len):
            current = t // hp["slc_block"]
            forced = {j for j in range(current + 1) if j < hp["init_blocks"] or j > current - hp["local_blocks"]}
            for g in range(idx.shape[1]):
                row = idx[start + t, g].tolist()
                assert forced <= set(row)
                valid = [j for j in row if j >= 0]
                assert valid == sorted(valid) and row[len(valid):] == [-1] * (len(row) - len(valid))
        start += seq_len


def test_ties_go_to_the_lower_block():
    scores = torch.tensor([[[0.5, 0.2, 0.5, 0.5, 0.1, 0.0]]], dtype=torch.float64)
    pos = torch.tensor([5 * 16 + 3])
    idx = select_blocks(scores, pos, slc_block=16, topk=3, init_blocks=0, local_blocks=1)
    assert idx.tolist() == [[[0, 2, 5]]]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_close_to_float64(dtype, tol):
    tensors, cu = make_inputs([60, 35], 8, 2, 16, 16, SMALL_HP, seed=21)
    ref = nsa_attention_reference(**tensors, cu_seqlens=cu, **SMALL_HP)
    low = {n: t.to(dtype) for n, t in tensors.items()}
    out = nsa_attention_reference(**low, cu_seqlens=cu, **SMALL_HP)
    assert out.dtype == dtype
    assert rel_err(out, ref) <= tol


def test_chunked_queries_equal_unchunked(monkeypatch):
    import nsa_kernels.reference as reference
    tensors, cu = make_inputs([90, 41], 4, 2, 8, 8, SMALL_HP, seed=23)
    whole = nsa_attention_reference(**tensors, cu_seqlens=cu, **SMALL_HP)
    monkeypatch.setattr(reference, "_CHUNK_BUDGET", 1)  # one query per chunk
    chunked = nsa_attention_reference(**tensors, cu_seqlens=cu, **SMALL_HP)
    assert rel_err(chunked, whole) <= 1e-13
