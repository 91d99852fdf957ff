"""NSA FLOP counting: attended tokens match a brute-force count from the spec's masks."""
from types import SimpleNamespace

import pytest

from nsa_launch.flops import attended_tokens, forward_flops_per_token


def _brute(L, l, d, ls, n, w):
    cmp = slc = win = 0
    for t in range(L):
        cmp += sum(1 for i in range(max(0, (L - l) // d + 1)) if i * d + l - 1 <= t)
        visible = t // ls + 1
        # every visible block, or n of them that include the query's own (local) block
        chosen = range(visible) if visible <= n else [visible - 1, *range(n - 1)]
        slc += sum(min(ls, t + 1 - j * ls) for j in chosen)
        win += min(t + 1, w)
    return cmp / L, slc / L, win / L


@pytest.mark.parametrize("L,l,d,ls,n,w", [(256, 16, 8, 32, 4, 64), (1000, 32, 16, 64, 16, 512), (63, 32, 16, 64, 3, 8)])
def test_attended_tokens_match_brute_force(L, l, d, ls, n, w):
    got = attended_tokens(L, l, d, ls, n, w)
    c, s, wi = _brute(L, l, d, ls, n, w)
    assert got["cmp"] == pytest.approx(c) and got["slc"] == pytest.approx(s) and got["win"] == pytest.approx(wi)
    assert got["full"] == pytest.approx((L + 1) / 2)


def test_nsa_attention_flops_far_below_dense_at_64k():
    base = dict(num_layers=2, hidden_size=2560, num_attention_heads=64, num_query_groups=4, kv_channels=192,
                nsa_v_head_dim=128, ffn_hidden_size=8192, gated_linear_unit=True, nsa_cmp_block=32,
                nsa_cmp_stride=16, nsa_slc_block=64, nsa_topk=16, nsa_window=512, nsa_compressor="mlp",
                nsa_branch_kv="independent", num_moe_experts=None)
    nsa = forward_flops_per_token(SimpleNamespace(attention_type="nsa", **base), 65536, 129280)
    full = forward_flops_per_token(SimpleNamespace(attention_type="full", **base), 65536, 129280)
    # per query at 64k: ~2048 compressed + 1024 selected + 512 window keys vs ~32768 dense
    assert 0.09 < nsa["attn_core"] / full["attn_core"] < 0.13
    assert nsa["mlp"] == full["mlp"]
