"""Context parallelism for NSA: the sequence split over a CP group (Megatron's zig-zag layout).

Public API: ``nsa_attention_cp`` (modes ``"ring"`` and ``"allgather"``), the layout helpers
``zigzag_split`` / ``zigzag_merge`` / ``zigzag_positions`` / ``ZigzagLayout``, and the byte
counters ``CommCounters`` / ``GLOBAL_COUNTERS``, and the per-layer readers ``collect_cp_bytes`` /
``format_cp_bytes`` (counters owned by each ``NSACoreAttention``). See README.md in this
folder for the design.
"""
from .api import CP_MODES, nsa_attention_cp
from .comm import GLOBAL_COUNTERS, CommCounters
from .layout import ZigzagLayout, zigzag_merge, zigzag_positions, zigzag_split
from .stats import collect_cp_bytes, format_cp_bytes, iter_cp_counters

__all__ = [
    "nsa_attention_cp",
    "CP_MODES",
    "CommCounters",
    "GLOBAL_COUNTERS",
    "collect_cp_bytes",
    "format_cp_bytes",
    "iter_cp_counters",
    "ZigzagLayout",
    "zigzag_split",
    "zigzag_merge",
    "zigzag_positions",
]
