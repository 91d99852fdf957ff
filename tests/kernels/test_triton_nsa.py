"""Triton NSA (all branches, forward and every gradient) vs the float64 reference.

CPU: runs in the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) at tiny shapes.
Shape classes: GQA group G in 1, 2, 3, 4, 16; Dqk != Dv; non-power-of-two dims; packed
varlen; length-1 sequences; lengths not divisible by any block; shared and independent
window keys; fp32, fp16 and bf16 (bf16 through the interpreter's dot fix).
"""
import pytest
import torch

from nsa_kernels.interpreter import enable_interpreter_bf16_dot

from .inputs import SMALL_HP
from .triton_checks import check_nsa

ODD_HP = dict(cmp_block=16, cmp_stride=8, slc_block=24, topk=3, window=13, init_blocks=0, local_blocks=2)

CASES = [
    # seqlens, HQ, HKV, Dqk, Dv, hp, dtype, independent window K/V
    pytest.param([37, 1, 50], 2, 2, 24, 20, SMALL_HP, torch.float32, True, id="G1-varlen-len1-fp32"),
    pytest.param([70], 4, 2, 16, 16, SMALL_HP, torch.float32, False, id="G2-shared-fp32"),
    pytest.param([45, 20], 4, 1, 32, 16, SMALL_HP, torch.float16, True, id="G4-dqk32-dv16-fp16"),
    pytest.param([33, 1], 16, 1, 16, 24, SMALL_HP, torch.bfloat16, False, id="G16-bf16"),
    pytest.param([61], 3, 1, 20, 12, ODD_HP, torch.float32, True, id="G3-lprime24-init0-fp32"),
]


@pytest.mark.parametrize("seqlens,hq,hkv,dqk,dv,hp,dtype,window_kv", CASES)
def test_nsa_triton_matches_reference(seqlens, hq, hkv, dqk, dv, hp, dtype, window_kv):
    if dtype == torch.bfloat16:
        assert enable_interpreter_bf16_dot() or torch.cuda.is_available()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    errs = check_nsa(seqlens, hq, hkv, dqk, dv, hp, dtype, device, window_kv=window_kv,
                     seed=len(seqlens) * 7 + hq)
    assert set(errs) >= {"o", "dq", "dk", "dv", "dk_cmp", "dv_cmp", "dgates"}


def test_split_dkdv_work_matches_reference(monkeypatch):
    """dK/dV work items cut into short query ranges (atomic accumulation path)."""
    import nsa_kernels.dense as dense

    monkeypatch.setattr(dense, "DKDV_QUERY_CHUNK", 16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_nsa([58, 3], 4, 2, 16, 24, SMALL_HP, torch.float32, device, window_kv=True, seed=11)


def test_small_tiles_run_unmasked_steps(monkeypatch):
    """Dense tiles far smaller than the sequences (4 tokens x G heads, 16 keys), so every dense
    kernel runs its unmasked middle steps between masked boundary steps, on both branches."""
    import nsa_kernels.dense as dense

    small = dict(ROWS=16, BLOCK_N=16)
    monkeypatch.setattr(dense, "TILE_OVERRIDE", {k: small for k in ("fwd", "dq", "dkdv")})
    monkeypatch.setattr(dense, "DKDV_QUERY_CHUNK", 48)
    hp = dict(SMALL_HP, window=37)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_nsa([150, 23], 8, 2, 16, 24, hp, torch.float32, device, window_kv=True, seed=13)


def test_eight_token_forward_tiles(monkeypatch):
    """The GPU's dense forward tiles since round 6: 8 tokens x G heads per tile and 32-key
    steps (a register cap, GPU only, rides along in the override); the window branch's own
    override (``"win_fwd"``) takes precedence over ``"fwd"`` for that branch."""
    import nsa_kernels.dense as dense

    over = {"fwd": dict(ROWS=32, BLOCK_N=32, num_warps=8, num_stages=2, maxnreg=128),
            "win_fwd": dict(ROWS=16, BLOCK_N=16)}
    monkeypatch.setattr(dense, "TILE_OVERRIDE", over)
    cmp_cfg = dense.dense_config(4, 16, 32, "fwd", window=False)
    win_cfg = dense.dense_config(4, 16, 32, "fwd", window=True)
    assert (cmp_cfg["BLOCK_T"], cmp_cfg["BLOCK_N"], cmp_cfg["num_warps"]) == (8, 32, 8)
    assert (win_cfg["BLOCK_T"], win_cfg["BLOCK_N"]) == (4, 16)
    assert ("maxnreg" in cmp_cfg) == (not dense.interpreting())
    hp = dict(SMALL_HP, window=37)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_nsa([150, 23], 8, 2, 16, 24, hp, torch.float32, device, window_kv=True, seed=17)
