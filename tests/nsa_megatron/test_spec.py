"""Layer/block specs: NSA vs full attention per layer, MoE MLPs, TE flavour guard."""
import pytest
from megatron.core.transformer.attention import SelfAttention

from nsa_megatron.attention import NSASelfAttention
from nsa_megatron.compat import HAVE_TE
from nsa_megatron.core_attention import NSACoreAttention
from nsa_megatron.dense_attention import SDPACoreAttention
from nsa_megatron.spec import get_gpt_layer_with_nsa_spec, get_nsa_decoder_block_spec
from tests.distributed_utils import init_megatron, run_distributed
from tests.nsa_megatron.gpt_harness import MOE, make_config


def _attn(layer_spec):
    a = layer_spec.submodules.self_attention
    return a.module, a.submodules.core_attention


def test_layer_spec_nsa_and_full():
    cfg = make_config()
    assert _attn(get_gpt_layer_with_nsa_spec(cfg, use_te=False)) == (NSASelfAttention, NSACoreAttention)
    full = get_gpt_layer_with_nsa_spec(cfg, use_te=False, attention_type="full")
    assert _attn(full) == (SelfAttention, SDPACoreAttention)
    with pytest.raises(ValueError, match="^attention_type"):
        get_gpt_layer_with_nsa_spec(cfg, attention_type="linear")


@pytest.mark.skipif(HAVE_TE, reason="TransformerEngine is installed")
def test_te_flavour_requires_transformer_engine():
    with pytest.raises(ValueError, match="^use_te"):
        get_gpt_layer_with_nsa_spec(make_config(), use_te=True)


def _block_worker(rank, world, overrides):
    init_megatron()
    block = get_nsa_decoder_block_spec(make_config(**overrides), use_te=False)
    out = []
    for spec in block.layer_specs:
        # ModuleSpec (0.16) or functools.partial (0.19): MoE specs name MoELayer somewhere
        out.append((_attn(spec)[0].__name__, "MoE" if "MoELayer" in repr(spec.submodules.mlp) else "dense"))
    return out


def test_block_spec_mixes_layers_by_index_and_moe_frequency():
    overrides = dict(MOE, num_layers=4, nsa_dense_layers=[0], moe_layer_freq=[0, 1, 0, 1])
    (layers,) = run_distributed(_block_worker, 1, overrides)
    assert [a for a, _ in layers] == ["SelfAttention", "NSASelfAttention", "NSASelfAttention", "NSASelfAttention"]
    assert [m for _, m in layers] == ["dense", "MoE", "dense", "MoE"]
