"""GPTModel provider with NSA layers (what launch scripts and Megatron-LM users call)."""
from __future__ import annotations

from typing import Optional

from megatron.core.models.gpt import GPTModel

from nsa_megatron.compat import apply_version_shims
from nsa_megatron.config import NSAConfig
from nsa_megatron.spec import get_nsa_decoder_block_spec

__all__ = ["gpt_model_provider"]


def gpt_model_provider(
    config: NSAConfig,
    vocab_size: int,
    max_sequence_length: int,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    parallel_output: bool = True,
    position_embedding_type: str = "rope",
    share_embeddings_and_output_weights: bool = False,
    rotary_base: int = 10000,
    use_te: Optional[bool] = None,
    vp_stage: Optional[int] = None,
) -> GPTModel:
    """Build a Megatron ``GPTModel`` whose layers follow ``config`` (NSA / full / MoE mix).

    Call after ``initialize_model_parallel``; on a CPU machine call
    ``nsa_megatron.compat.apply_cpu_compat()`` first.

    Args:
        config: NSAConfig (validated at construction).
        vocab_size: padded vocabulary size (divisible by the TP size).
        max_sequence_length: longest sequence the model sees (checked against NSA blocks).
        pre_process / post_process: this pipeline stage holds the embedding / output layer.
        parallel_output: keep logits split over TP ranks (for the vocab-parallel loss).
        position_embedding_type: "rope" (NSA's compressed keys need it for positions),
            "learned_absolute" or "none".
        share_embeddings_and_output_weights: tie input and output embeddings.
        rotary_base: RoPE base.
        use_te: TransformerEngine modules; None = when importable.
        vp_stage: virtual pipeline stage (interleaved schedules).
    Returns:
        GPTModel on the current device (CPU under the compat layer).
    """
    if not isinstance(config, NSAConfig):
        raise ValueError(f"config: expected NSAConfig, got {type(config).__name__}")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size!r}: must be a positive integer")
    if vocab_size % config.tensor_model_parallel_size != 0:
        raise ValueError(
            f"vocab_size={vocab_size}: must be divisible by tensor_model_parallel_size "
            f"({config.tensor_model_parallel_size}); pad the vocabulary"
        )
    config.validate_sequence_length(max_sequence_length)
    if position_embedding_type not in ("rope", "learned_absolute", "none"):
        raise ValueError(f"position_embedding_type={position_embedding_type!r}: rope | learned_absolute | none")
    apply_version_shims()
    block = get_nsa_decoder_block_spec(config, use_te=use_te, vp_stage=vp_stage)
    kwargs = {}
    if vp_stage is not None:
        kwargs["vp_stage"] = vp_stage
    return GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        rotary_base=rotary_base,
        **kwargs,
    )
