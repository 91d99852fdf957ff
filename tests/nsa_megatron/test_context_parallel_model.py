"""NSA GPTModel under context parallelism equals the one-process run (CPU, gloo, float32).

A tiny NSA GPT (hidden 64, 2 layers, seq 256, l=16, d=8, l'=32, n=4, w=64; see
``gpt_harness.TINY``) takes one training step through Megatron's DDP + schedule with
``context_parallel_size`` 2, 4 or 8 (both ``nsa_cp_mode``s), combined with TP=2, DP=2, PP=2,
selective and full recompute, and THD packed batches. Each CP rank gets its micro batch from
Megatron's ``get_batch_on_this_cp_rank`` (zig-zag), RoPE comes from Megatron's per-rank
tables (needs ``apply_cpu_compat``'s CP RoPE patch on CPU). Loss and the gradient of every
parameter (q/k/v/gate projection, compressors, norms, MLP, embeddings) must equal the CP=1
run to 1e-5 relative; per-layer CP byte counters must be filled; lengths that break the CP
rules are rejected with ValueErrors naming the rule.
"""
import pytest
import torch

from tests.distributed_utils import run_distributed
from tests.nsa_megatron.gpt_harness import layout_worker, make_config, reference_worker

TOL = 1e-5
SEQ_LEN = 256
PACK = (128, 384)  # one THD pack per micro batch (2 x 256 tokens), lengths divisible by 2*cp*l'

CASES = {
    "cp2_ring": (2, dict(context_parallel_size=2)),
    "cp2_allgather": (2, dict(context_parallel_size=2, nsa_cp_mode="allgather")),
    "cp4_ring": (4, dict(context_parallel_size=4)),
    "tp2_cp2_ring": (4, dict(context_parallel_size=2, tensor_model_parallel_size=2)),
    "tp2_cp2_allgather": (4, dict(context_parallel_size=2, tensor_model_parallel_size=2, nsa_cp_mode="allgather")),
    "dp2_cp2_ring": (4, dict(context_parallel_size=2)),
    "pp2_cp2_ring": (4, dict(context_parallel_size=2, pipeline_model_parallel_size=2)),
    "cp2_ring_selective": (2, dict(context_parallel_size=2, recompute_granularity="selective",
                                   recompute_modules=["core_attn"])),
    "cp2_allgather_full": (2, dict(context_parallel_size=2, nsa_cp_mode="allgather", recompute_granularity="full",
                                   recompute_method="uniform", recompute_num_layers=1)),
    "cp2_ring_full": (2, dict(context_parallel_size=2, recompute_granularity="full", recompute_method="uniform",
                              recompute_num_layers=1)),
    # issue 10's layouts at eight ranks
    "tp2_cp4_ring": (8, dict(context_parallel_size=4, tensor_model_parallel_size=2)),
    "cp8_allgather": (8, dict(context_parallel_size=8, nsa_cp_mode="allgather")),
}

PACKED_CASES = {
    "cp2_ring": (2, dict(context_parallel_size=2)),
    "cp2_allgather": (2, dict(context_parallel_size=2, nsa_cp_mode="allgather")),
    "tp2_cp2_ring": (4, dict(context_parallel_size=2, tensor_model_parallel_size=2)),
}


def _reference(tmp_path_factory, name, overrides):
    path = str(tmp_path_factory.mktemp("ref") / f"{name}.pt")
    (loss,) = run_distributed(reference_worker, 1, overrides, path)
    return path, loss


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference(tmp_path_factory, "cp_ref", dict(seq_length=SEQ_LEN))


@pytest.fixture(scope="module")
def packed_reference(tmp_path_factory):
    return _reference(tmp_path_factory, "cp_ref_packed", dict(seq_length=SEQ_LEN, packed_seqlens=PACK))


def _check(results, ref_loss, cp_mode):
    losses = [r["loss"] for r in results if r["loss"] is not None]
    assert losses, "no rank reported a loss"
    for loss in losses:
        assert abs(loss - ref_loss) <= TOL * abs(ref_loss), (loss, ref_loss)
    for rank, r in enumerate(results):
        assert r["checked"] > 0
        names = " ".join(r["grad_err"])
        if "decoder.layers" in names:  # every NSA weight is compared on ranks that hold layers
            for part in ("linear_qkv.weight", "k_compressor", "v_compressor", "linear_proj.weight"):
                assert part in names, f"rank {rank}: no {part} gradient compared"
        bad = {k: v for k, v in r["grad_err"].items() if not v <= TOL}
        assert not bad, f"rank {rank}: gradients differ from the CP=1 reference: {bad}"
        # per-layer byte counters: every NSA layer this rank holds sent the mode's exchanges
        assert r["cp_bytes"], f"rank {rank}: no NSA layer counters"
        for layer, counts in r["cp_bytes"].items():
            want = "slc_blocks.fwd" if cp_mode == "ring" else "kv_allgather.fwd"
            other = "kv_allgather.fwd" if cp_mode == "ring" else "slc_blocks.fwd"
            assert counts.get(want, 0) > 0 and counts.get("cmp_tokens.fwd", 0) > 0, (rank, layer, counts)
            assert counts.get(want.replace("fwd", "bwd"), 0) > 0 and other not in counts, (rank, layer, counts)


@pytest.mark.parametrize("case", list(CASES))
def test_cp_layout_matches_single_process(case, reference):
    ref_path, ref_loss = reference
    world, overrides = CASES[case]
    results = run_distributed(layout_worker, world, dict(overrides, seq_length=SEQ_LEN), ref_path)
    _check(results, ref_loss, overrides.get("nsa_cp_mode", "ring"))


@pytest.mark.parametrize("case", list(PACKED_CASES))
def test_cp_packed_thd_matches_single_process(case, packed_reference):
    ref_path, ref_loss = packed_reference
    world, overrides = PACKED_CASES[case]
    results = run_distributed(layout_worker, world, dict(overrides, seq_length=SEQ_LEN, packed_seqlens=PACK), ref_path)
    _check(results, ref_loss, overrides.get("nsa_cp_mode", "ring"))


def test_ring_mode_bytes_below_allgather(reference):
    """The selected-block mode moves fewer K/V bytes than gathering the whole K/V."""
    ref_path, _ = reference
    totals = {}
    for mode in ("ring", "allgather"):
        res = run_distributed(layout_worker, 2, dict(context_parallel_size=2, nsa_cp_mode=mode, seq_length=SEQ_LEN),
                              ref_path)
        totals[mode] = sum(sum(c.values()) for r in res for c in r["cp_bytes"].values())
    assert 0 < totals["ring"] < totals["allgather"], totals


def test_sequence_length_rules_name_the_cp_rule():
    ring = make_config(context_parallel_size=2)
    ring.validate_sequence_length(256)  # 2 * 2 * 32 = 128 divides 256
    with pytest.raises(ValueError, match=r"^seq_length=192: nsa_cp_mode='ring' needs .*2\*2\*32 = 128"):
        ring.validate_sequence_length(192)
    make_config(context_parallel_size=2, nsa_cp_mode="allgather").validate_sequence_length(192)
    with pytest.raises(ValueError, match=r"^seq_length=130: must be divisible by 2 \* context_parallel_size \(4\)"):
        make_config(context_parallel_size=2, nsa_cp_mode="allgather").validate_sequence_length(130)


def _rejection_worker(rank, world):
    """Under CP=2 (ring): the model provider and a packed forward reject bad lengths."""
    from megatron.core.packed_seq_params import PackedSeqParams

    from nsa_megatron.model import gpt_model_provider
    from tests.distributed_utils import init_megatron

    init_megatron(context_parallel_size=2)
    cfg = make_config(context_parallel_size=2)
    messages = []
    try:
        gpt_model_provider(cfg, 128, 192)
    except ValueError as exc:
        messages.append(str(exc))
    model = gpt_model_provider(cfg, 128, SEQ_LEN)
    for seqlens in ((64, 448), (256, 256)):  # 64: not whole blocks per chunk; then a local (non-global) cu
        cu = torch.tensor([0, *seqlens]).cumsum(0).to(torch.int32)
        if seqlens == (256, 256):
            cu = cu // 2
        psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                              max_seqlen_q=max(seqlens), max_seqlen_kv=max(seqlens))
        tokens = torch.zeros(1, sum(seqlens) // 2, dtype=torch.int64)
        try:
            model(tokens, tokens, None, packed_seq_params=psp)
        except ValueError as exc:
            messages.append(str(exc))
    return messages


def test_cp_model_rejects_bad_lengths_with_clear_errors():
    for messages in run_distributed(_rejection_worker, 2):
        assert len(messages) == 3, messages
        assert messages[0].startswith("seq_length=192: nsa_cp_mode='ring' needs"), messages[0]
        assert "sequence 0 has 64 tokens" in messages[1] and "2 * cp * slc_block = 128" in messages[1], messages[1]
        assert "cu_seqlens ends at 256" in messages[2] and "must end at 512" in messages[2], messages[2]


def test_collect_cp_bytes_reads_merges_and_resets_per_layer():
    from nsa_megatron.context_parallel import CommCounters, collect_cp_bytes, format_cp_bytes

    class Core(torch.nn.Module):
        def __init__(self, layer_number):
            super().__init__()
            self.layer_number, self.cp_counters = layer_number, CommCounters()

    chunks = [torch.nn.Sequential(Core(1), Core(2)), torch.nn.Sequential(Core(3))]  # e.g. virtual PP chunks
    chunks[0][0].cp_counters.add("kv_allgather.fwd", 3 * 2**20)
    chunks[0][0].cp_counters.add("kv_allgather.bwd", 2**20)
    chunks[1][0].cp_counters.add("slc_blocks.index", 2**19)
    stats = collect_cp_bytes(chunks, reset=True)
    assert stats == {1: {"kv_allgather.fwd": 3 * 2**20, "kv_allgather.bwd": 2**20}, 2: {},
                     3: {"slc_blocks.index": 2**19}}
    assert format_cp_bytes(stats) == "cp MiB sent (fwd/bwd): L1 3.00/1.00 | L2 0.00/0.00 | L3 0.50/0.00 | total 4.50"
    assert collect_cp_bytes(chunks) == {1: {}, 2: {}, 3: {}}  # reset=True zeroed them
    with pytest.raises(ValueError, match="^model"):
        collect_cp_bytes([object()])


def _ckpt_save_worker(rank, world, ckpt_dir):
    from megatron.core import dist_checkpointing

    from nsa_megatron.model import gpt_model_provider
    from tests.distributed_utils import init_megatron

    init_megatron(context_parallel_size=2)
    torch.manual_seed(0)
    model = gpt_model_provider(make_config(context_parallel_size=2), 128, SEQ_LEN)
    dist_checkpointing.save(model.sharded_state_dict(), ckpt_dir)  # CP ranks are replicas
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _ckpt_load_worker(rank, world, ckpt_dir):
    from megatron.core import dist_checkpointing

    from nsa_megatron.model import gpt_model_provider
    from tests.distributed_utils import init_megatron

    init_megatron(seed=4321)
    torch.manual_seed(1)
    model = gpt_model_provider(make_config(), 128, SEQ_LEN)
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), ckpt_dir))
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_checkpoint_saved_under_cp2_loads_at_cp1(tmp_path):
    (tmp_path / "ckpt").mkdir()
    saved = run_distributed(_ckpt_save_worker, 2, str(tmp_path / "ckpt"))
    (loaded,) = run_distributed(_ckpt_load_worker, 1, str(tmp_path / "ckpt"))
    params = [k for k in saved[0] if k.endswith("weight") or "compressor" in k]
    assert any("k_compressor" in k for k in params) and len(params) > 10
    for k in params:
        assert torch.equal(saved[0][k], saved[1][k]) and torch.equal(loaded[k], saved[0][k]), k
