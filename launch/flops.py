"""Honest training FLOPs of an NSA (or dense) GPT: only the tokens NSA actually attends.

Convention: a multiply-add is 2 FLOPs; a training step costs forward + backward = 3x the
forward (activation recompute is not counted: these are *model* FLOPs, as in MFU).

Per token t (0-based within a sequence of length L), each query head of an NSA layer attends
    compressed  n_c(t) = 0 if t < l-1 else floor((t-l+1)/d) + 1      tokens
    selected    n_s(t) = t+1 if t < n*l' else (n-1)*l' + (t mod l') + 1
    window      n_w(t) = min(t+1, w)
and each attended token costs 2*Dqk (q.k) + 2*Dv (p.v). A dense causal layer attends t+1.
The dense GEMMs: QKV (K/V three times with independent branch K/V), the gate projection
(3 per query head), the output projection, the compressor MLPs (once per d tokens per KV
head, for K and for V), the MLP or MoE (top-k routed + shared experts + router) and the
LM head.
"""
from __future__ import annotations

from typing import Dict

import numpy as np


def attended_tokens(seq_length: int, cmp_block: int, cmp_stride: int, slc_block: int,
                    topk: int, window: int) -> Dict[str, float]:
    """Mean keys attended per query in each NSA branch over positions 0..seq_length-1."""
    t = np.arange(seq_length, dtype=np.int64)
    n_c = np.where(t < cmp_block - 1, 0, (t - cmp_block + 1) // cmp_stride + 1)
    n_s = np.where(t < topk * slc_block, t + 1, (topk - 1) * slc_block + t % slc_block + 1)
    n_w = np.minimum(t + 1, window)
    return {"cmp": float(n_c.mean()), "slc": float(n_s.mean()), "win": float(n_w.mean()),
            "full": float((t + 1).mean())}


def _is_moe_layer(config, i: int) -> bool:
    if not getattr(config, "num_moe_experts", None):
        return False
    freq = getattr(config, "moe_layer_freq", 1)
    if isinstance(freq, (list, tuple)):
        return bool(freq[i])
    return i % int(freq) == 0


def forward_flops_per_token(config, seq_length: int, vocab_size: int) -> Dict[str, float]:
    """Forward FLOPs per token, by part (``attn_core``, ``attn_proj``, ``compressor``, ``mlp``,
    ``lm_head``), averaged over the positions of a ``seq_length`` sequence.

    Args:
        config: an ``NSAConfig`` (or any object with its fields).
        seq_length: tokens per sequence.
        vocab_size: (padded) vocabulary size of the output layer.
    """
    h, hq = config.hidden_size, config.num_attention_heads
    hkv = config.num_query_groups or hq
    dqk = config.kv_channels or h // hq
    dv_nsa = getattr(config, "nsa_v_head_dim", None) or dqk
    gated = bool(getattr(config, "gated_linear_unit", False))
    mlp_mult = 3 if gated else 2
    parts = {"attn_core": 0.0, "attn_proj": 0.0, "compressor": 0.0, "mlp": 0.0}
    att = None
    for i in range(config.num_layers):
        is_nsa = config.is_nsa_layer(i) if hasattr(config, "is_nsa_layer") else (
            getattr(config, "attention_type", "full") == "nsa")
        if is_nsa:
            if att is None:
                att = attended_tokens(seq_length, config.nsa_cmp_block, config.nsa_cmp_stride,
                                      config.nsa_slc_block, config.nsa_topk, config.nsa_window)
            dv = dv_nsa
            kv_sets = 3 if getattr(config, "nsa_branch_kv", "independent") == "independent" else 1
            keys = att["cmp"] + att["slc"] + att["win"]
            parts["attn_proj"] += 2 * h * (hq * dqk + kv_sets * hkv * (dqk + dv)) + 2 * h * 3 * hq
            l = config.nsa_cmp_block
            if getattr(config, "nsa_compressor", "mlp") == "mlp":
                per_cmp = hkv * (2 * (l * dqk * dqk + dqk * dqk) + 2 * (l * dv * dv + dv * dv))
            elif config.nsa_compressor == "linear":
                per_cmp = hkv * (2 * l * dqk * dqk + 2 * l * dv * dv)
            else:
                per_cmp = hkv * l * (dqk + dv)
            parts["compressor"] += per_cmp / config.nsa_cmp_stride
        else:
            dv = dqk
            keys = (seq_length + 1) / 2
            parts["attn_proj"] += 2 * h * (hq * dqk + hkv * 2 * dqk)
        parts["attn_core"] += hq * keys * 2 * (dqk + dv)
        parts["attn_proj"] += 2 * hq * dv * h
        if _is_moe_layer(config, i):
            ffn = config.moe_ffn_hidden_size or config.ffn_hidden_size
            shared = getattr(config, "moe_shared_expert_intermediate_size", None) or 0
            parts["mlp"] += mlp_mult * 2 * h * (config.moe_router_topk * ffn + shared)
            parts["mlp"] += 2 * h * config.num_moe_experts
        else:
            parts["mlp"] += mlp_mult * 2 * h * config.ffn_hidden_size
    parts["lm_head"] = 2.0 * h * vocab_size
    return parts


def train_flops_per_sequence(config, seq_length: int, vocab_size: int) -> float:
    """Forward + backward FLOPs of one training sequence (3x the forward)."""
    return 3.0 * seq_length * sum(forward_flops_per_token(config, seq_length, vocab_size).values())
