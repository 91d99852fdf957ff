"""Shared plumbing of the quality experiments (``tools/quality_lm.py``, ``tools/needle.py``).

An *arm* is one training run of ``launch/pretrain_nsa.py`` (e.g. ``nsa`` or ``full``) with
its own folder::

    <out>/<arm>/checkpoints/      the entry point's distributed checkpoints (resume point)
    <out>/<arm>/metrics.jsonl     the entry point's JSON-lines metrics (kind/iteration/lm_loss...)
    <out>/<arm>/log.txt           stdout+stderr of every chunk, appended

Arms are trained in *chunks*: each subprocess stops after ``chunk_iters`` steps (the entry
point's ``training.exit_interval``, which saves a checkpoint first), and the next call
resumes from the latest checkpoint automatically. A whole experiment can therefore be split
into calls of a few minutes each; :func:`run_arms` alternates chunks between arms so a run
cut short still compares the arms at (nearly) the same step.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "launch" / "pretrain_nsa.py"

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                  "SLURM_NTASKS", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")


def child_env() -> Dict[str, str]:
    """This environment minus launcher variables, so every child runs as a world of one."""
    return {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}


def arm_paths(out_dir: str | Path, arm: str) -> Dict[str, Path]:
    """Folder, checkpoint folder, metrics file and log file of ``arm`` under ``out_dir``."""
    root = Path(out_dir) / arm
    return {"root": root, "ckpt": root / "checkpoints", "metrics": root / "metrics.jsonl",
            "log": root / "log.txt"}


def latest_iteration(ckpt_dir: Path) -> int:
    """Iteration of the latest complete checkpoint in ``ckpt_dir`` (0 when there is none)."""
    tracker = Path(ckpt_dir) / "latest_checkpointed_iteration.txt"
    if not tracker.is_file():
        return 0
    text = tracker.read_text().strip()
    return int(text) if text.isdigit() else 0


def arm_command(config: str, arm_overrides: Sequence[str], out_dir: str | Path, arm: str,
                chunk_iters: int) -> List[str]:
    """Argument list of one chunk of ``arm`` (config, the arm's overrides, its folders)."""
    p = arm_paths(out_dir, arm)
    return [sys.executable, str(ENTRY), "--config", str(config), *arm_overrides,
            f"checkpoint.save={p['ckpt']}", f"logging.metrics_file={p['metrics']}",
            "logging.progress_bar=false", f"training.exit_interval={max(0, chunk_iters)}"]


def run_chunk(config: str, arm_overrides: Sequence[str], out_dir: str | Path, arm: str,
              chunk_iters: int, timeout: Optional[float] = None) -> Dict[str, object]:
    """Run one chunk of ``arm``; return ``{arm, start, end, seconds, returncode}``.

    Raises:
        RuntimeError: the entry point failed (the message holds the tail of its output).
    """
    p = arm_paths(out_dir, arm)
    p["root"].mkdir(parents=True, exist_ok=True)
    start = latest_iteration(p["ckpt"])
    cmd = arm_command(config, arm_overrides, out_dir, arm, chunk_iters)
    t0 = time.perf_counter()
    with open(p["log"], "a", encoding="utf-8") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} chunk from iteration {start}: "
                  + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.run(cmd, cwd=REPO, env=child_env(), stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = p["log"].read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"arm {arm}: launch/pretrain_nsa.py exited {proc.returncode}; log tail:\n{tail}")
    return {"arm": arm, "start": start, "end": latest_iteration(p["ckpt"]), "seconds": seconds,
            "returncode": proc.returncode}


def run_arms(config: str, arms: Dict[str, List[str]], out_dir: str | Path, train_iters: int,
             chunk_iters: int = 0, max_chunks: int = 0, time_limit_s: float = 0.0,
             echo=print) -> List[Dict[str, object]]:
    """Train every arm up to ``train_iters``, alternating one chunk per arm per round.

    Args:
        config: YAML config passed to the entry point.
        arms: arm name -> its overrides (``train_iters`` is appended here).
        out_dir: experiment folder (see the module docstring).
        train_iters: target steps of every arm.
        chunk_iters: steps per subprocess (0: the whole remainder at once).
        max_chunks: stop after this many subprocesses in this call (0: no limit).
        time_limit_s: do not start a chunk that, judged by the slowest chunk so far, would end
            after this many seconds from the call's start (0: no limit).
        echo: where progress lines go.
    Returns:
        One record per chunk run in this call (see :func:`run_chunk`).
    """
    t_start, done, slowest = time.perf_counter(), [], 0.0
    while True:
        pending = [a for a in arms if latest_iteration(arm_paths(out_dir, a)["ckpt"]) < train_iters]
        if not pending:
            return done
        for arm in pending:
            if max_chunks and len(done) >= max_chunks:
                echo(f"> stopping: --max-chunks {max_chunks} reached; rerun to continue")
                return done
            elapsed = time.perf_counter() - t_start
            if time_limit_s and done and elapsed + slowest > time_limit_s:
                echo(f"> stopping: another chunk (~{slowest:.0f} s) would pass the time limit "
                     f"({elapsed:.0f} of {time_limit_s:.0f} s used); rerun to continue")
                return done
            rec = run_chunk(config, [*arms[arm], f"training.train_iters={train_iters}"], out_dir, arm,
                            chunk_iters)
            slowest = max(slowest, float(rec["seconds"]))
            echo(f"> {arm}: iterations {rec['start']} -> {rec['end']} of {train_iters} "
                 f"in {rec['seconds']:.1f} s")
            if rec["end"] <= rec["start"]:
                raise RuntimeError(f"arm {arm}: no progress (checkpoint.save_interval / exit_interval?)")
            done.append(rec)


def read_metrics(path: str | Path) -> Dict[str, Dict[int, dict]]:
    """``{kind: {iteration: record}}`` from a metrics file; the last record of an iteration wins
    (a chunk killed after its last checkpoint is replayed by the next one)."""
    out: Dict[str, Dict[int, dict]] = {}
    path = Path(path)
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        out.setdefault(rec["kind"], {})[int(rec["iteration"])] = rec
    return out


def curve(metrics: Dict[str, Dict[int, dict]], kind: str, key: str = "lm_loss") -> List[Tuple[int, float]]:
    """Sorted ``[(iteration, value)]`` of one kind of record."""
    return [(it, float(rec[key])) for it, rec in sorted(metrics.get(kind, {}).items())]


def params_from_log(log_path: Path) -> Optional[float]:
    """Parameters in millions from the entry point's ``> ... GPT: ..., X.XXM parameters`` line."""
    if not Path(log_path).is_file():
        return None
    found = re.findall(r"([0-9.]+)M parameters on this rank", Path(log_path).read_text(errors="replace"))
    return float(found[-1]) if found else None


def git_commit() -> Dict[str, object]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the repository; an exported tree
    without .git (the device copies) takes the commit from ``NSA_COMMIT``."""
    if os.environ.get("NSA_COMMIT") and not (REPO / ".git").exists():
        return {"commit": os.environ["NSA_COMMIT"], "dirty": False}
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=20).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, timeout=20).stdout
        return {"commit": sha, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def device_card() -> str:
    """Name of GPU 0, or ``cpu (<processor count> cores)``."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def plot_curves(curves: Dict[str, List[Tuple[int, float]]], path: str | Path, title: str,
                ylabel: str = "validation loss") -> None:
    """Line plot of several ``[(iteration, value)]`` curves into a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
