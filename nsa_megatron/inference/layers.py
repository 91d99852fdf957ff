"""Cache-aware stand-ins for the attention modules of a Megatron GPTModel.

``CachedNSAAttention`` and ``CachedDenseAttention`` wrap a layer's ``NSASelfAttention`` /
Megatron ``SelfAttention`` and reuse its pieces (fused projection, q/k norms, compressors,
gates, output projection); only the attention itself changes: the step's tokens are
appended to the layer's cache and attend to their sequences' cached prefixes. Tokens come
in as one packed sequence [T, 1, hidden] described by the step's :class:`StepPlan`; RoPE is
applied at each token's position within its own sequence.

:func:`cached_attention` swaps the wrappers into a model for the duration of a ``with`` block.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from nsa_megatron.functional import nsa_attention

from .decode import chunk_attention, decode_attention, resolve_decode_backend
from .kv_cache import DenseLayerCache, NSALayerCache, StepPlan

__all__ = ["StepContext", "MegatronRope", "CachedNSAAttention", "CachedDenseAttention", "cached_attention"]


class StepContext:
    """What every wrapped layer of one forward needs: the step plan, cache lengths, RoPE.

    Attributes:
        plan: StepPlan of the current step (set by the generator before each forward).
        lengths: int32 [B] cache lengths after the step, on the model's device (decode steps).
        rope: MegatronRope or None (no rotary embedding in the model).
        backend: "auto" | "reference" | "triton" for the cache paths.
    """

    def __init__(self, rope: Optional["MegatronRope"], backend: str):
        self.plan: Optional[StepPlan] = None
        self.lengths: Optional[torch.Tensor] = None
        self.rope, self.backend = rope, backend


class MegatronRope:
    """Megatron's RoPE (same table, same ``apply_rotary_pos_emb``) at arbitrary positions.

    Args:
        rotary_pos_emb: the model's ``RotaryEmbedding`` module; capacity: positions needed.
        config: the TransformerConfig (rotary_interleaved, fusion, YaRN scale).
    """

    def __init__(self, rotary_pos_emb: nn.Module, capacity: int, config):
        from nsa_megatron.compat import yarn_mscale

        self.freqs = rotary_pos_emb(capacity)  # [cap, 1, 1, D]
        self.config, self.mscale = config, yarn_mscale(config)

    def __call__(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [N, H, D] rotated at int64 positions [N]."""
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        if x.shape[0] == 0:
            return x
        f = self.freqs[positions.to(self.freqs.device)]
        return apply_rotary_pos_emb(x.unsqueeze(1), f, config=self.config, mscale=self.mscale).squeeze(1)


def _check_hidden(hidden_states: torch.Tensor, plan: Optional[StepPlan]) -> StepPlan:
    if plan is None:
        raise ValueError("plan: no step is set on the StepContext (call through NSAGenerator)")
    if hidden_states.dim() != 3 or hidden_states.shape[1] != 1 or hidden_states.shape[0] != plan.num_tokens:
        raise ValueError(f"hidden_states must be [{plan.num_tokens}, 1, hidden] (the packed step), "
                         f"got {tuple(hidden_states.shape)}")
    return plan


class CachedNSAAttention(nn.Module):
    """NSASelfAttention over an NSALayerCache.

    forward(hidden_states [T, 1, hidden], **ignored) -> (output [T, 1, hidden], bias), like
    the wrapped module. Whole-prompt steps (every sequence from position 0) run the training
    path ``nsa_attention`` on the pack; batched one-token steps run ``decode_attention``;
    other steps (later prefill chunks) run ``chunk_attention``.
    """

    def __init__(self, attention: nn.Module, cache: NSALayerCache, ctx: StepContext):
        super().__init__()
        self.inner, self.cache, self.ctx = attention, cache, ctx
        core = attention.core_attention
        self.hp = dict(core.hparams)
        self.scale = core.softmax_scale if core.softmax_scale is not None else 1.0 / math.sqrt(core.qk_dim)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        plan = _check_hidden(hidden_states, self.ctx.plan)
        parts = {name: x.squeeze(1) for name, x in self.inner.get_nsa_tensors(hidden_states).items()}
        independent = "k_cmp" in parts
        if independent:
            k, v, kw, vw = parts["k_slc"], parts["v_slc"], parts["k_win"], parts["v_win"]
            src_k, src_v = parts["k_cmp"], parts["v_cmp"]
        else:
            k, v, kw, vw = parts["k"], parts["v"], None, None
            src_k, src_v = parts["k"], parts["v"]
        q, gates, rope = parts["q"], parts["gates"], self.ctx.rope
        if rope is not None:
            q, k = rope(q, plan.tok_pos), rope(k, plan.tok_pos)
            kw = rope(kw, plan.tok_pos) if kw is not None else None
        core = self.inner.core_attention
        self.cache.append(plan, k, v, kw, vw)
        k_cmp, v_cmp = self.cache.compress(plan, src_k, src_v, core.k_compressor, core.v_compressor, rope)
        backend = self.ctx.backend
        if plan.from_start:
            out = nsa_attention(q, k, v, k_cmp, v_cmp, gates, plan.cu, scale=self.scale, k_win=kw, v_win=vw,
                                backend=backend, **self.hp)
        elif plan.is_decode and plan.num_tokens == self.cache.batch:
            out = decode_attention(q, gates, self.cache, self.ctx.lengths, hp=self.hp, scale=self.scale,
                                   backend=backend)
        else:
            out = chunk_attention(q, gates, self.cache, plan, hp=self.hp, scale=self.scale, backend=backend)
        return self.inner.linear_proj(out.reshape(plan.num_tokens, 1, -1))


class CachedDenseAttention(nn.Module):
    """Megatron ``SelfAttention`` (the ``full`` layers of a mixed model) over a DenseLayerCache.

    Causal attention of the step's tokens over their sequences' cached prefixes (torch SDPA
    with an explicit position mask), then the layer's own output projection.
    """

    def __init__(self, attention: nn.Module, cache: DenseLayerCache, ctx: StepContext):
        super().__init__()
        self.inner, self.cache, self.ctx = attention, cache, ctx
        scale = getattr(attention.core_attention, "softmax_scale", None)
        self.scale = scale if scale is not None else 1.0 / math.sqrt(attention.config.kv_channels)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        plan = _check_hidden(hidden_states, self.ctx.plan)
        q, k, v = self.inner.get_query_key_value_tensors(hidden_states, None)[:3]
        q, k, v = q.squeeze(1), k.squeeze(1), v.squeeze(1)
        if self.ctx.rope is not None:
            q, k = self.ctx.rope(q, plan.tok_pos), self.ctx.rope(k, plan.tok_pos)
        self.cache.append(plan, k, v)
        outs = []
        for i, (b, a, e) in enumerate(zip(plan.seqs, plan.starts, plan.ends)):
            qi = q[plan.cu_host[i]:plan.cu_host[i + 1]].transpose(0, 1)[None]  # [1, HQ, c, D]
            ki = self.cache.k[b, :e].transpose(0, 1)[None].to(q.dtype)
            vi = self.cache.v[b, :e].transpose(0, 1)[None].to(q.dtype)
            mask = torch.arange(e, device=q.device)[None, :] <= torch.arange(a, e, device=q.device)[:, None]
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=self.scale,
                                               enable_gqa=qi.shape[1] != ki.shape[1])
            outs.append(o[0].transpose(0, 1))
        out = torch.cat(outs)
        return self.inner.linear_proj(out.reshape(plan.num_tokens, 1, -1))


@contextlib.contextmanager
def cached_attention(layers, wrappers):
    """Swap ``layer.self_attention`` for the wrappers (same order) inside the block; restore after."""
    originals = [layer.self_attention for layer in layers]
    try:
        for layer, wrapper in zip(layers, wrappers):
            layer.self_attention = wrapper
        yield
    finally:
        for layer, original in zip(layers, originals):
            layer.self_attention = original


def build_layer_caches(layers, batch: int, capacity: int, ctx: StepContext, dtype: torch.dtype,
                       device: torch.device) -> list:
    """One cache + wrapper per decoder layer: NSA layers get NSALayerCache, ``full`` layers a DenseLayerCache."""
    from megatron.core.transformer.attention import SelfAttention

    from nsa_megatron.attention import NSASelfAttention

    wrappers = []
    for layer in layers:
        attn = layer.self_attention
        if isinstance(attn, NSASelfAttention):
            core = attn.core_attention
            if core.cp_size > 1:
                raise ValueError("model: generation needs context_parallel_size == 1")
            cache = NSALayerCache(batch, capacity, core.num_kv_heads, core.qk_dim, core.v_dim,
                                  cmp_block=core.hparams["cmp_block"], cmp_stride=core.hparams["cmp_stride"],
                                  independent=attn.config.nsa_branch_kv == "independent", dtype=dtype, device=device)
            wrappers.append(CachedNSAAttention(attn, cache, ctx))
        elif isinstance(attn, SelfAttention):
            cfg = attn.config
            hkv = attn.num_query_groups_per_partition
            cache = DenseLayerCache(batch, capacity, hkv, cfg.kv_channels, cfg.kv_channels, dtype=dtype, device=device)
            wrappers.append(CachedDenseAttention(attn, cache, ctx))
        else:
            raise ValueError(f"model: layer {layer.layer_number} has unsupported attention {type(attn).__name__}")
    return wrappers


def resolve_backend_for(model_backend: str, override: Optional[str], device: torch.device) -> str:
    """Backend of the cache paths: ``override`` when given, else the model's ``nsa_backend``."""
    return resolve_decode_backend(override or model_backend, device)
