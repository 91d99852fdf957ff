"""KV cache of an NSA model for generation: raw K/V per branch set and the compressed K/V.

Per attention layer, for a fixed batch of B sequences and a capacity of ``capacity`` tokens:

| tensor | shape | content |
|---|---|---|
| ``k``, ``v`` | [B, cap, HKV, Dqk], [B, cap, HKV, Dv] | selection-branch keys (RoPE applied) / values |
| ``k_win``, ``v_win`` | same, or None | window-branch K/V (``nsa_branch_kv="independent"``) |
| ``k_cmp``, ``v_cmp`` | [B, cap_c, HKV, Dqk], [B, cap_c, HKV, Dv] | compressed tokens, key i RoPE'd at i*d + l - 1 |
| ``src_k``, ``src_v`` | [B, l, HKV, Dqk], [B, l, HKV, Dv] | ring of the last l compressor inputs (slot = pos % l) |

Compressed token i of a sequence summarises tokens [i*d, i*d + l). It is computed exactly
once, with the layer's own compressor, in the step that brings the sequence's length to
i*d + l; its inputs are the step's new tokens plus at most l - d earlier ones from the ring,
so the prefix is never recompressed. Dense (``full``) layers keep one K/V set
(:class:`DenseLayerCache`).

A step appends ``counts[b]`` tokens to sequence ``seqs[b]`` (a prefill chunk or one decode
token); :class:`StepPlan` holds its host-side bookkeeping, shared by every layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from nsa_kernels.layout import num_compressed

__all__ = ["StepPlan", "NSALayerCache", "DenseLayerCache", "RopeFn"]

RopeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``rope(x [N, H, D], positions int64 [N]) -> x`` rotated at within-sequence positions."""


@dataclass
class StepPlan:
    """Which tokens one step appends, and the compression work they trigger.

    Tokens are packed sequence by sequence: rows ``cu[i] .. cu[i+1]`` belong to sequence
    ``seqs[i]`` at positions ``starts[i] .. starts[i] + counts[i] - 1``.

    Attributes:
        seqs, starts, counts: host lists (one entry per sequence of the step).
        cmp_block, cmp_stride: l and d of the compressor.
        device: where the index tensors live.
        tok_seq, tok_pos: int64 [T] cache row (sequence) and position of every token.
        cu: int32 [N+1] token boundaries of the pack.
        ends: host list starts + counts (cache lengths after the step).
    """

    seqs: list
    starts: list
    counts: list
    cmp_block: int
    cmp_stride: int
    device: torch.device

    def __post_init__(self):
        if not (len(self.seqs) == len(self.starts) == len(self.counts)) or not self.seqs:
            raise ValueError("seqs, starts and counts must be non-empty lists of equal length")
        if any(c < 1 for c in self.counts) or any(a < 0 for a in self.starts):
            raise ValueError(f"counts must be >= 1 and starts >= 0, got {self.counts}, {self.starts}")
        if len(set(self.seqs)) != len(self.seqs):
            raise ValueError(f"seqs must be distinct, got {self.seqs}")
        l, d = self.cmp_block, self.cmp_stride
        self.ends = [a + c for a, c in zip(self.starts, self.counts)]
        seq_rows, pos_rows, cu = [], [], [0]
        for b, a, c in zip(self.seqs, self.starts, self.counts):
            seq_rows += [b] * c
            pos_rows += range(a, a + c)
            cu.append(cu[-1] + c)
        self.num_tokens = cu[-1]
        self.cu_host = cu
        dev = self.device
        self.tok_seq = torch.tensor(seq_rows, dtype=torch.int64, device=dev)
        self.tok_pos = torch.tensor(pos_rows, dtype=torch.int64, device=dev)
        self.cu = torch.tensor(cu, dtype=torch.int32, device=dev)

        # Compression work: source rows index cat([ring.view(B*l), step tokens]).
        self._src_rows, src_cu, out_seq, out_idx = [], [0], [], []
        ring_rows, ring_src = [], []
        for i, (b, a, c) in enumerate(zip(self.seqs, self.starts, self.counts)):
            first, last = num_compressed(a, l, d), num_compressed(a + c, l, d)
            if last > first:
                s0 = first * d
                rows = [("ring", b, p % l) for p in range(s0, a)] + [("tok", cu[i] + p - a, 0)
                                                                      for p in range(max(s0, a), a + c)]
                self._src_rows.append(rows)
                src_cu.append(src_cu[-1] + len(rows))
                out_seq += [b] * (last - first)
                out_idx += range(first, last)
            keep = range(max(a, a + c - l), a + c)  # the last l tokens refill the ring
            ring_rows += [cu[i] + p - a for p in keep]
            ring_src += [b * l + p % l for p in keep]
        self.has_compression = bool(out_idx)
        self.src_cu = torch.tensor(src_cu, dtype=torch.int32, device=dev)
        self.cmp_seq = torch.tensor(out_seq, dtype=torch.int64, device=dev)
        self.cmp_idx = torch.tensor(out_idx, dtype=torch.int64, device=dev)
        self.cmp_pos = self.cmp_idx * d + (l - 1)
        self.ring_tok = torch.tensor(ring_rows, dtype=torch.int64, device=dev)
        self.ring_slot = torch.tensor(ring_src, dtype=torch.int64, device=dev)

    @property
    def from_start(self) -> bool:
        """Every sequence of the step starts at position 0 (a whole-prompt prefill)."""
        return all(a == 0 for a in self.starts)

    @property
    def is_decode(self) -> bool:
        """One token for each of sequences 0..N-1, in order (a batched decode step)."""
        return all(c == 1 for c in self.counts) and self.seqs == list(range(len(self.seqs)))

    def source_index(self, batch: int) -> torch.Tensor:
        """int64 [S] rows of ``cat([ring [batch*l], step tokens [T]])`` feeding the compressor."""
        idx = []
        for rows in self._src_rows:
            idx += [seq * self.cmp_block + slot if kind == "ring" else batch * self.cmp_block + seq
                    for kind, seq, slot in rows]
        return torch.tensor(idx, dtype=torch.int64, device=self.device)


def _zeros(batch, length, heads, dim, dtype, device):
    return torch.zeros(batch, length, heads, dim, dtype=dtype, device=device)


class NSALayerCache:
    """Caches of one NSA layer (see the module docstring for the tensors).

    Args:
        batch: B sequences; capacity: tokens per sequence.
        num_kv_heads, qk_dim, v_dim: local HKV, Dqk, Dv.
        cmp_block, cmp_stride: l, d.
        independent: separate window K/V (``nsa_branch_kv="independent"``).
        dtype, device: of the cached tensors.
    """

    def __init__(self, batch: int, capacity: int, num_kv_heads: int, qk_dim: int, v_dim: int, *,
                 cmp_block: int, cmp_stride: int, independent: bool, dtype: torch.dtype,
                 device: torch.device):
        if batch < 1 or capacity < 1:
            raise ValueError(f"batch and capacity must be >= 1, got {batch}, {capacity}")
        self.batch, self.capacity = batch, capacity
        self.cmp_block, self.cmp_stride = cmp_block, cmp_stride
        hkv = num_kv_heads
        self.k = _zeros(batch, capacity, hkv, qk_dim, dtype, device)
        self.v = _zeros(batch, capacity, hkv, v_dim, dtype, device)
        self.k_win = _zeros(batch, capacity, hkv, qk_dim, dtype, device) if independent else None
        self.v_win = _zeros(batch, capacity, hkv, v_dim, dtype, device) if independent else None
        cap_c = max(1, num_compressed(capacity, cmp_block, cmp_stride))
        self.k_cmp = _zeros(batch, cap_c, hkv, qk_dim, dtype, device)
        self.v_cmp = _zeros(batch, cap_c, hkv, v_dim, dtype, device)
        self.src_k = _zeros(batch, cmp_block, hkv, qk_dim, dtype, device)
        self.src_v = _zeros(batch, cmp_block, hkv, v_dim, dtype, device)

    @property
    def window_k(self) -> torch.Tensor:
        """Keys the window branch reads (``k`` when branch K/V are shared)."""
        return self.k if self.k_win is None else self.k_win

    @property
    def window_v(self) -> torch.Tensor:
        return self.v if self.v_win is None else self.v_win

    def append(self, plan: StepPlan, k: torch.Tensor, v: torch.Tensor,
               k_win: Optional[torch.Tensor] = None, v_win: Optional[torch.Tensor] = None) -> None:
        """Store the step's selection (and window) K/V: [T, HKV, D] rows at (tok_seq, tok_pos)."""
        if max(plan.ends) > self.capacity:
            raise ValueError(f"plan: sequence length {max(plan.ends)} exceeds the cache capacity {self.capacity}")
        self.k[plan.tok_seq, plan.tok_pos] = k.to(self.k.dtype)
        self.v[plan.tok_seq, plan.tok_pos] = v.to(self.v.dtype)
        if self.k_win is not None:
            if k_win is None or v_win is None:
                raise ValueError("k_win: this cache keeps independent window K/V; pass k_win and v_win")
            self.k_win[plan.tok_seq, plan.tok_pos] = k_win.to(self.k_win.dtype)
            self.v_win[plan.tok_seq, plan.tok_pos] = v_win.to(self.v_win.dtype)

    def compress(self, plan: StepPlan, src_k: torch.Tensor, src_v: torch.Tensor,
                 k_compressor: Callable, v_compressor: Callable, rope: Optional[RopeFn] = None):
        """Compress the blocks this step completes, store them, and refill the ring.

        Args:
            plan: the step.
            src_k, src_v: [T, HKV, Dqk], [T, HKV, Dv] compressor inputs of the step's tokens
                (keys before RoPE).
            k_compressor, v_compressor: the layer's compressors ``(x [S, HKV, D], cu) -> [Sc, HKV, D]``.
            rope: RoPE at positions for the new compressed keys (None: no RoPE).
        Returns:
            (k_cmp_new [Tc, HKV, Dqk], v_cmp_new [Tc, HKV, Dv]) packed in ``plan.seqs`` order;
            for a step starting every sequence at 0 these are exactly the pack's compressed tokens.
        """
        if plan.has_compression:
            idx = plan.source_index(self.batch)
            ring_k = self.src_k.reshape(-1, *self.src_k.shape[2:]).to(src_k.dtype)
            ring_v = self.src_v.reshape(-1, *self.src_v.shape[2:]).to(src_v.dtype)
            xk = torch.cat([ring_k, src_k])[idx]
            xv = torch.cat([ring_v, src_v])[idx]
            k_new, v_new = k_compressor(xk, plan.src_cu), v_compressor(xv, plan.src_cu)
            if k_new.shape[0] != plan.cmp_idx.shape[0]:
                raise ValueError(f"k_compressor: produced {k_new.shape[0]} compressed tokens, "
                                 f"expected {plan.cmp_idx.shape[0]}")
            if rope is not None:
                k_new = rope(k_new, plan.cmp_pos)
            self.k_cmp[plan.cmp_seq, plan.cmp_idx] = k_new.to(self.k_cmp.dtype)
            self.v_cmp[plan.cmp_seq, plan.cmp_idx] = v_new.to(self.v_cmp.dtype)
        else:
            k_new = src_k.new_zeros(0, *self.k_cmp.shape[2:])
            v_new = src_v.new_zeros(0, *self.v_cmp.shape[2:])
        flat_k = self.src_k.view(-1, *self.src_k.shape[2:])
        flat_v = self.src_v.view(-1, *self.src_v.shape[2:])
        flat_k[plan.ring_slot] = src_k[plan.ring_tok].to(flat_k.dtype)
        flat_v[plan.ring_slot] = src_v[plan.ring_tok].to(flat_v.dtype)
        return k_new, v_new

    def compressed_prefix(self, seq: int, length: int):
        """(k_cmp, v_cmp) [Lc, HKV, D] of sequence ``seq`` at cache length ``length``."""
        n = num_compressed(length, self.cmp_block, self.cmp_stride)
        return self.k_cmp[seq, :n], self.v_cmp[seq, :n]


class DenseLayerCache:
    """K/V of a dense (``full``) attention layer: [B, cap, HKV, Dqk] and [B, cap, HKV, Dv]."""

    def __init__(self, batch: int, capacity: int, num_kv_heads: int, qk_dim: int, v_dim: int, *,
                 dtype: torch.dtype, device: torch.device):
        self.capacity = capacity
        self.k = _zeros(batch, capacity, num_kv_heads, qk_dim, dtype, device)
        self.v = _zeros(batch, capacity, num_kv_heads, v_dim, dtype, device)

    def append(self, plan: StepPlan, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store [T, HKV, D] rows at (tok_seq, tok_pos)."""
        if max(plan.ends) > self.capacity:
            raise ValueError(f"plan: sequence length {max(plan.ends)} exceeds the cache capacity {self.capacity}")
        self.k[plan.tok_seq, plan.tok_pos] = k.to(self.k.dtype)
        self.v[plan.tok_seq, plan.tok_pos] = v.to(self.v.dtype)


def plan_step(seqs: Sequence[int], starts: Sequence[int], counts: Sequence[int], *, cmp_block: int,
              cmp_stride: int, device) -> StepPlan:
    """Convenience constructor of :class:`StepPlan` from sequences."""
    return StepPlan(list(seqs), list(starts), list(counts), cmp_block, cmp_stride, torch.device(device))
