"""End-to-end training throughput: the 1B configs at 64k, NSA vs full attention, same machine.

Runs ``launch/pretrain_nsa.py`` once per config for a few steps with a metrics file, then
writes ``benchmarks/e2e-<date>[-tag].json`` and ``.md`` (BENCHMARKS.md format): median
tokens/s, iteration ms, TFLOP/s per GPU (NSA's real FLOPs) and peak memory over the steps
after the first two (compilation and allocator warm-up).

    python tools/bench_e2e.py --iters 8 --tag h100
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"nsa": "configs/nsa_1b_64k_h100.yaml", "full": "configs/full_1b_64k_h100.yaml"}


def run_config(name: str, config: str, iters: int, timeout: float) -> dict:
    """Train ``iters`` steps of ``config``; return the medians of its logged steps (or the error)."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "metrics.jsonl")
        cmd = [sys.executable, os.path.join(REPO, "launch", "pretrain_nsa.py"), "--config", config,
               f"train_iters={iters}", "micro_batch_size=1", "global_batch_size=1", "lr_warmup_iters=2", "eval_iters=0",
               "eval_interval=0", "save=null", "progress_bar=false", f"metrics_file={metrics}", "log_interval=1"]
        try:
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"impl": name, "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0:
            return {"impl": name, "error": (proc.stdout + proc.stderr)[-2000:]}
        with open(metrics) as f:
            steps = [r for r in map(json.loads, f) if r.get("kind") == "train" and "tokens_per_s" in r]
    steady = steps[2:] or steps
    med = lambda key: statistics.median(r[key] for r in steady)  # noqa: E731
    return {"impl": name, "config": config, "steps_timed": len(steady), "tokens_per_s": med("tokens_per_s"),
            "iter_ms": med("iter_ms"), "tflops_per_gpu": med("tflops_per_gpu"),
            "mem_peak_gib": max(r["mem_peak_mb"] for r in steady) / 1024, "losses": [r["lm_loss"] for r in steps]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--timeout", type=float, default=240)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks"))
    p.add_argument("--tag", default="")
    args = p.parse_args()
    import torch

    rows = [run_config(name, cfg, args.iters, args.timeout) for name, cfg in CONFIGS.items()]
    date = datetime.date.today().isoformat()
    doc = {"topic": "e2e", "date": date, "card": torch.cuda.get_device_name(0), "gpus": 1,
           "commit": os.environ.get("NSA_COMMIT", "unknown"),
           "software": {"torch": torch.__version__},
           "shape": {"model": "1B dense-MLP (configs/*_1b_64k_h100.yaml)", "seq": 65536, "global_batch": 1},
           "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"e2e-{date}-{args.tag}" if args.tag else f"e2e-{date}")
    with open(stem + ".json", "w") as f:
        json.dump(doc, f, indent=1)
    lines = [f"# End-to-end training, 1B at 64k ({date}, {doc['card']}, commit {doc['commit']})", "",
             "| impl | tokens/s | iter ms | TFLOP/s per GPU | peak GiB | steps timed |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['impl']} | failed: {r['error'].splitlines()[-1][:120]} | | | | |")
        else:
            lines.append(f"| {r['impl']} | {r['tokens_per_s']:.0f} | {r['iter_ms']:.0f} | {r['tflops_per_gpu']:.1f} | "
                         f"{r['mem_peak_gib']:.1f} | {r['steps_timed']} |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
