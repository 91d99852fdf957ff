"""NSA vs full attention on language modelling: same model, data order, steps and seed.

Trains the config twice through the training entry point (``launch/pretrain_nsa.py`` as a
subprocess), once with ``model.attention_type=nsa`` and once with ``full``, with periodic
validation on the held-out split, then writes

    <report-dir>/quality-lm-<date>[-<tag>].json   final validation losses, relative gap, curves,
                                                  steps, seed, config, card, commit
    <report-dir>/quality-lm-<date>[-<tag>].md     the same as a short table
    <report-dir>/quality-lm-<date>[-<tag>].png    both validation-loss curves

Both arms read the same samples in the same order: the data pipeline depends only on the
data settings and ``training.seed`` (``launch/data.py``), which the arms share.

Resumable: every arm checkpoints under ``<out-dir>/<arm>/checkpoints`` and a rerun of the
same command continues from there, so a long GPU run is split into short calls::

    python tools/quality_lm.py --config configs/quality_lm_small.yaml --chunk-iters 250 --time-limit 540
    python tools/quality_lm.py --smoke                       # CPU, tiny, ~30 s

``--report-only`` rewrites the report from the metrics files without training.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

from nsa_tools import experiment_runs as X

ARMS = ("nsa", "full")
TARGET_REL_GAP = 0.01
"""Issue 9's target: NSA's final validation loss at most 1% above full attention's."""

SMOKE_CONFIG = "configs/tiny_cpu.yaml"
SMOKE_OVERRIDES = [
    "model.num_layers=1", "model.hidden_size=64", "model.ffn_hidden_size=128",
    "model.num_attention_heads=4", "model.num_query_groups=2", "model.kv_channels=16",
    "data.seq_length=128", "data.micro_batch_size=1", "data.global_batch_size=2",
    "nsa.cmp_block=16", "nsa.cmp_stride=8", "nsa.slc_block=32", "nsa.topk=3", "nsa.window=32",
    "training.lr_warmup_iters=1", "training.eval_interval=2", "training.eval_iters=1",
    "data.corpus_max_mb=0.3", "checkpoint.save_interval=2", "logging.log_interval=1",
]
"""CPU smoke: one tiny layer, 128-token sequences, 4 steps, validation every 2."""
SMOKE_ITERS = 4


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Command-line arguments; anything unrecognised is passed to both arms as overrides."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--config", default="configs/quality_lm_small.yaml", help="training config (both arms)")
    p.add_argument("--out-dir", default=None, help="run folder (default runs/quality_lm[_smoke])")
    p.add_argument("--report-dir", default=None, help="report folder (default benchmarks/, smoke: --out-dir)")
    p.add_argument("--tag", default="", help="suffix of the report name")
    p.add_argument("--date", default=None, help="date in the report name (default today)")
    p.add_argument("--train-iters", type=int, default=None, help="steps per arm (default: the config's)")
    p.add_argument("--chunk-iters", type=int, default=0, help="steps per subprocess (0: all at once)")
    p.add_argument("--max-chunks", type=int, default=0, help="subprocesses in this call (0: no limit)")
    p.add_argument("--time-limit", type=float, default=0.0,
                   help="seconds: start no chunk expected to end later than this (0: no limit)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of nsa,full")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of a few steps (CI)")
    args, overrides = p.parse_known_args(argv)
    args.overrides = overrides
    return args


def resolve(args: argparse.Namespace):
    """(config path, overrides, train_iters, out_dir, report_dir, flat resolved config)."""
    from nsa_launch.config_loader import load_config, to_flat_dict

    config = SMOKE_CONFIG if args.smoke else args.config
    overrides = (SMOKE_OVERRIDES if args.smoke else []) + list(args.overrides)
    cfg = load_config(str(X.REPO / config) if not Path(config).is_absolute() else config, overrides)
    iters = args.train_iters or (SMOKE_ITERS if args.smoke else cfg.training.train_iters)
    out_dir = Path(args.out_dir or X.REPO / ("runs/quality_lm_smoke" if args.smoke else "runs/quality_lm"))
    report_dir = Path(args.report_dir or (out_dir if args.smoke else X.REPO / "benchmarks"))
    flat = to_flat_dict(cfg)
    flat["training.train_iters"] = iters
    return config, overrides, iters, out_dir, report_dir, flat


def summarize_arm(out_dir: Path, arm: str, train_iters: int) -> Dict[str, object]:
    """Curves and final numbers of one arm from its metrics file and log."""
    p = X.arm_paths(out_dir, arm)
    m = X.read_metrics(p["metrics"])
    valid, train = X.curve(m, "valid"), X.curve(m, "train")
    speed = sorted(float(r["tokens_per_s"]) for it, r in m.get("train", {}).items() if it > 2)
    final = valid[-1] if valid else None
    return {
        "iterations_done": X.latest_iteration(p["ckpt"]),
        "complete": X.latest_iteration(p["ckpt"]) >= train_iters and bool(final) and final[0] == train_iters,
        "final_valid_iteration": final[0] if final else None,
        "final_valid_loss": final[1] if final else None,
        "valid_curve": valid,
        "train_curve": train[:: max(1, len(train) // 200)] + ([train[-1]] if train else []),
        "params_m": X.params_from_log(p["log"]),
        "median_tokens_per_s": speed[len(speed) // 2] if speed else None,
    }


def build_report(args, config, overrides, iters, out_dir, flat, arms) -> Dict[str, object]:
    """The JSON report (see the module docstring)."""
    per_arm = {a: summarize_arm(out_dir, a, iters) for a in arms}
    gap = None
    if {"nsa", "full"} <= set(per_arm):
        n, f = per_arm["nsa"], per_arm["full"]
        if n["final_valid_loss"] is not None and f["final_valid_loss"] is not None \
                and n["final_valid_iteration"] == f["final_valid_iteration"]:
            gap = (n["final_valid_loss"] - f["final_valid_loss"]) / f["final_valid_loss"]
    complete = all(a["complete"] for a in per_arm.values())
    return {
        "experiment": "quality-lm",
        "date": args.date or datetime.date.today().isoformat(),
        "smoke": bool(args.smoke),
        "complete": complete,
        "config": config,
        "overrides": overrides,
        "resolved_config": flat,
        "train_iters": iters,
        "seed": flat.get("training.seed"),
        "seq_length": flat.get("data.seq_length"),
        "global_batch_size": flat.get("data.global_batch_size"),
        "tokens_per_arm": iters * flat["data.global_batch_size"] * flat["data.seq_length"],
        "validation": {"eval_interval": flat.get("training.eval_interval"),
                       "eval_iters": flat.get("training.eval_iters"),
                       "split": "held-out files" if not flat.get("data.valid_data_path") else flat["data.valid_data_path"]},
        "arms": per_arm,
        "relative_gap": gap,
        "target_rel_gap": TARGET_REL_GAP,
        "target_met": (gap is not None and gap <= TARGET_REL_GAP and complete),
        "card": X.device_card(),
        **X.git_commit(),
    }


def write_report(report: Dict[str, object], report_dir: Path, tag: str) -> Path:
    """Write the JSON, markdown and PNG; return the JSON path."""
    report_dir.mkdir(parents=True, exist_ok=True)
    stem = f"quality-lm-{report['date']}" + (f"-{tag}" if tag else "")
    base = report_dir / stem
    Path(f"{base}.json").write_text(json.dumps(report, indent=1) + "\n")
    X.plot_curves({a: r["valid_curve"] for a, r in report["arms"].items()}, f"{base}.png",
                  f"validation loss, seq {report['seq_length']}, seed {report['seed']}")
    fmt = lambda v, s="{:.4f}": "n/a" if v is None else s.format(v)  # noqa: E731
    lines = [
        f"# Quality (language modelling): NSA vs full attention{' (SMOKE, not a result)' if report['smoke'] else ''}",
        "",
        f"Config `{report['config']}`" + (f" with `{' '.join(report['overrides'])}`" if report["overrides"] else "")
        + f"; {report['train_iters']} steps x {report['global_batch_size']} x {report['seq_length']} tokens "
        f"({report['tokens_per_arm'] / 1e6:.1f}M tokens per arm), seed {report['seed']}, same data order; "
        f"card {report['card']}; commit {report['commit']}{' (dirty)' if report['dirty'] else ''}.",
        "",
        "| arm | params (M) | steps done | final valid loss (iteration) | median tokens/s |",
        "|---|---|---|---|---|",
    ]
    for a, r in report["arms"].items():
        lines.append(f"| {a} | {fmt(r['params_m'], '{:.2f}')} | {r['iterations_done']} | "
                     f"{fmt(r['final_valid_loss'])} ({r['final_valid_iteration']}) | "
                     f"{fmt(r['median_tokens_per_s'], '{:.0f}')} |")
    gap = report["relative_gap"]
    lines += ["", f"Relative gap (nsa - full) / full: {fmt(gap, '{:+.2%}')} (target <= "
              f"{TARGET_REL_GAP:.0%}: {'met' if report['target_met'] else 'not met' if report['complete'] else 'run incomplete'}).",
              "", f"![validation loss]({stem}.png)", ""]
    Path(f"{base}.md").write_text("\n".join(lines))
    return Path(f"{base}.json")


def main(argv: Optional[List[str]] = None) -> int:
    """Train (or continue) both arms, then write the report. Exit 2 on configuration errors."""
    args = parse_args(argv)
    from nsa_launch.config_loader import ConfigError

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or any(a not in ARMS for a in arms):
        print(f"error: --arms must name some of {','.join(ARMS)}", file=sys.stderr)
        return 2
    try:
        config, overrides, iters, out_dir, report_dir, flat = resolve(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cfg_path = str(X.REPO / config) if not Path(config).is_absolute() else config
    if not args.report_only:
        arm_overrides = {a: [*overrides, f"model.attention_type={a}"] for a in arms}
        try:
            X.run_arms(cfg_path, arm_overrides, out_dir, iters, args.chunk_iters, args.max_chunks,
                       args.time_limit)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    report = build_report(args, config, overrides, iters, out_dir, flat, arms)
    path = write_report(report, report_dir, args.tag)
    status = "complete" if report["complete"] else "incomplete (rerun the same command to continue)"
    losses = ", ".join(f"{a} {r['final_valid_loss']}" for a, r in report["arms"].items())
    gap = report["relative_gap"]
    print(f"> quality-lm {status}: final valid loss {losses}; gap "
          f"{'n/a' if gap is None or math.isnan(gap) else f'{gap:+.2%}'}; report {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
