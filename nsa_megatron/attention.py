"""NSASelfAttention: Megatron's SelfAttention with NSA's projections and core.

One column-parallel GEMM (the spec's ``linear_qkv``) produces, per KV group g (so that
tensor parallelism splits whole groups):

    [ q: G*Dqk | (k, v) per branch set | gates: 3*G ]

where the branch sets are (cmp, slc, win) for ``nsa_branch_kv="independent"`` (paper) or
one shared set. Keys feed the compressor before RoPE; q, selection and window keys get
Megatron's RoPE; compressed keys get RoPE at their block's last position. The layer's
[s, b, h, d] tensors become THD once here, ``NSACoreAttention`` runs, and the result goes
back to [s, b, HQ*Dv] for the row-parallel ``linear_proj``.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from nsa_kernels.host_cache import host_list
from nsa_megatron.compat import yarn_mscale
from nsa_megatron.config import NSAConfig
from nsa_megatron.dense_attention import packed_cu_seqlens

__all__ = ["NSASelfAttention", "nsa_qkv_layout"]


def nsa_qkv_layout(config: NSAConfig) -> list[tuple[str, int]]:
    """Column layout of one KV group of the fused projection: [(name, width), ...].

    Names: ``q``, then ``k_cmp, v_cmp, k_slc, v_slc, k_win, v_win`` (independent) or
    ``k, v`` (shared), then ``gates``. Widths in elements; total per group times
    ``num_query_groups`` is the projection's output size.
    """
    group = config.num_attention_heads // config.num_query_groups
    dqk, dv = config.kv_channels, config.nsa_v_dim
    sets = ("cmp", "slc", "win") if config.nsa_branch_kv == "independent" else ("",)
    layout = [("q", group * dqk)]
    for s in sets:
        suffix = f"_{s}" if s else ""
        layout += [(f"k{suffix}", dqk), (f"v{suffix}", dv)]
    layout.append(("gates", 3 * group))
    return layout


def _build(spec, *args, **kwargs):
    return build_module(spec, *args, **kwargs) if isinstance(spec, ModuleSpec) else spec(*args, **kwargs)


class NSASelfAttention(SelfAttention):
    """Self-attention with Native Sparse Attention (see module docstring for the layout).

    Args: as Megatron's ``SelfAttention`` (``config`` must be an ``NSAConfig``);
    ``submodules`` is a ``SelfAttentionSubmodules`` whose ``core_attention`` is
    ``NSACoreAttention``. Extra keyword arguments of newer Megatron versions (``name``,
    ``pp_layer_offset``) are passed through.

    Input [s, b, hidden] (or [t, 1, hidden] with THD ``packed_seq_params``), output
    ([s, b, hidden], bias) like every Megatron attention.
    """

    def __init__(
        self,
        config: NSAConfig,
        submodules: SelfAttentionSubmodules,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **kwargs,
    ):
        if not isinstance(config, NSAConfig):
            raise ValueError(f"config: NSASelfAttention needs an NSAConfig, got {type(config).__name__}")
        # The parent builds core attention and the norms; the projections are built below
        # with NSA's sizes, so the parent gets cheap placeholders for them.
        placeholder = SelfAttentionSubmodules(
            linear_qkv=IdentityOp,
            core_attention=submodules.core_attention,
            linear_proj=IdentityOp,
            q_layernorm=submodules.q_layernorm,
            k_layernorm=submodules.k_layernorm,
        )
        super().__init__(
            config=config,
            submodules=placeholder,
            layer_number=layer_number,
            attn_mask_type=attn_mask_type,
            cp_comm_type=cp_comm_type,
            pg_collection=pg_collection,
            **kwargs,
        )
        name = kwargs.get("name")
        extra = lambda suffix: {"name": name + suffix} if name is not None else {}  # noqa: E731
        self.nsa_layout = nsa_qkv_layout(config)
        self.group_width = sum(w for _, w in self.nsa_layout)
        self.v_dim = config.nsa_v_dim
        self.linear_qkv_out_dim = self.group_width * config.num_query_groups
        self.linear_qkv = _build(
            submodules.linear_qkv,
            config.hidden_size,
            self.linear_qkv_out_dim,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=config.add_bias_linear or config.add_qkv_bias,
            skip_bias_add=False,
            is_expert=False,
            tp_comm_buffer_name="qkv",
            tp_group=self.pg_collection.tp,
            **extra(".linear_qkv"),
        )
        self.linear_proj = _build(
            submodules.linear_proj,
            config.num_attention_heads * self.v_dim,
            config.hidden_size,
            config=config,
            init_method=config.output_layer_init_method,
            bias=config.add_bias_linear,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="proj",
            tp_group=self.pg_collection.tp,
            **extra(".linear_proj"),
        )
        self.checkpoint_core_attention = (
            config.recompute_granularity == "selective" and "core_attn" in (config.recompute_modules or [])
        )

    # ------------------------------------------------------------------ projections

    def get_nsa_tensors(self, hidden_states: torch.Tensor) -> dict[str, torch.Tensor]:
        """Project and split: {name: [s, b, heads, dim]} for q, the K/V sets; gates [s, b, HQ, 3].

        Queries have the local query heads, K/V the local KV heads; gates are sigmoided.
        """
        mixed, _ = self.linear_qkv(hidden_states)
        s, b = mixed.shape[:2]
        hkv, hq = self.num_query_groups_per_partition, self.num_attention_heads_per_partition
        mixed = mixed.view(s, b, hkv, self.group_width)
        parts = torch.split(mixed, [w for _, w in self.nsa_layout], dim=-1)
        out = {}
        for (name, _), t in zip(self.nsa_layout, parts):
            if name == "q":
                t = t.reshape(s, b, hq, -1)
            elif name == "gates":
                t = torch.sigmoid(t.reshape(s, b, hq, 3))
            out[name] = t
        if self.q_layernorm is not None:
            out["q"] = self.q_layernorm(out["q"])
        if self.k_layernorm is not None:
            for name in out:
                if name.startswith("k"):
                    out[name] = self.k_layernorm(out[name])
        return out

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        key_value_states: Optional[torch.Tensor] = None,
        inference_context=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        rotary_pos_cos_sin=None,
        attention_bias=None,
        packed_seq_params: Optional[PackedSeqParams] = None,
        sequence_len_offset=None,
        *,
        inference_params=None,
        **unused,
    ):
        """NSA self-attention.

        Args:
            hidden_states: [s, b, hidden] ([t, 1, hidden] for THD packs; [s/tp, b, hidden]
                under sequence parallelism).
            attention_mask: ignored (NSA is causal within each sequence).
            rotary_pos_emb: Megatron's RoPE freqs [S, 1, 1, Dqk] (or a (q, k) pair), or None.
            packed_seq_params: THD packs: ``cu_seqlens_q`` (``_padded`` when present), the
                boundaries of the *global* pack under context parallelism (Megatron's
                convention), each sequence split zig-zag over the CP ranks.
        Returns:
            (output [s, b, hidden], bias or None) from the row-parallel projection.
        """
        if key_value_states is not None:
            raise ValueError("key_value_states: NSA is self-attention only")
        if inference_context is not None or inference_params is not None:
            raise ValueError("inference_context: Megatron's KV-cache inference is not supported by NSA")
        if attention_bias is not None:
            raise ValueError("attention_bias: not supported by NSA")
        parts = self.get_nsa_tensors(hidden_states)
        thd = packed_seq_params is not None and packed_seq_params.qkv_format == "thd"
        b = parts["q"].shape[1]
        cp = self.pg_collection.cp.size()
        if thd:
            parts = {name: x.squeeze(1) for name, x in parts.items()}
            cu_seqlens = packed_cu_seqlens(packed_seq_params).to(torch.int32)
            _check_pack(cu_seqlens, parts["q"].shape[0], cp)
        else:
            # Global boundaries: under CP each rank holds 2 of the 2*cp chunks of every sequence.
            seq = parts["q"].shape[0] * cp
            cu_seqlens = torch.arange(b + 1, dtype=torch.int32, device=hidden_states.device) * seq
        independent = "k_cmp" in parts
        k_slc, k_win = ("k_slc", "k_win") if independent else ("k", None)
        if not independent:
            parts["k_cmp"], parts["v_cmp"] = parts["k"], parts["v"]  # compressor reads pre-RoPE keys

        # RoPE exactly as Megatron's SelfAttention does it ([s, b, h, d], or THD packs).
        rope_cmp = None
        if rotary_pos_emb is not None:
            q_emb, k_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            rope = _Rope(self.config, cu_seqlens if thd else None, self.pg_collection.cp)
            parts["q"] = rope.tokens(parts["q"], q_emb)
            for name in (k_slc, k_win):
                if name is not None:
                    parts[name] = rope.tokens(parts[name], k_emb)
            if cp == 1:
                rope_cmp = rope.at_positions(k_emb)
        else:
            k_emb = None

        # [s, b, h, d] -> [T, h, d] (batch-major): the one layout conversion of the layer.
        if not thd:
            parts = {name: x.transpose(0, 1).reshape(-1, *x.shape[2:]) for name, x in parts.items()}
        t_total = parts["q"].shape[0]
        t = parts
        k_slc, v_slc = (t["k_slc"], t["v_slc"]) if independent else (t["k"], t["v"])
        k_win, v_win = (t["k_win"], t["v_win"]) if independent else (None, None)
        k_src, v_src, q = t["k_cmp"], t["v_cmp"], t["q"]
        cp_kwargs = {}
        if cp > 1:
            cp_kwargs = dict(rotary_pos_emb=k_emb, packed_seq_params=packed_seq_params)
        args = (q, k_slc, v_slc, k_win, v_win, k_src, v_src, t["gates"], cu_seqlens)
        if self.checkpoint_core_attention and self.training:
            present = [a is not None for a in args]

            def run(*tensors):
                it = iter(tensors)
                full = [next(it) if p else None for p in present]
                return self.core_attention(*full, rope_cmp=rope_cmp, **cp_kwargs)

            out = tensor_parallel.checkpoint(run, False, *[a for a in args if a is not None])
        else:
            out = self.core_attention(*args, rope_cmp=rope_cmp, **cp_kwargs)

        # [T, HQ, Dv] -> [s, b, HQ*Dv] (or [t, 1, HQ*Dv])
        if thd:
            out = out.reshape(t_total, 1, -1)
        else:
            out = out.reshape(b, -1, out.shape[1] * out.shape[2]).transpose(0, 1).contiguous()
        return self.linear_proj(out)


def _check_pack(cu_seqlens: torch.Tensor, local_tokens: int, cp: int) -> None:
    """Validate THD boundaries against this rank's token count (before RoPE splits the pack).

    Megatron's packed ``cu_seqlens`` describe the whole (global) pack; under context
    parallelism each rank holds ``1/cp`` of every sequence (2 of its 2*cp chunks), so the
    boundaries must end at ``cp * local_tokens`` and every sequence length must be divisible
    by 2*cp. (``nsa_cp_mode="ring"`` additionally needs 2*cp*nsa_slc_block, checked by
    ``nsa_attention_cp``.)
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"packed_seq_params: cu_seqlens must be 1-D [N+1], got shape {tuple(cu_seqlens.shape)}")
    bounds = host_list(cu_seqlens)
    if bounds[0] != 0 or any(b < a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"packed_seq_params: cu_seqlens must start at 0 and be non-decreasing, got {bounds}")
    if bounds[-1] != local_tokens * cp:
        where = (
            f"the pack has {local_tokens} tokens"
            if cp == 1
            else f"this rank holds {local_tokens} tokens, so the global pack (context_parallel_size={cp}; "
            f"Megatron's packed cu_seqlens are global) must end at {local_tokens * cp}"
        )
        raise ValueError(f"packed_seq_params: cu_seqlens ends at {bounds[-1]}, {where}")
    if cp > 1:
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if (b - a) % (2 * cp):
                raise ValueError(
                    f"packed_seq_params: sequence {i} has {b - a} tokens, not divisible by "
                    f"2 * context_parallel_size ({2 * cp}); pad every packed sequence to a multiple of {2 * cp}"
                )


class _Rope:
    """Megatron RoPE on [s, b, h, d] or THD tensors, and at arbitrary positions."""

    def __init__(self, config, cu_seqlens: Optional[torch.Tensor], cp_group):
        self.config, self.cu_seqlens, self.cp_group = config, cu_seqlens, cp_group
        self.mscale = yarn_mscale(config)

    def tokens(self, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        """x [s, b, H, D] (cu_seqlens None) or THD [T, H, D] -> RoPE'd x (CP-aware, Megatron's)."""
        return apply_rotary_pos_emb(
            x, freqs, config=self.config, cu_seqlens=self.cu_seqlens, mscale=self.mscale, cp_group=self.cp_group
        )

    def at_positions(self, freqs: torch.Tensor):
        """Callable ``(x [Tc, H, D], positions int64 [Tc]) -> x`` rotating row i at positions[i]."""

        def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            table = freqs
            if positions.numel() and int(positions.max()) >= table.shape[0]:
                raise ValueError(
                    f"rotary_pos_emb: {table.shape[0]} positions, compressed keys need "
                    f"{int(positions.max()) + 1}"
                )
            f = table[positions.to(table.device)]  # [Tc, 1, 1, D]
            return apply_rotary_pos_emb(
                x.unsqueeze(1), f, config=self.config, cu_seqlens=None, mscale=self.mscale, cp_group=self.cp_group
            ).squeeze(1)

        return rotate
