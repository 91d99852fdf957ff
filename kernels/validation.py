"""Argument checks for ``nsa_attention``: run once, before any backend touches the data.

Every failure is a ``ValueError`` whose message starts with the offending argument's name,
so a bad call never reaches a kernel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .host_cache import host_list, memo_on, remember_host
from .layout import compressed_cu_seqlens, num_compressed, seqlens_from_cu
from .varlen import int32_on

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class NSAHyperParams:
    """NSA hyper-parameters (NSA_SPEC.md names; paper values as defaults)."""

    cmp_block: int = 32
    cmp_stride: int = 16
    slc_block: int = 64
    topk: int = 16
    window: int = 512
    init_blocks: int = 1
    local_blocks: int = 2

    def check(self, prefix: str = "") -> None:
        """Raise ValueError naming the first hyper-parameter that breaks a spec constraint.

        ``prefix`` is prepended to every name in the message (``"nsa_"`` for NSAConfig fields).
        """
        n = {name: prefix + name for name in self.__dataclass_fields__}
        for name in ("cmp_block", "cmp_stride", "slc_block", "topk", "window"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{n[name]}={value!r}: must be a positive int")
        for name in ("init_blocks", "local_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{n[name]}={value!r}: must be a non-negative int")
        if self.cmp_block % self.cmp_stride:
            raise ValueError(f"{n['cmp_stride']}={self.cmp_stride}: must divide {n['cmp_block']} ({self.cmp_block})")
        if self.slc_block % self.cmp_stride:
            raise ValueError(f"{n['cmp_stride']}={self.cmp_stride}: must divide {n['slc_block']} ({self.slc_block})")
        if self.cmp_block > self.slc_block:
            raise ValueError(f"{n['cmp_block']}={self.cmp_block}: must be <= {n['slc_block']} ({self.slc_block})")
        if self.topk < self.init_blocks + self.local_blocks:
            raise ValueError(
                f"{n['topk']}={self.topk}: must be >= {n['init_blocks']} + {n['local_blocks']} "
                f"({self.init_blocks} + {self.local_blocks}): forced blocks count towards topk"
            )


@dataclass(frozen=True)
class NSAArgs:
    """Validated, normalised view of one ``nsa_attention`` call.

    ``cu_seqlens``/``cu_seqlens_cmp`` are int32 tensors on the inputs' device; ``seqlens``
    and ``cmp_seqlens`` are the same boundaries as host lists.
    """

    hp: NSAHyperParams
    scale: float
    cu_seqlens: torch.Tensor
    cu_seqlens_cmp: torch.Tensor
    seqlens: tuple
    cmp_seqlens: tuple


def _check_tensor(name: str, x, ndim: int, device: torch.device, dtype: torch.dtype) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}")
    if x.dtype != dtype:
        raise ValueError(f"{name} has dtype {x.dtype} but q has {dtype}")


def _normalise_cu_seqlens(cu_seqlens: Optional[torch.Tensor], total: int, device: torch.device) -> torch.Tensor:
    if cu_seqlens is None:
        return int32_on([0, total], device)
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    host = host_list(cu_seqlens)
    if host[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {host[0]}")
    if host[-1] != total:
        raise ValueError(f"cu_seqlens must end at T={total} (q.shape[0]), got {host[-1]}")
    if any(b < a for a, b in zip(host[:-1], host[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {host}")
    if total >= 2**31:
        raise ValueError(f"cu_seqlens: T={total} does not fit the int32 boundaries the spec prescribes")
    if cu_seqlens.dtype == torch.int32:
        return cu_seqlens
    return memo_on(cu_seqlens, "int32", lambda: remember_host(cu_seqlens.to(torch.int32), host))


def validate_nsa_inputs(
    q, k, v, k_cmp, v_cmp, gates, cu_seqlens=None, k_win=None, v_win=None, *, scale=None, **hparams
) -> NSAArgs:
    """Check every argument of ``nsa_attention`` against NSA_SPEC.md.

    Shapes: q [T, HQ, Dqk]; k, k_win [T, HKV, Dqk]; v, v_win [T, HKV, Dv];
    k_cmp [Tc, HKV, Dqk]; v_cmp [Tc, HKV, Dv]; gates [T, HQ, 3]; cu_seqlens int32 [N+1].
    All float tensors share q's dtype and device.

    Returns:
        NSAArgs with normalised boundaries and the softmax scale (default 1/sqrt(Dqk)).
    Raises:
        ValueError naming the offending argument.
    """
    hp = NSAHyperParams(**hparams)
    hp.check()
    if not isinstance(q, torch.Tensor):
        raise ValueError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must be [T, HQ, Dqk], got shape {tuple(q.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"q must be a float16/bfloat16/float32/float64 tensor, got {q.dtype}")
    total, num_q_heads, dqk = q.shape
    device, dtype = q.device, q.dtype
    if num_q_heads < 1 or dqk < 1:
        raise ValueError(f"q must have at least one head and one channel, got shape {tuple(q.shape)}")

    _check_tensor("k", k, 3, device, dtype)
    num_kv_heads = k.shape[1]
    if k.shape[0] != total or k.shape[2] != dqk:
        raise ValueError(f"k must be [T={total}, HKV, Dqk={dqk}], got shape {tuple(k.shape)}")
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(f"k: HQ={num_q_heads} must be a multiple of HKV={num_kv_heads}")
    _check_tensor("v", v, 3, device, dtype)
    dv = v.shape[2]
    if v.shape[0] != total or v.shape[1] != num_kv_heads or dv < 1:
        raise ValueError(f"v must be [T={total}, HKV={num_kv_heads}, Dv], got shape {tuple(v.shape)}")
    if (k_win is None) != (v_win is None):
        raise ValueError("k_win and v_win must be given together (or both None)")
    if k_win is not None:
        _check_tensor("k_win", k_win, 3, device, dtype)
        if k_win.shape != k.shape:
            raise ValueError(f"k_win must have k's shape {tuple(k.shape)}, got {tuple(k_win.shape)}")
        _check_tensor("v_win", v_win, 3, device, dtype)
        if v_win.shape != v.shape:
            raise ValueError(f"v_win must have v's shape {tuple(v.shape)}, got {tuple(v_win.shape)}")

    cu = _normalise_cu_seqlens(cu_seqlens, total, device)
    cu_cmp = compressed_cu_seqlens(cu, hp.cmp_block, hp.cmp_stride)
    num_cmp = host_list(cu_cmp)[-1]
    _check_tensor("k_cmp", k_cmp, 3, device, dtype)
    if tuple(k_cmp.shape) != (num_cmp, num_kv_heads, dqk):
        raise ValueError(
            f"k_cmp must be [Tc={num_cmp}, HKV={num_kv_heads}, Dqk={dqk}] for these cu_seqlens and "
            f"cmp_block={hp.cmp_block}, cmp_stride={hp.cmp_stride}; got shape {tuple(k_cmp.shape)}"
        )
    _check_tensor("v_cmp", v_cmp, 3, device, dtype)
    if tuple(v_cmp.shape) != (num_cmp, num_kv_heads, dv):
        raise ValueError(f"v_cmp must be [Tc={num_cmp}, HKV={num_kv_heads}, Dv={dv}], got shape {tuple(v_cmp.shape)}")
    _check_tensor("gates", gates, 3, device, dtype)
    if tuple(gates.shape) != (total, num_q_heads, 3):
        raise ValueError(f"gates must be [T={total}, HQ={num_q_heads}, 3], got shape {tuple(gates.shape)}")

    if scale is None:
        scale = 1.0 / math.sqrt(dqk)
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")

    seqlens = tuple(seqlens_from_cu(cu))
    cmp_seqlens = tuple(num_compressed(n, hp.cmp_block, hp.cmp_stride) for n in seqlens)
    return NSAArgs(hp, float(scale), cu, cu_cmp, seqlens, cmp_seqlens)
