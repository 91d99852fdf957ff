"""Random NSA inputs for tests: every tensor drawn fresh, never zeros."""
import torch

from nsa_kernels.layout import num_compressed

SMALL_HP = dict(cmp_block=8, cmp_stride=4, slc_block=16, topk=3, window=20, init_blocks=1, local_blocks=1)
PAPER_HP = dict(cmp_block=32, cmp_stride=16, slc_block=64, topk=16, window=512, init_blocks=1, local_blocks=2)


def make_inputs(seqlens, num_q_heads, num_kv_heads, dqk, dv, hp, *, dtype=torch.float64, device="cpu",
                window_kv=True, seed=0, requires_grad=False):
    """Returns (tensors dict for nsa_attention, cu_seqlens int32 [N+1])."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(seqlens)
    num_cmp = sum(num_compressed(n, hp["cmp_block"], hp["cmp_stride"]) for n in seqlens)

    def rand(*shape):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    tensors = dict(
        q=rand(total, num_q_heads, dqk), k=rand(total, num_kv_heads, dqk), v=rand(total, num_kv_heads, dv),
        k_cmp=rand(num_cmp, num_kv_heads, dqk), v_cmp=rand(num_cmp, num_kv_heads, dv),
        gates=torch.rand(total, num_q_heads, 3, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
        .requires_grad_(requires_grad),
    )
    if window_kv:
        tensors["k_win"] = rand(total, num_kv_heads, dqk)
        tensors["v_win"] = rand(total, num_kv_heads, dv)
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seqlens), 0)
    return tensors, cu.to(device)


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64 (NaN-safe: NaN gives inf)."""
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))
