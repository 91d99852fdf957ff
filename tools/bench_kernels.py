"""Benchmark full NSA attention (issue 3) against dense causal SDPA (cuDNN, flash) on one GPU.

NSA here is q, k, v, gates -> o: MLP compression of K and V, compressed attention, block
scores + top-n, selected attention, sliding window and gating, forward and backward
(gradients reach q, k, v, gates and the compressors). Per-branch times come from timing each
launcher alone. Writes benchmarks/kernels-<date>.json and .md (BENCHMARKS.md format) and a
PNG plot when matplotlib is available.

    python tools/bench_kernels.py --seqs 8192,16384,32768,65536,131072
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess

import torch
import torch.nn.functional as F

from nsa_kernels.combine import combine_bwd, combine_fwd
from nsa_kernels.dense import dense_attention_bwd, dense_attention_fwd
from nsa_kernels.function import nsa_attention_triton
from nsa_kernels.layout import compressed_cu_seqlens
from nsa_kernels.selected import selected_attention_bwd, selected_attention_fwd
from nsa_kernels.selection import select_blocks_triton
from nsa_kernels.varlen import Varlen

HP = dict(cmp_block=32, cmp_stride=16, slc_block=64, topk=16, window=512, init_blocks=1, local_blocks=2)


def timed(fn, reps: int, warmup: int = 2) -> float:
    """Median of ``reps`` event-timed calls (ms) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def commit() -> str:
    if os.environ.get("NSA_COMMIT"):
        return os.environ["NSA_COMMIT"]
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"]).returncode != 0
        untracked = subprocess.check_output(["git", "ls-files", "--others", "--exclude-standard",
                                             "kernels", "tools"], text=True).strip()
        return f"uncommitted on top of {sha}" if (dirty or untracked) else sha
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git)"


def make_compressors(hkv, dqk, dv, dtype):
    from nsa_megatron.compression import MLPCompressor

    kc = MLPCompressor(hkv, dqk, HP["cmp_block"], HP["cmp_stride"]).cuda().to(dtype)
    vc = MLPCompressor(hkv, dv, HP["cmp_block"], HP["cmp_stride"]).cuda().to(dtype)
    return kc, vc


def make_inputs(T, hq, hkv, dqk, dv):
    """Seeded bf16 leaves of one B=1 sequence of T tokens on the GPU and its compressors.

    Returns (q [T, hq, dqk], k [T, hkv, dqk], v [T, hkv, dv], gates [T, hq, 3], cu int32 [2],
    k compressor, v compressor, the generator that drew them)."""
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(T)
    q = torch.randn(T, hq, dqk, device="cuda", dtype=dtype, generator=g).requires_grad_()
    k = torch.randn(T, hkv, dqk, device="cuda", dtype=dtype, generator=g).requires_grad_()
    v = torch.randn(T, hkv, dv, device="cuda", dtype=dtype, generator=g).requires_grad_()
    gates = torch.rand(T, hq, 3, device="cuda", dtype=dtype, generator=g).requires_grad_()
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    kcomp, vcomp = make_compressors(hkv, dqk, dv, dtype)
    return q, k, v, gates, cu, kcomp, vcomp, g


V7_FWD_TILES = {"fwd": dict(ROWS=64, BLOCK_N=64, num_warps=4, num_stages=3),
                "win_fwd": dict(ROWS=64, BLOCK_N=32, num_warps=4, num_stages=3)}
# --ab: forward variants bench_nsa times again after the defaults, each a list of
# (module under nsa_kernels, attribute, value) set for its run and restored after it
AB_VARIANTS = {
    "v7_tiles": [("dense", "TILE_OVERRIDE", V7_FWD_TILES)],
    "scores_fp16": [("selection", "TILE_OVERRIDE", {"split": False})],
    "scores_split": [("selection", "TILE_OVERRIDE", {"split": True})],
    "no_local": [("function", "LOCAL_IN_WINDOW", {"shared": False, "independent": False})],
}
AB_FWD: list = []  # the names chosen by --ab


def with_settings(settings, fn):
    """fn() with the AB_VARIANTS-style ``settings`` applied, the previous values restored."""
    import importlib

    saved = []
    for mod_name, attr, value in settings:
        mod = importlib.import_module(f"nsa_kernels.{mod_name}")
        saved.append((mod, attr, getattr(mod, attr)))
        setattr(mod, attr, value)
    try:
        return fn()
    finally:
        for mod, attr, value in reversed(saved):
            setattr(mod, attr, value)


def bench_nsa(T, hq, hkv, dqk, dv, reps):
    q, k, v, gates, cu, kcomp, vcomp, _ = make_inputs(T, hq, hkv, dqk, dv)
    scale = dqk ** -0.5

    def fwd():
        return nsa_attention_triton(q, k, v, kcomp(k, cu), vcomp(v, cu), gates, cu, scale=scale, **HP)

    row = {"impl": "nsa", "seq": T, "fwd_ms": timed(fwd, reps)}
    o = fwd()
    do = torch.randn_like(o)
    params = [q, k, v, gates, *kcomp.parameters(), *vcomp.parameters()]

    def bwd():
        for p in params:
            p.grad = None
        o.backward(do, retain_graph=True)

    row["bwd_ms"] = timed(bwd, reps)
    if AB_FWD:  # the whole forward again under each variant, then the defaults again
        ab = {}
        for name in (*AB_FWD, "default_again"):
            ab[name] = round(with_settings(AB_VARIANTS.get(name, []), lambda: timed(fwd, reps)), 3)
        row["fwd_ab_ms"] = ab
    row["branches_ms"] = branch_times(q.detach(), k.detach(), v.detach(), kcomp, vcomp,
                                      gates.detach(), cu, scale, do, reps)
    return row


def branch_times(q, k, v, kcomp, vcomp, gates, cu, scale, do, reps):
    """Each launcher alone (ms), same inputs as the full run."""
    with torch.no_grad():
        k_cmp, v_cmp = kcomp(k, cu), vcomp(v, cu)
    lay = Varlen.build(cu)
    kc_cu = compressed_cu_seqlens(cu, HP["cmp_block"], HP["cmp_stride"])
    cmp_kw = dict(key_stride=HP["cmp_stride"], key_offset=HP["cmp_block"] - 1, window=0, scale=scale)
    win_kw = dict(key_stride=1, key_offset=0, window=HP["window"], scale=scale)
    sel_kw = {n: HP[n] for n in ("cmp_block", "cmp_stride", "slc_block", "topk", "init_blocks", "local_blocks")}
    out = {}
    with torch.no_grad():
        out["compress_fwd"] = timed(lambda: (kcomp(k, cu), vcomp(v, cu)), reps)
        o_c, lse_c = dense_attention_fwd(q, k_cmp, v_cmp, lay, kc_cu, **cmp_kw)
        out["cmp_fwd"] = timed(lambda: dense_attention_fwd(q, k_cmp, v_cmp, lay, kc_cu, **cmp_kw), reps)
        blocks = select_blocks_triton(q, k_cmp, lse_c, lay, kc_cu, scale=scale, **sel_kw)
        out["select"] = timed(lambda: select_blocks_triton(q, k_cmp, lse_c, lay, kc_cu, scale=scale, **sel_kw), reps)
        o_s, lse_s = selected_attention_fwd(q, k, v, blocks, lay, cu, slc_block=HP["slc_block"], scale=scale)
        out["slc_fwd"] = timed(lambda: selected_attention_fwd(q, k, v, blocks, lay, cu, slc_block=HP["slc_block"],
                                                              scale=scale), reps)
        o_w, lse_w = dense_attention_fwd(q, k, v, lay, cu, **win_kw)
        # the forward runs the window kernel with the gated sum fused (combine=...)
        out["win_fwd"] = timed(lambda: dense_attention_fwd(q, k, v, lay, cu, combine=(o_c, o_s, gates),
                                                           **win_kw), reps)
        out["win_fwd_alone"] = timed(lambda: dense_attention_fwd(q, k, v, lay, cu, **win_kw), reps)
        out["combine_fwd_unfused"] = timed(lambda: combine_fwd(o_c, o_s, o_w, gates), reps)
        # the backward runs each branch with the gate/delta step fused into its dQ kernel
        # (fuse=...); combine_bwd_unfused is the separate pass it replaced
        out["combine_bwd_unfused"] = timed(lambda: combine_bwd(do, o_c, o_s, o_w, gates), reps)
        dgates = torch.empty_like(gates)
        out["cmp_bwd"] = timed(lambda: dense_attention_bwd(q, k_cmp, v_cmp, do, lse_c, None, lay, kc_cu,
                                                           gate=gates[:, :, 0], fuse=(o_c, dgates[:, :, 0]),
                                                           **cmp_kw), reps)
        out["slc_bwd"] = timed(lambda: selected_attention_bwd(q, k, v, do, lse_s, None, blocks, lay, cu,
                                                              slc_block=HP["slc_block"], scale=scale,
                                                              gate=gates[:, :, 1], fuse=(o_s, dgates[:, :, 1])),
                               reps)
        out["win_bwd"] = timed(lambda: dense_attention_bwd(q, k, v, do, lse_w, None, lay, cu, gate=gates[:, :, 2],
                                                           fuse=(o_w, dgates[:, :, 2]), **win_kw), reps)
    return {n: round(t, 3) for n, t in out.items()}


SWEEP = {  # kernel -> candidate launch shapes (first = the launcher's default on Dqk = Dv = 128)
    # compressed default, window default, then round 6's register-capped 8- and 16-token tiles
    # (2 resp. 1 programs of 8 resp. 16 warps per SM; not kept, kernels-analysis.md round 6);
    # the round 1-4 shapes without a cap are in kernels-sweep-2026-11-26-r4.log
    "dense:fwd": [dict(ROWS=64, BLOCK_N=64, num_warps=4, num_stages=3),
                  dict(ROWS=64, BLOCK_N=32, num_warps=4, num_stages=3),
                  dict(ROWS=128, BLOCK_N=32, num_warps=8, num_stages=3, maxnreg=128),
                  dict(ROWS=128, BLOCK_N=32, num_warps=8, num_stages=2, maxnreg=128),
                  dict(ROWS=256, BLOCK_N=16, num_warps=16, num_stages=2, maxnreg=128)],
    # selection.TILE_OVERRIDE: score kernel (ROWS, BJ, num_warps), top-n (top_rows, top_warps)
    "scores": [dict(), dict(ROWS=128, num_warps=8), dict(BJ=32), dict(ROWS=128, BJ=8, num_warps=8),
               dict(num_warps=8), dict(ROWS=32, num_warps=4)],
    "topn": [dict(), dict(top_rows=2, top_warps=4), dict(top_rows=1, top_warps=2),
             dict(top_rows=1, top_warps=4)],
    "dense:dq": [dict(ROWS=128, BLOCK_N=64, num_warps=8, num_stages=2),
                 dict(ROWS=64, BLOCK_N=64, num_warps=4, num_stages=3),
                 dict(ROWS=64, BLOCK_N=64, num_warps=8, num_stages=2),
                 dict(ROWS=128, BLOCK_N=32, num_warps=8, num_stages=2),
                 dict(ROWS=64, BLOCK_N=32, num_warps=4, num_stages=3)],
    "dense:dkdv": [dict(ROWS=64, BLOCK_N=128, num_warps=8, num_stages=2),
                   dict(ROWS=64, BLOCK_N=64, num_warps=8, num_stages=2),
                   dict(ROWS=32, BLOCK_N=128, num_warps=8, num_stages=2),
                   dict(ROWS=16, BLOCK_N=128, num_warps=8, num_stages=2),
                   dict(ROWS=32, BLOCK_N=64, num_warps=4, num_stages=2),
                   dict(ROWS=64, BLOCK_N=64, num_warps=8, num_stages=3)],
    "slc:fwd": [dict(num_warps=4, num_stages=2), dict(num_warps=2, num_stages=2),
                dict(num_warps=4, num_stages=3), dict(num_warps=2, num_stages=4)],
    "slc:dq": [dict(num_warps=4, num_stages=2), dict(num_warps=2, num_stages=2),
               dict(num_warps=4, num_stages=3), dict(num_warps=2, num_stages=4)],
    "slc:dkdv": [dict(ROWS=32, SEGMENT=512, num_warps=4, num_stages=2),
                 dict(ROWS=64, SEGMENT=512, num_warps=8, num_stages=2),
                 dict(ROWS=32, SEGMENT=512, num_warps=8, num_stages=2),
                 dict(ROWS=64, SEGMENT=2048, num_warps=8, num_stages=2),
                 dict(ROWS=64, SEGMENT=512, num_warps=8, num_stages=3)],
}


def pair_counts(T: int) -> dict:
    """Visible (query, key) pairs per query head of each branch (selected: upper bound)."""
    t = torch.arange(T, dtype=torch.float64)
    l, d, w = HP["cmp_block"], HP["cmp_stride"], HP["window"]
    cmp = torch.where(t >= l - 1, torch.div(t - l + 1, d, rounding_mode="floor") + 1, 0).sum()
    win = torch.clamp(t + 1, max=w).sum()
    slc = torch.clamp(t + 1, max=HP["topk"] * HP["slc_block"]).sum()
    return {"cmp": float(cmp), "win": float(win), "slc": float(slc)}


def sweep(T, hq, hkv, dqk, dv, reps, only=()):
    """Time every kernel alone under each SWEEP shape at length T; rows with ms and TFLOP/s
    (FLOPs of the visible pairs only: fwd 2(Dqk+Dv), dq 2(2Dqk+Dv), dkdv 4(Dqk+Dv), qk 2 Dqk per
    pair); ``only``: kernel-name prefixes to time (all when empty)."""
    import nsa_kernels.dense as dense
    import nsa_kernels.selected as selected

    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(T)
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    q, k, v, do = rnd(T, hq, dqk), rnd(T, hkv, dqk), rnd(T, hkv, dv), rnd(T, hq, dv)
    gates = torch.rand(T, hq, 3, device="cuda", dtype=dtype, generator=g)
    cu = torch.tensor([0, T], dtype=torch.int32, device="cuda")
    kcomp, vcomp = make_compressors(hkv, dqk, dv, dtype)
    scale = dqk ** -0.5
    with torch.no_grad():
        k_cmp, v_cmp = kcomp(k, cu), vcomp(v, cu)
    lay = Varlen.build(cu)
    kc_cu = compressed_cu_seqlens(cu, HP["cmp_block"], HP["cmp_stride"])
    kw = {"cmp": dict(key_stride=HP["cmp_stride"], key_offset=HP["cmp_block"] - 1, window=0, scale=scale),
          "win": dict(key_stride=1, key_offset=0, window=HP["window"], scale=scale)}
    kv = {"cmp": (k_cmp, v_cmp, kc_cu), "win": (k, v, cu)}
    sel_kw = {n: HP[n] for n in ("cmp_block", "cmp_stride", "slc_block", "topk", "init_blocks", "local_blocks")}
    pairs = pair_counts(T)
    flop = {"fwd": 2 * (dqk + dv), "dq": 2 * (2 * dqk + dv), "dkdv": 4 * (dqk + dv), "qk": 2 * dqk}
    rows = []

    def run(name, kernel, cfg, fn, branch):
        if only and not any(name.startswith(o) for o in only):
            return
        try:
            ms = timed(fn, reps, warmup=1)
        except Exception as err:  # a shape that does not fit (shared memory) is a result too
            rows.append({"kernel": name, "cfg": cfg, "error": str(err)[:200]})
            print(name, cfg, "error", str(err)[:120], flush=True)
            return
        tf = flop[kernel] * pairs[branch] * hq / ms / 1e9
        rows.append({"kernel": name, "cfg": cfg, "ms": round(ms, 3), "tflops": round(tf, 1)})
        print(f"{name:10s} {ms:8.3f} ms {tf:6.1f} TFLOP/s {cfg}", flush=True)

    with torch.no_grad():
        outs = {}
        for br in ("cmp", "win"):
            outs[br] = dense_attention_fwd(q, kv[br][0], kv[br][1], lay, kv[br][2], **kw[br])
        blocks = select_blocks_triton(q, k_cmp, outs["cmp"][1], lay, kc_cu, scale=scale, **sel_kw)
        o_s, lse_s = selected_attention_fwd(q, k, v, blocks, lay, cu, slc_block=HP["slc_block"], scale=scale)
        _, delta = combine_bwd(do, outs["cmp"][0], o_s, outs["win"][0], gates)
        import nsa_kernels.selection as selection
        from nsa_kernels.selection import _scores_chunks

        def scores_only():
            for _ in _scores_chunks(q, k_cmp, outs["cmp"][1], lay, kc_cu, cmp_block=HP["cmp_block"],
                                    cmp_stride=HP["cmp_stride"], slc_block=HP["slc_block"], scale=scale,
                                    budget_bytes=256 << 20):
                pass
        for cfg in SWEEP["scores"]:
            selection.TILE_OVERRIDE = dict(cfg)
            run("scores", "qk", cfg, scores_only, "cmp")
        for cfg in SWEEP["topn"]:  # scores (default launch) + top-n under cfg
            selection.TILE_OVERRIDE = dict(cfg)
            run("select", "qk", cfg, lambda: select_blocks_triton(q, k_cmp, outs["cmp"][1], lay, kc_cu,
                                                                  scale=scale, **sel_kw), "cmp")
        selection.TILE_OVERRIDE = {}
        for br, gi in (("cmp", 0), ("win", 2)):
            kk, vv, kcu = kv[br]
            for cfg in SWEEP["dense:fwd"]:
                dense.TILE_OVERRIDE = {"fwd": cfg}
                run(f"{br}_fwd", "fwd", cfg, lambda: dense_attention_fwd(q, kk, vv, lay, kcu, **kw[br]), br)
            o_b, lse_b = outs[br]
            dgates = torch.empty_like(gates)
            dog = (do.float() * gates[:, :, gi, None].float()).to(do.dtype)
            for part in ("dq", "dkdv"):
                # dQ with the fused gate/delta step; dK/dV on the gated dO it stores
                bw = (dict(do=do, gate=gates[:, :, gi], fuse=(o_b, dgates[:, :, gi])) if part == "dq"
                      else dict(do=dog, gate=None))
                for cfg in SWEEP["dense:" + part]:
                    dense.TILE_OVERRIDE = {part: cfg}
                    run(f"{br}_{part}", part, cfg, lambda: dense_attention_bwd(
                        q, kk, vv, bw["do"], lse_b, delta[gi], lay, kcu, gate=bw["gate"], kernels=(part,),
                        fuse=bw.get("fuse"), **kw[br]), br)
            dense.TILE_OVERRIDE = {}
        for cfg in SWEEP["slc:fwd"]:
            selected.TILE_OVERRIDE = {"fwd": cfg}
            run("slc_fwd", "fwd", cfg, lambda: selected_attention_fwd(q, k, v, blocks, lay, cu, slc_block=HP["slc_block"],
                                                                  scale=scale), "slc")
        dgates = torch.empty_like(gates)
        dog = (do.float() * gates[:, :, 1, None].float()).to(do.dtype)
        for part in ("dq", "dkdv"):
            bw = (dict(do=do, gate=gates[:, :, 1], fuse=(o_s, dgates[:, :, 1])) if part == "dq"
                  else dict(do=dog, gate=None))
            for cfg in SWEEP["slc:" + part]:
                selected.TILE_OVERRIDE = {part: dict(cfg)}
                run(f"slc_{part}", part, cfg, lambda: selected_attention_bwd(
                    q, k, v, bw["do"], lse_s, delta[1], blocks, lay, cu, slc_block=HP["slc_block"], scale=scale,
                    gate=bw["gate"], kernels=(part,), fuse=bw.get("fuse")), "slc")
        selected.TILE_OVERRIDE = {}
    return rows


def bench_dense(T, hq, hkv, d, backend, reps, dv=None):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    g = torch.Generator(device="cuda").manual_seed(T + 1)
    q = torch.randn(1, hq, T, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k = torch.randn(1, hkv, T, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    v = torch.randn(1, hkv, T, dv or d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()

    def fwd():
        with sdpa_kernel(which):
            kk = k.repeat_interleave(hq // hkv, 1)
            vv = v.repeat_interleave(hq // hkv, 1)
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=True)

    row = {"impl": backend, "seq": T, "fwd_ms": timed(fwd, reps)}
    o = fwd()
    do = torch.randn_like(o)

    def bwd():
        q.grad = k.grad = v.grad = None
        o.backward(do, retain_graph=True)

    row["bwd_ms"] = timed(bwd, reps)
    return row


def write(rows, args, out_dir, quiet=False):
    date = datetime.date.today().isoformat()
    card = torch.cuda.get_device_name()
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    doc = {"topic": "kernels", "date": date, "card": card, "gpus": 1, "commit": commit(),
           "software": {"torch": torch.__version__, "triton": tv},
           "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "qk_dim": args.dqk, "v_dim": args.dv,
                     "dtype": "bf16", **HP},
           "notes": "dense baselines expand K/V to all query heads; NSA fwd includes MLP compression of K and V; "
                    "bwd_ms is backward alone (retain_graph replays)",
           "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"kernels-{date}-{args.tag}" if args.tag else f"kernels-{date}")
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    lines = [f"# NSA kernels vs dense attention ({date}, {card}, commit {doc['commit']})", "",
             f"bf16, B=1, {args.heads} q heads, {args.kv_heads} kv heads, Dqk={args.dqk}, Dv={args.dv}, "
             "l=32 d=16 l'=64 n=16 w=512; medians of event-timed runs (ms).", "",
             "| seq | impl | fwd | bwd | fwd+bwd |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['seq']} | {r['impl']} | {r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} | "
                     f"{r['fwd_ms'] + r['bwd_ms']:.2f} |")
    lines += ["", "Per-branch times of NSA (ms):", ""]
    for r in rows:
        if r["impl"] == "nsa":
            lines.append(f"- {r['seq']}: " + ", ".join(f"{k} {v}" for k, v in r["branches_ms"].items()))
    ab_rows = [r for r in rows if r.get("fwd_ab_ms")]
    if ab_rows:
        lines += ["", "Whole forward again under each `--ab` variant (same inputs, after the defaults; "
                  "ms):", ""]
        for r in ab_rows:
            lines.append(f"- {r['seq']}: " + ", ".join(f"{k} {v}" for k, v in r["fwd_ab_ms"].items()))
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for impl in ("nsa", "cudnn", "flash"):
            pts = [(r["seq"], r["fwd_ms"] + r["bwd_ms"]) for r in rows if r["impl"] == impl]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=impl)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel("fwd+bwd ms")
        ax.set_title(card)
        ax.legend()
        fig.savefig(stem + ".png", dpi=120, bbox_inches="tight")
    except ImportError:
        print("matplotlib missing: no PNG")
    if not quiet:
        print("\n".join(lines))
    return stem


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", default="8192,16384,32768,65536,131072")
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--dqk", type=int, default=128)
    p.add_argument("--dv", type=int, default=128)
    p.add_argument("--dense", default="cudnn,flash", help="dense baselines to run ('' for none)")
    p.add_argument("--out", default="benchmarks")
    p.add_argument("--tag", default="")
    p.add_argument("--sweep", type=int, default=0, help="time each kernel's candidate shapes at this length")
    p.add_argument("--sweep-only", default="", help="comma-separated kernel-name prefixes for --sweep")
    p.add_argument("--prescale-do", type=int, default=1,
                   help="0: dK/dV kernels gate dO themselves instead of reading the dQ kernel's gated copy")
    p.add_argument("--ab", default="",
                   help=f"comma-separated forward variants also timed at every length (fwd_ab_ms): "
                        f"{', '.join(AB_VARIANTS)}")
    args = p.parse_args()
    import nsa_kernels.dense as dense

    for name in filter(None, args.ab.split(",")):
        if name not in AB_VARIANTS:
            p.error(f"--ab: unknown variant {name!r} (known: {', '.join(AB_VARIANTS)})")
        AB_FWD.append(name)

    dense.PRESCALE_DO = bool(args.prescale_do)
    if args.sweep:
        rows = sweep(args.sweep, args.heads, args.kv_heads, args.dqk, args.dv, reps=5,
                     only=tuple(filter(None, args.sweep_only.split(","))))
        doc = {"topic": "kernels-sweep", "date": datetime.date.today().isoformat(),
               "card": torch.cuda.get_device_name(), "gpus": 1, "commit": commit(), "seq": args.sweep,
               "shape": {"heads": args.heads, "kv_heads": args.kv_heads, "qk_dim": args.dqk, "v_dim": args.dv,
                         "dtype": "bf16", **HP}, "rows": rows}
        os.makedirs(args.out, exist_ok=True)
        name = f"kernels-sweep-{doc['date']}" + (f"-{args.tag}" if args.tag else "")
        with open(os.path.join(args.out, name + ".json"), "w") as f:
            json.dump(doc, f, indent=1)
        if not args.seqs:
            return
    rows = []
    for T in (int(s) for s in args.seqs.split(",")):
        reps = 10 if T <= 32768 else 5
        rows.append(bench_nsa(T, args.heads, args.kv_heads, args.dqk, args.dv, reps))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
        for backend in filter(None, args.dense.split(",")):
            try:
                rows.append(bench_dense(T, args.heads, args.kv_heads, args.dqk, backend, reps, dv=args.dv))
                print(rows[-1], flush=True)
            except RuntimeError as err:
                print(f"{backend} at {T}: {err}")
            torch.cuda.empty_cache()
        write(rows, args, args.out, quiet=True)  # partial results survive a timeout
    write(rows, args, args.out)


if __name__ == "__main__":
    main()
