"""Per-kernel GPU time of one NSA training step (fwd+bwd) and of decode steps, from torch.profiler.

The benchmarks time whole branches; this names every launched kernel, glue copies included,
so the analysis in benchmarks/kernels-analysis.md can say where each millisecond goes.

    python tools/profile_kernels.py --seq 65536 --decode-batches 8,32 --decode-ctx 65536 --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from nsa_tools.bench_kernels import HP, commit, make_inputs


def kernel_table(step, reps: int) -> list[dict]:
    """Run ``step`` twice to warm up, then ``reps`` times under the profiler.

    Returns one row per kernel name: calls per step and GPU microseconds per step, largest first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None)
        if us is None:
            us = evt.cuda_time_total
        if us <= 0:
            continue
        rows.append(dict(kernel=evt.key[:90], calls=evt.count / reps, us=us / reps))
    rows.sort(key=lambda r: -r["us"])
    return rows


def training_step(seq: int, hq: int, hkv: int, dqk: int, dv: int):
    """q,k,v,gates -> o -> backward, the step tools/bench_kernels.py times (compression included)."""
    from nsa_kernels.function import nsa_attention_triton

    q, k, v, gates, cu, kcomp, vcomp, g = make_inputs(seq, hq, hkv, dqk, dv)
    do = torch.randn(seq, hq, dv, device="cuda", dtype=q.dtype, generator=g)
    params = [q, k, v, gates, *kcomp.parameters(), *vcomp.parameters()]

    def step():
        for p in params:  # as tools/bench_kernels.py: no gradient accumulation adds in the profile
            p.grad = None
        o = nsa_attention_triton(q, k, v, kcomp(k, cu), vcomp(v, cu), gates, cu, scale=dqk ** -0.5, **HP)
        o.backward(do)

    return step


def decode_step(batch: int, ctx: int, hq: int, hkv: int, d: int):
    """One NSA decode step over a full cache of ``ctx`` tokens per sequence."""
    from nsa_kernels.decode import nsa_decode

    dt, dev = torch.bfloat16, torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    ccap = (ctx - HP["cmp_block"]) // HP["cmp_stride"] + 1
    rnd = lambda *s: torch.randn(*s, generator=g, device=dev, dtype=dt)  # noqa: E731
    k, v, kw, vw = (rnd(batch, ctx, hkv, d) for _ in range(4))
    kc, vc = rnd(batch, ccap, hkv, d), rnd(batch, ccap, hkv, d)
    q = rnd(batch, hq, d)
    gates = torch.rand(batch, hq, 3, generator=g, device=dev).to(dt)
    lengths = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    return lambda: nsa_decode(q, k, v, kc, vc, gates, lengths, k_win=kw, v_win=vw, **HP)


def markdown(title: str, rows: list[dict], top: int = 25) -> str:
    total = sum(r["us"] for r in rows)
    lines = [f"### {title}: {total / 1000:.3f} ms of kernels per step", "",
             "| kernel | calls/step | ms/step | share |", "|---|---|---|---|"]
    for r in rows[:top]:
        lines.append(f"| `{r['kernel']}` | {r['calls']:.0f} | {r['us'] / 1000:.3f} | {r['us'] / total:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=65536, help="training-step tokens (0: skip)")
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--qk-dim", type=int, default=128)
    ap.add_argument("--v-dim", type=int, default=128)
    ap.add_argument("--decode-batches", default="8,32", help="comma-separated ('' skips decode)")
    ap.add_argument("--decode-ctx", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--tag", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA device")
    record = dict(card=torch.cuda.get_device_name(), commit=commit(), hp=HP, args=vars(args), tables={})
    md = [f"# Per-kernel profile ({record['card']}, commit {record['commit']})", ""]
    if args.seq:
        name = f"train fwd+bwd T={args.seq} HQ={args.heads} HKV={args.kv_heads} Dqk={args.qk_dim} Dv={args.v_dim}"
        rows = kernel_table(training_step(args.seq, args.heads, args.kv_heads, args.qk_dim, args.v_dim), args.reps)
        record["tables"][name] = rows
        md.append(markdown(name, rows))
    for b in [int(x) for x in args.decode_batches.split(",") if x]:
        name = f"decode B={b} ctx={args.decode_ctx}"
        rows = kernel_table(decode_step(b, args.decode_ctx, args.heads, args.kv_heads, args.qk_dim), 20)
        record["tables"][name] = rows
        md.append(markdown(name, rows, top=12))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"profile{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
