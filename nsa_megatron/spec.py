"""Layer and block specs: Megatron's GPT layer with NSA (or the SDPA ``full`` baseline).

The specs start from Megatron's own GPT layer spec (local modules, or TransformerEngine
when it imports), so MLPs, MoE, norms and sharded-state-dict key maps stay Megatron's,
and only the ``self_attention`` entry is replaced:

* NSA layers: ``NSASelfAttention`` + ``NSACoreAttention``, same ``linear_qkv`` /
  ``linear_proj`` classes as the base spec (TE's fused layernorm-linear in the TE flavour);
* ``full`` layers: Megatron's ``SelfAttention`` + ``SDPACoreAttention``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.models.gpt import gpt_layer_specs as gls
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from nsa_megatron.attention import NSASelfAttention
from nsa_megatron.compat import HAVE_TE
from nsa_megatron.config import NSAConfig
from nsa_megatron.core_attention import NSACoreAttention
from nsa_megatron.dense_attention import SDPACoreAttention

__all__ = ["get_gpt_layer_with_nsa_spec", "get_nsa_decoder_block_spec"]


def _base_layer_spec(config, num_experts, moe_grouped_gemm, qk_layernorm, use_te) -> ModuleSpec:
    if use_te:
        return gls.get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts, moe_grouped_gemm=moe_grouped_gemm, qk_layernorm=qk_layernorm
        )
    return gls.get_gpt_layer_local_spec(
        num_experts=num_experts,
        moe_grouped_gemm=moe_grouped_gemm,
        qk_layernorm=qk_layernorm,
        normalization=config.normalization,
    )


def get_gpt_layer_with_nsa_spec(
    config: NSAConfig,
    *,
    num_experts: Optional[int] = None,
    moe_grouped_gemm: bool = False,
    qk_layernorm: Optional[bool] = None,
    use_te: Optional[bool] = None,
    attention_type: Optional[str] = None,
) -> ModuleSpec:
    """Spec of one GPT TransformerLayer whose self-attention is NSA (or ``full``).

    Args:
        config: NSAConfig (``attention_type`` picks NSA or the SDPA baseline).
        num_experts: None for a dense MLP, else the MoE expert count (Megatron's MoE spec).
        moe_grouped_gemm: use grouped-GEMM experts (as Megatron's spec).
        qk_layernorm: normalise q and k per head; None follows ``config.qk_layernorm``.
        use_te: TransformerEngine modules (fused layernorm + linear); None means "if TE
            imports". The TE flavour is untested here (TE is not installable on CPU CI).
        attention_type: override ``config.attention_type`` for this layer ("nsa" | "full").
    Returns:
        ModuleSpec(TransformerLayer) ready for ``GPTModel`` / ``TransformerBlock``.
    """
    if not isinstance(config, NSAConfig):
        raise ValueError(f"config: expected NSAConfig, got {type(config).__name__}")
    use_te = HAVE_TE if use_te is None else bool(use_te)
    if use_te and not HAVE_TE:
        raise ValueError("use_te=True: transformer_engine is not importable")
    kind = attention_type or config.attention_type
    if kind not in ("nsa", "full"):
        raise ValueError(f"attention_type={kind!r}: must be 'nsa' or 'full'")
    qk_layernorm = config.qk_layernorm if qk_layernorm is None else bool(qk_layernorm)
    base = _base_layer_spec(config, num_experts, moe_grouped_gemm, qk_layernorm, use_te)
    attn = base.submodules.self_attention
    sub = attn.submodules
    new_sub = SelfAttentionSubmodules(
        linear_qkv=sub.linear_qkv,
        core_attention=NSACoreAttention if kind == "nsa" else SDPACoreAttention,
        linear_proj=sub.linear_proj,
        q_layernorm=sub.q_layernorm,
        k_layernorm=sub.k_layernorm,
    )
    new_attn = ModuleSpec(
        module=NSASelfAttention if kind == "nsa" else SelfAttention,
        params=dict(attn.params),
        submodules=new_sub,
    )
    return dataclasses.replace(
        base, submodules=dataclasses.replace(base.submodules, self_attention=new_attn)
    )


def get_nsa_decoder_block_spec(
    config: NSAConfig,
    *,
    use_te: Optional[bool] = None,
    qk_layernorm: Optional[bool] = None,
    vp_stage: Optional[int] = None,
    pp_rank: Optional[int] = None,
) -> TransformerBlockSubmodules:
    """Block spec for this pipeline stage, mixing NSA and dense layers and dense/MoE MLPs.

    Layer i (0-based, global) uses ``full`` attention when ``config.is_nsa_layer(i)`` is
    False (``attention_type="full"`` or i in ``nsa_dense_layers``), NSA otherwise. Its MLP
    is MoE when ``config.num_moe_experts`` is set and ``config.moe_layer_freq`` marks it
    (int N: every N-th layer from 0; list: 1 = MoE), dense otherwise.

    Args:
        config: NSAConfig.
        use_te, qk_layernorm: as ``get_gpt_layer_with_nsa_spec``.
        vp_stage, pp_rank: virtual / pipeline stage to build (None: the current rank's).
    Returns:
        TransformerBlockSubmodules with this stage's layer specs and the final norm.
    """
    if not isinstance(config, NSAConfig):
        raise ValueError(f"config: expected NSAConfig, got {type(config).__name__}")
    n = config.num_layers
    if config.num_moe_experts:
        freq = config.moe_layer_freq
        if isinstance(freq, int):
            moe = [i % freq == 0 for i in range(n)]
        else:
            moe = [bool(x) for x in freq]
            if len(moe) != n:
                raise ValueError(f"moe_layer_freq: {len(moe)} entries for num_layers={n}")
    else:
        moe = [False] * n
    cache = {}
    specs = []
    for i in range(n):
        key = ("nsa" if config.is_nsa_layer(i) else "full", moe[i])
        if key not in cache:
            cache[key] = get_gpt_layer_with_nsa_spec(
                config,
                num_experts=config.num_moe_experts if key[1] else None,
                moe_grouped_gemm=config.moe_grouped_gemm,
                qk_layernorm=qk_layernorm,
                use_te=use_te,
                attention_type=key[0],
            )
        specs.append(cache[key])

    layout = getattr(config, "pipeline_model_parallel_layout", None)
    if layout is not None:
        from megatron.core.transformer.enums import LayerType

        ids = layout.get_layer_id_list(layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank)
        local = [specs[i] for i in ids]
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        local = specs[offset : offset + count]
    use_te = HAVE_TE if use_te is None else bool(use_te)
    norm = gls.TENorm if use_te else gls.LNImpl
    return TransformerBlockSubmodules(layer_specs=local, layer_norm=norm)
