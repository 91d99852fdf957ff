"""Helpers for the launch tests: tiny overrides, subprocess runners, metrics readers."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[2]
ENTRY = str(REPO / "launch" / "pretrain_nsa.py")
CONFIG = str(REPO / "configs" / "tiny_cpu.yaml")
BIN = Path(sys.executable).parent

# Even tinier than tiny_cpu.yaml: one NSA layer, 128-token sequences, 2 micro batches of 1
# (gradient accumulation), a 0.3 MB corpus.
TINY = [
    "num_layers=1", "hidden_size=64", "ffn_hidden_size=128", "num_attention_heads=4",
    "num_query_groups=2", "kv_channels=16", "seq_length=128", "micro_batch_size=1",
    "global_batch_size=2", "nsa.cmp_block=16", "nsa.cmp_stride=8", "nsa.slc_block=32",
    "nsa.topk=3", "nsa.window=32", "lr=3e-3", "lr_warmup_iters=2", "log_interval=1",
    "eval_interval=0", "eval_iters=1", "corpus_max_mb=0.3", "progress_bar=false", "save=null",
]


def free_port() -> int:
    """A currently free TCP port on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env() -> Dict[str, str]:
    """This environment without any launcher variables (so the child picks its own mode)."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
            "SLURM_NTASKS", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["OMP_NUM_THREADS"] = "1"
    return env


def pretrain_cmd(extra: List[str]) -> List[str]:
    """Argument list of one single-process training run with the tiny overrides."""
    return [sys.executable, ENTRY, "--config", CONFIG, *TINY, *extra]


def run(cmd: List[str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repo root; fail the test with its output tail if it fails."""
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd[:3]}... exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc


def train_losses(metrics_file: Path) -> Dict[int, float]:
    """iteration -> training loss from a metrics file (the last record wins after a resume)."""
    out: Dict[int, float] = {}
    for line in metrics_file.read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["iteration"]] = rec["lm_loss"]
    return out
