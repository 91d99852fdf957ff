"""NSA in plain PyTorch: the executable form of NSA_SPEC.md.

Runs on any device and float dtype (float64 included), is differentiable end to end, and
is chunked over queries so memory stays O(T * (T/d + n*l' + w)) instead of O(T^2).

Notation (kernels/README.md): T tokens, HQ query heads, HKV key/value heads, G = HQ/HKV,
Dqk/Dv head dims, l = cmp_block, d = cmp_stride, l' = slc_block, n = topk, w = window.

The one-sequence branch functions take queries with explicit positions ``q_pos`` (0-based
within their sequence) and keys that are the sequence's prefix from position 0, so context
parallelism and decoding can evaluate any subset of queries. Branch outputs come back in the
accumulation dtype (float32, or float64 for float64 inputs) with their log-sum-exp.
"""
from __future__ import annotations

from typing import Optional

import torch

from .validation import NSAArgs, validate_nsa_inputs

__all__ = [
    "nsa_attention_reference",
    "compressed_attention",
    "selection_scores",
    "select_blocks",
    "selected_attention",
    "window_attention",
    "compressed_visibility",
    "block_overlap_weights",
]

# Elements of the largest per-chunk intermediate; bounds reference memory at ~128 MB (fp32).
_CHUNK_BUDGET = 1 << 25


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_size(per_query_elems: int) -> int:
    return max(1, _CHUNK_BUDGET // max(1, per_query_elems))


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor):
    """Softmax over the last dim where ``mask`` is True; rows with nothing visible give 0.

    Returns (probabilities, lse) with lse = -inf on empty rows.
    """
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    expd = torch.exp(scores - row_max)
    denom = expd.sum(dim=-1, keepdim=True)
    probs = expd / torch.where(denom > 0, denom, torch.ones_like(denom))
    lse = (row_max + torch.log(denom)).squeeze(-1)
    return probs, lse


def compressed_visibility(q_pos: torch.Tensor, num_cmp: int, cmp_block: int, cmp_stride: int) -> torch.Tensor:
    """bool [Tq, Lc]: query at position t sees compressed token i iff i*d + l - 1 <= t."""
    last = torch.arange(num_cmp, device=q_pos.device) * cmp_stride + cmp_block - 1
    return last[None, :] <= q_pos[:, None]


def block_overlap_weights(num_cmp: int, num_blocks: int, cmp_block: int, cmp_stride: int, slc_block: int,
                          dtype: torch.dtype, device) -> torch.Tensor:
    """[Lc, NB] overlap(i, j) / d: tokens shared by compressed block i and selection block j."""
    start = torch.arange(num_cmp, device=device)[:, None] * cmp_stride
    blk = torch.arange(num_blocks, device=device)[None, :] * slc_block
    shared = torch.minimum(start + cmp_block, blk + slc_block) - torch.maximum(start, blk)
    return shared.clamp_min(0).to(dtype) / cmp_stride


def _compressed_branch(q, k_cmp, v_cmp, q_pos, cmp_block, cmp_stride, scale):
    """Compressed attention for one chunk: (o [C,HQ,Dv], lse [C,HQ], probs [C,HKV,G,Lc])."""
    acc = _acc_dtype(q.dtype)
    num_q, num_q_heads, _ = q.shape
    num_cmp, num_kv_heads, dv = v_cmp.shape
    group = num_q_heads // num_kv_heads
    if num_cmp == 0:
        empty = q.new_zeros(num_q, num_kv_heads, group, 0, dtype=acc)
        lse = q.new_full((num_q, num_q_heads), float("-inf"), dtype=acc)
        out = q.new_zeros(num_q, num_q_heads, dv, dtype=acc)
        return out, lse, empty
    qg = q.to(acc).view(num_q, num_kv_heads, group, -1)
    scores = torch.einsum("chgd,khd->chgk", qg, k_cmp.to(acc)) * scale
    mask = compressed_visibility(q_pos, num_cmp, cmp_block, cmp_stride)[:, None, None, :]
    probs, lse = _masked_softmax(scores, mask)
    out = torch.einsum("chgk,khd->chgd", probs, v_cmp.to(acc))
    return out.reshape(num_q, num_q_heads, dv), lse.reshape(num_q, num_q_heads), probs


def compressed_attention(q, k_cmp, v_cmp, q_pos, *, cmp_block: int, cmp_stride: int, scale: float):
    """Branch 1 for one sequence.

    Args:
        q: [Tq, HQ, Dqk] queries at positions ``q_pos`` (int64 [Tq]).
        k_cmp, v_cmp: [Lc, HKV, Dqk], [Lc, HKV, Dv] the sequence's compressed tokens 0..Lc-1.
    Returns:
        o [Tq, HQ, Dv] (accumulation dtype; 0 where nothing is visible), lse [Tq, HQ] (-inf there).
    """
    per_query = q.shape[1] * max(1, k_cmp.shape[0])
    return _over_query_chunks(
        lambda sl: _compressed_branch(q[sl], k_cmp, v_cmp, q_pos[sl], cmp_block, cmp_stride, scale)[:2],
        q, v_cmp.shape[-1], per_query)


def _scores_from_probs(probs, num_blocks, cmp_block, cmp_stride, slc_block):
    weights = block_overlap_weights(probs.shape[-1], num_blocks, cmp_block, cmp_stride, slc_block,
                                    probs.dtype, probs.device)
    return torch.einsum("chk,kj->chj", probs.detach().sum(dim=2), weights)


def selection_scores(q, k_cmp, q_pos, lse_cmp, *, cmp_block: int, cmp_stride: int, slc_block: int,
                     scale: float, num_blocks: int):
    """Overlap-weighted, group-summed compressed-branch probabilities (spec "Selection" 1-3).

    Args:
        q: [Tq, HQ, Dqk]; k_cmp: [Lc, HKV, Dqk]; q_pos: int64 [Tq];
        lse_cmp: [Tq, HQ] log-sum-exp returned by ``compressed_attention``.
        num_blocks: selection blocks of the key range (ceil(Lk / l')).
    Returns:
        [Tq, HKV, num_blocks] in the accumulation dtype, no gradient.
    """
    acc = _acc_dtype(q.dtype)
    num_q, num_q_heads, _ = q.shape
    num_cmp, num_kv_heads, _ = k_cmp.shape
    group = num_q_heads // num_kv_heads
    with torch.no_grad():
        qg = q.to(acc).view(num_q, num_kv_heads, group, -1)
        logits = torch.einsum("chgd,khd->chgk", qg, k_cmp.to(acc)) * scale
        lse = lse_cmp.to(acc).view(num_q, num_kv_heads, group, 1)
        mask = compressed_visibility(q_pos, num_cmp, cmp_block, cmp_stride)[:, None, None, :]
        probs = torch.where(mask & torch.isfinite(lse), torch.exp(logits - lse), torch.zeros_like(logits))
        return _scores_from_probs(probs, num_blocks, cmp_block, cmp_stride, slc_block)


def select_blocks(scores, q_pos, *, slc_block: int, topk: int, init_blocks: int, local_blocks: int):
    """Top-n selection blocks per (query, KV head), spec "Selection" 4-6.

    Args:
        scores: [Tq, HKV, NB] block scores; q_pos: int64 [Tq].
    Returns:
        int32 [Tq, HKV, topk]: ascending block indices, padded with -1 at the end.
    """
    num_q, num_kv_heads, num_blocks = scores.shape
    blocks = torch.arange(num_blocks, device=scores.device)
    current = (q_pos // slc_block)[:, None]
    visible = blocks[None, :] <= current
    forced = visible & ((blocks[None, :] < init_blocks) | (blocks[None, :] > current - local_blocks))
    key = scores.detach().masked_fill(forced[:, None, :], float("inf"))
    key = key.masked_fill(~visible[:, None, :], float("-inf"))
    # A stable descending sort keeps equal scores in ascending block order: ties go to the lower j.
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :topk]
    chosen_visible = torch.gather(visible[:, None, :].expand_as(key), -1, order)
    order = torch.where(chosen_visible, order, torch.full_like(order, num_blocks))
    order = torch.sort(order, dim=-1).values
    order = torch.where(order == num_blocks, torch.full_like(order, -1), order)
    if order.shape[-1] < topk:
        pad = torch.full((num_q, num_kv_heads, topk - order.shape[-1]), -1, dtype=order.dtype, device=order.device)
        order = torch.cat([order, pad], dim=-1)
    return order.to(torch.int32)


def _gathered_attention(q, k, v, q_pos, token_idx, token_ok, scale):
    """Attention of each query over its own gathered key list.

    token_idx/token_ok: [C, HKV, S] key positions and validity per (query, KV head).
    Returns (o [C, HQ, Dv], lse [C, HQ]) in the accumulation dtype.
    """
    acc = _acc_dtype(q.dtype)
    num_q, num_q_heads, _ = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    safe_idx = torch.where(token_ok, token_idx, torch.zeros_like(token_idx))
    head = torch.arange(num_kv_heads, device=q.device)[None, :, None]
    k_sel = k.to(acc)[safe_idx, head]  # [C, HKV, S, Dqk]
    v_sel = v.to(acc)[safe_idx, head]
    qg = q.to(acc).view(num_q, num_kv_heads, group, -1)
    scores = torch.einsum("chgd,chsd->chgs", qg, k_sel) * scale
    probs, lse = _masked_softmax(scores, token_ok[:, :, None, :])
    out = torch.einsum("chgs,chsd->chgd", probs, v_sel)
    return out.reshape(num_q, num_q_heads, -1), lse.reshape(num_q, num_q_heads)


def _selected_chunk(q, k, v, q_pos, block_indices, slc_block, scale):
    offsets = torch.arange(slc_block, device=q.device)
    blocks = block_indices.long()
    token_idx = (blocks[..., None] * slc_block + offsets).flatten(-2)  # [C, HKV, n*l']
    token_ok = (blocks[..., None] >= 0).expand(*blocks.shape, slc_block).flatten(-2)
    token_ok = token_ok & (token_idx <= q_pos[:, None, None]) & (token_idx < k.shape[0])
    return _gathered_attention(q, k, v, q_pos, token_idx, token_ok, scale)


def selected_attention(q, k, v, q_pos, block_indices, *, slc_block: int, scale: float):
    """Branch 2 for one sequence: attention over the selected blocks, cut causally at t.

    Args:
        q: [Tq, HQ, Dqk] at positions q_pos (int64 [Tq]); k, v: [Lk, HKV, D*] prefix from 0;
        block_indices: int [Tq, HKV, n], -1 = empty slot.
    Returns:
        o [Tq, HQ, Dv], lse [Tq, HQ] (accumulation dtype).
    """
    per_query = k.shape[1] * block_indices.shape[-1] * slc_block * (k.shape[2] + v.shape[2])
    return _over_query_chunks(
        lambda sl: _selected_chunk(q[sl], k, v, q_pos[sl], block_indices[sl], slc_block, scale),
        q, v.shape[-1], per_query)


def _window_chunk(q, k_win, v_win, q_pos, window, scale):
    offsets = torch.arange(window - 1, -1, -1, device=q.device)
    token_idx = q_pos[:, None] - offsets[None, :]  # [C, w]: t-w+1 .. t
    token_ok = token_idx >= 0
    num_kv_heads = k_win.shape[1]
    token_idx = token_idx[:, None, :].expand(-1, num_kv_heads, -1)
    token_ok = token_ok[:, None, :].expand(-1, num_kv_heads, -1)
    return _gathered_attention(q, k_win, v_win, q_pos, token_idx, token_ok, scale)


def window_attention(q, k_win, v_win, q_pos, *, window: int, scale: float):
    """Branch 3 for one sequence: causal sliding window over [max(0, t-w+1), t].

    Args:
        q: [Tq, HQ, Dqk] at positions q_pos (int64 [Tq]); k_win, v_win: [Lk, HKV, D*] prefix.
    Returns:
        o [Tq, HQ, Dv], lse [Tq, HQ] (accumulation dtype).
    """
    per_query = k_win.shape[1] * window * (k_win.shape[2] + v_win.shape[2])
    return _over_query_chunks(
        lambda sl: _window_chunk(q[sl], k_win, v_win, q_pos[sl], window, scale), q, v_win.shape[-1], per_query)


def _over_query_chunks(branch, q, dv, per_query):
    """Run ``branch(slice) -> (o, lse)`` over query chunks of bounded size; concatenate.

    Returns o [Tq, HQ, Dv] and lse [Tq, HQ] in the accumulation dtype (empty when Tq = 0).
    """
    step = _chunk_size(per_query)
    parts = [branch(slice(start, start + step)) for start in range(0, q.shape[0], step)]
    if not parts:
        acc = _acc_dtype(q.dtype)
        return q.new_zeros(0, q.shape[1], dv, dtype=acc), q.new_zeros(0, q.shape[1], dtype=acc)
    return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])


def _sequence_forward(q, k, v, k_win, v_win, k_cmp, v_cmp, gates, args: NSAArgs):
    """All three branches and the gated sum for one sequence; returns (o, block_indices)."""
    hp = args.hp
    seq_len, num_q_heads, _ = q.shape
    num_kv_heads, dv = v.shape[1], v.shape[2]
    num_cmp = k_cmp.shape[0]
    num_blocks = -(-seq_len // hp.slc_block)
    per_query = num_q_heads * max(1, num_cmp) + num_kv_heads * (
        hp.topk * hp.slc_block + hp.window) * (q.shape[2] + dv)
    step = _chunk_size(per_query)
    positions = torch.arange(seq_len, device=q.device)
    outs, picks = [], []
    for start in range(0, seq_len, step):
        sl = slice(start, start + step)
        q_pos = positions[sl]
        o_cmp, _, probs = _compressed_branch(q[sl], k_cmp, v_cmp, q_pos, hp.cmp_block, hp.cmp_stride, args.scale)
        scores = _scores_from_probs(probs, num_blocks, hp.cmp_block, hp.cmp_stride, hp.slc_block)
        blocks = select_blocks(scores, q_pos, slc_block=hp.slc_block, topk=hp.topk,
                               init_blocks=hp.init_blocks, local_blocks=hp.local_blocks)
        o_slc, _ = _selected_chunk(q[sl], k, v, q_pos, blocks, hp.slc_block, args.scale)
        o_win, _ = _window_chunk(q[sl], k_win, v_win, q_pos, hp.window, args.scale)
        g = gates[sl].to(o_cmp.dtype)
        outs.append(g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win)
        picks.append(blocks)
    return outs, picks


def nsa_attention_reference(
    q, k, v, k_cmp, v_cmp, gates, cu_seqlens: Optional[torch.Tensor] = None, *,
    cmp_block: int = 32, cmp_stride: int = 16, slc_block: int = 64, topk: int = 16, window: int = 512,
    init_blocks: int = 1, local_blocks: int = 2, scale: Optional[float] = None,
    k_win=None, v_win=None, return_block_indices: bool = False, _args: Optional[NSAArgs] = None,
):
    """NSA attention, plain PyTorch (NSA_SPEC.md is the contract).

    Args:
        q: [T, HQ, Dqk] queries (RoPE applied). k, v: [T, HKV, Dqk], [T, HKV, Dv] selection
            branch keys/values. k_cmp, v_cmp: [Tc, HKV, Dqk], [Tc, HKV, Dv] compressed tokens
            packed per sequence. gates: [T, HQ, 3] sigmoided (cmp, slc, win).
        cu_seqlens: int32 [N+1] pack boundaries, or None for one sequence.
        k_win, v_win: window-branch keys/values (None: use k, v).
    Returns:
        o [T, HQ, Dv] in q's dtype, and with ``return_block_indices`` also int32 [T, HKV, topk]
        selected blocks (ascending, -1 padded).
    """
    args = _args or validate_nsa_inputs(
        q, k, v, k_cmp, v_cmp, gates, cu_seqlens, k_win, v_win, scale=scale, cmp_block=cmp_block,
        cmp_stride=cmp_stride, slc_block=slc_block, topk=topk, window=window,
        init_blocks=init_blocks, local_blocks=local_blocks)
    if k_win is None:
        k_win, v_win = k, v
    outs, picks = [], []
    bounds = args.cu_seqlens.tolist()
    cmp_bounds = args.cu_seqlens_cmp.tolist()
    for (a, b), (ca, cb) in zip(zip(bounds[:-1], bounds[1:]), zip(cmp_bounds[:-1], cmp_bounds[1:])):
        if b == a:
            continue
        o_parts, idx_parts = _sequence_forward(q[a:b], k[a:b], v[a:b], k_win[a:b], v_win[a:b],
                                               k_cmp[ca:cb], v_cmp[ca:cb], gates[a:b], args)
        outs += o_parts
        picks += idx_parts
    dv = v.shape[-1]
    out = torch.cat(outs).to(q.dtype) if outs else q.new_zeros(0, q.shape[1], dv)
    if not return_block_indices:
        return out
    indices = torch.cat(picks) if picks else torch.zeros(0, k.shape[1], topk, dtype=torch.int32, device=q.device)
    return out, indices
