"""Bad arguments raise ValueError naming the argument, before any backend runs."""
import pytest
import torch

from nsa_megatron.functional import nsa_attention
from tests.kernels.inputs import SMALL_HP, make_inputs


def _call(**overrides):
    tensors, cu = make_inputs([30, 20], 4, 2, 8, 8, SMALL_HP, dtype=torch.float32, seed=1)
    kwargs = dict(tensors, cu_seqlens=cu, **SMALL_HP, backend="reference")
    kwargs.update(overrides)
    return nsa_attention(**kwargs)


def _tensors():
    return make_inputs([30, 20], 4, 2, 8, 8, SMALL_HP, dtype=torch.float32, seed=1)


@pytest.mark.parametrize("name,make_bad", [
    ("q", lambda t, cu: t["q"][0]),
    ("k", lambda t, cu: t["k"][:, :, :4]),
    ("k", lambda t, cu: torch.randn(50, 3, 8)),
    ("v", lambda t, cu: t["v"][:10]),
    ("k_cmp", lambda t, cu: t["k_cmp"][:-1]),
    ("v_cmp", lambda t, cu: t["v_cmp"].double()),
    ("gates", lambda t, cu: t["gates"][..., :2]),
    ("k_win", lambda t, cu: t["k_win"][:, :1]),
    ("cu_seqlens", lambda t, cu: torch.tensor([0, 30, 20, 50], dtype=torch.int32)),
    ("cu_seqlens", lambda t, cu: torch.tensor([0, 30, 49], dtype=torch.int32)),
    ("cu_seqlens", lambda t, cu: torch.tensor([1, 30, 50], dtype=torch.int32)),
    ("cu_seqlens", lambda t, cu: torch.tensor([0.0, 30.0, 50.0])),
])
def test_bad_tensor_names_the_argument(name, make_bad):
    tensors, cu = _tensors()
    bad = make_bad(tensors, cu)
    key = name
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        _call(**{key: bad})


def test_half_of_window_pair_is_rejected():
    tensors, _ = _tensors()
    with pytest.raises(ValueError, match="k_win and v_win"):
        _call(v_win=None)


@pytest.mark.parametrize("field,value,pattern", [
    ("cmp_stride", 3, "cmp_stride"),
    ("slc_block", 18, "slc_block"),
    ("cmp_block", 32, "cmp_block"),
    ("topk", 1, "topk"),
    ("window", 0, "window"),
    ("init_blocks", -1, "init_blocks"),
    ("scale", -1.0, "scale"),
    ("backend", "cuda", "backend"),
])
def test_bad_hyper_parameters_name_the_field(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        _call(**{field: value})


def test_wrong_device_is_rejected():
    tensors, cu = _tensors()
    meta = tensors["k"].to("meta")
    with pytest.raises(ValueError, match=r"^k is on meta"):
        _call(k=meta)


def test_integer_query_is_rejected():
    tensors, _ = _tensors()
    with pytest.raises(ValueError, match=r"^q must be a float"):
        _call(q=tensors["q"].long())


def test_empty_sequences_in_a_pack_are_allowed():
    tensors, _ = _tensors()
    cu = torch.tensor([0, 30, 30, 50], dtype=torch.int32)
    out = _call(cu_seqlens=cu)
    assert out.shape == (50, 4, 8) and torch.isfinite(out).all()
