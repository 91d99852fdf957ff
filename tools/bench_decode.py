"""Decode-step latency of NSA (``nsa_kernels.decode``) against dense decode on the same cache.

For every batch B and context T: B sequences of T cached tokens (64 query heads, 4 KV
heads, head dim 128, bf16, paper hyper-parameters, independent window K/V), one new query
per sequence. NSA reads the compressed cache, 16 selected blocks and the window; dense
decode is torch SDPA (flash / efficient / cuDNN, each tried; the fastest is the baseline)
over the full selection-branch cache, in the same process. Both are timed as CUDA graphs
(falling back to eager launches if capture fails) with CUDA events, median of the replays.
Achieved bandwidth = bytes the step must read (NSA: compressed + selected + window K/V, q,
gates and its fp32 block-score scratch; dense: all K/V) / time. Writes
benchmarks/decode-<date>.json and .md (BENCHMARKS.md format) and prints a table last.

    python tools/bench_decode.py                       # B 1,8,32 x T 8k,32k,64k,128k
    python tools/bench_decode.py --batches 8 --contexts 65536 --reps 50
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HQ, HKV, D = 64, 4, 128
HP = dict(cmp_block=32, cmp_stride=16, slc_block=64, topk=16, window=512, init_blocks=1, local_blocks=2)
DENSE = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
         "cudnn": SDPBackend.CUDNN_ATTENTION}


def time_step(fn, reps: int, use_graph: bool):
    """(median ms, mode) of ``fn`` as a replayed CUDA graph (or eager calls), event-timed."""
    mode = "eager"
    run = fn
    if use_graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
                fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            run, mode = graph.replay, "graph"
        except Exception:  # capture unsupported by this path: time eager launches instead
            torch.cuda.synchronize()
    for _ in range(3):
        run()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times), mode


def nsa_bytes(batch: int, ctx: int, elem: int = 2) -> int:
    """Bytes one NSA decode step reads or writes at full cache length ``ctx`` (every sequence)."""
    l, d, ls, n, w = (HP[k] for k in ("cmp_block", "cmp_stride", "slc_block", "topk", "window"))
    n_cmp = (ctx - l) // d + 1
    g = HQ // HKV
    kv_tokens = n_cmp + min(ctx, n * ls) + min(ctx, w)
    n_blocks = -(-n_cmp * d // ls)
    per_group = kv_tokens * 2 * D * elem + 2 * g * n_blocks * 4  # K+V rows, fp32 block-score partials w + r
    return batch * (HKV * per_group + HQ * (D + 3 + D) * elem)


def dense_bytes(batch: int, ctx: int, elem: int = 2) -> int:
    """Bytes dense decode reads: all cached K and V, q and o."""
    return batch * (ctx * HKV * 2 * D * elem + HQ * 2 * D * elem)


def git_commit() -> str:
    if os.environ.get("NSA_COMMIT"):
        return os.environ["NSA_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench(batches, contexts, reps: int, use_graph: bool):
    from nsa_kernels.decode import nsa_decode

    dev, dt = torch.device("cuda"), torch.bfloat16
    bmax, tmax = max(batches), max(contexts)
    cmax = (tmax - HP["cmp_block"]) // HP["cmp_stride"] + 1
    gen = torch.Generator(device=dev).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=dev, dtype=dt)  # noqa: E731
    # one cache of the largest size; smaller runs use [:B, :T] views of it (same strides)
    k, v, k_win, v_win = (rnd(bmax, tmax, HKV, D) for _ in range(4))
    k_cmp, v_cmp = rnd(bmax, cmax, HKV, D), rnd(bmax, cmax, HKV, D)
    q_all = rnd(bmax, HQ, D)
    gates_all = torch.rand(bmax, HQ, 3, generator=gen, device=dev).to(dt)
    rows = []
    for ctx in contexts:
        ccap = (ctx - HP["cmp_block"]) // HP["cmp_stride"] + 1
        for batch in batches:
            q, gates = q_all[:batch], gates_all[:batch]
            lengths = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
            views = dict(k=k[:batch, :ctx], v=v[:batch, :ctx], k_win=k_win[:batch, :ctx], v_win=v_win[:batch, :ctx],
                         k_cmp=k_cmp[:batch, :ccap], v_cmp=v_cmp[:batch, :ccap])
            step = lambda: nsa_decode(q, views["k"], views["v"], views["k_cmp"], views["v_cmp"], gates,  # noqa: E731
                                      lengths, k_win=views["k_win"], v_win=views["v_win"], **HP)
            ms, mode = time_step(step, reps, use_graph)
            row = dict(impl="nsa", batch=batch, seq=ctx, decode_ms=ms, timing=mode, bytes=nsa_bytes(batch, ctx))
            rows.append(row)
            qd = q[:, :, None, :]  # [B, HQ, 1, D]
            kd, vd = views["k"].transpose(1, 2), views["v"].transpose(1, 2)  # [B, HKV, T, D], strided views
            best = None
            for name, backend in DENSE.items():
                def dense(backend=backend):
                    with sdpa_kernel([backend]):
                        return F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)
                try:
                    dense()
                    torch.cuda.synchronize()
                except Exception as exc:  # backend unavailable for these shapes/strides
                    rows.append(dict(impl=name, batch=batch, seq=ctx, error=type(exc).__name__))
                    continue
                ms_d, mode_d = time_step(dense, reps, use_graph)
                rows.append(dict(impl=name, batch=batch, seq=ctx, decode_ms=ms_d, timing=mode_d,
                                 bytes=dense_bytes(batch, ctx)))
                best = ms_d if best is None else min(best, ms_d)
            row["dense_best_ms"] = best
            row["speedup_vs_dense"] = best / ms if best else None
            print(f"  T={ctx:>6} B={batch:>2}: nsa {ms:.4f} ms ({mode}), dense best "
                  f"{best if best is None else round(best, 4)} ms", flush=True)
    for r in rows:
        if "decode_ms" in r:
            r["gbytes_per_s"] = r["bytes"] / (r["decode_ms"] * 1e-3) / 1e9
    return rows


def markdown(record) -> str:
    lines = [f"# Decode step: NSA vs dense SDPA ({record['card']}, {record['date']})", "",
             f"Shape: {json.dumps(record['shape'])}; commit {record['commit'][:12]}; times are medians "
             "of CUDA-graph replays (column `timing`), dense = fastest SDPA backend on the same cache.", "",
             "| T | B | NSA ms | dense ms (backend) | speedup | NSA GB/s | dense GB/s |", "|---|---|---|---|---|---|---|"]
    by_key = {}
    for r in record["rows"]:
        by_key.setdefault((r["seq"], r["batch"]), []).append(r)
    for (seq, batch), rs in sorted(by_key.items()):
        nsa = next(r for r in rs if r["impl"] == "nsa")
        dense = [r for r in rs if r["impl"] != "nsa" and "decode_ms" in r]
        if dense:
            best = min(dense, key=lambda r: r["decode_ms"])
            dense_txt = f"{best['decode_ms']:.4f} ({best['impl']})"
            spd, dgb = f"{best['decode_ms'] / nsa['decode_ms']:.1f}x", f"{best['gbytes_per_s']:.0f}"
        else:
            dense_txt, spd, dgb = "n/a", "n/a", "n/a"
        lines.append(f"| {seq} | {batch} | {nsa['decode_ms']:.4f} | {dense_txt} | {spd} | "
                     f"{nsa['gbytes_per_s']:.0f} | {dgb} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--contexts", default="8192,32768,65536,131072")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--no-graph", action="store_true", help="time eager launches instead of CUDA graphs")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                  "benchmarks"))
    p.add_argument("--tag", default="", help="suffix of the output names (decode-<date><tag>)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: tools/bench_decode.py needs a CUDA GPU")
        return 2
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    if min(batches) < 1 or min(contexts) < HP["slc_block"]:
        print(f"error: --batches must be >= 1 and --contexts >= {HP['slc_block']}")
        return 2
    start = time.time()
    rows = bench(batches, contexts, args.reps, not args.no_graph)
    import triton

    try:
        from importlib.metadata import version
        mcore = version("megatron-core")
    except Exception:  # not installed on the GPU machine
        mcore = None
    record = {
        "topic": "decode", "date": datetime.date.today().isoformat(), "card": torch.cuda.get_device_name(),
        "gpus": 1, "commit": git_commit(),
        "software": {"torch": torch.__version__, "triton": triton.__version__, "megatron_core": mcore},
        "shape": {"heads": HQ, "kv_heads": HKV, "qk_dim": D, "v_dim": D, "dtype": "bf16",
                  "branch_kv": "independent", **HP},
        "seconds": round(time.time() - start, 1), "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"decode-{record['date']}{args.tag}")
    with open(stem + ".json", "w") as f:
        json.dump(record, f, indent=1)
    table = markdown(record)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(f"wrote {stem}.json and .md in {record['seconds']} s")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
