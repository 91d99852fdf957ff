"""The selected branch's local blocks attended by the window forward kernel (round 8):
``selected_attention_fwd(skip_local=L)`` leaves them out, ``dense_attention_fwd(local=...)``
attends them and completes o_slc / lse_slc in place. Against the float64 reference, outputs
poisoned: the launchers on query chunks at position offsets (tiles straddling a block
boundary), and the whole NSA forward and gradients through ``function._forward``."""
import pytest
import torch

import nsa_kernels.dense as dense
import nsa_kernels.function as function
from nsa_kernels import reference as R
from nsa_kernels.dense import LocalBlocks, dense_attention_fwd
from nsa_kernels.selected import selected_attention_fwd
from nsa_kernels.varlen import Varlen, poisoned_outputs

from .inputs import rel_err
from .triton_checks import check_nsa


def _check_lse(lse, ref):
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(lse), finite)
    assert rel_err(lse[finite], ref[finite]) <= 1e-5


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "independent"])
def test_local_blocks_on_query_chunks(monkeypatch, shared):
    """Queries [0, 1), [1, 37), [37, 90) of one sequence against their key prefixes (as context
    parallelism calls the launchers), 8-token window tiles with 16-key steps, so tiles straddle
    16-token blocks and rows of one tile have different local starts; selections from random
    scores (forced blocks as the spec's). Final o_slc / lse_slc, window o / lse and the fused
    gated sum against the reference branches."""
    monkeypatch.setattr(dense, "TILE_OVERRIDE", {"fwd": dict(ROWS=16, BLOCK_N=16)})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(21)
    L, hq, hkv, dqk, dv, bs, n, local, w = 90, 4, 2, 24, 20, 16, 4, 2, 40
    starts, ends = [0, 1, 37], [1, 37, 90]
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(L, hq, dqk), rnd(L, hkv, dqk), rnd(L, hkv, dv)
    k_w, v_w = (k, v) if shared else (rnd(L, hkv, dqk), rnd(L, hkv, dv))
    gates = torch.rand(L, hq, 3, generator=gen, dtype=torch.float64)
    pos = torch.arange(L)
    nb = -(-L // bs)
    scores = torch.rand(L, hkv, nb, generator=gen, dtype=torch.float64)
    blocks = R.select_blocks(scores, pos, slc_block=bs, topk=n, init_blocks=1, local_blocks=local)
    scale = dqk ** -0.5
    ref_s, ref_ls = R.selected_attention(q, k, v, pos, blocks, slc_block=bs, scale=scale)
    ref_w, ref_lw = R.window_attention(q, k_w, v_w, pos, window=w, scale=scale)
    o_c = rnd(L, hq, dv)

    f = lambda x: x.float().contiguous().to(dev)  # noqa: E731
    layout = Varlen.build(torch.tensor([0] + ends, dtype=torch.int32).to(dev),
                          torch.tensor(starts, dtype=torch.int32).to(dev))
    pre = lambda x: f(torch.cat([x[:b] for b in ends]))  # noqa: E731
    k_cu = torch.tensor([0, *torch.tensor(ends).cumsum(0).tolist()], dtype=torch.int32).to(dev)
    ks, vs = pre(k), pre(v)
    kw, vw = (ks, vs) if shared else (pre(k_w), pre(v_w))
    with poisoned_outputs():
        o_s, l_s = selected_attention_fwd(f(q), ks, vs, blocks.to(torch.int32).to(dev), layout,
                                          k_cu, slc_block=bs, scale=scale, skip_local=local)
        o_w, l_w, out = dense_attention_fwd(
            f(q), kw, vw, layout, k_cu, key_stride=1, key_offset=0, window=w, scale=scale,
            combine=(f(o_c), o_s, f(gates)), local=LocalBlocks(ks, vs, o_s, l_s, bs, local))
    assert rel_err(o_s, ref_s) <= 1e-5
    _check_lse(l_s.double().cpu(), ref_ls)
    assert rel_err(o_w, ref_w) <= 1e-5
    _check_lse(l_w.double().cpu(), ref_lw)
    want = gates[..., 0:1] * o_c + gates[..., 1:2] * o_s.double().cpu() + gates[..., 2:3] * ref_w
    assert rel_err(out, want) <= 1e-5


def test_local_blocks_need_the_window():
    """dense_attention_fwd refuses local blocks outside a window or on the compressed branch."""
    q, k = torch.randn(4, 2, 16), torch.randn(4, 1, 16)
    lay = Varlen.build(torch.tensor([0, 4], dtype=torch.int32))
    cu = torch.tensor([0, 4], dtype=torch.int32)
    loc = LocalBlocks(k, k, torch.empty(4, 2, 16), torch.empty(4, 2), 16, 2)
    with pytest.raises(ValueError, match="inside the window"):
        dense_attention_fwd(q, k, k, lay, cu, key_stride=1, key_offset=0, window=16, scale=0.25,
                            local=loc)
    with pytest.raises(ValueError, match="sliding-window"):
        dense_attention_fwd(q, k, k, lay, cu, key_stride=2, key_offset=1, window=0, scale=0.25,
                            local=loc)


def _hp(slc, topk, window, init, local, cmp_block=16, cmp_stride=8):
    return dict(cmp_block=cmp_block, cmp_stride=cmp_stride, slc_block=slc, topk=topk,
                window=window, init_blocks=init, local_blocks=local)


CASES = [
    # seqlens, HQ, HKV, Dqk, Dv, hp, independent window K/V, grads, local expected
    pytest.param([1, 5, 63, 64, 65, 130, 300], 2, 1, 16, 24, _hp(64, 4, 160, 1, 2, 32, 16),
                 False, False, 2, id="varlen-l64-G2-shared-local2"),
    pytest.param([37, 1, 50], 2, 2, 24, 16, _hp(8, 4, 24, 0, 3, 8, 4), True, True, 3,
                 id="G1-indep-local3-init0"),
    pytest.param([45, 20], 16, 1, 16, 24, _hp(16, 3, 20, 1, 1), False, True, 1,
                 id="G16-shared-local1"),
    pytest.param([70, 9], 4, 2, 16, 12, _hp(8, 2, 16, 0, 2, 8, 4), False, True, 2,
                 id="G2-topk-equals-local"),
    pytest.param([70], 4, 2, 16, 16, _hp(16, 4, 24, 1, 2), False, False, 0,
                 id="local-outside-window-old-path"),
]


@pytest.mark.parametrize("seqlens,hq,hkv,dqk,dv,hp,window_kv,grads,expect", CASES)
def test_nsa_with_local_blocks_in_window(monkeypatch, seqlens, hq, hkv, dqk, dv, hp, window_kv,
                                         grads, expect):
    """Whole NSA (fp32, interpreter) with the local blocks in the window kernel for both window
    K/V kinds, o and every gradient against the float64 reference; the last case's local
    blocks (2 x 16) do not fit its window (24), so it takes the old path."""
    monkeypatch.setattr(function, "LOCAL_IN_WINDOW", {"shared": True, "independent": True})
    seen = []
    real = function.selected_attention_fwd

    def spy(*args, **kw):
        seen.append(kw.get("skip_local", 0))
        return real(*args, **kw)

    monkeypatch.setattr(function, "selected_attention_fwd", spy)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_nsa(seqlens, hq, hkv, dqk, dv, hp, torch.float32, device, window_kv=window_kv,
              grads=grads, seed=sum(seqlens) + hq)
    assert seen == [expect]


def test_nsa_local_blocks_small_tiles(monkeypatch):
    """Whole NSA forward with 4-token window tiles and 16-key steps (independent window K/V):
    the local phase and the window's remaining keys each run masked head, unmasked middle and
    masked tail steps."""
    monkeypatch.setattr(function, "LOCAL_IN_WINDOW", {"shared": True, "independent": True})
    monkeypatch.setattr(dense, "TILE_OVERRIDE", {"win_fwd": dict(ROWS=16, BLOCK_N=16)})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_nsa([100, 9], 2, 1, 16, 24, _hp(32, 4, 80, 1, 2), torch.float32, device,
              window_kv=True, grads=False, seed=19)
