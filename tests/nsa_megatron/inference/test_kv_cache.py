"""KV cache and decode-step API without a model: incremental compression, backends agree."""
import pytest
import torch

from nsa_kernels.layout import num_compressed
from nsa_megatron.compression import build_compressor
from nsa_megatron.inference.decode import chunk_attention, decode_attention
from nsa_megatron.inference.kv_cache import NSALayerCache, StepPlan

L, D = 8, 4  # cmp_block, cmp_stride
HP = dict(cmp_block=L, cmp_stride=D, slc_block=16, topk=3, window=12, init_blocks=1, local_blocks=1)


def _rope(x, pos):
    """A position-dependent map standing in for RoPE (only its positions matter here)."""
    return x * torch.cos(pos.to(x.dtype))[:, None, None] + 0.5 * torch.sin(pos.to(x.dtype))[:, None, None]


def test_compressed_cache_grows_incrementally():
    torch.manual_seed(0)
    hkv, dqk, dv = 2, 6, 5
    comp_k = build_compressor("mlp", hkv, dqk, L, D)
    comp_v = build_compressor("linear", hkv, dv, L, D)
    lengths = [3, 29, 40]
    src_k = [torch.randn(n, hkv, dqk) for n in lengths]
    src_v = [torch.randn(n, hkv, dv) for n in lengths]
    cache = NSALayerCache(3, 48, hkv, dqk, dv, cmp_block=L, cmp_stride=D, independent=False,
                          dtype=torch.float32, device=torch.device("cpu"))
    done = [0, 0, 0]
    calls, bounds = [], []
    counting_k = lambda x, cu: (calls.append(x.shape[0]), comp_k(x, cu))[1]  # noqa: E731
    # prefill pieces of uneven sizes (some longer than l), then single tokens
    schedule = [[(0, 2), (1, 11), (2, 17)], [(1, 9), (2, 1)], [(0, 1), (2, 13)]]
    schedule += [[(b, 1) for b in range(3)] for _ in range(9)]
    with torch.no_grad():
        for step in schedule:
            step = [(b, c) for b, c in step if done[b] < lengths[b]]
            seqs = [b for b, _ in step]
            counts = [min(c, lengths[b] - done[b]) for b, c in step]
            plan = StepPlan(seqs, [done[b] for b in seqs], counts, L, D, torch.device("cpu"))
            xk = torch.cat([src_k[b][done[b]:done[b] + c] for b, c in zip(seqs, counts)])
            xv = torch.cat([src_v[b][done[b]:done[b] + c] for b, c in zip(seqs, counts)])
            cache.append(plan, xk, xv)
            cache.compress(plan, xk, xv, counting_k, comp_v, _rope)
            if plan.has_compression:
                bounds.append(plan.num_tokens + len(seqs) * (L - D))
            for b, c in zip(seqs, counts):
                done[b] += c
        assert done == lengths
        for b, n in enumerate(lengths):
            cu = torch.tensor([0, n], dtype=torch.int32)
            nc = num_compressed(n, L, D)
            want_k = _rope(comp_k(src_k[b], cu), torch.arange(nc) * D + L - 1)
            k_c, v_c = cache.compressed_prefix(b, n)
            torch.testing.assert_close(k_c, want_k, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(v_c, comp_v(src_v[b], cu), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(cache.k[b, :n], src_k[b])
    # each call compressed only the step's new blocks: inputs <= new tokens + (l - d) per sequence
    assert all(n <= bound for n, bound in zip(calls, bounds)), (calls, bounds)


def _filled_cache(lengths, hkv, dqk, dv, dtype, independent):
    gen = torch.Generator().manual_seed(3)
    cap = max(lengths) + 3
    cache = NSALayerCache(len(lengths), cap, hkv, dqk, dv, cmp_block=L, cmp_stride=D, independent=independent,
                          dtype=dtype, device=torch.device("cpu"))
    for t in (cache.k, cache.v, cache.k_win, cache.v_win, cache.k_cmp, cache.v_cmp):
        if t is not None:
            t.copy_(torch.randn(t.shape, generator=gen, dtype=dtype))
    return cache, gen


@pytest.mark.parametrize("independent", [True, False])
def test_decode_backends_agree(independent):
    lengths = [1, 9, 26, 45]
    cache, gen = _filled_cache(lengths, 2, 16, 12, torch.float32, independent)
    q = torch.randn(4, 4, 16, generator=gen)
    gates = torch.rand(4, 4, 3, generator=gen)
    lens = torch.tensor(lengths, dtype=torch.int32)
    ref, ref_b = decode_attention(q, gates, cache, lens, hp=HP, scale=0.25, backend="reference",
                                  return_block_indices=True)
    tri, tri_b = decode_attention(q, gates, cache, lens, hp=HP, scale=0.25, backend="triton",
                                  return_block_indices=True)
    assert torch.equal(ref_b, tri_b)
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-5)


def test_chunk_attention_backends_agree():
    lengths = [30, 21]
    cache, gen = _filled_cache(lengths, 2, 16, 12, torch.float32, True)
    plan = StepPlan([1, 0], [5, 17], [16, 13], L, D, torch.device("cpu"))  # chunks ending at 21 and 30
    q = torch.randn(plan.num_tokens, 4, 16, generator=gen)
    gates = torch.rand(plan.num_tokens, 4, 3, generator=gen)
    ref = chunk_attention(q, gates, cache, plan, hp=HP, scale=0.25, backend="reference")
    tri = chunk_attention(q, gates, cache, plan, hp=HP, scale=0.25, backend="triton")
    torch.testing.assert_close(tri, ref, rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise():
    cache, _ = _filled_cache([4, 4], 1, 8, 8, torch.float32, False)
    with pytest.raises(ValueError, match="counts"):
        StepPlan([0], [0], [0], L, D, torch.device("cpu"))
    with pytest.raises(ValueError, match="seqs"):
        StepPlan([0, 0], [0, 1], [1, 1], L, D, torch.device("cpu"))
    with pytest.raises(ValueError, match="capacity"):
        plan = StepPlan([0], [5], [3], L, D, torch.device("cpu"))
        cache.append(plan, torch.zeros(3, 1, 8), torch.zeros(3, 1, 8))
    with pytest.raises(ValueError, match="lengths"):
        decode_attention(torch.zeros(2, 2, 8), torch.zeros(2, 2, 3), cache, torch.ones(3, dtype=torch.int32),
                         hp=HP, scale=1.0, backend="reference")
    with pytest.raises(ValueError, match="hp"):
        decode_attention(torch.zeros(2, 2, 8), torch.zeros(2, 2, 3), cache, torch.ones(2, dtype=torch.int32),
                         hp={}, scale=1.0, backend="reference")
