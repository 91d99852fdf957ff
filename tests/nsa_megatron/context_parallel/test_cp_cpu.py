"""CP on CPU (gloo, float32): outputs, gradients and selected blocks equal the one-process run.

Tiny shapes (HQ=4, HKV=2, D=16, l=8, d=4, l'=16, n=4, w=32); every case spawns its own world.
"""
import pytest
import torch
import torch.distributed as dist

from nsa_megatron.context_parallel import nsa_attention_cp, zigzag_split
from tests.distributed_utils import run_distributed
from tests.nsa_megatron.context_parallel.cp_utils import (
    TINY_HP, cp_worker, make_problem, merge_results, reference_run, rel_err,
)

TOL = 1e-5

CASES = [
    # mode, cp, sequence lengths, shared window K/V, compressor
    ("allgather", 2, [256], False, "mlp"),
    ("ring", 2, [256], False, "mlp"),
    # chunks of 33 / 15 / 3 tokens: not multiples of d or l', a chunk shorter than l.
    ("allgather", 4, [264, 120, 24], True, "mlp"),
    ("ring", 4, [256, 128], False, "linear"),
    ("ring", 2, [128, 64, 192], True, "mlp"),
    # eight ranks (issue 10's CP=8 layout, correctness on CPU): chunks of 16 tokens = one l'
    ("ring", 8, [512], False, "mlp"),
    ("allgather", 8, [528, 48], True, "linear"),
]


@pytest.mark.parametrize("mode,cp,seqlens,shared,compressor", CASES)
def test_cp_matches_single_process(mode, cp, seqlens, shared, compressor):
    p = make_problem(seqlens, shared_win=shared, compressor=compressor, seed=len(seqlens) + cp)
    o_ref, idx_ref, g_ref = reference_run(p)
    results = run_distributed(cp_worker, cp, p, mode, timeout=150)
    o, idx, grads = merge_results(results, p)
    assert torch.equal(idx, idx_ref), "selected block indices differ from the one-process run"
    assert rel_err(o, o_ref) <= TOL
    checked = 0
    for name, ref in g_ref.items():
        if ref is None:
            assert grads[name] is None, name
            continue
        assert grads[name] is not None, f"no gradient for {name}"
        assert rel_err(grads[name], ref) <= TOL, f"{name}: rel {rel_err(grads[name], ref):.2e}"
        checked += 1
    assert checked >= 8 + (2 if shared else 4)  # q k v gates k_src v_src (+ win) + compressor params
    for r in results:
        assert r["bytes"]["cmp_tokens.fwd"] > 0 and r["bytes"]["cmp_tokens.bwd"] > 0


def _triton_worker(rank, world, p, mode):
    return cp_worker(rank, world, p, mode, backend="triton")


@pytest.mark.parametrize("mode,seqlens,shared", [("ring", [128, 64], False), ("allgather", [64, 32], True)])
def test_cp_triton_path_matches_single_process(mode, seqlens, shared):
    """The Triton path (one launch per branch over all segments, fused gated sum and backward; the
    Triton interpreter on CPU, float32) gives the one-process reference's blocks, output and grads."""
    p = make_problem(seqlens, shared_win=shared, seed=5)
    o_ref, idx_ref, g_ref = reference_run(p)
    o, idx, grads = merge_results(run_distributed(_triton_worker, 2, p, mode, timeout=400), p)
    assert torch.equal(idx, idx_ref)
    assert rel_err(o, o_ref) <= TOL
    for name, ref in g_ref.items():
        if ref is not None:
            assert rel_err(grads[name], ref) <= TOL, f"{name}: rel {rel_err(grads[name], ref):.2e}"


def _plan_worker(rank, world):
    from nsa_megatron.context_parallel.layout import ZigzagLayout
    from nsa_megatron.context_parallel.plan import static_plan
    from nsa_kernels.validation import NSAHyperParams

    hp = NSAHyperParams(**TINY_HP)
    layout = ZigzagLayout([256, 128], world)
    plan = static_plan(layout, rank, hp, "cpu")
    again = static_plan(ZigzagLayout([256, 128], world), rank, hp, "cpu")
    send = torch.tensor(plan.win_halo.send_counts)
    got = torch.zeros_like(send)
    dist.all_to_all_single(got, torch.tensor(plan.win_halo.recv_counts))
    return dict(cached=plan is again, send=send, peers_recv=got)


def test_static_plans_are_cached_and_agree_across_ranks():
    """Halo plans are computed locally (no count exchange): what a rank plans to send must be
    what its peers plan to receive from it; a second call with the same pack reuses the plan."""
    for r in run_distributed(_plan_worker, 4, timeout=120):
        assert r["cached"]
        assert torch.equal(r["send"], r["peers_recv"])


def _bytes_worker(rank, world, p):
    out = {}
    for mode in ("allgather", "ring"):
        out[mode] = cp_worker(rank, world, p, mode)["bytes"]
    return out


def test_byte_counters_and_ring_moves_less():
    seqlens, cp = [512], 2
    p = make_problem(seqlens, seed=7)
    hq, hkv, dqk, dv = p["dims"]
    results = run_distributed(_bytes_worker, cp, p, timeout=150)
    local = sum(seqlens) // cp
    elem = 4
    for r in results:
        ag, ring = r["allgather"], r["ring"]
        # all-gather of k, v, k_win, v_win: each rank sends its (cp-1) shares, same back in bwd.
        kv = (cp - 1) * local * hkv * 2 * (dqk + dv) * elem
        assert ag["kv_allgather.fwd"] == kv and ag["kv_allgather.bwd"] == kv
        assert "kv_allgather.fwd" not in ring
        for key in ("slc_blocks.fwd", "win_halo.fwd", "cmp_tokens.fwd", "cmp_halo.fwd"):
            assert key in ring
        # window halo: w-1 tokens of k_win+v_win per chunk that has a predecessor on another rank.
        assert ring["win_halo.fwd"] % (hkv * (dqk + dv) * elem) == 0
    total = {m: sum(sum(v for k, v in r[m].items() if k.endswith(".fwd")) for r in results)
             for m in ("allgather", "ring")}
    assert total["ring"] < total["allgather"], total


def _errors_worker(rank, world):
    hq, hkv, d = 4, 2, 16
    msgs = {}

    def call(local_tokens, cu, mode, **kw):
        q = torch.randn(local_tokens, hq, d)
        kv = torch.randn(local_tokens, hkv, d)
        gates = torch.rand(local_tokens, hq, 3)
        from nsa_megatron.compression import build_compressor
        ck = build_compressor("mean", hkv, d, TINY_HP["cmp_block"], TINY_HP["cmp_stride"])
        args = dict(cp_group=dist.group.WORLD, cp_mode=mode, compress_k=ck, compress_v=ck, **TINY_HP)
        args.update(kw)
        return nsa_attention_cp(q, kv, kv, None, None, kv, kv, gates, cu, **args)

    for key, fn in {
        "ring_len": lambda: call(48, torch.tensor([0, 96]), "ring"),
        "two_cp": lambda: call(50, torch.tensor([0, 42, 100]), "allgather"),
        "mode": lambda: call(64, None, "zigzag"),
        "cu_end": lambda: call(64, torch.tensor([0, 100]), "allgather"),
        "shape": lambda: call(64, None, "allgather", window=0),
    }.items():
        try:
            fn()
            msgs[key] = None
        except ValueError as exc:
            msgs[key] = str(exc)
    # A length divisible by 2*cp but not by 2*cp*l' works in allgather mode (and agrees with ring on
    # nothing else): the local form of cu_seqlens (last = T/cp) is accepted too.
    out = call(48, torch.tensor([0, 48]), "allgather")
    msgs["allgather_96_ok"] = tuple(out.shape)
    return msgs


def test_bad_configurations_raise_clear_errors():
    results = run_distributed(_errors_worker, 2, timeout=120)
    for msgs in results:
        assert "divisible by 2 * cp * slc_block = 64" in msgs["ring_len"] and "allgather" in msgs["ring_len"]
        assert "sequence 0 has 42 tokens, not divisible by 2 * context_parallel_size (4)" in msgs["two_cp"]
        assert msgs["mode"].startswith("cp_mode must be one of")
        assert msgs["cu_end"].startswith("cu_seqlens ends at 100")
        assert msgs["shape"].startswith("window=") and "must be a positive int" in msgs["shape"]
        assert msgs["allgather_96_ok"] == (48, 4, 16)


def _megatron_rope_worker(rank, world, p):
    from types import SimpleNamespace

    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer.transformer_config import TransformerConfig

    from nsa_megatron.compat import apply_cpu_compat
    from tests.nsa_megatron.context_parallel.cp_utils import _compressors

    if not torch.cuda.is_available():
        apply_cpu_compat()
    group = dist.group.WORLD
    hq, hkv, dqk, dv = p["dims"]
    total = int(p["cu_seqlens"][-1])
    rot = RotaryEmbedding(kv_channels=dqk, rotary_percent=1.0, use_cpu_initialization=True, cp_group=group)
    full_table = rot(total, packed_seq=True)  # THD: one row per position
    # BSHD under CP: Megatron slices the table to this rank's zig-zag positions
    # (get_pos_emb_on_this_cp_rank, which pins memory and so needs CUDA; the split is the same).
    local_table = zigzag_split(full_table, None, world, rank)
    assert local_table.shape[0] == total // world and full_table.shape[0] == total
    config = TransformerConfig(num_layers=1, hidden_size=hq * dqk, num_attention_heads=hq,
                               num_query_groups=hkv, kv_channels=dqk)
    ck, cv = _compressors(p, "cpu")
    core = SimpleNamespace(config=config, hparams=dict(p["hp"]), k_compressor=ck, v_compressor=cv,
                           softmax_scale=None)
    x = {n: (zigzag_split(p[n], None, world, rank) if p[n] is not None else None)
         for n in ("q", "k", "v", "k_win", "v_win", "k_src", "v_src", "gates")}
    args = (x["q"], x["k"], x["v"], x["k_win"], x["v_win"], x["k_src"], x["v_src"], x["gates"])
    local_cu = torch.tensor([0, total // world], dtype=torch.int32)

    def run(**kw):
        return nsa_attention_cp(*args, cp_group=group, cp_mode="allgather", core=core, **kw).detach()

    def by_position(k_cmp, positions):
        return apply_rotary_pos_emb(k_cmp.unsqueeze(1), full_table[positions], config=config,
                                    cp_group=group).squeeze(1)

    return dict(
        bshd=run(cu_seqlens=local_cu, rotary_pos_emb=local_table),
        thd=run(cu_seqlens=p["cu_seqlens"], rotary_pos_emb=full_table, packed_seq_params=object()),
        explicit=run(cu_seqlens=p["cu_seqlens"], rope_cmp=by_position),
        none=run(cu_seqlens=p["cu_seqlens"]),
    )


def test_megatron_rope_tables_rotate_compressed_keys_at_global_positions():
    p = make_problem([256], seed=3)
    for r in run_distributed(_megatron_rope_worker, 2, p, timeout=150):
        assert rel_err(r["bshd"], r["explicit"]) <= TOL
        assert rel_err(r["thd"], r["explicit"]) <= TOL
        assert rel_err(r["none"], r["explicit"]) > 1e-3  # RoPE on compressed keys matters
