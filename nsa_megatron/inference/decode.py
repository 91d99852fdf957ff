"""NSA attention of new tokens against an :class:`NSALayerCache`: decode steps and prefill chunks.

Both compute NSA_SPEC.md for queries at positions t against the sequence's cached prefix
[0, t] (the step's own tokens are appended to the cache first):

* ``decode_attention``: one query per sequence of the batch (all G heads of a group
  together). ``backend="reference"`` evaluates the reference branch functions sequence by
  sequence (any device, host loop); ``"triton"`` runs ``nsa_kernels.decode`` (GPU, or CPU
  under TRITON_INTERPRET=1), batched over sequences of different lengths without host syncs.
* ``chunk_attention``: a pack of query chunks at positions [a_b, e_b) (chunked prefill of
  long prompts); reference branch functions, or the training kernels' branch launchers
  with query-position offsets.

``hp`` is the dict of NSA hyper-parameters (cmp_block, cmp_stride, slc_block, topk, window,
init_blocks, local_blocks), as ``NSACoreAttention.hparams``.
"""
from __future__ import annotations

import torch

from nsa_kernels import reference as R
from nsa_kernels.layout import num_compressed

from .kv_cache import NSALayerCache, StepPlan

__all__ = ["branch_attention_reference", "decode_attention", "chunk_attention", "resolve_decode_backend"]

_HP_KEYS = ("cmp_block", "cmp_stride", "slc_block", "topk", "window", "init_blocks", "local_blocks")


def resolve_decode_backend(backend: str, device: torch.device) -> str:
    """``"auto"`` -> ``"triton"`` on CUDA, ``"reference"`` elsewhere; others pass through."""
    if backend not in ("auto", "reference", "triton"):
        raise ValueError(f"backend must be 'auto', 'reference' or 'triton', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "reference"
    return backend


def _check_hp(hp: dict) -> dict:
    missing = [k for k in _HP_KEYS if k not in hp]
    if missing:
        raise ValueError(f"hp: missing NSA hyper-parameters {missing}")
    return {k: int(hp[k]) for k in _HP_KEYS}


def branch_attention_reference(q, gates, k, v, k_win, v_win, k_cmp, v_cmp, q_pos, hp: dict, scale: float):
    """NSA of queries at positions ``q_pos`` against one sequence's prefix (reference).

    Args:
        q: [Tq, HQ, Dqk] (RoPE applied); gates: [Tq, HQ, 3]; q_pos: int64 [Tq].
        k, v, k_win, v_win: [Lk, HKV, D*] the sequence's prefix, Lk > max(q_pos).
        k_cmp, v_cmp: [Lc, HKV, D*] its compressed tokens visible to the last query.
    Returns:
        (o [Tq, HQ, Dv] in the accumulation dtype, block indices int32 [Tq, HKV, topk]).
    """
    hp = _check_hp(hp)
    o_c, lse_c = R.compressed_attention(q, k_cmp, v_cmp, q_pos, cmp_block=hp["cmp_block"],
                                        cmp_stride=hp["cmp_stride"], scale=scale)
    nb = -(-k.shape[0] // hp["slc_block"])
    scores = R.selection_scores(q, k_cmp, q_pos, lse_c, cmp_block=hp["cmp_block"], cmp_stride=hp["cmp_stride"],
                                slc_block=hp["slc_block"], scale=scale, num_blocks=nb)
    blocks = R.select_blocks(scores, q_pos, slc_block=hp["slc_block"], topk=hp["topk"],
                             init_blocks=hp["init_blocks"], local_blocks=hp["local_blocks"])
    o_s, _ = R.selected_attention(q, k, v, q_pos, blocks, slc_block=hp["slc_block"], scale=scale)
    o_w, _ = R.window_attention(q, k_win, v_win, q_pos, window=hp["window"], scale=scale)
    g = gates.to(o_c.dtype)
    return g[..., 0:1] * o_c + g[..., 1:2] * o_s + g[..., 2:3] * o_w, blocks


def decode_attention(q: torch.Tensor, gates: torch.Tensor, cache: NSALayerCache, lengths: torch.Tensor, *,
                     hp: dict, scale: float, backend: str = "auto", return_block_indices: bool = False):
    """One decode step of NSA for every sequence of the cache.

    Args:
        q: [B, HQ, Dqk] the new token of each sequence (RoPE at position lengths[b] - 1).
        gates: [B, HQ, 3] sigmoided gates.
        cache: the layer cache, the new tokens already appended (and compressed).
        lengths: int32 [B] cache lengths including the new token (>= 1), on q's device.
        hp: NSA hyper-parameters; scale: softmax scale.
        backend: "reference" | "triton" | "auto".
    Returns:
        o [B, HQ, Dv] in q's dtype (and int32 [B, HKV, topk] selected blocks when asked).
    """
    if q.dim() != 3 or q.shape[0] != cache.batch:
        raise ValueError(f"q must be [B={cache.batch}, HQ, Dqk], got {tuple(q.shape)}")
    if gates.shape != (q.shape[0], q.shape[1], 3):
        raise ValueError(f"gates must be [{q.shape[0]}, {q.shape[1]}, 3], got {tuple(gates.shape)}")
    if lengths.shape != (q.shape[0],):
        raise ValueError(f"lengths must be [{q.shape[0]}], got {tuple(lengths.shape)}")
    hp = _check_hp(hp)
    if resolve_decode_backend(backend, q.device) == "triton":
        from nsa_kernels.decode import nsa_decode

        out = nsa_decode(q, cache.k, cache.v, cache.k_cmp, cache.v_cmp, gates, lengths, k_win=cache.window_k,
                         v_win=cache.window_v, scale=scale, return_block_indices=return_block_indices, **hp)
        return out
    outs, picks = [], []
    for b, length in enumerate(lengths.tolist()):
        if not 1 <= length <= cache.capacity:
            raise ValueError(f"lengths[{b}]={length}: must be in [1, capacity={cache.capacity}]")
        k_cmp, v_cmp = cache.compressed_prefix(b, length)
        pos = torch.tensor([length - 1], dtype=torch.int64, device=q.device)
        o, blocks = branch_attention_reference(
            q[b:b + 1], gates[b:b + 1], cache.k[b, :length], cache.v[b, :length], cache.window_k[b, :length],
            cache.window_v[b, :length], k_cmp, v_cmp, pos, hp, scale)
        outs.append(o)
        picks.append(blocks)
    out = torch.cat(outs).to(q.dtype)
    return (out, torch.cat(picks)) if return_block_indices else out


def chunk_attention(q: torch.Tensor, gates: torch.Tensor, cache: NSALayerCache, plan: StepPlan, *, hp: dict,
                    scale: float, backend: str = "auto") -> torch.Tensor:
    """NSA of a step's packed tokens against their sequences' cached prefixes.

    Args:
        q: [T, HQ, Dqk] packed like ``plan`` (RoPE applied); gates: [T, HQ, 3].
        cache: the layer cache with the step's tokens already appended and compressed.
        plan: the step (sequences, first positions, counts).
    Returns:
        o [T, HQ, Dv] in q's dtype.
    """
    if q.shape[0] != plan.num_tokens or gates.shape[0] != plan.num_tokens:
        raise ValueError(f"q and gates must have the plan's {plan.num_tokens} rows, got {q.shape[0]}, {gates.shape[0]}")
    hp = _check_hp(hp)
    if resolve_decode_backend(backend, q.device) == "triton":
        return _chunk_attention_triton(q, gates, cache, plan, hp, scale)
    outs = []
    for i, (b, a, e) in enumerate(zip(plan.seqs, plan.starts, plan.ends)):
        rows = slice(plan.cu_host[i], plan.cu_host[i + 1])
        k_cmp, v_cmp = cache.compressed_prefix(b, e)
        pos = torch.arange(a, e, dtype=torch.int64, device=q.device)
        o, _ = branch_attention_reference(q[rows], gates[rows], cache.k[b, :e], cache.v[b, :e],
                                          cache.window_k[b, :e], cache.window_v[b, :e], k_cmp, v_cmp, pos, hp, scale)
        outs.append(o)
    return torch.cat(outs).to(q.dtype)


def _chunk_attention_triton(q, gates, cache, plan, hp, scale):
    """The training kernels' branch launchers on the pack, keys = the sequences' cached prefixes."""
    from nsa_kernels.dense import dense_attention_fwd
    from nsa_kernels.selected import selected_attention_fwd
    from nsa_kernels.selection import select_blocks_triton
    from nsa_kernels.varlen import Varlen

    dev = q.device
    l, d = hp["cmp_block"], hp["cmp_stride"]
    ncmp = [num_compressed(e, l, d) for e in plan.ends]
    cat = lambda t, n: torch.cat([t[b, :m] for b, m in zip(plan.seqs, n)]).contiguous()  # noqa: E731
    k, v = cat(cache.k, plan.ends), cat(cache.v, plan.ends)
    kw, vw = (k, v) if cache.k_win is None else (cat(cache.k_win, plan.ends), cat(cache.v_win, plan.ends))
    kc, vc = cat(cache.k_cmp, ncmp), cat(cache.v_cmp, ncmp)
    cu = lambda n: torch.tensor([0] + list(torch.tensor(n).cumsum(0).tolist()), dtype=torch.int32, device=dev)  # noqa: E731
    k_cu, kc_cu = cu(plan.ends), cu(ncmp)
    layout = Varlen.build(plan.cu, torch.tensor(plan.starts, dtype=torch.int32, device=dev))
    qc = q.contiguous()
    o_c, lse_c = dense_attention_fwd(qc, kc, vc, layout, kc_cu, key_stride=d, key_offset=l - 1, window=0, scale=scale)
    blocks = select_blocks_triton(qc, kc, lse_c, layout, kc_cu, cmp_block=l, cmp_stride=d,
                                  slc_block=hp["slc_block"], topk=hp["topk"], init_blocks=hp["init_blocks"],
                                  local_blocks=hp["local_blocks"], scale=scale)
    o_s, _ = selected_attention_fwd(qc, k, v, blocks, layout, k_cu, slc_block=hp["slc_block"], scale=scale)
    o_w, _ = dense_attention_fwd(qc, kw, vw, layout, k_cu, key_stride=1, key_offset=0, window=hp["window"],
                                 scale=scale)
    g = gates.float()
    o = g[..., 0:1] * o_c.float() + g[..., 1:2] * o_s.float() + g[..., 2:3] * o_w.float()
    return o.to(q.dtype)
