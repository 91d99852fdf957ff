"""Host copies and plans remembered on a tensor: read once, rebuilt after an in-place write."""
import torch

from nsa_kernels.host_cache import host_list, memo_on, remember_host
from nsa_kernels.layout import compressed_cu_seqlens, compressed_positions
from nsa_kernels.validation import validate_nsa_inputs
from nsa_kernels.varlen import Varlen


def test_memo_builds_once_per_key_and_version():
    t = torch.tensor([0, 3, 7], dtype=torch.int32)
    calls = []

    def build():
        calls.append(1)
        return t.sum().item()

    assert memo_on(t, "sum", build) == 10
    assert memo_on(t, "sum", build) == 10
    assert memo_on(t, "other", build) == 10
    assert len(calls) == 2
    t[2] = 9  # in-place write: new version, plans rebuilt
    assert memo_on(t, "sum", build) == 12
    assert len(calls) == 3


def test_host_list_follows_in_place_writes_and_returns_copies():
    t = torch.tensor([0, 4, 9], dtype=torch.int32)
    first = host_list(t)
    first.append(99)  # the caller's copy, not the memo
    assert host_list(t) == [0, 4, 9]
    t.copy_(torch.tensor([0, 2, 5]))
    assert host_list(t) == [0, 2, 5]


def test_remembered_values_are_used_without_a_read():
    t = torch.tensor([0, 8], dtype=torch.int32)
    remember_host(t, [0, 8])
    assert host_list(t) == [0, 8]
    # the seeded copy is what host_list trusts: proof that it does not read the tensor back
    u = remember_host(torch.tensor([0, 1], dtype=torch.int32), [0, 2])
    assert host_list(u) == [0, 2]


def test_layout_and_compressed_boundaries_shared_until_the_pack_changes():
    cu = torch.tensor([0, 40, 100], dtype=torch.int32)
    lay = Varlen.build(cu)
    assert Varlen.build(cu) is lay
    kc = compressed_cu_seqlens(cu, 32, 16)
    assert compressed_cu_seqlens(cu, 32, 16) is kc
    assert kc.tolist() == [0, 1, 3]
    assert host_list(kc) == [0, 1, 3]
    assert compressed_cu_seqlens(cu, 16, 16).tolist() == [0, 2, 5]
    pos = compressed_positions(cu, 32, 16)
    assert pos.tolist() == [31, 31, 47]

    cu[1] = 64  # same tensor, new pack: nothing stale survives
    lay2 = Varlen.build(cu)
    assert lay2 is not lay and lay2.lens == [64, 36]
    assert compressed_cu_seqlens(cu, 32, 16).tolist() == [0, 3, 4]
    assert compressed_positions(cu, 32, 16).tolist() == [31, 47, 63, 31]


def test_layout_with_positions_is_not_shared():
    cu = torch.tensor([0, 5], dtype=torch.int32)
    pos0 = torch.tensor([7], dtype=torch.int32)
    a, b = Varlen.build(cu, pos0), Varlen.build(cu, pos0)
    assert a is not b and a.pos0 == [7]


def test_validation_sees_a_changed_pack():
    torch.manual_seed(0)
    T, hq, hkv, d = 70, 2, 1, 8
    q = torch.randn(T, hq, d)
    k, v = torch.randn(T, hkv, d), torch.randn(T, hkv, d)
    gates = torch.rand(T, hq, 3)
    cu = torch.tensor([0, 40, 70], dtype=torch.int32)
    kc = torch.randn(1, hkv, d)  # 40 -> 1 compressed token, 30 -> 0
    args = validate_nsa_inputs(q, k, v, kc, kc.clone(), gates, cu)
    assert args.seqlens == (40, 30) and args.cmp_seqlens == (1, 0)
    cu[1] = 64  # 64 -> 3, 6 -> 0: the old k_cmp no longer fits
    try:
        validate_nsa_inputs(q, k, v, kc, kc.clone(), gates, cu)
    except ValueError as err:
        assert "k_cmp" in str(err)
    else:
        raise AssertionError("a stale compressed count was accepted")
    kc3 = torch.randn(3, hkv, d)
    assert validate_nsa_inputs(q, k, v, kc3, kc3.clone(), gates, cu).seqlens == (64, 6)
