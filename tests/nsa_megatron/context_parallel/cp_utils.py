"""Shared pieces of the CP tests: a random NSA problem, its one-process run, and a CP worker.

The problem is built in the parent; ``cp_worker`` (run on gloo or NCCL ranks through
``tests.distributed_utils.run_distributed`` or torchrun) takes its zig-zag share, runs
``nsa_attention_cp`` forward and backward and returns local outputs and gradients, which
``merge_results`` puts back in natural order for comparison with ``reference_run``.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from nsa_kernels.layout import compressed_positions
from nsa_kernels.reference import nsa_attention_reference
from nsa_megatron.compression import build_compressor
from nsa_megatron.context_parallel import CommCounters, nsa_attention_cp, zigzag_merge, zigzag_split

TOKEN_INPUTS = ("q", "k", "v", "k_win", "v_win", "k_src", "v_src", "gates")

TINY_HP = dict(cmp_block=8, cmp_stride=4, slc_block=16, topk=4, window=32, init_blocks=1, local_blocks=2)


def toy_rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [T, H, D] by positions * 10000^(-2i/D) (float64 angles)."""
    d = x.shape[-1]
    inv = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]
    cos, sin = torch.cos(ang)[:, None, :].to(x.dtype), torch.sin(ang)[:, None, :].to(x.dtype)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def make_problem(seqlens, *, seed=0, hq=4, hkv=2, dqk=16, dv=16, shared_win=False, compressor="mlp",
                 dtype=torch.float32, hp=None):
    """Random global inputs of one pack (natural order), compressor weights and an output weight."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(seqlens)
    hp = dict(TINY_HP if hp is None else hp)
    cu = torch.tensor([0] + list(seqlens), dtype=torch.int64).cumsum(0).to(torch.int32)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    positions = torch.cat([torch.arange(n) for n in seqlens])
    p = dict(
        q=toy_rope(rnd(total, hq, dqk), positions), k=toy_rope(rnd(total, hkv, dqk), positions), v=rnd(total, hkv, dv),
        k_src=rnd(total, hkv, dqk), v_src=rnd(total, hkv, dv),
        gates=torch.sigmoid(rnd(total, hq, 3)), out_weight=rnd(total, hq, dv),
    )
    p["k_win"] = None if shared_win else toy_rope(rnd(total, hkv, dqk), positions)
    p["v_win"] = None if shared_win else rnd(total, hkv, dv)
    p = {k: (v.to(dtype) if v is not None else None) for k, v in p.items()}
    torch.manual_seed(seed + 1)
    ck = build_compressor(compressor, hkv, dqk, hp["cmp_block"], hp["cmp_stride"])
    cv = build_compressor(compressor, hkv, dv, hp["cmp_block"], hp["cmp_stride"])
    p.update(cu_seqlens=cu, hp=hp, compressor=compressor, dims=(hq, hkv, dqk, dv),
             ck_state={k: v.to(dtype) for k, v in ck.state_dict().items()},
             cv_state={k: v.to(dtype) for k, v in cv.state_dict().items()}, dtype=dtype)
    return p


def _compressors(p, device):
    hq, hkv, dqk, dv = p["dims"]
    ck = build_compressor(p["compressor"], hkv, dqk, p["hp"]["cmp_block"], p["hp"]["cmp_stride"],
                          params_dtype=p["dtype"])
    cv = build_compressor(p["compressor"], hkv, dv, p["hp"]["cmp_block"], p["hp"]["cmp_stride"],
                          params_dtype=p["dtype"])
    ck.load_state_dict(p["ck_state"])
    cv.load_state_dict(p["cv_state"])
    return ck.to(device), cv.to(device)


def _grads(leaves, ck, cv):
    out = {name: (t.grad.detach().clone() if t is not None and t.grad is not None else None)
           for name, t in leaves.items()}
    for prefix, mod in (("ck.", ck), ("cv.", cv)):
        for name, param in mod.named_parameters():
            out[prefix + name] = param.grad.detach().clone() if param.grad is not None else None
    return out


def reference_run(p, device="cpu"):
    """One-process NSA on the whole pack: (o, block indices, grads dict)."""
    leaves = {n: (p[n].to(device).clone().requires_grad_(True) if p[n] is not None else None) for n in TOKEN_INPUTS}
    ck, cv = _compressors(p, device)
    cu = p["cu_seqlens"].to(device)
    hp = p["hp"]
    k_cmp = toy_rope(ck(leaves["k_src"], cu), compressed_positions(cu, hp["cmp_block"], hp["cmp_stride"]))
    v_cmp = cv(leaves["v_src"], cu)
    o, idx = nsa_attention_reference(leaves["q"], leaves["k"], leaves["v"], k_cmp, v_cmp, leaves["gates"], cu,
                                     k_win=leaves["k_win"], v_win=leaves["v_win"], return_block_indices=True, **hp)
    (o.float() * p["out_weight"].to(device).float()).sum().backward()
    return o.detach(), idx, _grads(leaves, ck, cv)


def cp_worker(rank, world_size, p, mode, device="cpu", backend="reference"):
    """One CP rank: local share -> nsa_attention_cp fwd+bwd. Returns local o, indices, grads, bytes."""
    cu = p["cu_seqlens"]
    local = {n: (zigzag_split(p[n], cu, world_size, rank).to(device).clone().requires_grad_(True)
                 if p[n] is not None else None) for n in TOKEN_INPUTS}
    weight = zigzag_split(p["out_weight"], cu, world_size, rank).to(device)
    ck, cv = _compressors(p, device)
    counters = CommCounters()
    o, idx = nsa_attention_cp(
        local["q"], local["k"], local["v"], local["k_win"], local["v_win"], local["k_src"], local["v_src"],
        local["gates"], cu.to(device), cp_group=dist.group.WORLD, cp_mode=mode, compress_k=ck, compress_v=cv,
        rope_cmp=toy_rope, counters=counters, return_block_indices=True, backend=backend, **p["hp"])
    (o.float() * weight.float()).sum().backward()
    grads = {k: (v.cpu() if v is not None else None) for k, v in _grads(local, ck, cv).items()}
    return dict(o=o.detach().cpu(), idx=idx.cpu(), grads=grads, bytes=counters.snapshot())


def merge_results(results, p):
    """Natural-order o, indices and grads from every rank's ``cp_worker`` result (params summed)."""
    cu = p["cu_seqlens"]
    o = zigzag_merge([r["o"] for r in results], cu)
    idx = zigzag_merge([r["idx"] for r in results], cu)
    grads = {}
    for name in results[0]["grads"]:
        parts = [r["grads"][name] for r in results]
        if parts[0] is None:
            grads[name] = None
        elif name in TOKEN_INPUTS:
            grads[name] = zigzag_merge(parts, cu)
        else:
            grads[name] = torch.stack(parts).sum(0)
    return o, idx, grads


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def as_dtype(p, dtype):
    """The same problem with its float tensors (inputs, compressor weights) cast to ``dtype``."""
    q = dict(p)
    for name in TOKEN_INPUTS + ("out_weight",):
        if p[name] is not None:
            q[name] = p[name].to(dtype)
    q["ck_state"] = {k: v.to(dtype) for k, v in p["ck_state"].items()}
    q["cv_state"] = {k: v.to(dtype) for k, v in p["cv_state"].items()}
    q["dtype"] = dtype
    return q


def _nccl_entry(rank, world_size, port, fn, args, queue):
    import os
    import pickle
    import traceback

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=torch.device("cuda", rank))
        # by value: a queued tensor would share an fd the exiting rank may close before it is read
        queue.put((rank, True, pickle.dumps(fn(rank, world_size, *args))))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_nccl(fn, world_size, *args, timeout: float = 600.0):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned NCCL ranks (one GPU each).

    Returns the per-rank results (moved to CPU by ``fn``); raises RuntimeError on a worker
    error or after ``timeout`` seconds.
    """
    import pickle
    import queue as queue_mod

    import torch.multiprocessing as mp

    from tests.distributed_utils import free_port

    ctx = mp.get_context("spawn")
    results_q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_nccl_entry, args=(r, world_size, port, fn, args, results_q))
             for r in range(world_size)]
    for proc in procs:
        proc.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, ok, value = results_q.get(timeout=timeout)
            (results.__setitem__(rank, pickle.loads(value)) if ok else errors.append(f"rank {rank}:\n{value}"))
    except queue_mod.Empty:
        errors.append(f"no result within {timeout} s")
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
