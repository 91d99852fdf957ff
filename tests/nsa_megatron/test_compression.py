"""Compressors: block layout, per-KV-head weights, independence of sequences in a pack."""
import pytest
import torch

from nsa_kernels.layout import compressed_cu_seqlens, compressed_positions, num_compressed
from nsa_megatron.compression import build_compressor, compression_block_index


def test_num_compressed_follows_the_spec():
    assert [num_compressed(n, 32, 16) for n in (0, 1, 31, 32, 47, 48, 100)] == [0, 0, 0, 1, 1, 2, 5]


def test_block_index_and_positions():
    cu = torch.tensor([0, 10, 11, 23], dtype=torch.int32)
    idx = compression_block_index(cu, 4, 2)
    assert idx.tolist()[:4] == [[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 7], [6, 7, 8, 9]]
    assert idx.tolist()[4] == [11, 12, 13, 14]
    assert compressed_cu_seqlens(cu, 4, 2).tolist() == [0, 4, 4, 9]
    assert compressed_positions(cu, 4, 2).tolist() == [3, 5, 7, 9, 3, 5, 7, 9, 11]


def test_mean_compressor_averages_each_block():
    x = torch.randn(20, 2, 4, dtype=torch.float64)
    out = build_compressor("mean", 2, 4, 8, 4)(x, torch.tensor([0, 20], dtype=torch.int32))
    assert out.shape == (4, 2, 4)
    assert torch.allclose(out[1], x[4:12].mean(0))


def test_linear_compressor_starts_as_mean_pooling():
    x = torch.randn(20, 2, 4, dtype=torch.float64)
    cu = torch.tensor([0, 20], dtype=torch.int32)
    lin = build_compressor("linear", 2, 4, 8, 4, params_dtype=torch.float64)
    mean = build_compressor("mean", 2, 4, 8, 4)
    assert torch.allclose(lin(x, cu), mean(x, cu))


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_each_kv_head_has_its_own_weights(kind):
    comp = build_compressor(kind, 3, 4, 8, 4, params_dtype=torch.float64)
    for p in comp.parameters():
        assert p.shape[0] == 3 and p.nsa_kv_head_dim == 0
    x = torch.randn(16, 3, 4, dtype=torch.float64)
    cu = torch.tensor([0, 16], dtype=torch.int32)
    base = comp(x, cu)
    with torch.no_grad():
        next(comp.parameters())[1].add_(0.5)
    changed = comp(x, cu)
    assert torch.equal(base[:, 0], changed[:, 0]) and torch.equal(base[:, 2], changed[:, 2])
    assert not torch.equal(base[:, 1], changed[:, 1])


def test_mlp_compressor_pack_equals_separate_and_has_gradients():
    comp = build_compressor("mlp", 2, 4, 8, 4, params_dtype=torch.float64)
    x = torch.randn(40, 2, 4, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 7, 29, 40], dtype=torch.int32)
    packed = comp(x, cu)
    parts = [comp(x[a:b], torch.tensor([0, b - a], dtype=torch.int32)) for a, b in ((0, 7), (7, 29), (29, 40))]
    # equal up to fp64 rounding: BLAS may block a 40-row matmul differently from a 7-row one
    torch.testing.assert_close(packed, torch.cat(parts), rtol=1e-12, atol=1e-12)
    packed.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in comp.parameters())
    assert x.grad[:7].abs().sum() == 0  # the 7-token sequence has no whole block


def test_bad_compressor_arguments():
    with pytest.raises(ValueError, match="kind"):
        build_compressor("conv", 2, 4, 8, 4)
    with pytest.raises(ValueError, match="cmp_stride"):
        build_compressor("mlp", 2, 4, 8, 3)
    comp = build_compressor("mean", 2, 4, 8, 4)
    with pytest.raises(ValueError, match="x must be"):
        comp(torch.randn(10, 3, 4), torch.tensor([0, 10], dtype=torch.int32))


@pytest.mark.parametrize("kind", ["mlp", "linear"])
@pytest.mark.parametrize("dtype,block,stride", [(torch.float64, 8, 4), (torch.float32, 8, 2),
                                                (torch.bfloat16, 8, 4)])
def test_block_kernels_match_the_torch_path(monkeypatch, kind, dtype, block, stride):
    """The Triton block gather (GPU default; here the interpreter) against torch indexing:
    same output, same gradients (the kernel sums a token's block slots in fp32 / fp64)."""
    import nsa_megatron.compression as compression
    from nsa_kernels.interpreter import enable_interpreter_bf16_dot

    if not torch.cuda.is_available():
        assert enable_interpreter_bf16_dot()  # bf16 stores round to nearest even, as on a GPU
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    comp = build_compressor(kind, 2, 6, block, stride, params_dtype=torch.float64).to(dev, dtype)
    with torch.no_grad():
        for p in comp.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cu = torch.tensor([0, 7, 29, 30, 70], dtype=torch.int32, device=dev)
    x = torch.randn(70, 2, 6, dtype=torch.float64, device=dev).to(dtype)
    dout = torch.randn(compressed_cu_seqlens(cu, block, stride)[-1].item(), 2, 6, device=dev).to(dtype)
    results = []
    for use_kernels in (False, True):
        monkeypatch.setattr(compression, "USE_KERNELS", use_kernels)
        xi = x.clone().requires_grad_()
        comp.zero_grad()
        out = comp(xi, cu)
        out.backward(dout)
        results.append([out.detach(), xi.grad] + [p.grad.clone() for p in comp.parameters()])
    assert torch.equal(results[0][0], results[1][0])
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    for a, b in zip(results[0][1:], results[1][1:]):
        assert (a.double() - b.double()).abs().max() <= tol * a.double().abs().max()
    assert results[1][1][:7].abs().sum() == 0  # no whole block in the 7-token sequence
