"""GPU checks of the Triton NSA kernels (marked ``gpu``; run through tools/gpu_session.sh).

Random shapes over the classes of issue 3 (G 1..16, Dqk != Dv, non-power-of-two dims,
varlen packs, length-1 sequences) up to 64k tokens against the float64 reference at bf16
tolerance, and a 256k-token forward + backward whose int32 offsets would overflow
(T * HQ * Dqk > 2^31) checked on its last queries.
"""
import random

import pytest
import torch

from nsa_kernels import reference as R
from nsa_kernels.function import nsa_attention_triton
from nsa_kernels.layout import compressed_cu_seqlens

from .inputs import PAPER_HP, SMALL_HP, make_inputs, rel_err
from .triton_checks import check_nsa

pytestmark = pytest.mark.gpu

_rng = random.Random(3)
_DIMS = [(64, 64), (128, 128), (192, 128), (96, 80)]
_GROUPS = [(16, 16), (16, 4), (8, 4), (4, 4), (16, 1), (6, 2)]


def _random_case(total, grads, paper):
    hq, hkv = _rng.choice([gk for gk in _GROUPS if not (grads and paper) or gk[1] <= 4])
    dqk, dv = _rng.choice(_DIMS)
    lens, left = [], total
    while left > 0:
        n = min(left, _rng.choice([1, 37, 1000, 4097, total]))
        lens.append(n)
        left -= n
    hp = PAPER_HP if paper else SMALL_HP
    return pytest.param(lens, hq, hkv, dqk, dv, hp, grads,
                        id=f"T{total}-G{hq // hkv}-d{dqk}x{dv}-n{len(lens)}-{'paper' if paper else 'small'}")


# float64 autograd of the reference keeps every gathered block: gradients at <= 8k tokens
CASES = [_random_case(300, True, False), _random_case(2048, True, True), _random_case(5000, True, False),
         _random_case(8192, True, False), _random_case(16384, False, True), _random_case(65536, False, True)]


@pytest.mark.parametrize("seqlens,hq,hkv,dqk,dv,hp,grads", CASES)
def test_random_shapes_bf16(seqlens, hq, hkv, dqk, dv, hp, grads):
    errs = check_nsa(seqlens, hq, hkv, dqk, dv, hp, torch.bfloat16, "cuda", grads=grads,
                     window_kv=hq % 3 != 0, seed=sum(seqlens))
    print(seqlens[:4], hq, hkv, dqk, dv, {k: f"{v:.1e}" for k, v in errs.items()})


def test_256k_tokens_no_offset_overflow():
    T, hq, hkv, dqk, dv = 262144, 64, 4, 192, 128
    assert T * hq * dqk > 2 ** 31
    t, cu = make_inputs([T], hq, hkv, dqk, dv, PAPER_HP, dtype=torch.bfloat16, device="cuda",
                        window_kv=False, seed=5, requires_grad=True)
    scale = dqk ** -0.5
    o, blocks = nsa_attention_triton(**t, cu_seqlens=cu, scale=scale, return_block_indices=True,
                                     **PAPER_HP)
    o.backward(torch.randn_like(o))
    torch.cuda.synchronize()
    for name, x in t.items():
        assert torch.isfinite(x.grad).all(), f"d{name} not finite"
    # the last queries sit beyond the int32 range of q's offsets: compare them with the reference
    tail = slice(T - 64, T)
    pos = torch.arange(T - 64, T, device="cuda")
    d = {k: x.detach().double() for k, x in t.items()}
    kc_cu = compressed_cu_seqlens(cu, PAPER_HP["cmp_block"], PAPER_HP["cmp_stride"])
    assert int(kc_cu[-1]) == d["k_cmp"].shape[0]
    hp = PAPER_HP
    o_c, _ = R.compressed_attention(d["q"][tail], d["k_cmp"], d["v_cmp"], pos, cmp_block=hp["cmp_block"],
                                    cmp_stride=hp["cmp_stride"], scale=scale)
    o_s, _ = R.selected_attention(d["q"][tail], d["k"], d["v"], pos, blocks[tail].long(),
                                  slc_block=hp["slc_block"], scale=scale)
    o_w, _ = R.window_attention(d["q"][tail], d["k"], d["v"], pos, window=hp["window"], scale=scale)
    g = d["gates"][tail]
    ref = g[..., 0:1] * o_c + g[..., 1:2] * o_s + g[..., 2:3] * o_w
    assert rel_err(o[tail], ref) <= 1e-2
