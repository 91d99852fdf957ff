"""The ``full`` baseline: dense causal attention on torch SDPA (flash / cuDNN on GPU).

Drop-in ``core_attention`` for Megatron's ``SelfAttention``. Unlike Megatron's local
``DotProductAttention`` it never materialises [s, s] scores on GPU (SDPA picks a fused
kernel), supports GQA natively and takes packed (THD) batches sequence by sequence.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from nsa_kernels.host_cache import host_list

__all__ = ["SDPACoreAttention", "packed_cu_seqlens"]


def packed_cu_seqlens(packed_seq_params: PackedSeqParams) -> torch.Tensor:
    """Sequence boundaries of a THD pack: int32 [N+1] (padded boundaries when given).

    Megatron pads packed sequences (``cu_seqlens_q_padded``) for context parallelism; the
    padded boundaries are the ones the tokens are laid out by, so they win when present.
    """
    cu = packed_seq_params.cu_seqlens_q_padded
    if cu is None:
        cu = packed_seq_params.cu_seqlens_q
    if cu is None:
        raise ValueError("packed_seq_params: cu_seqlens_q is required for the 'thd' format")
    return cu


class SDPACoreAttention(MegatronModule):
    """Causal (GQA) attention core on ``torch.nn.functional.scaled_dot_product_attention``.

    Args (as Megatron's core-attention builder passes them):
        config: TransformerConfig (``kv_channels``, ``softmax_scale``, ``attention_dropout``).
        layer_number: 1-based layer number (kept for parity with Megatron).
        attn_mask_type: must be ``AttnMaskType.causal``.
        attention_type: ``"self"``.
        softmax_scale: overrides ``1/sqrt(kv_channels)`` when not None.
        pg_collection: process groups; context parallelism (cp size > 1) is not supported.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **unused,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"attn_mask_type={attn_mask_type}: SDPACoreAttention is causal only")
        cp_size = config.context_parallel_size
        if pg_collection is not None and getattr(pg_collection, "cp", None) is not None:
            cp_size = pg_collection.cp.size()
        if cp_size > 1:
            raise ValueError(
                f"context_parallel_size={cp_size}: the 'full' SDPA baseline runs without "
                "context parallelism; use attention_type='nsa' or CP=1"
            )
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.softmax_scale

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q [B, HQ, S, D], k/v [B, HKV, S, D*] -> [B, HQ, S, Dv]
        scale = self.softmax_scale if self.softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=True,
            scale=scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        **unused,
    ) -> torch.Tensor:
        """Causal attention.

        Args:
            query: [s, b, HQ, D] (or [t, HQ, D] for packed THD batches).
            key: [s, b, HKV, D] / [t, HKV, D]; HQ must be a multiple of HKV.
            value: [s, b, HKV, Dv] / [t, HKV, Dv].
            attention_mask: ignored (the mask is causal by construction).
            attn_mask_type: None or causal.
            attention_bias: must be None.
            packed_seq_params: THD batches: sequence boundaries (``cu_seqlens_q``).
        Returns:
            [s, b, HQ * Dv] (or [t, HQ * Dv] for THD), the dtype of ``query``.
        """
        if attn_mask_type not in (None, AttnMaskType.causal):
            raise ValueError(f"attn_mask_type={attn_mask_type}: only causal is supported")
        if attention_bias is not None:
            raise ValueError("attention_bias: not supported by SDPACoreAttention")
        if query.shape[-2] % key.shape[-2] != 0:
            raise ValueError(
                f"query: {query.shape[-2]} heads is not a multiple of the {key.shape[-2]} KV heads"
            )
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            if query.dim() == 4:  # [t, 1, h, d]
                query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
            bounds = host_list(packed_cu_seqlens(packed_seq_params))
            if bounds[-1] != query.shape[0]:
                raise ValueError(
                    f"packed_seq_params: cu_seqlens ends at {bounds[-1]}, the pack has {query.shape[0]} tokens"
                )
            pieces = [
                self._sdpa(*(x[a:b].transpose(0, 1).unsqueeze(0) for x in (query, key, value)))
                .squeeze(0)
                .transpose(0, 1)
                for a, b in zip(bounds[:-1], bounds[1:])
                if b > a
            ]
            out = torch.cat(pieces, 0) if pieces else value.new_zeros(0, query.shape[1], value.shape[-1])
            return out.reshape(out.shape[0], -1)
        if query.dim() != 4:
            raise ValueError(f"query: expected [s, b, h, d], got shape {tuple(query.shape)}")
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, h, s, d]
        o = self._sdpa(q, k, v)  # [b, HQ, s, Dv]
        s, b = query.shape[0], query.shape[1]
        return o.permute(2, 0, 1, 3).reshape(s, b, -1)
