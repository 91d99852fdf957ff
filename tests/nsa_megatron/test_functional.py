"""The public entry point: backend choice and the compressor -> RoPE -> attention pipeline."""
import pytest
import torch

from nsa_kernels.layout import compressed_cu_seqlens
from nsa_megatron.compression import build_compressor
from nsa_megatron.functional import nsa_attention, resolve_backend
from tests.kernels.inputs import SMALL_HP, make_inputs


def test_auto_backend_is_reference_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "reference"
    assert resolve_backend("triton", torch.device("cpu")) == "triton"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("flash", torch.device("cpu"))


def test_functional_returns_indices_and_trains_compressors():
    tensors, cu = make_inputs([40, 50], 4, 2, 8, 8, SMALL_HP, dtype=torch.float32, seed=2)
    comp_k = build_compressor("mlp", 2, 8, SMALL_HP["cmp_block"], SMALL_HP["cmp_stride"])
    comp_v = build_compressor("mlp", 2, 8, SMALL_HP["cmp_block"], SMALL_HP["cmp_stride"])
    tensors["k_cmp"] = comp_k(tensors["k"], cu)
    tensors["v_cmp"] = comp_v(tensors["v"], cu)
    assert tensors["k_cmp"].shape[0] == int(compressed_cu_seqlens(cu, 8, 4)[-1])
    out, idx = nsa_attention(**tensors, cu_seqlens=cu, **SMALL_HP, backend="auto", return_block_indices=True)
    assert out.shape == (90, 4, 8) and idx.shape == (90, 2, SMALL_HP["topk"]) and idx.dtype == torch.int32
    out.square().mean().backward()
    for module in (comp_k, comp_v):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
                   for p in module.parameters())
