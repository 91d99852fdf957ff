"""Benchmark NSA context parallelism (issue 6): one NSA core-attention layer, forward+backward.

CP=1 on one GPU (``nsa_attention`` on the Triton kernels, plus ``nsa_attention_cp`` over a
group of one) vs CP=2 on two GPUs (NCCL) in both modes. The layer is MLP compression of K and
V + the three branches + gates; inputs bf16, independent branch K/V. For CP=2 the time of a
step is the slower rank's; bytes are what each rank sent per step, by exchange. Writes
benchmarks/cp-<date>.json and .md (BENCHMARKS.md format), with the cuDNN dense baseline
measured in the same run.

    python tools/bench_cp.py --seq 131072 --worlds 2,4   # CP=2/4 rows need that many GPUs
"""
from __future__ import annotations

import argparse
import datetime
import json
import os

import torch
import torch.distributed as dist

try:
    from nsa_tools.bench_kernels import bench_dense, commit, timed
except ImportError:  # run from a checkout without the editable install
    from tools.bench_kernels import bench_dense, commit, timed

HP = dict(cmp_block=32, cmp_stride=16, slc_block=64, topk=16, window=512, init_blocks=1, local_blocks=2)


def _inputs(T, hq, hkv, dqk, dv, device, cp, rank):
    """This rank's zig-zag share of one random bf16 problem (the same on every rank) + compressors."""
    from nsa_megatron.compression import MLPCompressor
    from nsa_megatron.context_parallel import zigzag_split

    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(T)
    shapes = dict(q=(hq, dqk), k=(hkv, dqk), v=(hkv, dv), k_win=(hkv, dqk), v_win=(hkv, dv),
                  k_src=(hkv, dqk), v_src=(hkv, dv))
    x = {}
    for name, shape in shapes.items():
        full = torch.randn(T, *shape, device=device, dtype=dtype, generator=g)
        x[name] = zigzag_split(full, None, cp, rank).contiguous().requires_grad_()
        del full
    gates = torch.rand(T, hq, 3, device=device, dtype=dtype, generator=g)
    x["gates"] = zigzag_split(gates, None, cp, rank).contiguous().requires_grad_()
    torch.manual_seed(0)
    kc = MLPCompressor(hkv, dqk, HP["cmp_block"], HP["cmp_stride"]).to(device, dtype)
    vc = MLPCompressor(hkv, dv, HP["cmp_block"], HP["cmp_stride"]).to(device, dtype)
    return x, kc, vc


def _time_step(fwd, params, reps):
    out = fwd()
    do = torch.randn_like(out)
    row = {"fwd_ms": timed(fwd, reps)}

    def bwd():
        for p in params:
            p.grad = None
        out.backward(do, retain_graph=True)

    row["bwd_ms"] = timed(bwd, reps)
    return row


def bench_plain(T, hq, hkv, dqk, dv, reps):
    """CP=1 baseline: compress + ``nsa_attention`` (Triton) on one GPU."""
    from nsa_megatron.functional import nsa_attention

    x, kc, vc = _inputs(T, hq, hkv, dqk, dv, "cuda", 1, 0)
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")

    def fwd():
        return nsa_attention(x["q"], x["k"], x["v"], kc(x["k_src"], cu), vc(x["v_src"], cu), x["gates"], cu,
                             k_win=x["k_win"], v_win=x["v_win"], backend="triton", **HP)

    row = {"impl": "nsa-cp1", "seq": T, "gpus": 1, **_time_step(fwd, [*x.values(), *kc.parameters(),
                                                                      *vc.parameters()], reps)}
    row["max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def _cp_worker(rank, world, T, hq, hkv, dqk, dv, mode, reps):
    from nsa_megatron.context_parallel import CommCounters, nsa_attention_cp

    # One host thread per rank, as torchrun sets (OMP_NUM_THREADS=1): spawned ranks otherwise each
    # start one thread per core and oversubscribe the host's small CPU-side tensor ops.
    torch.set_num_threads(1)
    torch.cuda.reset_peak_memory_stats()
    x, kc, vc = _inputs(T, hq, hkv, dqk, dv, f"cuda:{rank}", world, rank)
    counters = CommCounters()

    def fwd():
        return nsa_attention_cp(x["q"], x["k"], x["v"], x["k_win"], x["v_win"], x["k_src"], x["v_src"], x["gates"],
                                None, cp_group=dist.group.WORLD, cp_mode=mode, compress_k=kc, compress_v=vc,
                                backend="triton", counters=counters, **HP)

    row = _time_step(fwd, [*x.values(), *kc.parameters(), *vc.parameters()], reps)
    try:
        row["fwd_stages_ms"] = _fwd_stages(fwd)
    except Exception as exc:  # diagnostics only: never lose the timing row
        row["fwd_stages_ms"] = {"error": repr(exc)}
    counters.reset()
    out = fwd()
    out.backward(torch.ones_like(out))
    row.update(bytes=counters.snapshot(), max_mem_gib=torch.cuda.max_memory_allocated() / 2**30)
    return row


def _fwd_stages(fwd) -> dict:
    """CUDA time per forward stage (ms, one profiled call): the CP functions by name, the kernels
    by family, and the number of host synchronisations (cudaStreamSynchronize / DeviceSynchronize)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fwd()
        torch.cuda.synchronize()
    out = {"syncs": 0}
    families = ("_dense_fwd", "_block_scores", "_top_blocks", "_slc_fwd", "nccl", "gemm", "index",
                "cat", "elementwise", "scatter", "reduce")
    for e in prof.key_averages():
        name = e.key
        if name in ("cudaStreamSynchronize", "cudaDeviceSynchronize"):
            out["syncs"] += e.count
        dev_us = getattr(e, "device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "cuda_time_total", 0)
        if not dev_us:
            continue
        low = name.lower()
        fam = next((f for f in families if f.lower() in low), None)
        if fam and not name.startswith("aten::"):
            out[fam] = out.get(fam, 0.0) + dev_us / 1e3
    out["cpu_wall_ms"] = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1e3
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in out.items()}


def bench_cp(T, hq, hkv, dqk, dv, world, mode, reps):
    """CP=world over NCCL (world=1: the CP code path on one GPU); slowest rank's medians."""
    from tests.nsa_megatron.context_parallel.cp_utils import run_nccl

    per_rank = run_nccl(_cp_worker, world, T, hq, hkv, dqk, dv, mode, reps, timeout=900)
    row = {"impl": f"nsa-cp{world}-{mode}", "seq": T, "gpus": world,
           "fwd_ms": max(r["fwd_ms"] for r in per_rank), "bwd_ms": max(r["bwd_ms"] for r in per_rank),
           "fwd_stages_ms": per_rank[0].get("fwd_stages_ms"),
           "per_rank": per_rank,
           "bytes_sent_fwd": [sum(v for k, v in r["bytes"].items() if k.endswith(".fwd")) for r in per_rank],
           "bytes_sent_bwd": [sum(v for k, v in r["bytes"].items() if k.endswith(".bwd")) for r in per_rank],
           "max_mem_gib": max(r["max_mem_gib"] for r in per_rank)}
    return row


def write(rows, args, out_dir):
    date = datetime.date.today().isoformat()
    cards = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    doc = {"topic": "cp", "date": date, "card": cards[0] if cards else None, "gpus": len(cards),
           "commit": commit(), "software": {"torch": torch.__version__},
           "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "qk_dim": args.dqk, "v_dim": args.dv,
                     "dtype": "bf16", **HP},
           "notes": "one NSA core-attention layer (MLP compression + 3 branches + gates), independent branch K/V; "
                    "CP rows: slowest rank's median; bytes = sent by each rank per step (fwd / bwd)",
           "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"cp-{date}-{args.tag}" if args.tag else f"cp-{date}")
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    base = next((r for r in rows if r["impl"] == "nsa-cp1"), None)
    lines = [f"# NSA context parallelism ({date}, {doc['card']} x{len(cards)}, commit {doc['commit']})", "",
             f"bf16, {args.heads} q heads, {args.kv_heads} kv heads, Dqk={args.dqk}, Dv={args.dv}, "
             "l=32 d=16 l'=64 n=16 w=512; medians (ms); bytes sent per rank per step.", "",
             "| seq | impl | GPUs | fwd | bwd | fwd+bwd | vs CP=1 | MiB sent fwd/bwd (max rank) | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        total = r["fwd_ms"] + r["bwd_ms"]
        ratio = f"{total / (base['fwd_ms'] + base['bwd_ms']):.3f}" if base else "-"
        sent = (f"{max(r['bytes_sent_fwd']) / 2**20:.1f} / {max(r['bytes_sent_bwd']) / 2**20:.1f}"
                if "bytes_sent_fwd" in r else "-")
        mem = f"{r['max_mem_gib']:.1f}" if "max_mem_gib" in r else "-"
        lines.append(f"| {r['seq']} | {r['impl']} | {r.get('gpus', 1)} | {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} | "
                     f"{total:.1f} | {ratio} | {sent} | {mem} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return stem


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=131072)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dqk", type=int, default=128)
    p.add_argument("--dv", type=int, default=128)
    p.add_argument("--modes", default="ring,allgather")
    p.add_argument("--worlds", default="2", help="CP sizes to run beside CP=1, e.g. 2,4 (those that fit the GPUs)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dense", default="cudnn", help="dense baseline(s) of tools/bench_kernels ('' for none)")
    p.add_argument("--skip-cp1-path", action="store_true", help="skip CP=1 through nsa_attention_cp")
    p.add_argument("--out", default="benchmarks")
    p.add_argument("--tag", default="")
    args = p.parse_args()
    shape = (args.seq, args.heads, args.kv_heads, args.dqk, args.dv)
    rows = [bench_plain(*shape, args.reps)]
    print(rows[-1], flush=True)
    torch.cuda.empty_cache()
    for backend in filter(None, args.dense.split(",")):
        rows.append(bench_dense(args.seq, args.heads, args.kv_heads, args.dqk, backend, args.reps))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    modes = [m for m in args.modes.split(",") if m]
    if not args.skip_cp1_path:
        rows.append(bench_cp(*shape, 1, modes[0], args.reps))
        print({k: v for k, v in rows[-1].items() if k != "per_rank"}, flush=True)
    for world in (int(w) for w in args.worlds.split(",") if w):
        if world > torch.cuda.device_count():
            print(f"only {torch.cuda.device_count()} GPUs: no CP={world} rows")
            continue
        for mode in modes:
            rows.append(bench_cp(*shape, world, mode, args.reps))
            print({k: v for k, v in rows[-1].items() if k != "per_rank"}, flush=True)
    write(rows, args, args.out)


if __name__ == "__main__":
    main()
