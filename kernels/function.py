"""NSA attention through the Triton kernels: autograd.Function and the public entry point.

Forward: compressed attention (-> lse) -> block scores + top-n -> selected attention ->
sliding window -> gated sum. Backward: each branch's dQ kernel (which also computes its
gate gradient and delta = rowsum(d o_b * o_b), and stores the gated dO) then its dK/dV
kernel, summing into fp32 (dQ shared by the three branches; dK/dV shared by the selected
and window branches when they use the same keys): the first kernel of a sum stores its
term, the last writes the input dtype. See README.md for the maths.
Only the forward reads anything back from the device (the sequence lengths, once per
``cu_seqlens`` tensor: ``host_cache``).
"""
from __future__ import annotations

import torch

from .dense import LocalBlocks, dense_attention_bwd, dense_attention_fwd, interpreting
from .layout import compressed_cu_seqlens
from .selected import selected_attention_bwd, selected_attention_fwd
from .selection import select_blocks_triton
from .varlen import Varlen, int32_on, new_empty


def _grad_out(x: torch.Tensor):
    """Tensor a gradient sum of ``x`` is written to by its last kernel: None (the fp32
    accumulator itself) for fp32 inputs, else a new tensor in ``x``'s dtype."""
    return None if x.dtype == torch.float32 else new_empty(*x.shape, dtype=x.dtype, device=x.device)


# whether the window forward kernel attends the selected branch's local blocks
# (dense.LocalBlocks), per window K/V: "shared" (k_win is k) or "independent"
LOCAL_IN_WINDOW = {"shared": True, "independent": False}


def _local_in_window(hp: dict, shared: bool) -> int:
    """local_blocks when the window kernel takes over the selected branch's local blocks, else
    0: they must lie in the window and be forced beside the initial blocks (so the selected
    kernel finds the others in the first topk - local_blocks entries)."""
    n = hp["local_blocks"]
    fits = (hp["window"] > 0 and n >= 1 and hp["init_blocks"] + n <= hp["topk"]
            and n * hp["slc_block"] <= hp["window"])
    return n if fits and LOCAL_IN_WINDOW["shared" if shared else "independent"] else 0


def _forward(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cu_seqlens, hp, scale):
    layout = Varlen.build(cu_seqlens)
    kc_cu = compressed_cu_seqlens(cu_seqlens, hp["cmp_block"], hp["cmp_stride"])
    o_cmp, lse_cmp = dense_attention_fwd(q, k_cmp, v_cmp, layout, kc_cu, key_stride=hp["cmp_stride"],
                                         key_offset=hp["cmp_block"] - 1, window=0, scale=scale)
    blocks = select_blocks_triton(q, k_cmp, lse_cmp, layout, kc_cu, cmp_block=hp["cmp_block"],
                                  cmp_stride=hp["cmp_stride"], slc_block=hp["slc_block"],
                                  topk=hp["topk"], init_blocks=hp["init_blocks"],
                                  local_blocks=hp["local_blocks"], scale=scale)
    n_local = _local_in_window(hp, k_win is k and v_win is v)
    o_slc, lse_slc = selected_attention_fwd(q, k, v, blocks, layout, cu_seqlens,
                                            slc_block=hp["slc_block"], scale=scale,
                                            skip_local=n_local)
    local = LocalBlocks(k, v, o_slc, lse_slc, hp["slc_block"], n_local) if n_local else None
    # the window kernel also writes the gated sum of the three branches (combine_fwd fused)
    o_win, lse_win, o = dense_attention_fwd(q, k_win, v_win, layout, cu_seqlens, key_stride=1,
                                            key_offset=0, window=hp["window"], scale=scale,
                                            combine=(o_cmp, o_slc, gates), local=local)
    return o, blocks, layout, kc_cu, (o_cmp, o_slc, o_win), (lse_cmp, lse_slc, lse_win)


class NSATritonFunction(torch.autograd.Function):
    """(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cu_seqlens, hp, scale) -> (o, blocks).

    ``k_win``/``v_win`` may be the same tensors as ``k``/``v`` (shared branch keys); all
    tensors contiguous; ``blocks`` is non-differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, k_cmp, v_cmp, gates, k_win, v_win, cu_seqlens, hp, scale):
        o, blocks, layout, kc_cu, outs, lses = _forward(q, k, v, k_cmp, v_cmp, gates, k_win,
                                                        v_win, cu_seqlens, hp, scale)
        ctx.save_for_backward(q, k, v, k_cmp, v_cmp, gates, k_win, v_win, blocks, *outs, *lses)
        # the key boundaries stay the tensors the layout knows on the host (no read-back)
        ctx.cu, ctx.kc_cu = layout.q_cu, kc_cu
        ctx.layout, ctx.hp, ctx.scale = layout, hp, scale
        ctx.shared_win = hp["shared_win"]
        ctx.mark_non_differentiable(blocks)
        return o, blocks

    @staticmethod
    def backward(ctx, do, _unused):
        (q, k, v, k_cmp, v_cmp, gates, k_win, v_win, blocks, o_cmp, o_slc, o_win,
         lse_cmp, lse_slc, lse_win) = ctx.saved_tensors
        hp, scale, layout, cu, kc_cu = ctx.hp, ctx.scale, ctx.layout, ctx.cu, ctx.kc_cu
        do = do.contiguous()
        # each branch's dQ kernel also does its part of the gate/delta step (combine_bwd):
        # d gates[..., b] = rowsum(do * o_b) and delta_b = gates[..., b] * that
        dgates = new_empty(*gates.shape, dtype=gates.dtype, device=gates.device)
        dq, dkc, dvc = dense_attention_bwd(
            q, k_cmp, v_cmp, do, lse_cmp, None, layout, kc_cu, key_stride=hp["cmp_stride"],
            key_offset=hp["cmp_block"] - 1, window=0, scale=scale, gate=gates[:, :, 0],
            dk_out=_grad_out(k_cmp), dv_out=_grad_out(v_cmp), fuse=(o_cmp, dgates[:, :, 0]))
        shared = ctx.shared_win
        _, dk, dv = selected_attention_bwd(
            q, k, v, do, lse_slc, None, blocks, layout, cu, slc_block=hp["slc_block"],
            scale=scale, gate=gates[:, :, 1], dq_acc=dq,
            dk_out=None if shared else _grad_out(k), dv_out=None if shared else _grad_out(v),
            fuse=(o_slc, dgates[:, :, 1]))
        win_acc = (dk, dv) if shared else (None, None)
        dq, dkw, dvw = dense_attention_bwd(
            q, k_win, v_win, do, lse_win, None, layout, cu, key_stride=1, key_offset=0,
            window=hp["window"], scale=scale, gate=gates[:, :, 2], dq_acc=dq, dq_out=_grad_out(q),
            dk_acc=win_acc[0], dv_acc=win_acc[1], dk_out=_grad_out(k_win),
            dv_out=_grad_out(v_win), fuse=(o_win, dgates[:, :, 2]))
        if shared:
            grads = [dq, dkw, dvw, dkc, dvc, dgates, None, None]
        else:
            grads = [dq, dk, dv, dkc, dvc, dgates, dkw, dvw]
        return (*grads, None, None, None)


def nsa_attention_triton(q, k, v, k_cmp, v_cmp, gates, cu_seqlens, *, cmp_block: int,
                         cmp_stride: int, slc_block: int, topk: int, window: int,
                         init_blocks: int, local_blocks: int, scale: float, k_win=None,
                         v_win=None, return_block_indices: bool = False):
    """NSA attention (NSA_SPEC.md) on the Triton kernels; inputs already validated.

    Args:
        q: [T, HQ, Dqk]; k, v: [T, HKV, Dqk], [T, HKV, Dv] (selection branch);
        k_cmp, v_cmp: [Tc, HKV, Dqk], [Tc, HKV, Dv] compressed tokens packed per sequence;
        gates: [T, HQ, 3] (cmp, slc, win) in [0, 1]; cu_seqlens: int32 [N+1] on q's device
        (None: one sequence); k_win, v_win: window-branch keys/values (None: use k, v).
        Hyper-parameters as in the spec; ``scale`` a float. bf16 / fp16 / fp32 tensors on a
        CUDA device, or CPU tensors under TRITON_INTERPRET=1.
    Returns:
        o [T, HQ, Dv] in q's dtype; with ``return_block_indices`` also int32 [T, HKV, topk].
    """
    if cu_seqlens is None:
        cu_seqlens = int32_on([0, q.shape[0]], q.device)
    if interpreting() and any(t is not None and t.dtype == torch.bfloat16
                              for t in (q, k, v, k_cmp, v_cmp, k_win, v_win)):
        from .interpreter import enable_interpreter_bf16_dot

        enable_interpreter_bf16_dot()
    shared = k_win is None
    q, k, v, k_cmp, v_cmp, gates = (t.contiguous() for t in (q, k, v, k_cmp, v_cmp, gates))
    k_win, v_win = (k, v) if shared else (k_win.contiguous(), v_win.contiguous())
    hp = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, slc_block=slc_block, topk=topk,
              window=window, init_blocks=init_blocks, local_blocks=local_blocks, shared_win=shared)
    o, blocks = NSATritonFunction.apply(q, k, v, k_cmp, v_cmp, gates, k_win, v_win,
                                        cu_seqlens.to(torch.int32).contiguous(), hp, float(scale))
    return (o, blocks) if return_block_indices else o
