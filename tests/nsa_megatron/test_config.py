"""NSAConfig: defaults, derived values and every validation rule (message names the field)."""
import pytest

from tests.nsa_megatron.gpt_harness import make_config

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2)


def _cfg(**kw):
    from nsa_megatron.config import NSAConfig

    return NSAConfig(**{**BASE, **kw})


def test_defaults_are_the_papers():
    c = _cfg()
    assert (c.attention_type, c.nsa_cmp_block, c.nsa_cmp_stride, c.nsa_slc_block) == ("nsa", 32, 16, 64)
    assert (c.nsa_topk, c.nsa_window, c.nsa_init_blocks, c.nsa_local_blocks) == (16, 512, 1, 2)
    assert (c.nsa_compressor, c.nsa_branch_kv, c.nsa_backend, c.nsa_cp_mode) == ("mlp", "independent", "auto", "ring")
    assert c.nsa_v_dim == c.kv_channels == 16


def test_v_head_dim_and_dense_layers():
    c = _cfg(nsa_v_head_dim=24, nsa_dense_layers=[1, 0])
    assert c.nsa_v_dim == 24 and c.nsa_dense_layers == [0, 1]
    assert not c.is_nsa_layer(0) and not c.is_nsa_layer(1)
    c = _cfg(nsa_dense_layers=[1])
    assert c.is_nsa_layer(0) and not c.is_nsa_layer(1)
    assert not _cfg(attention_type="full").is_nsa_layer(0)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(attention_type="sparse"), "attention_type"),
        (dict(nsa_compressor="conv"), "nsa_compressor"),
        (dict(nsa_branch_kv="split"), "nsa_branch_kv"),
        (dict(nsa_backend="cuda"), "nsa_backend"),
        (dict(nsa_cp_mode="ulysses"), "nsa_cp_mode"),
        (dict(nsa_cmp_block=0), "nsa_cmp_block"),
        (dict(nsa_window=-1), "nsa_window"),
        (dict(nsa_local_blocks=0), "nsa_local_blocks"),
        (dict(nsa_cmp_block=24, nsa_cmp_stride=16), "nsa_cmp_stride"),  # d | l
        (dict(nsa_slc_block=40), "nsa_cmp_stride"),  # d | l'
        (dict(nsa_cmp_block=128, nsa_slc_block=64), "nsa_cmp_block"),  # l <= l'
        (dict(nsa_topk=2), "nsa_topk"),  # topk >= init + local
        (dict(nsa_v_head_dim=0), "nsa_v_head_dim"),
        (dict(nsa_dense_layers=[2]), "nsa_dense_layers"),
        (dict(nsa_dense_layers=[0, 0]), "nsa_dense_layers"),
        (dict(num_query_groups=4, num_attention_heads=6, hidden_size=96), "num_attention_heads"),
        (dict(num_query_groups=1, tensor_model_parallel_size=2), "num_query_groups"),
        (dict(attention_output_gate=True), "attention_output_gate"),
    ],
)
def test_invalid_values_raise_naming_the_field(kw, field):
    with pytest.raises(ValueError) as e:
        _cfg(**kw)
    assert str(e.value).startswith(field), str(e.value)


def test_full_attention_allows_fewer_kv_heads_than_tp():
    c = _cfg(attention_type="full", num_query_groups=1, tensor_model_parallel_size=2)
    assert c.num_query_groups == 1


def test_heads_not_divisible_by_tp_is_rejected():
    with pytest.raises(ValueError, match="num_attention_heads"):
        _cfg(num_attention_heads=4, num_query_groups=4, tensor_model_parallel_size=3)


def test_sequence_length_rules():
    c = make_config()
    c.validate_sequence_length(128)
    with pytest.raises(ValueError, match="^seq_length"):
        c.validate_sequence_length(c.nsa_cmp_block - 1)
    with pytest.raises(ValueError, match="^seq_length"):
        make_config(context_parallel_size=2).validate_sequence_length(130)
