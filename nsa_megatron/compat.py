"""Megatron-Core compatibility: running on CPU (gloo), and 0.16 vs 0.19 differences.

``apply_cpu_compat()`` lets megatron-core train on a machine without CUDA (tests, CI,
dry runs). It is applied explicitly, is idempotent, and does nothing when CUDA is
available. What it patches (measured, see ENVIRONMENT.md):

* the tensor-parallel RNG tracker and ``model_parallel_cuda_manual_seed`` use CUDA RNG
  state -> they use the CPU generator instead;
* ``torch.cuda.current_device()`` (RoPE ``inv_freq``, buffers, layers) -> ``"cpu"``;
  ``torch.cuda.synchronize`` -> no-op; ``torch.cuda.current_stream()`` (0.19 DDP) -> a
  stream stand-in whose waits are no-ops; ``Tensor.cuda()`` -> the tensor itself;
* hard-coded ``device="cuda"``, ``pin_memory()`` / ``pin_memory=True`` and
  ``'torch.cuda.FloatTensor'`` type checks inside a fixed list of megatron functions
  (optimizer constructors, gradient norm / clipping, pipeline schedules, CP RoPE slicing,
  data broadcast) -> CPU equivalents, only while those functions run. Modules that imported
  such a function by name (``rotary_pos_embedding`` and ``yarn_rotary_pos_embedding`` import
  ``get_pos_emb_on_this_cp_rank``; the optimizers import the ``clip_grads`` functions) get
  the wrapped function too.

Version shims (``HAVE_TE``, ``MCORE_VERSION``, ``yarn_mscale``) live at the bottom.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import threading

import torch

__all__ = [
    "apply_cpu_compat",
    "cpu_compat_applied",
    "MCORE_VERSION",
    "HAVE_TE",
    "yarn_mscale",
    "apply_version_shims",
]

_APPLIED = False
_LOCK = threading.Lock()
_SCOPE = threading.local()

# (module, dotted attribute) of megatron functions that hard-code CUDA devices/types.
_SCOPED_TARGETS = (
    ("megatron.core.optimizer.optimizer", "MixedPrecisionOptimizer.__init__"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    ("megatron.core.optimizer.optimizer", "FP32Optimizer.__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_no_pipelining"),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_pipelining_without_interleaving"),
    ("megatron.core.pipeline_parallel.schedules", "forward_backward_pipelining_with_interleaving"),
    ("megatron.core.models.common.embeddings.rope_utils", "get_pos_emb_on_this_cp_rank"),
    ("megatron.core.models.common.embeddings.rope_utils", "_get_thd_freqs_on_this_cp_rank"),
    ("megatron.core.tensor_parallel.data", "broadcast_data"),
    ("megatron.core.tensor_parallel.data", "_build_key_size_numel_dictionaries"),
    ("megatron.core.distributed.param_and_grad_buffer", "_ParamAndGradBuffer.__init__"),
    ("megatron.core.utils", "get_batch_on_this_cp_rank"),
    ("megatron.core.optimizer.clip_grads", "get_grad_norm_fp32"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.clip_grads", "count_zeros_fp32"),
)

# Modules that bind a scoped target under their own name (``from ... import fn``):
# (target module, function name) -> modules whose attribute of that name is rebound.
_ALIASES = {
    ("megatron.core.models.common.embeddings.rope_utils", "get_pos_emb_on_this_cp_rank"): (
        "megatron.core.models.common.embeddings.rotary_pos_embedding",
        "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding",
    ),
    **{
        ("megatron.core.optimizer.clip_grads", fn): (
            "megatron.core.optimizer.optimizer",
            "megatron.core.optimizer.layer_wise_optimizer",
        )
        for fn in ("get_grad_norm_fp32", "clip_grad_by_total_norm_fp32", "count_zeros_fp32")
    },
}


def cpu_compat_applied() -> bool:
    """True once ``apply_cpu_compat()`` has patched megatron for CPU."""
    return _APPLIED


def apply_cpu_compat() -> bool:
    """Patch megatron-core (and the few torch.cuda calls it makes) to run on CPU.

    Call once before ``initialize_model_parallel`` / model construction. Idempotent.
    Returns True when patches are (now) active, False when CUDA is available (no-op).
    """
    global _APPLIED
    if torch.cuda.is_available():
        return False
    with _LOCK:
        if _APPLIED:
            return True
        _patch_torch_cuda()
        _patch_rng_tracker()
        apply_version_shims()
        for module_name, attr in _SCOPED_TARGETS:
            _wrap_in_cpu_scope(module_name, attr)
        _APPLIED = True
    return True


# ----------------------------------------------------------------------------- torch.cuda


class _CpuEvent:
    """Stand-in for ``torch.cuda.Event`` on CPU: already complete."""

    def synchronize(self):
        return None

    def wait(self, *_):
        return None

    def query(self):
        return True

    def record(self, *_):
        return None


class _CpuStream:
    """Stand-in for ``torch.cuda.Stream`` on CPU: every ordering call is a no-op."""

    device = torch.device("cpu")

    def wait_stream(self, *_):
        return None

    def wait_event(self, *_):
        return None

    def record_event(self, *_):
        return _CpuEvent()

    def synchronize(self):
        return None

    def query(self):
        return True

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False


def _patch_torch_cuda() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _CpuStream()
    torch.cuda.Stream = lambda *a, **k: _CpuStream()
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.Event = lambda *a, **k: _CpuEvent()
    torch.Tensor.cuda = lambda self, *a, **k: self


# ----------------------------------------------------------------------------- RNG tracker


def _patch_rng_tracker() -> None:
    random = importlib.import_module("megatron.core.tensor_parallel.random")

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    random._get_cuda_rng_state = get_state
    random._set_cuda_rng_state = set_state
    random.CudaRNGStatesTracker.add = add


# ----------------------------------------------------------------------------- scoped patches


def _cpu_device(device):
    if device is None:
        return None
    if isinstance(device, int):
        return "cpu"
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return "cpu"
    return device


def _factory(fn):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinned host memory needs a CUDA allocator
        return fn(*args, **kwargs)

    return wrapped


_FACTORIES = ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "empty_like")


@contextlib.contextmanager
def _cpu_scope():
    """While active: CUDA device args -> CPU, pin_memory -> identity, cuda type names."""
    depth = getattr(_SCOPE, "depth", 0)
    _SCOPE.depth = depth + 1
    if depth:
        try:
            yield
        finally:
            _SCOPE.depth -= 1
        return
    saved = {name: getattr(torch, name) for name in _FACTORIES}
    saved_pin, saved_type, saved_to = torch.Tensor.pin_memory, torch.Tensor.type, torch.Tensor.to
    try:
        for name in _FACTORIES:
            setattr(torch, name, _factory(saved[name]))
        torch.Tensor.pin_memory = lambda self, *a, **k: self

        def type_(self, dtype=None, non_blocking=False, **kw):
            if dtype is None:
                name = saved_type(self)
                return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
            return saved_type(self, dtype, non_blocking, **kw)

        def to(self, *args, **kwargs):
            args = tuple(_cpu_device(a) if isinstance(a, (str, torch.device)) else a for a in args)
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return saved_to(self, *args, **kwargs)

        torch.Tensor.type = type_
        torch.Tensor.to = to
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch, name, fn)
        torch.Tensor.pin_memory, torch.Tensor.type, torch.Tensor.to = saved_pin, saved_type, saved_to
        _SCOPE.depth -= 1


def _wrap_in_cpu_scope(module_name: str, attr: str) -> None:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return
    owner, name = module, attr
    if "." in attr:
        cls_name, name = attr.split(".", 1)
        owner = getattr(module, cls_name, None)
    fn = getattr(owner, name, None) if owner is not None else None
    if fn is None:
        return
    if getattr(fn, "_nsa_cpu_scoped", False):
        scoped, fn = fn, fn.__wrapped__
    else:

        @functools.wraps(fn)
        def scoped(*args, **kwargs):
            with _cpu_scope():
                return fn(*args, **kwargs)

        scoped._nsa_cpu_scoped = True
        setattr(owner, name, scoped)
    for alias_module in _ALIASES.get((module_name, attr), ()):
        try:
            alias = importlib.import_module(alias_module)
        except ImportError:
            continue
        if getattr(alias, name, None) is fn:
            setattr(alias, name, scoped)


# ----------------------------------------------------------------------------- versions


def _mcore_version():
    from packaging.version import Version

    try:
        from megatron.core.package_info import __version__
    except ImportError:  # pragma: no cover - very old releases
        return Version("0")
    return Version(__version__)


MCORE_VERSION = _mcore_version()
"""Installed megatron-core version (packaging.version.Version); 0.16.1 on CPU CI, 0.19.2 on GPU."""

try:
    import transformer_engine  # noqa: F401

    HAVE_TE = True
except ImportError:
    HAVE_TE = False


def apply_version_shims() -> None:
    """Fix megatron-core bugs that depend on the version, not the device. Idempotent.

    * 0.16: ``moe_utils.te_general_gemm`` is left undefined when TransformerEngine is
      missing, so the MoE router's gating linear raises NameError -> define it as None.
    """
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def yarn_mscale(config) -> float:
    """RoPE magnitude scale Megatron applies for YaRN (1.0 for plain RoPE)."""
    try:
        from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
            _yarn_get_concentration_factor_from_config,
        )
    except ImportError:
        return 1.0
    return float(_yarn_get_concentration_factor_from_config(config))
