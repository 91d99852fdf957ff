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
    python tools/bench_decode.py --set=PDL=0 --tag=-nopdl  # module constants of nsa_kernels.decode

A/B mode (``--baseline OLD_DECODE.py``): the baseline file (e.g. ``git show HEAD:kernels/decode.py``)
is loaded as a private module beside ``nsa_kernels.decode``; each ``--variants`` entry
(``name:ATTR=INT,ATTR=INT``, ';'-separated) sets module constants of ``nsa_kernels.decode``.
Every variant is first checked against the baseline on random caches of mixed lengths (same
block indices and bitwise-equal outputs, poisoned outputs, CUDA-graph replay equal to eager
after the lengths change), then baseline, variants and cuDNN SDPA are timed interleaved, round
after round (CUDA-graph replay medians), for each ``--ab-shapes`` entry B/T:

    python tools/bench_decode.py --baseline /tmp/decode_head.py --variants "plain:PDL=0;m15:PDL_ENTRY_MASK=15"
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
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
            run, mode = capture(fn).replay, "graph"
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


def short_commit(commit: str) -> str:
    """A bare 40-hex sha cut to 12 characters; anything else (sha + working-tree note) as given."""
    return commit[:12] if len(commit) == 40 else commit


def decode_settings() -> dict:
    """The decode module's tuning constants and the PDL mode it uses on this GPU."""
    import nsa_kernels.decode as decode_module

    names = ("PDL", "PDL_ENTRY_MASK", "TOPK_BITONIC", "TOPK_KEYS_PER_THREAD", "CMP_PROGRAMS_PER_SM",
             "PART_PROGRAMS_PER_SM", "BLOCK_J", "CMP_TILE", "CMP_STAGES")
    out = {n: getattr(decode_module, n) for n in names if hasattr(decode_module, n)}
    if hasattr(decode_module, "pdl_mode"):
        out["pdl_active"] = decode_module.pdl_mode(torch.device("cuda"))
    return out


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


def load_baseline(path: str):
    """The decode module in ``path`` imported as ``nsa_kernels._decode_baseline`` (its relative
    imports resolve inside nsa_kernels)."""
    import nsa_kernels

    spec = importlib.util.spec_from_file_location(f"{nsa_kernels.__name__}._decode_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_sets(text: str) -> dict:
    """'A=1,B=2' -> {A: 1, B: 2} ('' -> {})."""
    return {k.strip(): int(v) for k, v in (kv.split("=") for kv in filter(None, text.split(",")))}


def parse_variants(text: str) -> list:
    """'name:A=1,B=2;name2:A=0' -> [(name, {A: 1, B: 2}), (name2, {A: 0})]."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(";"))):
        name, _, sets = item.partition(":")
        out.append((name, parse_sets(sets)))
    return out


@contextlib.contextmanager
def settings(module, values: dict):
    """Module constants of ``module`` set to ``values`` inside the block (unknown names refused)."""
    old = {k: getattr(module, k) for k in values}  # AttributeError on a misspelt constant
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(module, k, v)


def random_step(batch: int, ctx: int, seed: int, mixed: bool):
    """Inputs of one decode step: dict of q [B, HQ, D], caches [B, ctx, HKV, D], compressed
    caches, gates and lengths int32 [B] (mixed: random in [1, ctx] with one full sequence)."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=dev, dtype=dt)  # noqa: E731
    ccap = (ctx - HP["cmp_block"]) // HP["cmp_stride"] + 1
    lengths = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
    if mixed:
        lengths = torch.randint(1, ctx + 1, (batch,), generator=gen, device=dev, dtype=torch.int32)
        lengths[0] = ctx
    return dict(q=rnd(batch, HQ, D), k=rnd(batch, ctx, HKV, D), v=rnd(batch, ctx, HKV, D),
                k_win=rnd(batch, ctx, HKV, D), v_win=rnd(batch, ctx, HKV, D), k_cmp=rnd(batch, ccap, HKV, D) * 2,
                v_cmp=rnd(batch, ccap, HKV, D), gates=torch.rand(batch, HQ, 3, generator=gen, device=dev).to(dt),
                lengths=lengths)


def run_step(decode, x: dict):
    """(o [B, HQ, D], block indices [B, HKV, topk]) of ``decode`` on the inputs of ``random_step``."""
    return decode(x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], x["gates"], x["lengths"], k_win=x["k_win"],
                  v_win=x["v_win"], return_block_indices=True, **HP)


def check_variant(decode_module, values: dict, baseline, log) -> bool:
    """Variant ``values`` of ``decode_module`` vs ``baseline``: equal indices and bitwise-equal
    outputs (poisoned) on mixed-length batches; CUDA-graph replay equal to eager."""
    from nsa_kernels.varlen import poisoned_outputs

    ok = True
    with settings(decode_module, values):
        for batch, ctx, seed in ((8, 65536, 1), (32, 65536, 2), (1, 131072, 3), (5, 8192, 4)):
            x = random_step(batch, ctx, seed, mixed=batch > 1)
            with poisoned_outputs():
                o_new, bi_new = run_step(decode_module.nsa_decode, x)
                o_old, bi_old = run_step(baseline.nsa_decode, x)
            same = torch.equal(bi_new, bi_old) and torch.equal(o_new, o_old)
            rel = ((o_new.double() - o_old.double()).norm() / o_old.double().norm()).item()
            log(f"  check B={batch:>2} T={ctx:>6}: same blocks {torch.equal(bi_new, bi_old)}, "
                f"bitwise-equal o {torch.equal(o_new, o_old)} (rel {rel:.1e}), nan {bool(o_new.isnan().any())}")
            ok &= same and not bool(o_new.isnan().any())
        x = random_step(8, 8192, 5, mixed=True)
        run_step(decode_module.nsa_decode, x)  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o_g, bi_g = run_step(decode_module.nsa_decode, x)
        for r in range(3):
            x["lengths"].copy_(torch.randint(1, 8193, (8,), device="cuda", dtype=torch.int32))
            graph.replay()
            o_e, bi_e = run_step(decode_module.nsa_decode, x)
            equal = torch.equal(o_g, o_e) and torch.equal(bi_g, bi_e)
            log(f"  graph replay {r}: equal to eager {equal}")
            ok &= equal
    return ok


def capture(fn):
    """A CUDA graph of ``fn`` (warmed up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def replay_median_us(graph, reps: int) -> float:
    """Median of ``reps`` event-timed replays of ``graph``, in microseconds."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def capture_dense(x: dict):
    """A CUDA graph of cuDNN SDPA decode over the selection-branch cache of ``x`` (None if cuDNN
    cannot run or be captured here)."""
    qd, kd, vd = x["q"][:, :, None, :], x["k"].transpose(1, 2), x["v"].transpose(1, 2)

    def step():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)
    try:
        return capture(step)
    except Exception:  # cuDNN unavailable for this shape: no dense column
        torch.cuda.synchronize()
        return None


def ab_times(candidates, shapes, rounds: int, reps: int) -> dict:
    """{(name, (B, T)): median over rounds of the replay medians (None: not runnable)};
    candidates: [(name, module, values)], module None meaning cuDNN SDPA; within a round they
    run in the given order."""
    out = {}
    for batch, ctx in shapes:
        x = random_step(batch, ctx, 0, mixed=False)
        graphs = []
        for _name, module, values in candidates:
            if module is None:
                graphs.append(capture_dense(x))
                continue
            with settings(module, values):
                graphs.append(capture(lambda m=module: run_step(m.nsa_decode, x)))
        per = {name: [] for name, _, _ in candidates}
        for r in range(rounds + 1):  # round 0 warms up
            for (name, _, _), g in zip(candidates, graphs):
                if g is not None:
                    t = replay_median_us(g, reps)
                    per[name] += [t] if r else []
        for name, ts in per.items():
            out[(name, (batch, ctx))] = statistics.median(ts) if ts else None
        del graphs, x
        torch.cuda.synchronize()
    return out


def ab_main(args) -> int:
    """The A/B mode of the module docstring; prints (and logs) checks and a table of microseconds."""
    import nsa_kernels.decode as decode_module

    if args.ab_log:
        open(args.ab_log, "w").close()

    def log(text=""):
        print(text, flush=True)
        if args.ab_log:
            with open(args.ab_log, "a") as f:
                f.write(text + "\n")

    baseline = load_baseline(args.baseline)
    variants = parse_variants(args.variants)
    log(f"# A/B: baseline {args.baseline} vs nsa_kernels.decode variants, {torch.cuda.get_device_name()}, "
        f"SMs {torch.cuda.get_device_properties(0).multi_processor_count}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, commit {git_commit()}")
    log(f"# module defaults: {json.dumps(decode_settings())}")
    passed = {}
    for name, values in variants:
        log(f"check {name} {values}")
        passed[name] = check_variant(decode_module, values, baseline, log)
        log(f"check {name}: {'ok' if passed[name] else 'FAILED'}")
    shapes = [tuple(int(v) for v in s.split("/")) for s in args.ab_shapes.split(",")]
    candidates = [("old", baseline, {})]
    for name, values in variants:
        candidates += [(name, decode_module, values), ("old", baseline, {})] if passed[name] else []
    candidates = candidates + [("cudnn", None, {})]
    # 'old' appears between every variant: its median pools all those runs
    times = ab_times([(f"{n}#{i}", m, v) for i, (n, m, v) in enumerate(candidates)], shapes, args.rounds, args.reps)
    log(f"# CUDA-graph replay medians (us): median over {args.rounds} rounds of {args.reps} replays; "
        "'old' = median of its interleaved runs")
    log(f"{'variant':>16}: " + " ".join(f"{f'B{b}/{t // 1024}k':>9}" for b, t in shapes))
    table = {}
    for name in dict.fromkeys(n for n, _, _ in candidates):
        runs = [[t for (n, sh), t in times.items() if n.split("#")[0] == name and sh == shape and t is not None]
                for shape in shapes]
        table[name] = [statistics.median(ts) if ts else None for ts in runs]
        log(f"{name:>16}: " + " ".join(f"{t:9.1f}" if t else f"{'n/a':>9}" for t in table[name]))
        if name == "old":
            log(f"{'old min..max':>16}: " + " ".join(f"{f'{min(ts):.1f}..{max(ts):.1f}':>9}" for ts in runs))
    log("# speedup vs cuDNN SDPA of the same round (dense us / NSA us)")
    for name, row in table.items():
        if name != "cudnn":
            log(f"{name:>16}: " + " ".join(f"{d / t:8.2f}x" if d and t else f"{'n/a':>9}"
                                           for d, t in zip(table["cudnn"], row)))
    ranked = sorted((statistics.mean(t / o for t, o in zip(table[name], table["old"])), name)
                    for name, _ in variants if passed[name])
    if ranked:
        best = dict(variants)[ranked[0][1]]
        log(f"# best (mean time / old over the shapes): {ranked[0][1]} {ranked[0][0]:.3f}; "
            + ", ".join(f"{n} {r:.3f}" for r, n in ranked[1:]))
        if args.ab_best:
            with open(args.ab_best, "w") as f:
                f.write(",".join(f"{k}={v}" for k, v in best.items()))
    return 0 if all(passed.values()) else 1


def markdown(record) -> str:
    lines = [f"# Decode step: NSA vs dense SDPA ({record['card']}, {record['date']})", "",
             f"Shape: {json.dumps(record['shape'])}; commit {short_commit(record['commit'])}; "
             f"decode settings {json.dumps(record.get('decode_settings', {}))}; times are medians "
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
    p.add_argument("--baseline", help="A/B mode: a decode.py to compare nsa_kernels.decode against")
    p.add_argument("--variants", default="default:", help="A/B: 'name:ATTR=INT,...;name2:...' (module constants)")
    p.add_argument("--ab-shapes", default="1/65536,8/65536,32/65536,8/131072", help="A/B: B/T list")
    p.add_argument("--rounds", type=int, default=5, help="A/B: interleaved rounds")
    p.add_argument("--ab-log", help="A/B: also write the printed lines to this file")
    p.add_argument("--ab-best", help="A/B: write the fastest passing variant's 'ATTR=INT,...' to this file")
    p.add_argument("--set", default="", help="'ATTR=INT,...': nsa_kernels.decode constants for this run")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: tools/bench_decode.py needs a CUDA GPU")
        return 2
    if args.baseline:
        return ab_main(args)
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    if min(batches) < 1 or min(contexts) < HP["slc_block"]:
        print(f"error: --batches must be >= 1 and --contexts >= {HP['slc_block']}")
        return 2
    import nsa_kernels.decode as decode_module
    import triton

    start = time.time()
    with settings(decode_module, parse_sets(args.set)):
        rows = bench(batches, contexts, args.reps, not args.no_graph)
        chosen = decode_settings()

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
        "decode_settings": chosen, "seconds": round(time.time() - start, 1), "rows": rows,
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
