"""NSACoreAttention: compression + the three NSA branches on packed (THD) tensors.

Built by ``NSASelfAttention`` from the layer spec (``core_attention`` slot). It owns the
K and V compressors (per local KV head, sharded with the KV heads under tensor
parallelism) and calls ``nsa_megatron.functional.nsa_attention``. With
``context_parallel_size > 1`` it hands everything to
``nsa_megatron.context_parallel.nsa_attention_cp`` (see ``_forward_cp`` for the contract).
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from nsa_megatron.compression import build_compressor
from nsa_megatron.config import NSAConfig
from nsa_megatron.context_parallel.comm import CommCounters
from nsa_megatron.functional import nsa_attention

__all__ = ["NSACoreAttention"]


class NSACoreAttention(MegatronModule):
    """NSA core: compressors for K and V plus ``nsa_attention`` (or its CP variant).

    Args (as Megatron's core-attention builder passes them):
        config: NSAConfig.
        layer_number: 1-based layer number.
        attn_mask_type: must be causal.
        attention_type: "self".
        softmax_scale: overrides ``1/sqrt(Dqk)`` when not None.
        pg_collection: process groups (``tp`` and ``cp`` are used).

    Parameters: ``k_compressor.*`` and ``v_compressor.*``, each with the local KV-head dim
    first; they carry Megatron's tensor-parallel attributes (partition dim 0).

    Attributes:
        cp_counters: this layer's ``CommCounters`` (bytes this rank sent for context
            parallelism, by exchange and direction); stays empty when context_parallel_size
            is 1. Read / reset all layers with
            ``nsa_megatron.context_parallel.collect_cp_bytes(model, reset=True)``.
    """

    def __init__(
        self,
        config: NSAConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        attention_type: str = "self",
        cp_comm_type: Optional[str] = None,
        softmax_scale: Optional[float] = None,
        pg_collection=None,
        **unused,
    ):
        super().__init__(config=config)
        if not isinstance(config, NSAConfig):
            raise ValueError(f"config: NSACoreAttention needs an NSAConfig, got {type(config).__name__}")
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"attn_mask_type={attn_mask_type}: NSA is causal only")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.pg_collection = pg_collection
        self.layer_number = layer_number
        self.tp_size = pg_collection.tp.size() if pg_collection.tp is not None else 1
        self.cp_size = pg_collection.cp.size() if pg_collection.cp is not None else 1
        if config.num_query_groups % self.tp_size != 0:
            raise ValueError(
                f"num_query_groups={config.num_query_groups}: must be divisible by the "
                f"tensor-parallel size ({self.tp_size})"
            )
        self.num_kv_heads = config.num_query_groups // self.tp_size
        self.qk_dim, self.v_dim = config.kv_channels, config.nsa_v_dim
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.softmax_scale
        self.hparams = dict(
            cmp_block=config.nsa_cmp_block,
            cmp_stride=config.nsa_cmp_stride,
            slc_block=config.nsa_slc_block,
            topk=config.nsa_topk,
            window=config.nsa_window,
            init_blocks=config.nsa_init_blocks,
            local_blocks=config.nsa_local_blocks,
        )
        self.backend = config.nsa_backend
        self.cp_counters = CommCounters()
        device = None
        if torch.cuda.is_available() and not config.use_cpu_initialization:
            device = torch.cuda.current_device()
        common = dict(params_dtype=config.params_dtype, init_method=config.init_method)
        args = (config.nsa_compressor, self.num_kv_heads)
        cmp = (config.nsa_cmp_block, config.nsa_cmp_stride)
        self.k_compressor = build_compressor(*args, self.qk_dim, *cmp, **common)
        self.v_compressor = build_compressor(*args, self.v_dim, *cmp, **common)
        if device is not None:
            self.to(device)
        for param in self.parameters():
            tensor_parallel.set_tensor_model_parallel_attributes(
                param, is_parallel=True, dim=getattr(param, "nsa_kv_head_dim", 0), stride=1
            )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_win: Optional[torch.Tensor],
        v_win: Optional[torch.Tensor],
        k_cmp_src: torch.Tensor,
        v_cmp_src: torch.Tensor,
        gates: torch.Tensor,
        cu_seqlens: torch.Tensor,
        rope_cmp: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        **cp_kwargs,
    ) -> torch.Tensor:
        """NSA over one pack of local heads.

        Args:
            q: [T, HQ, Dqk] queries (RoPE applied); HQ = local query heads.
            k, v: [T, HKV, Dqk], [T, HKV, Dv] selection-branch keys (RoPE applied) / values.
            k_win, v_win: window-branch K/V like k, v, or None to reuse k, v.
            k_cmp_src, v_cmp_src: [T, HKV, Dqk], [T, HKV, Dv] compressor inputs (keys before
                RoPE).
            gates: [T, HQ, 3] sigmoided gates (cmp, slc, win).
            cu_seqlens: int32 [N+1] sequence boundaries of the pack.
            rope_cmp: ``rope_cmp(k_cmp [Tc, HKV, Dqk], positions int64 [Tc]) -> k_cmp`` applies
                RoPE at within-sequence positions; None skips RoPE.
            cp_kwargs: extra context for the context-parallel path (see ``_forward_cp``).
        Returns:
            [T, HQ, Dv] in q's dtype.
        """
        if self.cp_size > 1:
            return self._forward_cp(
                q, k, v, k_win, v_win, k_cmp_src, v_cmp_src, gates, cu_seqlens, rope_cmp, **cp_kwargs
            )
        k_cmp, v_cmp = self.compress(k_cmp_src, v_cmp_src, cu_seqlens, rope_cmp)
        return nsa_attention(
            q, k, v, k_cmp, v_cmp, gates, cu_seqlens,
            scale=self.softmax_scale, k_win=k_win, v_win=v_win, backend=self.backend, **self.hparams,
        )

    def compress(
        self,
        k_src: torch.Tensor,
        v_src: torch.Tensor,
        cu_seqlens: torch.Tensor,
        rope_cmp: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Compressed K/V of a pack: [Tc, HKV, Dqk] (RoPE at each block's last token), [Tc, HKV, Dv]."""
        from nsa_kernels.layout import compressed_positions

        k_cmp = self.k_compressor(k_src, cu_seqlens)
        v_cmp = self.v_compressor(v_src, cu_seqlens)
        if rope_cmp is not None:
            positions = compressed_positions(cu_seqlens, self.hparams["cmp_block"], self.hparams["cmp_stride"])
            k_cmp = rope_cmp(k_cmp, positions)
        return k_cmp, v_cmp

    def _forward_cp(self, q, k, v, k_win, v_win, k_cmp_src, v_cmp_src, gates, cu_seqlens, rope_cmp, **cp_kwargs):
        """Context-parallel hook.

        Calls ``nsa_megatron.context_parallel.nsa_attention_cp(q, k, v, k_win, v_win, k_cmp_src,
        v_cmp_src, gates, cu_seqlens, *, core=self, rope_cmp=rope_cmp, cp_group=..., cp_mode=...,
        **cp_kwargs)`` with this rank's share of the tokens in Megatron's CP layout. ``core``
        gives access to ``compress`` / the compressors, ``hparams``, ``softmax_scale`` and
        ``backend``; ``cp_kwargs`` carries ``rotary_pos_emb`` (the freqs Megatron passed to
        this layer) and ``packed_seq_params``. ``rope_cmp`` is None under CP: compressed-key
        positions are global and only the CP implementation knows them. ``cu_seqlens`` are
        the global pack's boundaries. Bytes sent are counted in ``self.cp_counters``.
        """
        try:
            cp = importlib.import_module("nsa_megatron.context_parallel")
            fn = getattr(cp, "nsa_attention_cp")
        except (ImportError, AttributeError) as exc:
            raise ValueError(
                f"context_parallel_size={self.cp_size}: NSA context parallelism needs "
                "nsa_megatron.context_parallel.nsa_attention_cp, which is not available"
            ) from exc
        return fn(
            q, k, v, k_win, v_win, k_cmp_src, v_cmp_src, gates, cu_seqlens,
            core=self, rope_cmp=rope_cmp, cp_group=self.pg_collection.cp,
            cp_mode=self.config.nsa_cp_mode, counters=self.cp_counters, **cp_kwargs,
        )

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Distributed-checkpoint view: compressor params sharded along their KV-head dim (TP).

        Reloading under a different TP size works because each tensor is described by its
        global shape and this rank's slice of dim 0; DP and CP ranks hold replicas (replica
        ids from the dp x cp group), so checkpoints save under any DP / CP size.
        """
        state_dict = self.state_dict(prefix="", keep_vars=True)
        axis_map = {name: getattr(t, "nsa_kv_head_dim", 0) for name, t in state_dict.items()
                    if isinstance(t, torch.nn.Parameter) and hasattr(t, "nsa_kv_head_dim")}
        kwargs = {}
        if _accepts(make_sharded_tensors_for_checkpoint, "tp_group") and self.pg_collection.tp is not None:
            kwargs["tp_group"] = self.pg_collection.tp
            # Megatron computes replica ids from (tp, dp x cp) ranks; with only tp_group given
            # it would treat every DP/CP replica as the main copy and refuse to save.
            if _accepts(make_sharded_tensors_for_checkpoint, "dp_cp_group"):
                dp_cp = getattr(self.pg_collection, "dp_cp", None)
                if dp_cp is None:
                    from megatron.core import parallel_state

                    dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
                kwargs["dp_cp_group"] = dp_cp
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, axis_map, sharded_offsets, **kwargs)


def _accepts(fn, name: str) -> bool:
    import inspect

    return name in inspect.signature(fn).parameters
