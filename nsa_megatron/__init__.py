"""NSA for Megatron-Core. Importing this package is cheap and patches nothing.

Public names load lazily on first access, e.g. ``from nsa_megatron import NSAConfig``:
``NSAConfig``, ``NSASelfAttention``, ``NSACoreAttention``, ``SDPACoreAttention``,
``get_gpt_layer_with_nsa_spec``, ``get_nsa_decoder_block_spec``, ``gpt_model_provider``,
``apply_cpu_compat``, ``nsa_attention``.
"""
import importlib

_LAZY = {
    "NSAConfig": "nsa_megatron.config",
    "NSASelfAttention": "nsa_megatron.attention",
    "NSACoreAttention": "nsa_megatron.core_attention",
    "SDPACoreAttention": "nsa_megatron.dense_attention",
    "get_gpt_layer_with_nsa_spec": "nsa_megatron.spec",
    "get_nsa_decoder_block_spec": "nsa_megatron.spec",
    "gpt_model_provider": "nsa_megatron.model",
    "apply_cpu_compat": "nsa_megatron.compat",
    "nsa_attention": "nsa_megatron.functional",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nsa_megatron' has no attribute {name!r}")
