"""The NSA branch functions CP calls over all of a rank's segments, on the reference or the Triton kernels.

Two calls per layer and rank: ``compressed_and_select`` (branch 1 and the top-n blocks) and
``attend`` (branches 2 and 3 and the gated sum). Segment b of a ``plan.SegLayout`` has queries at
consecutive positions from ``pos0[b]`` and a key run that is a prefix from position 0 (of the
sequence, or of a CP key store whose positions were remapped). ``triton`` launches each kernel
once over all segments (the kernels' packed ``Varlen`` layout) and fuses the gated sum and every
branch's backward into one autograd Function, like the one-GPU path; ``reference`` runs
``nsa_kernels.reference`` segment by segment under autograd.
"""
from __future__ import annotations

import torch

from nsa_kernels import reference as ref

__all__ = ["get_branches", "BACKENDS"]

BACKENDS = ("auto", "reference", "triton")


def _segments(lay):
    """(query rows, key rows, first position) of every segment of a ``SegLayout``."""
    for b in range(lay.num_segments):
        yield slice(lay.q_cu[b], lay.q_cu[b + 1]), slice(lay.k_cu[b], lay.k_cu[b + 1]), lay.pos0[b]


class _CPAttention(torch.autograd.Function):
    """Selected + window branches and the gated sum over all segments (one launch each), with the
    compressed branch's backward: the CP counterpart of ``nsa_kernels.function.NSATritonFunction``.

    The compressed branch's forward (o_cmp, lse_cmp) ran before (selection needs it); it comes in
    as non-differentiable tensors and its backward runs here, from the saved inputs.
    """

    @staticmethod
    def forward(ctx, q, kc, vc, ks, vs, kw, vw, gates, o_cmp, lse_cmp, blocks, meta):
        from nsa_kernels.dense import dense_attention_fwd
        from nsa_kernels.selected import selected_attention_fwd

        lay_c, lay_s, lay_w, hp, scale, shared = meta
        o_slc, lse_slc = selected_attention_fwd(q, ks, vs, blocks, lay_s.varlen(), lay_s.k_cu_dev(),
                                                slc_block=hp.slc_block, scale=scale)
        # the window kernel also writes the gated sum of the three branches
        o_win, lse_win, o = dense_attention_fwd(q, kw, vw, lay_w.varlen(), lay_w.k_cu_dev(), key_stride=1,
                                                key_offset=0, window=hp.window, scale=scale,
                                                combine=(o_cmp, o_slc, gates))
        ctx.save_for_backward(q, kc, vc, ks, vs, kw, vw, gates, blocks, o_cmp, o_slc, o_win, lse_cmp, lse_slc,
                              lse_win)
        ctx.meta = meta
        return o

    @staticmethod
    def backward(ctx, do):
        from nsa_kernels.dense import dense_attention_bwd
        from nsa_kernels.selected import selected_attention_bwd
        from nsa_kernels.varlen import new_empty

        q, kc, vc, ks, vs, kw, vw, gates, blocks, o_cmp, o_slc, o_win, lse_c, lse_s, lse_w = ctx.saved_tensors
        lay_c, lay_s, lay_w, hp, scale, shared = ctx.meta
        do = do.contiguous()
        # each branch's dQ kernel writes its gate gradient and delta (``fuse``), as in the one-GPU path
        dgates = new_empty(*gates.shape, dtype=gates.dtype, device=gates.device)
        dq, dkc, dvc = dense_attention_bwd(q, kc, vc, do, lse_c, None, lay_c.varlen(), lay_c.k_cu_dev(),
                                           key_stride=hp.cmp_stride, key_offset=hp.cmp_block - 1, window=0,
                                           scale=scale, gate=gates[:, :, 0], fuse=(o_cmp, dgates[:, :, 0]))
        _, dks, dvs = selected_attention_bwd(q, ks, vs, do, lse_s, None, blocks, lay_s.varlen(),
                                             lay_s.k_cu_dev(), slc_block=hp.slc_block, scale=scale,
                                             gate=gates[:, :, 1], dq_acc=dq, fuse=(o_slc, dgates[:, :, 1]))
        acc = (dks, dvs) if shared else (None, None)
        _, dkw, dvw = dense_attention_bwd(q, kw, vw, do, lse_w, None, lay_w.varlen(), lay_w.k_cu_dev(),
                                          key_stride=1, key_offset=0, window=hp.window, scale=scale,
                                          gate=gates[:, :, 2], dq_acc=dq, dk_acc=acc[0], dv_acc=acc[1],
                                          fuse=(o_win, dgates[:, :, 2]))
        win = (None, None) if shared else (dkw.to(kw.dtype), dvw.to(vw.dtype))
        return (dq.to(q.dtype), dkc.to(kc.dtype), dvc.to(vc.dtype), dks.to(ks.dtype), dvs.to(vs.dtype), *win,
                dgates, None, None, None, None)


class _Triton:
    """Branch functions on the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1): one launch
    per kernel over all of a rank's segments."""

    @staticmethod
    def compressed_and_select(q, kc, vc, lay_c, hp, scale):
        """(o_cmp, lse_cmp, blocks) of every segment, without autograd (``attend`` differentiates)."""
        from nsa_kernels.dense import dense_attention_fwd
        from nsa_kernels.selection import select_blocks_triton

        with torch.no_grad():
            q, kc, vc = q.detach().contiguous(), kc.detach().contiguous(), vc.detach().contiguous()
            o, lse = dense_attention_fwd(q, kc, vc, lay_c.varlen(), lay_c.k_cu_dev(), key_stride=hp.cmp_stride,
                                         key_offset=hp.cmp_block - 1, window=0, scale=scale)
            blocks = select_blocks_triton(q, kc, lse, lay_c.varlen(), lay_c.k_cu_dev(), cmp_block=hp.cmp_block,
                                          cmp_stride=hp.cmp_stride, slc_block=hp.slc_block, topk=hp.topk,
                                          init_blocks=hp.init_blocks, local_blocks=hp.local_blocks, scale=scale)
        return o, lse, blocks

    @staticmethod
    def attend(q, kc, vc, ks, vs, kw, vw, gates, cmp_out, blocks, lay_c, lay_s, lay_w, hp, scale):
        """o [R, HQ, Dv] in q's dtype: gated sum of the three branches (see ``_CPAttention``)."""
        o_cmp, lse_cmp, _ = cmp_out
        shared = kw is ks and vw is vs
        args = [t.contiguous() for t in (q, kc, vc, ks, vs)]
        win = args[3:5] if shared else [kw.contiguous(), vw.contiguous()]
        return _CPAttention.apply(*args, *win, gates.contiguous(), o_cmp, lse_cmp,
                                  blocks.to(torch.int32).contiguous(),
                                  (lay_c, lay_s, lay_w, hp, scale, shared))


class _Reference:
    """Branch functions of ``nsa_kernels.reference`` (any device and dtype), segment by segment."""

    @staticmethod
    def compressed_and_select(q, kc, vc, lay_c, hp, scale):
        """(o_cmp with autograd, lse, blocks) of every segment."""
        outs, lses, picks = [], [], []
        for rows, keys, pos0 in _segments(lay_c):
            q_g = q[rows]
            q_pos = torch.arange(pos0, pos0 + q_g.shape[0], device=q.device)
            o, lse = ref.compressed_attention(q_g, kc[keys], vc[keys], q_pos, cmp_block=hp.cmp_block,
                                              cmp_stride=hp.cmp_stride, scale=scale)
            end = pos0 + q_g.shape[0]
            scores = ref.selection_scores(q_g, kc[keys], q_pos, lse, cmp_block=hp.cmp_block,
                                          cmp_stride=hp.cmp_stride, slc_block=hp.slc_block, scale=scale,
                                          num_blocks=-(-end // hp.slc_block))
            picks.append(ref.select_blocks(scores, q_pos, slc_block=hp.slc_block, topk=hp.topk,
                                           init_blocks=hp.init_blocks, local_blocks=hp.local_blocks))
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses), torch.cat(picks).to(torch.int32)

    @staticmethod
    def attend(q, kc, vc, ks, vs, kw, vw, gates, cmp_out, blocks, lay_c, lay_s, lay_w, hp, scale):
        """o [R, HQ, Dv] in q's dtype (gated sum in float32, float64 for float64)."""
        o_cmp = cmp_out[0]
        outs = []
        for (rows, k_s, p_s), (_, k_w, p_w) in zip(_segments(lay_s), _segments(lay_w)):
            q_g = q[rows]
            n = q_g.shape[0]
            o_slc, _ = ref.selected_attention(q_g, ks[k_s], vs[k_s], torch.arange(p_s, p_s + n, device=q.device),
                                              blocks[rows], slc_block=hp.slc_block, scale=scale)
            o_win, _ = ref.window_attention(q_g, kw[k_w], vw[k_w], torch.arange(p_w, p_w + n, device=q.device),
                                            window=hp.window, scale=scale)
            outs.append(_gated_sum(gates[rows], o_cmp[rows], o_slc, o_win))
        out = torch.cat(outs) if outs else q.new_zeros(0, q.shape[1], vs.shape[-1])
        return out.to(q.dtype)


def _gated_sum(gates_c, o_cmp, o_slc, o_win):
    acc = torch.promote_types(o_cmp.dtype, torch.float32)
    g = gates_c.to(acc)
    return g[..., 0:1] * o_cmp.to(acc) + g[..., 1:2] * o_slc.to(acc) + g[..., 2:3] * o_win.to(acc)


def get_branches(backend: str, device: torch.device):
    """Branch functions for ``backend`` ("reference", "triton", or "auto": Triton on CUDA)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "reference"
    return _Triton if backend == "triton" else _Reference
