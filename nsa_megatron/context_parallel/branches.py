"""The NSA branch functions CP calls per segment, on the reference or the Triton kernels.

Every function takes one segment's queries at consecutive positions ``q_pos`` (int64 [S],
``q_pos[0] + arange(S)``) and keys that form a prefix starting at position 0 (the sequence
itself, or a CP key store whose positions were remapped), and returns the branch output and
its natural-log lse. ``reference`` is ``nsa_kernels.reference`` (differentiable by autograd);
``triton`` wraps the kernel launchers (``dense_attention_*``, ``selected_attention_*``,
``select_blocks_triton``) in autograd Functions; the lse is returned without gradient.
"""
from __future__ import annotations

import torch

from nsa_kernels import reference as ref

__all__ = ["get_branches", "BACKENDS"]

BACKENDS = ("auto", "reference", "triton")


def _layout(q: torch.Tensor, q_pos: torch.Tensor, num_keys: int):
    from nsa_kernels.varlen import Varlen

    dev = q.device
    first = int(q_pos[0]) if q_pos.numel() else 0
    layout = Varlen.build(torch.tensor([0, q.shape[0]], dtype=torch.int32, device=dev),
                          torch.tensor([first], dtype=torch.int32, device=dev))
    return layout, torch.tensor([0, num_keys], dtype=torch.int32, device=dev)


class _DenseBranch(torch.autograd.Function):
    """Compressed (key_stride=d, key_offset=l-1) or window (key_stride=1, window=w) attention."""

    @staticmethod
    def forward(ctx, q, k, v, q_pos, key_stride, key_offset, window, scale):
        from nsa_kernels.dense import dense_attention_fwd

        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        layout, k_cu = _layout(q, q_pos, k.shape[0])
        o, lse = dense_attention_fwd(q, k, v, layout, k_cu, key_stride=key_stride, key_offset=key_offset,
                                     window=window, scale=scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.meta = (layout, k_cu, key_stride, key_offset, window, scale)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        from nsa_kernels.dense import dense_attention_bwd

        q, k, v, o, lse = ctx.saved_tensors
        layout, k_cu, key_stride, key_offset, window, scale = ctx.meta
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1)
        dq, dk, dv = dense_attention_bwd(q, k, v, do, lse, delta, layout, k_cu, key_stride=key_stride,
                                         key_offset=key_offset, window=window, scale=scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


class _SelectedBranch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_pos, blocks, slc_block, scale):
        from nsa_kernels.selected import selected_attention_fwd

        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        blocks = blocks.to(torch.int32).contiguous()
        layout, k_cu = _layout(q, q_pos, k.shape[0])
        o, lse = selected_attention_fwd(q, k, v, blocks, layout, k_cu, slc_block=slc_block, scale=scale)
        ctx.save_for_backward(q, k, v, o, lse, blocks)
        ctx.meta = (layout, k_cu, slc_block, scale)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        from nsa_kernels.selected import selected_attention_bwd

        q, k, v, o, lse, blocks = ctx.saved_tensors
        layout, k_cu, slc_block, scale = ctx.meta
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1)
        dq, dk, dv = selected_attention_bwd(q, k, v, do, lse, delta, blocks, layout, k_cu,
                                            slc_block=slc_block, scale=scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


class _Triton:
    """Branch functions on the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""

    @staticmethod
    def compressed_attention(q, k_cmp, v_cmp, q_pos, *, cmp_block, cmp_stride, scale):
        return _DenseBranch.apply(q, k_cmp, v_cmp, q_pos, cmp_stride, cmp_block - 1, 0, scale)

    @staticmethod
    def select(q, k_cmp, q_pos, lse, *, cmp_block, cmp_stride, slc_block, topk, init_blocks, local_blocks,
               scale):
        from nsa_kernels.selection import select_blocks_triton

        layout, kc_cu = _layout(q, q_pos, k_cmp.shape[0])
        with torch.no_grad():
            return select_blocks_triton(q.detach().contiguous(), k_cmp.detach().contiguous(), lse.contiguous(),
                                        layout, kc_cu, cmp_block=cmp_block, cmp_stride=cmp_stride,
                                        slc_block=slc_block, topk=topk, init_blocks=init_blocks,
                                        local_blocks=local_blocks, scale=scale)

    @staticmethod
    def selected_attention(q, k, v, q_pos, blocks, *, slc_block, scale):
        return _SelectedBranch.apply(q, k, v, q_pos, blocks, slc_block, scale)

    @staticmethod
    def window_attention(q, k, v, q_pos, *, window, scale):
        return _DenseBranch.apply(q, k, v, q_pos, 1, 0, window, scale)


class _Reference:
    """Branch functions of ``nsa_kernels.reference`` (any device and dtype)."""

    compressed_attention = staticmethod(ref.compressed_attention)
    selected_attention = staticmethod(ref.selected_attention)
    window_attention = staticmethod(ref.window_attention)

    @staticmethod
    def select(q, k_cmp, q_pos, lse, *, cmp_block, cmp_stride, slc_block, topk, init_blocks, local_blocks,
               scale):
        end = int(q_pos[-1]) + 1 if q_pos.numel() else 0
        scores = ref.selection_scores(q, k_cmp, q_pos, lse, cmp_block=cmp_block, cmp_stride=cmp_stride,
                                      slc_block=slc_block, scale=scale, num_blocks=-(-end // slc_block))
        return ref.select_blocks(scores, q_pos, slc_block=slc_block, topk=topk, init_blocks=init_blocks,
                                 local_blocks=local_blocks)


def get_branches(backend: str, device: torch.device):
    """Branch functions for ``backend`` ("reference", "triton", or "auto": Triton on CUDA)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "reference"
    return _Triton if backend == "triton" else _Reference
