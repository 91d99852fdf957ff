"""Megatron-style training logs: one line per ``log_interval``, a progress bar on a terminal,
TensorBoard scalars when a folder is set, and an optional JSON-lines metrics file.

Only the logging rank (the last global rank: it holds the loss under pipeline parallelism)
writes anything.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any, Dict, Optional

import torch


def memory_mb() -> Dict[str, float]:
    """Peak memory of this process: GPU allocator peak on CUDA, else the peak resident set."""
    if torch.cuda.is_available():
        return {"mem_peak_mb": torch.cuda.max_memory_allocated() / 2**20,
                "mem_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
    return {"mem_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


class TrainLogger:
    """Formats and routes training metrics.

    Args:
        enabled: whether this rank writes (True on the logging rank only).
        total_iters: the run's ``train_iters`` (for the bar and the line counter).
        start_iter: iteration a resumed run starts from.
        progress_bar: True/False, or None to show one only when stdout is a TTY.
        tensorboard_dir: folder for TensorBoard event files, or None.
        metrics_file: path of a JSON-lines file with every logged value, or None.
    """

    def __init__(self, enabled: bool, total_iters: int, start_iter: int = 0,
                 progress_bar: Optional[bool] = None, tensorboard_dir: Optional[str] = None,
                 metrics_file: Optional[str] = None) -> None:
        self.enabled = enabled
        self.total = total_iters
        self.bar = None
        self.tb = None
        self.metrics = None
        if not enabled:
            return
        if progress_bar is None:
            progress_bar = sys.stdout.isatty()
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_iters, initial=start_iter, unit="it", dynamic_ncols=True,
                            file=sys.stdout)
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("logging.tensorboard_dir needs the tensorboard package "
                                   "(pip install tensorboard)") from exc
            self.tb = SummaryWriter(log_dir=tensorboard_dir)
        if metrics_file:
            self.metrics = open(metrics_file, "a", encoding="utf-8")

    def print(self, msg: str) -> None:
        """Print a line (above the progress bar when there is one)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def record(self, kind: str, iteration: int, values: Dict[str, Any]) -> None:
        """Send ``values`` to TensorBoard (``<kind>/<name>``) and the metrics file."""
        if not self.enabled:
            return
        if self.tb is not None:
            for name, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{name}", v, iteration)
        if self.metrics is not None:
            self.metrics.write(json.dumps({"kind": kind, "iteration": iteration, **values}) + "\n")
            self.metrics.flush()

    def step(self, iteration: int, values: Dict[str, Any], print_line: bool) -> None:
        """Record one optimizer step; print the Megatron-style line when ``print_line``."""
        if not self.enabled:
            return
        self.record("train", iteration, values)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{values['lm_loss']:.4f}", lr=f"{values['lr']:.2e}")
        if print_line:
            self.print(format_train_line(iteration, self.total, values))

    def close(self) -> None:
        """Flush and close the bar, TensorBoard writer and metrics file."""
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.metrics is not None:
            self.metrics.close()


def format_train_line(iteration: int, total: int, v: Dict[str, Any]) -> str:
    """One log line in Megatron-LM's layout (fields separated by `` | ``)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    fields = [
        f" [{stamp}] iteration {iteration:8d}/{total:8d}",
        f"consumed samples: {v['consumed_samples']:12d}",
        f"elapsed time per iteration (ms): {v['iter_ms']:.1f}",
        f"learning rate: {v['lr']:.6E}",
        f"global batch size: {v['global_batch_size']:5d}",
        f"lm loss: {v['lm_loss']:.6E}",
        f"grad norm: {v['grad_norm']:.3f}",
        f"tokens/s: {v['tokens_per_s']:.0f}",
        f"TFLOP/s/GPU: {v['tflops_per_gpu']:.3f}",
        f"mem peak (MB): {v['mem_peak_mb']:.0f}",
    ]
    if v.get("skipped"):
        fields.append("skipped: 1")
    return " | ".join(fields) + " |"
