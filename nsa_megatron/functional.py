"""Public functional API: ``nsa_attention`` (NSA_SPEC.md, "Functional entry point").

Arguments are validated once here; the chosen backend then receives clean inputs.
"""
from __future__ import annotations

from typing import Optional

import torch

from nsa_kernels.reference import nsa_attention_reference
from nsa_kernels.validation import validate_nsa_inputs

__all__ = ["nsa_attention", "resolve_backend"]

_BACKENDS = ("auto", "reference", "triton")


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to ``"triton"`` on CUDA (when Triton imports) and ``"reference"`` elsewhere."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "reference"
    return backend


def nsa_attention(
    q, k, v, k_cmp, v_cmp, gates, cu_seqlens: Optional[torch.Tensor] = None, *,
    cmp_block: int = 32, cmp_stride: int = 16, slc_block: int = 64, topk: int = 16, window: int = 512,
    init_blocks: int = 1, local_blocks: int = 2, scale: Optional[float] = None,
    k_win: Optional[torch.Tensor] = None, v_win: Optional[torch.Tensor] = None,
    backend: str = "auto", return_block_indices: bool = False,
):
    """Native Sparse Attention over packed sequences.

    Every query attends through three branches mixed by its gates: compressed block tokens,
    the ``topk`` selection blocks of ``slc_block`` tokens chosen from the compressed scores
    (shared by the heads of a GQA group), and a causal window of ``window`` tokens.

    Args:
        q: [T, HQ, Dqk] queries, RoPE applied.
        k, v: [T, HKV, Dqk], [T, HKV, Dv] selection-branch keys (RoPE applied) and values.
        k_cmp, v_cmp: [Tc, HKV, Dqk], [Tc, HKV, Dv] compressed tokens packed per sequence
            (``nsa_kernels.layout.compressed_cu_seqlens`` gives their boundaries).
        gates: [T, HQ, 3] in [0, 1], order (cmp, slc, win).
        cu_seqlens: int32 [N+1] boundaries of the packed sequences (None: one sequence).
        cmp_block, cmp_stride, slc_block, topk, window, init_blocks, local_blocks: l, d, l',
            n, w and the forced blocks; constraints d | l, d | l', l <= l', topk >= forced.
        scale: softmax scale, default 1/sqrt(Dqk).
        k_win, v_win: window-branch keys/values, shaped like k, v (None: use k, v).
        backend: "reference" (plain PyTorch, any device/dtype), "triton" (kernels: CUDA, or
            CPU under TRITON_INTERPRET=1), or "auto" (triton on CUDA, else reference).
        return_block_indices: also return the selected blocks.
    Returns:
        o [T, HQ, Dv] in q's dtype; with ``return_block_indices`` also int32 [T, HKV, topk]
        (ascending, -1 padded).
    Raises:
        ValueError naming the argument on bad shapes, dtypes, devices, cu_seqlens or
        hyper-parameters.
    """
    hparams = dict(cmp_block=cmp_block, cmp_stride=cmp_stride, slc_block=slc_block, topk=topk,
                   window=window, init_blocks=init_blocks, local_blocks=local_blocks)
    args = validate_nsa_inputs(q, k, v, k_cmp, v_cmp, gates, cu_seqlens, k_win, v_win, scale=scale, **hparams)
    chosen = resolve_backend(backend, q.device)
    if chosen == "reference":
        return nsa_attention_reference(q, k, v, k_cmp, v_cmp, gates, args.cu_seqlens, scale=args.scale,
                                       k_win=k_win, v_win=v_win, return_block_indices=return_block_indices,
                                       _args=args, **hparams)
    from nsa_kernels.function import nsa_attention_triton

    return nsa_attention_triton(q, k, v, k_cmp, v_cmp, gates, args.cu_seqlens, scale=args.scale,
                                k_win=k_win, v_win=v_win, return_block_indices=return_block_indices, **hparams)
