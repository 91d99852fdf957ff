"""The CPU compatibility layer: explicit, idempotent, and enough for megatron's CUDA-isms."""
import torch

from tests.distributed_utils import run_distributed


def _worker(rank, world):
    import nsa_megatron.attention  # noqa: F401  (importing must not patch anything)
    from megatron.core.optimizer import optimizer as opt

    from nsa_megatron import compat

    before = (compat.cpu_compat_applied(), torch.cuda.synchronize.__module__)
    first, second = compat.apply_cpu_compat(), compat.apply_cpu_compat()
    wrapped = opt.MixedPrecisionOptimizer.__init__
    nested = getattr(getattr(wrapped, "__wrapped__", None), "_nsa_cpu_scoped", False)
    # CUDA-isms megatron uses now work on CPU
    t = torch.zeros(2, device=torch.cuda.current_device())
    torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(torch.cuda.current_stream())
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(7)
    with get_cuda_rng_tracker().fork():
        a = torch.rand(3)
    with get_cuda_rng_tracker().fork():
        b = torch.rand(3)
    return before, first, second, nested, t.device.type, bool((a != b).all())


def test_apply_cpu_compat_is_explicit_and_idempotent():
    (r,) = run_distributed(_worker, 1)
    (applied_before, sync_module), first, second, nested, device, tracker_advances = r
    assert applied_before is False and sync_module.startswith("torch")
    assert first is True and second is True and nested is False
    assert device == "cpu" and tracker_advances
