"""The ``full`` baseline (SDPACoreAttention) against a naive dense causal attention."""
import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams

from nsa_megatron.dense_attention import SDPACoreAttention
from tests.nsa_megatron.gpt_harness import make_config


def _naive(q, k, v, scale):
    """q [S, HQ, D], k/v [S, HKV, D*] -> [S, HQ, Dv] causal softmax attention in float64."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    mask = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).tril()
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", p, v)


@pytest.fixture
def core():
    return SDPACoreAttention(make_config(attention_type="full"), layer_number=1)


def test_bshd_gqa_matches_naive(core):
    s, b, hq, hkv, d = 40, 2, 4, 2, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, b, h, d, generator=g) for h in (hq, hkv, hkv))
    out = core(q, k, v, None)
    assert out.shape == (s, b, hq * d)
    for i in range(b):
        want = _naive(q[:, i], k[:, i], v[:, i], 1 / math.sqrt(d)).reshape(s, -1)
        torch.testing.assert_close(out[:, i].double(), want, rtol=1e-5, atol=1e-5)


def test_packed_thd_matches_naive_per_sequence(core):
    lens = [7, 30, 1]
    hq, hkv, d = 4, 1, 16
    g = torch.Generator().manual_seed(1)
    t = sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, 7, 37, 38], dtype=torch.int32)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=30, max_seqlen_kv=30)
    out = core(q, k, v, None, packed_seq_params=psp)
    assert out.shape == (t, hq * d)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        want = _naive(q[a:b], k[a:b], v[a:b], 1 / math.sqrt(d)).reshape(b - a, -1)
        torch.testing.assert_close(out[a:b].double(), want, rtol=1e-5, atol=1e-5)


def test_rejects_context_parallel_and_bad_heads(core):
    with pytest.raises(ValueError, match="^context_parallel_size"):
        SDPACoreAttention(make_config(attention_type="full", context_parallel_size=2), layer_number=1)
    q, k = torch.randn(8, 1, 3, 16), torch.randn(8, 1, 2, 16)
    with pytest.raises(ValueError, match="^query"):
        core(q, k, k, None)
