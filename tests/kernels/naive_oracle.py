"""A deliberately naive NSA: per sequence, per query, per head, plain Python loops, float64.

Written from NSA_SPEC.md independently of ``nsa_kernels.reference`` (no shared helpers), so
that the two agreeing means something. Only for tiny shapes.
"""
import math

import torch


def _softmax_attend(query, keys, values, scale):
    """query [D], keys list of [D], values list of [Dv] -> [Dv] (zeros when keys is empty)."""
    if not keys:
        return torch.zeros(values[0].shape if values else 0, dtype=torch.float64)
    logits = [scale * float(torch.dot(query, key)) for key in keys]
    top = max(logits)
    weights = [math.exp(x - top) for x in logits]
    total = sum(weights)
    out = torch.zeros_like(values[0])
    for w, val in zip(weights, values):
        out += (w / total) * val
    return out


def naive_nsa(q, k, v, k_cmp, v_cmp, gates, seqlens, *, cmp_block, cmp_stride, slc_block, topk, window,
              init_blocks, local_blocks, scale=None, k_win=None, v_win=None):
    """Returns (o [T, HQ, Dv] float64, block indices int32 [T, HKV, topk])."""
    q, k, v, k_cmp, v_cmp, gates = (x.detach().double() for x in (q, k, v, k_cmp, v_cmp, gates))
    k_win = k if k_win is None else k_win.detach().double()
    v_win = v if v_win is None else v_win.detach().double()
    total, num_q_heads, dqk = q.shape
    num_kv_heads, dv = v.shape[1], v.shape[2]
    group = num_q_heads // num_kv_heads
    scale = 1.0 / math.sqrt(dqk) if scale is None else scale
    out = torch.zeros(total, num_q_heads, dv, dtype=torch.float64)
    picked = torch.full((total, num_kv_heads, topk), -1, dtype=torch.int32)
    tok0 = cmp0 = 0
    for seq_len in seqlens:
        num_cmp = max(0, (seq_len - cmp_block) // cmp_stride + 1)
        num_blocks = -(-seq_len // slc_block)
        for t in range(seq_len):
            for g in range(num_kv_heads):
                heads = range(g * group, (g + 1) * group)
                visible_cmp = [i for i in range(num_cmp) if i * cmp_stride + cmp_block - 1 <= t]
                score = [0.0] * num_blocks
                o_cmp = {}
                for h in heads:
                    query = q[tok0 + t, h]
                    keys = [k_cmp[cmp0 + i, g] for i in visible_cmp]
                    vals = [v_cmp[cmp0 + i, g] for i in visible_cmp]
                    if visible_cmp:
                        logits = [scale * float(torch.dot(query, key)) for key in keys]
                        top = max(logits)
                        total_w = sum(math.exp(x - top) for x in logits)
                        for i, x in zip(visible_cmp, logits):
                            p = math.exp(x - top) / total_w
                            for j in range(num_blocks):
                                lo = max(i * cmp_stride, j * slc_block)
                                hi = min(i * cmp_stride + cmp_block, (j + 1) * slc_block)
                                score[j] += p * max(0, hi - lo) / cmp_stride
                        o_cmp[h] = _softmax_attend(query, keys, vals, scale)
                    else:
                        o_cmp[h] = torch.zeros(dv, dtype=torch.float64)
                current = t // slc_block
                visible_blocks = list(range(current + 1))
                forced = [j for j in visible_blocks if j < init_blocks or j >= current - local_blocks + 1]
                others = sorted((j for j in visible_blocks if j not in forced), key=lambda j: (-score[j], j))
                chosen = sorted(forced + others[: topk - len(forced)])
                for slot, j in enumerate(chosen):
                    picked[tok0 + t, g, slot] = j
                slc_tokens = [s for j in chosen for s in range(j * slc_block, (j + 1) * slc_block) if s <= t]
                win_tokens = list(range(max(0, t - window + 1), t + 1))
                for h in heads:
                    query = q[tok0 + t, h]
                    o_slc = _softmax_attend(query, [k[tok0 + s, g] for s in slc_tokens],
                                            [v[tok0 + s, g] for s in slc_tokens], scale)
                    o_win = _softmax_attend(query, [k_win[tok0 + s, g] for s in win_tokens],
                                            [v_win[tok0 + s, g] for s in win_tokens], scale)
                    gate = gates[tok0 + t, h]
                    out[tok0 + t, h] = gate[0] * o_cmp[h] + gate[1] * o_slc + gate[2] * o_win
        tok0 += seq_len
        cmp0 += num_cmp
    return out, picked
