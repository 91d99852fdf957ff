"""GPU: the NSA GPTModel in bf16 with the Triton backend agrees with the reference backend.

Run on the H100 machine (megatron-core 0.19.2): ``pytest -m gpu tests/nsa_megatron``.
"""
import pytest
import torch

from tests.distributed_utils import init_megatron, run_distributed
from tests.nsa_megatron.gpt_harness import SEQ, VOCAB, global_batch, make_config

pytestmark = pytest.mark.gpu


def _run(rank, world):
    init_megatron()
    from megatron.core.transformer.module import Float16Module

    from nsa_megatron.model import gpt_model_provider

    results = {}
    state = None
    for backend in ("reference", "triton"):
        cfg = make_config(nsa_backend=backend, bf16=True, params_dtype=torch.bfloat16,
                          pipeline_dtype=torch.bfloat16, use_cpu_initialization=False)
        # bf16 as in training: Float16Module casts the parameters and the first stage's inputs
        model = Float16Module(cfg, gpt_model_provider(cfg, VOCAB, SEQ).cuda())
        if state is None:
            state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        tokens, labels = (x.cuda() for x in global_batch())
        positions = torch.arange(SEQ, device="cuda").expand(tokens.shape[0], SEQ)
        loss = model(tokens, positions, None, labels=labels).float().mean()
        loss.backward()
        results[backend] = (float(loss), {n: p.grad.float().cpu() for n, p in model.named_parameters()})
    return results


def test_bf16_triton_matches_reference_backend():
    (res,) = run_distributed(_run, 1, timeout=600)
    (loss_ref, g_ref), (loss_tri, g_tri) = res["reference"], res["triton"]
    assert abs(loss_tri - loss_ref) <= 1e-2 * abs(loss_ref)
    for name, want in g_ref.items():
        err = float((g_tri[name] - want).norm() / want.norm().clamp_min(1e-12))
        assert err <= 2e-2, (name, err)
