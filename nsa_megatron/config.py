"""NSAConfig: Megatron's TransformerConfig plus the NSA hyper-parameters.

Every NSA field is checked once, in ``__post_init__``, with a message naming the field
and the rule it breaks. Notation follows ``NSA_SPEC.md``: l = ``nsa_cmp_block``,
d = ``nsa_cmp_stride``, l' = ``nsa_slc_block``, n = ``nsa_topk``, w = ``nsa_window``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer.transformer_config import TransformerConfig

from nsa_kernels.validation import NSAHyperParams

__all__ = ["NSAConfig"]

ATTENTION_TYPES = ("nsa", "full")
COMPRESSORS = ("mlp", "mean", "linear")
BRANCH_KV = ("independent", "shared")
BACKENDS = ("auto", "reference", "triton")
CP_MODES = ("ring", "allgather")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: must be one of {', '.join(map(repr, choices))}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")


@dataclass
class NSAConfig(TransformerConfig):
    """TransformerConfig with Native Sparse Attention settings.

    ``kv_channels`` is the query/key head dim (Dqk); ``nsa_v_head_dim`` the value head dim
    (Dv). ``num_query_groups`` is the number of KV heads (HKV); every NSA layer needs
    ``num_attention_heads`` and ``num_query_groups`` divisible by the tensor-parallel size
    because compressor weights are per KV head and shard with them.
    """

    attention_type: str = "nsa"
    """Attention of every layer: ``"nsa"`` (sparse, this project) or ``"full"`` (dense causal
    attention on torch SDPA, the baseline). Layers listed in ``nsa_dense_layers`` are dense
    either way."""

    nsa_cmp_block: int = 32
    """l: tokens summarised by one compressed token (compression block length)."""

    nsa_cmp_stride: int = 16
    """d: stride between consecutive compression blocks; must divide l and l'."""

    nsa_slc_block: int = 64
    """l': selection block length (tokens per selected block); l <= l'."""

    nsa_topk: int = 16
    """n: selected blocks per query and KV group, forced blocks included."""

    nsa_window: int = 512
    """w: sliding-window length of branch 3 (the query itself included)."""

    nsa_init_blocks: int = 1
    """Leading selection blocks always selected when visible (attention-sink blocks)."""

    nsa_local_blocks: int = 2
    """Trailing selection blocks (the query's own and the ones before it) always selected."""

    nsa_compressor: str = "mlp"
    """Compressor phi: ``"mlp"`` (paper: block + learned position encoding -> MLP),
    ``"mean"`` (mean pooling) or ``"linear"`` (one learned linear map per KV head)."""

    nsa_branch_kv: str = "independent"
    """``"independent"``: the QKV projection emits separate K/V for the compressor, the
    selection branch and the window branch (paper); ``"shared"``: one K/V set for all three."""

    nsa_backend: str = "auto"
    """Kernel backend: ``"triton"`` (GPU, or CPU under TRITON_INTERPRET=1), ``"reference"``
    (plain PyTorch, any device) or ``"auto"`` (Triton on CUDA tensors, else reference)."""

    nsa_v_head_dim: Optional[int] = None
    """Dv, the value head dim of NSA layers; ``None`` means ``kv_channels`` (Dv == Dqk)."""

    nsa_dense_layers: Optional[list[int]] = None
    """0-based layer numbers that use ``full`` attention inside an NSA model (e.g. the first
    layers); ``None`` means none."""

    nsa_cp_mode: str = "ring"
    """Context-parallel exchange of the NSA core attention, used only when
    context_parallel_size > 1: ``"ring"`` (selected-block mode: fetch only the selection
    blocks this rank's queries picked plus the window halo; sequence lengths must be
    divisible by 2*cp*nsa_slc_block) or ``"allgather"`` (gather the whole K/V once per layer,
    reduce-scatter dK/dV; lengths divisible by 2*cp). See nsa_megatron/context_parallel/README.md."""

    def __post_init__(self):
        super().__post_init__()
        self._validate_nsa()

    @property
    def nsa_v_dim(self) -> int:
        """Effective value head dim of NSA layers (``nsa_v_head_dim`` or ``kv_channels``)."""
        return self.nsa_v_head_dim if self.nsa_v_head_dim is not None else self.kv_channels

    def is_nsa_layer(self, layer_index: int) -> bool:
        """Whether 0-based layer ``layer_index`` uses NSA (False: dense ``full`` attention)."""
        if self.attention_type != "nsa":
            return False
        return layer_index not in (self.nsa_dense_layers or ())

    def validate_sequence_length(self, seq_length: int) -> None:
        """Check a training/inference sequence length against the NSA block sizes and CP.

        Rules (each error names ``seq_length``, the rule and the fields it comes from):

        * NSA layers need ``seq_length >= nsa_cmp_block`` (at least one compressed token);
        * ``context_parallel_size`` cp > 1: ``seq_length`` divisible by 2*cp (Megatron's
          load-balanced split into 2*cp chunks);
        * cp > 1 with ``nsa_cp_mode="ring"``: divisible by 2*cp*nsa_slc_block (every chunk
          holds whole selection blocks); ``"allgather"`` has no such rule.

        Packed (THD) batches apply the same rules to every packed sequence at run time
        (``nsa_attention_cp`` rejects a sequence that breaks them).

        Args:
            seq_length: tokens per sequence (the model's max_sequence_length).
        Raises:
            ValueError naming ``seq_length`` and the rule it breaks.
        """
        _check_int("seq_length", seq_length, 1)
        if self.attention_type == "nsa" and seq_length < self.nsa_cmp_block:
            raise ValueError(
                f"seq_length={seq_length}: must be >= nsa_cmp_block ({self.nsa_cmp_block}), "
                "otherwise no compressed token (and no block score) ever exists"
            )
        cp = self.context_parallel_size
        if cp <= 1:
            return
        if seq_length % (2 * cp) != 0:
            raise ValueError(
                f"seq_length={seq_length}: must be divisible by 2 * context_parallel_size "
                f"({2 * cp}), Megatron's load-balanced context-parallel split into 2*cp chunks"
            )
        unit = 2 * cp * self.nsa_slc_block
        if self.attention_type == "nsa" and self.nsa_cp_mode == "ring" and seq_length % unit != 0:
            raise ValueError(
                f"seq_length={seq_length}: nsa_cp_mode='ring' needs it divisible by "
                f"2 * context_parallel_size * nsa_slc_block = 2*{cp}*{self.nsa_slc_block} = {unit} "
                "(whole selection blocks per CP chunk); pad the sequence or set nsa_cp_mode='allgather'"
            )

    def _validate_nsa(self) -> None:
        _check_choice("attention_type", self.attention_type, ATTENTION_TYPES)
        _check_choice("nsa_compressor", self.nsa_compressor, COMPRESSORS)
        _check_choice("nsa_branch_kv", self.nsa_branch_kv, BRANCH_KV)
        _check_choice("nsa_backend", self.nsa_backend, BACKENDS)
        _check_choice("nsa_cp_mode", self.nsa_cp_mode, CP_MODES)
        _check_int("nsa_local_blocks", self.nsa_local_blocks, 1)
        NSAHyperParams(
            cmp_block=self.nsa_cmp_block, cmp_stride=self.nsa_cmp_stride, slc_block=self.nsa_slc_block,
            topk=self.nsa_topk, window=self.nsa_window, init_blocks=self.nsa_init_blocks,
            local_blocks=self.nsa_local_blocks,
        ).check(prefix="nsa_")
        if self.nsa_v_head_dim is not None:
            _check_int("nsa_v_head_dim", self.nsa_v_head_dim, 1)
        if self.nsa_dense_layers is not None:
            layers = list(self.nsa_dense_layers)
            for i in layers:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_layers:
                    raise ValueError(
                        f"nsa_dense_layers={layers}: entries must be 0-based layer numbers in "
                        f"[0, num_layers={self.num_layers})"
                    )
            if len(set(layers)) != len(layers):
                raise ValueError(f"nsa_dense_layers={layers}: entries must be unique")
            self.nsa_dense_layers = sorted(layers)
        if self.attention_type != "nsa":
            return
        heads, groups, tp = self.num_attention_heads, self.num_query_groups, self.tensor_model_parallel_size
        if heads % groups != 0:
            raise ValueError(
                f"num_attention_heads={heads}: must be a multiple of num_query_groups ({groups})"
            )
        if groups % tp != 0:
            raise ValueError(
                f"num_query_groups={groups}: NSA needs the KV heads divisible by "
                f"tensor_model_parallel_size ({tp}) (compressors shard per KV head)"
            )
        if self.multi_latent_attention:
            raise ValueError("multi_latent_attention=True: NSA layers replace MLA; set it False")
        if self.attention_output_gate:
            raise ValueError(
                "attention_output_gate=True: NSA has its own branch gates; set it False"
            )
