"""Per-layer context-parallel byte counters of a model, for the training log.

Every ``NSACoreAttention`` owns a ``CommCounters`` (``cp_counters``) that
``nsa_attention_cp`` fills with the bytes this rank sent to other CP ranks, per exchange
and direction (``cmp_tokens.fwd``, ``slc_blocks.bwd``, ...; see README.md). A training loop
calls ``collect_cp_bytes(model, reset=True)`` once per step to get that step's numbers and
``format_cp_bytes`` to print them. Activation recompute re-runs the forward exchanges, so
their ``.fwd`` bytes are counted again: that traffic really happens.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Union

import torch

from .comm import CommCounters

__all__ = ["iter_cp_counters", "collect_cp_bytes", "format_cp_bytes"]


def _modules(model: Union[torch.nn.Module, Iterable[torch.nn.Module]]) -> Iterator[torch.nn.Module]:
    chunks = [model] if isinstance(model, torch.nn.Module) else list(model)
    for chunk in chunks:
        if not isinstance(chunk, torch.nn.Module):
            raise ValueError(f"model: expected a torch.nn.Module or a list of them, got {type(chunk).__name__}")
        yield from chunk.modules()


def iter_cp_counters(model) -> Iterator[tuple[int, CommCounters]]:
    """(layer_number, counters) of every NSA core attention in ``model``.

    Args:
        model: a module (GPTModel, or one wrapped in DDP / Float16Module) or a list of
            model chunks (virtual pipeline stages). ``layer_number`` is Megatron's global,
            1-based layer number (pipeline offsets included).
    """
    for module in _modules(model):
        counters = getattr(module, "cp_counters", None)
        if isinstance(counters, CommCounters):
            yield int(getattr(module, "layer_number", 0)), counters


def collect_cp_bytes(model, reset: bool = False) -> dict[int, dict[str, int]]:
    """Bytes this rank sent for context parallelism, per NSA layer.

    Args:
        model: as for ``iter_cp_counters``.
        reset: zero the counters after reading them (call once per step with True to get
            per-step numbers).
    Returns:
        {layer_number: {exchange key: bytes}} sorted by layer; layers that sent nothing
        (context_parallel_size 1, or not yet run) map to an empty dict. Keys look like
        ``"cmp_tokens.fwd"``, ``"kv_allgather.bwd"``, ``"slc_blocks.index"``.
    """
    out: dict[int, dict[str, int]] = {}
    for layer, counters in iter_cp_counters(model):
        merged = out.setdefault(layer, {})
        for key, value in counters.snapshot().items():
            merged[key] = merged.get(key, 0) + value
        if reset:
            counters.reset()
    return dict(sorted(out.items()))


def format_cp_bytes(stats: dict[int, dict[str, int]]) -> str:
    """One log line from ``collect_cp_bytes``: MiB sent per layer (fwd/bwd) and the total.

    Example: ``"cp MiB sent (fwd/bwd): L1 0.50/0.25 | L2 0.50/0.25 | total 1.50"``.
    """
    mib = 1024.0 * 1024.0
    parts, total = [], 0
    for layer, keys in stats.items():
        fwd = sum(v for k, v in keys.items() if not k.endswith(".bwd"))  # index lists travel forward
        bwd = sum(v for k, v in keys.items() if k.endswith(".bwd"))
        total += fwd + bwd
        parts.append(f"L{layer} {fwd / mib:.2f}/{bwd / mib:.2f}")
    return "cp MiB sent (fwd/bwd): " + " | ".join(parts + [f"total {total / mib:.2f}"])
