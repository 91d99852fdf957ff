"""Generation with NSA models: KV cache, decode/prefill attention over it, and the generator.

Modules: ``kv_cache`` (per-layer caches and step plans), ``decode`` (attention of new tokens
against the cache: reference or Triton), ``layers`` (cache-aware stand-ins for a GPTModel's
attention modules), ``generate`` (``NSAGenerator``: chunked prefill, greedy / top-p decoding).
"""
from .generate import NSAGenerator, sample_next
from .kv_cache import DenseLayerCache, NSALayerCache, StepPlan

__all__ = ["NSAGenerator", "sample_next", "NSALayerCache", "DenseLayerCache", "StepPlan"]
