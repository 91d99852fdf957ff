"""Host copies of small device tensors, and the plans built from them, read back once.

Megatron hands the same ``cu_seqlens`` tensor to every layer of a micro-batch, and each layer's
validation, compressors and kernel launchers need its values on the host. ``tensor.tolist()``
on a GPU tensor waits until the device has drained its queue, so a read per use costs every
layer a pipeline bubble (the host stops running ahead). Here the host copy and anything planned
from it are remembered on the tensor object itself, keyed by the tensor's version counter: an
in-place write to the tensor (which bumps ``_version``) discards them, and they are freed with
the tensor.
"""
from __future__ import annotations

from typing import Callable, Hashable, TypeVar

import torch

__all__ = ["host_list", "memo_on", "remember_host"]

_ATTR = "_nsa_host_memo"
T = TypeVar("T")


def memo_on(t: torch.Tensor, key: Hashable, build: Callable[[], T]) -> T:
    """``build()``, computed once per (tensor ``t``, its current version, ``key``).

    ``build`` must depend only on ``t``'s values and on what ``key`` names (e.g. the
    hyper-parameters and device of a plan)."""
    entry = getattr(t, _ATTR, None)
    if entry is None or entry[0] != t._version:
        entry = (t._version, {})
        setattr(t, _ATTR, entry)
    memo = entry[1]
    if key not in memo:
        memo[key] = build()
    return memo[key]


def host_list(t: torch.Tensor) -> list:
    """``t.tolist()`` (1-D int tensor) as a new list of python ints; the device is read once
    per version of ``t``."""
    return list(memo_on(t, "host_list", lambda: tuple(int(x) for x in t.detach().tolist())))


def remember_host(t: torch.Tensor, values) -> torch.Tensor:
    """Record ``values`` (ints) as the host copy of ``t``, a tensor just built from them, so
    :func:`host_list` never reads ``t`` back; returns ``t``."""
    memo_on(t, "host_list", lambda: tuple(int(x) for x in values))
    return t
