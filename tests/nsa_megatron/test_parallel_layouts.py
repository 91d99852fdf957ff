"""GPTModel with NSA layers: every parallel layout equals the one-process run (CPU, gloo, fp32).

Same full weights -> same loss and gradients (norm-relative 1e-5) for TP=2, PP=2, DP=2,
TP=2 x PP=2, EP=2 with a small MoE, and full / selective recompute. Each case forks a
small gloo world (tests/distributed_utils.py). Sequence parallelism is not covered on CPU:
Megatron's torch LayerNorm fallback refuses it without TE/apex.
"""
import pytest
import torch

from tests.distributed_utils import run_distributed
from tests.nsa_megatron.gpt_harness import MOE, layout_worker, reference_worker

TOL = 1e-5

CASES = {
    "tp2": (2, dict(tensor_model_parallel_size=2)),
    "pp2": (2, dict(pipeline_model_parallel_size=2)),
    "dp2": (2, dict()),
    "tp2_pp2": (4, dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)),
    "recompute_full": (1, dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)),
    "recompute_selective": (1, dict(recompute_granularity="selective", recompute_modules=["core_attn"])),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ref") / "dense_mlp.pt")
    (loss,) = run_distributed(reference_worker, 1, {}, path)
    return path, loss


@pytest.fixture(scope="module")
def moe_reference(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ref") / "moe.pt")
    (loss,) = run_distributed(reference_worker, 1, dict(MOE), path)
    return path, loss


def _check(results, ref_loss):
    losses = [r["loss"] for r in results if r["loss"] is not None]
    assert losses, "no rank reported a loss"
    for loss in losses:
        assert abs(loss - ref_loss) <= TOL * abs(ref_loss), (loss, ref_loss)
    for rank, r in enumerate(results):
        assert r["checked"] > 0
        bad = {k: v for k, v in r["grad_err"].items() if not v <= TOL}
        assert not bad, f"rank {rank}: gradients differ from the reference: {bad}"


@pytest.mark.parametrize("case", list(CASES))
def test_layout_matches_single_process(case, reference):
    ref_path, ref_loss = reference
    world, overrides = CASES[case]
    results = run_distributed(layout_worker, world, overrides, ref_path)
    _check(results, ref_loss)


def test_expert_parallel_moe_matches_single_process(moe_reference):
    ref_path, ref_loss = moe_reference
    results = run_distributed(layout_worker, 2, dict(MOE, expert_model_parallel_size=2), ref_path)
    _check(results, ref_loss)
    # the experts really are split: each rank holds half of them
    experts = [k for k in results[0]["grad_err"] if "local_experts" in k]
    assert experts and all(".local_experts.0." in k or ".local_experts.1." in k for k in experts)


@pytest.fixture(scope="module")
def mixed_reference(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ref") / "mixed.pt")
    (loss,) = run_distributed(reference_worker, 1, dict(nsa_dense_layers=[1]), path)
    return path, loss


def test_mixed_nsa_and_full_layers_tp2_matches_single_process(mixed_reference):
    ref_path, ref_loss = mixed_reference
    results = run_distributed(layout_worker, 2, dict(nsa_dense_layers=[1], tensor_model_parallel_size=2), ref_path)
    _check(results, ref_loss)


def test_reference_loss_is_finite(reference):
    _, loss = reference
    assert torch.isfinite(torch.tensor(loss)) and loss > 0
