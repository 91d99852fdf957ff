"""Strong-scaling plot of NSA context parallelism from the JSON records of ``tools/bench_cp.py``.

    python tools/plot_cp.py benchmarks/cp-2026-11-26-256k-h200x4.json [more.json ...] \\
        --out benchmarks/cp-2026-11-26-256k-h200x4.png

One panel per sequence length: forward+backward time of one NSA layer against the number of
GPUs (log-log), one line per CP mode, and the ideal line that halves the time of the smallest
CP size at every doubling. Rows named ``nsa-cp<N>-<mode>`` are plotted; ``nsa-cp1`` (the plain
one-GPU layer) is the CP=1 point of every mode. The same numbers, with the speed-up and the
scaling efficiency relative to the smallest CP size > 1, go to stdout as a markdown table.
"""
from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

CP_ROW = re.compile(r"^nsa-cp(\d+)-(\w+)$")


def load_series(paths: List[Path]) -> Dict[int, Dict[str, Dict[int, float]]]:
    """Read bench_cp records into ``{seq: {mode: {gpus: fwd+bwd ms}}}``.

    The one-GPU ``nsa-cp1`` row becomes the CP=1 point of every mode at its length; a point
    measured twice keeps the faster median. Raises ValueError for a file that is not a CP record.
    """
    series: Dict[int, Dict[str, Dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    cp1: Dict[int, float] = {}
    for path in paths:
        record = json.loads(Path(path).read_text())
        if record.get("topic") != "cp" or "rows" not in record:
            raise ValueError(f"{path}: not a tools/bench_cp.py record (topic 'cp' with rows)")
        for row in record["rows"]:
            total = float(row["fwd_ms"]) + float(row["bwd_ms"])
            seq = int(row["seq"])
            if row["impl"] == "nsa-cp1":
                cp1[seq] = min(total, cp1.get(seq, total))
                continue
            match = CP_ROW.match(row["impl"])
            if match:
                gpus, mode = int(match.group(1)), match.group(2)
                old = series[seq][mode].get(gpus, total)
                series[seq][mode][gpus] = min(total, old)
    for seq, t in cp1.items():
        for mode in series.get(seq, {}):
            series[seq][mode].setdefault(1, t)
    return {s: dict(m) for s, m in series.items()}


def scaling_rows(series: Dict[int, Dict[str, Dict[int, float]]]) -> List[Tuple[int, str, int, float, float, float]]:
    """Rows ``(seq, mode, gpus, ms, speed-up, efficiency)`` relative to the smallest CP size > 1.

    Efficiency = speed-up / (gpus / base_gpus); the base row has speed-up and efficiency 1.
    """
    rows = []
    for seq in sorted(series):
        for mode in sorted(series[seq]):
            points = series[seq][mode]
            multi = sorted(g for g in points if g > 1)
            if not multi:
                continue
            base = multi[0]
            for gpus in sorted(points):
                speedup = points[base] / points[gpus]
                rows.append((seq, mode, gpus, points[gpus], speedup, speedup / (gpus / base)))
    return rows


def plot(series: Dict[int, Dict[str, Dict[int, float]]], out: Path, title: str = "") -> None:
    """Draw one log-log panel per sequence length into the PNG ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = sorted(series)
    fig, axes = plt.subplots(1, len(seqs), figsize=(5 * len(seqs), 4), squeeze=False)
    for ax, seq in zip(axes[0], seqs):
        for mode, points in sorted(series[seq].items()):
            gpus = sorted(points)
            ax.plot(gpus, [points[g] for g in gpus], marker="o", label=mode)
        all_gpus = sorted({g for pts in series[seq].values() for g in pts})
        multi = [g for g in all_gpus if g > 1] or all_gpus
        base = min(pts[multi[0]] for pts in series[seq].values() if multi[0] in pts)
        ax.plot(multi, [base * multi[0] / g for g in multi], "k--", lw=1, label="ideal")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(all_gpus, [str(g) for g in all_gpus])
        ax.set_xlabel("GPUs (CP size)")
        ax.set_ylabel("fwd+bwd ms, one NSA layer")
        ax.set_title(f"{seq // 1024}k tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("records", nargs="+", type=Path, help="JSON files written by tools/bench_cp.py")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    series = load_series(args.records)
    if not series:
        raise SystemExit("no nsa-cp<N>-<mode> rows in the given records")
    plot(series, args.out, args.title)
    print("| seq | mode | GPUs | fwd+bwd ms | speed-up | efficiency |")
    print("|---|---|---|---|---|---|")
    for seq, mode, gpus, ms, speedup, eff in scaling_rows(series):
        print(f"| {seq} | {mode} | {gpus} | {ms:.1f} | {speedup:.2f}x | {eff:.0%} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
