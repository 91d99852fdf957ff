"""Per-GPU memory and step FLOPs of a config on a parallel layout, with the arithmetic shown.

    python tools/estimate_memory.py --config configs/nsa_27b_moe_64k.yaml --gpus 128
    python tools/estimate_memory.py --config configs/nsa_1b_64k_h100.yaml --gpus 1 --limit-gb 80

The layout (TP, PP, CP, EP, distributed optimizer, recompute) comes from the config and may be
overridden like the training entry point (``parallel.pipeline_model_parallel_size=8`` ...).
The worst pipeline stage is reported (the last: it also holds the output layer and the logits).

Model (Megatron-Core, bf16 mixed precision, as ``launch/training.py`` sets it up):
  weights       2 B/param (bf16)            grads       4 B/param (fp32 main grads)
  optimizer    12 B/param (fp32 master + Adam m, v), divided by the data(+context)-parallel
               size with the distributed optimizer (experts: by the expert-data-parallel size)
  activations  full recompute keeps each layer's input (s/CP x b x h x 2 B, /TP with sequence
               parallelism) for every layer of the stage and every micro batch in flight
               (PP of them on the first stage under 1F1B); without recompute ~34 s b h B per layer
  working set  one layer re-run forward + backward: QKV/branch outputs, the MLP or the routed
               MoE tokens, and NSA's workspace (block scores [s, HKV, s/l'] fp32, gathered K/V
               of the whole sequence under CP)
  logits       s/CP x b x vocab/TP x 4 B, twice (fp32 logits and their gradient)
  reserve      CUDA context, NCCL buffers and allocator fragmentation (--reserve-gb, default 6)
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Tuple

from nsa_launch.config_loader import ConfigError, build_model_config, load_config
from nsa_launch.flops import train_flops_per_sequence

GB = 1e9


def _is_moe(config, i: int) -> bool:
    if not config.num_moe_experts:
        return False
    freq = config.moe_layer_freq
    return bool(freq[i]) if isinstance(freq, (list, tuple)) else i % int(freq) == 0


def layer_params(config, i: int) -> Tuple[float, float]:
    """(dense params, expert params) of layer ``i`` (norms included, biases ignored)."""
    h, hq, hkv = config.hidden_size, config.num_attention_heads, config.num_query_groups
    dqk = config.kv_channels
    nsa = config.is_nsa_layer(i)
    dv = (config.nsa_v_head_dim or dqk) if nsa else dqk
    kv_sets = 3 if nsa and config.nsa_branch_kv == "independent" else 1
    attn = h * hq * dqk + kv_sets * h * hkv * (dqk + dv) + hq * dv * h
    if nsa:
        attn += h * 3 * hq  # gates
        l = config.nsa_cmp_block
        if config.nsa_compressor == "mlp":
            attn += hkv * (l * dqk + l * dqk * dqk + dqk * dqk + l * dv + l * dv * dv + dv * dv)
        elif config.nsa_compressor == "linear":
            attn += hkv * (l * dqk * dqk + l * dv * dv)
    mult = 3 if config.gated_linear_unit else 2
    dense = attn + 2 * h
    if _is_moe(config, i):
        ffn = config.moe_ffn_hidden_size or config.ffn_hidden_size
        experts = config.num_moe_experts * mult * h * ffn
        dense += h * config.num_moe_experts + mult * h * (config.moe_shared_expert_intermediate_size or 0)
        return dense, experts
    return dense + mult * h * config.ffn_hidden_size, 0.0


def estimate(cfg, config, world: int, vocab: int, reserve_gb: float) -> Dict[str, object]:
    """All numbers of the report for the worst (last) pipeline stage; sizes in bytes."""
    p, d = cfg.parallel, cfg.data
    tp, pp, cp, ep = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                      p.context_parallel_size, p.expert_model_parallel_size)
    if world % (tp * pp * cp):
        raise ConfigError(f"--gpus {world}: not divisible by tp*pp*cp = {tp * pp * cp}")
    dp = world // (tp * pp * cp)
    if (dp * cp) % ep:
        raise ConfigError(f"expert_model_parallel_size={ep}: must divide dp*cp = {dp * cp}")
    edp = dp * cp // ep  # expert data parallel (expert tensor parallel = tp)
    L, h, b, s = config.num_layers, config.hidden_size, d.micro_batch_size, d.seq_length
    per_stage = -(-L // pp)
    last = range(L - per_stage, L)
    dense = sum(layer_params(config, i)[0] for i in last) + vocab * h + h  # output layer + final norm
    if pp == 1:
        dense += vocab * h  # untied input embedding on the same stage
    expert = sum(layer_params(config, i)[1] for i in last)
    dense_gpu, expert_gpu = dense / tp, expert / (ep * tp)
    shard = p.use_distributed_optimizer
    mem = {
        "weights (bf16, 2 B)": 2 * (dense_gpu + expert_gpu),
        "main grads (fp32, 4 B)": 4 * (dense_gpu + expert_gpu),
        "optimizer (master + Adam, 12 B)": 12 * (dense_gpu / (dp * cp if shard else 1) + expert_gpu / (edp if shard else 1)),
    }
    s_loc = s // cp
    sp = tp if p.sequence_parallel else 1
    in_flight = pp if pp > 1 else 1
    recompute = config.recompute_granularity == "full"
    per_layer_saved = s_loc * b * h * 2 / sp if recompute else 34 * s_loc * b * h / sp
    mem["activations (stored)"] = per_stage * in_flight * per_layer_saved
    hq, hkv, dqk = config.num_attention_heads / tp, config.num_query_groups / tp, config.kv_channels
    dv = config.nsa_v_head_dim or dqk
    tok = s_loc * b
    attn_ws = tok * (hq * dqk + 3 * 2 * hkv * (dqk + dv) + 4 * hq * dv + hq * 3) * 2 * 3  # fwd + 2x bwd
    if config.num_moe_experts:
        ffn = config.moe_ffn_hidden_size or config.ffn_hidden_size
        routed = tok * config.moe_router_topk
        mlp_ws = (routed * (2 * h + 3 * ffn / tp) + tok * 3 * (config.moe_shared_expert_intermediate_size or 0) / tp) * 2 * 2
    else:
        mlp_ws = tok * 3 * config.ffn_hidden_size / tp * 2 * 2
    nsa_ws = 0.0
    if config.attention_type == "nsa":
        nsa_ws = tok * hkv * (s / config.nsa_slc_block) * 4 + tok * hkv * config.nsa_topk * 4
        if cp > 1:
            nsa_ws += s * b * hkv * (dqk + dv) * 2 * 2 * (1 + 1 / config.nsa_cmp_stride)
    mem["working set (one layer, fwd+bwd)"] = attn_ws + mlp_ws
    mem["NSA workspace (scores, indices, CP K/V)"] = nsa_ws
    mem["logits + grad (fp32)"] = tok * vocab / tp * 4 * 2
    mem["reserve (context, NCCL, fragmentation)"] = reserve_gb * GB
    flops_seq = train_flops_per_sequence(config, s, vocab)
    return {"world": world, "tp": tp, "pp": pp, "cp": cp, "ep": ep, "dp": dp, "edp": edp,
            "stage_layers": per_stage, "dense_params_stage": dense, "expert_params_stage": expert,
            "dense_gpu": dense_gpu, "expert_gpu": expert_gpu, "mem": mem, "total": sum(mem.values()),
            "flops_step": flops_seq * d.global_batch_size, "flops_gpu": flops_seq * d.global_batch_size / world,
            "total_params": sum(sum(layer_params(config, i)) for i in range(L)) + 2 * vocab * h}


def report(cfg, est: Dict[str, object], limit_gb: float) -> str:
    """Human-readable report: layout, parameter split, memory lines, FLOPs, verdict."""
    e = est
    lines = [
        f"config {cfg.source}: {e['total_params'] / 1e9:.2f}B parameters, seq {cfg.data.seq_length}, "
        f"micro batch {cfg.data.micro_batch_size}, global batch {cfg.data.global_batch_size}",
        f"layout: {e['world']} GPUs = TP {e['tp']} x PP {e['pp']} x CP {e['cp']} x DP {e['dp']}; "
        f"EP {e['ep']} over DP*CP (expert DP {e['edp']}); distributed optimizer "
        f"{'on' if cfg.parallel.use_distributed_optimizer else 'off'}; sequence parallel "
        f"{'on' if cfg.parallel.sequence_parallel else 'off'}",
        f"last stage: {e['stage_layers']} layers + output layer: {e['dense_params_stage'] / 1e9:.3f}B dense / TP "
        f"= {e['dense_gpu'] / 1e9:.3f}B, {e['expert_params_stage'] / 1e9:.3f}B expert / (EP*TP) = "
        f"{e['expert_gpu'] / 1e9:.3f}B per GPU",
        "per-GPU memory:",
    ]
    for name, v in e["mem"].items():
        lines.append(f"  {name:<42s} {v / GB:8.2f} GB")
    lines.append(f"  {'total':<42s} {e['total'] / GB:8.2f} GB  (limit {limit_gb:g} GB: "
                 f"{'fits' if e['total'] <= limit_gb * GB else 'DOES NOT FIT'})")
    lines.append(f"step FLOPs (model, fwd+bwd, NSA attended tokens only): {e['flops_step']:.3e} total, "
                 f"{e['flops_gpu']:.3e} per GPU; at 400 TFLOP/s per GPU: {e['flops_gpu'] / 400e12:.2f} s/step")
    return "\n".join(lines)


def main(argv: List[str] | None = None) -> int:
    """Print the report; exit 1 when the total exceeds ``--limit-gb``, 2 on a bad config."""
    ap = argparse.ArgumentParser(description="Estimate per-GPU memory and step FLOPs of a config.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpus", type=int, required=True, help="total GPUs (world size)")
    ap.add_argument("--vocab", type=int, default=None, help="padded vocab (default: from the tokenizer)")
    ap.add_argument("--limit-gb", type=float, default=80.0)
    ap.add_argument("--reserve-gb", type=float, default=6.0)
    args, overrides = ap.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides)
        config = build_model_config(cfg)
        if args.vocab is None:
            from nsa_launch.training import padded_vocab_size
            from nsa_tools.tokenizer import load_tokenizer

            args.vocab = padded_vocab_size(load_tokenizer(cfg.data.tokenizer).vocab_size,
                                           cfg.data.make_vocab_size_divisible_by, cfg.parallel.tensor_model_parallel_size)
        est = estimate(cfg, config, args.gpus, args.vocab, args.reserve_gb)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report(cfg, est, args.limit_gb))
    return 0 if est["total"] <= args.limit_gb * GB else 1


if __name__ == "__main__":
    sys.exit(main())
