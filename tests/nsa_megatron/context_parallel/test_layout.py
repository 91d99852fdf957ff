"""Zig-zag layout: split/merge round trip, positions, owners (no process group needed)."""
import pytest
import torch

from nsa_megatron.context_parallel import ZigzagLayout, zigzag_merge, zigzag_positions, zigzag_split


@pytest.mark.parametrize("cp,seqlens", [(1, [8]), (2, [16]), (2, [8, 24, 0, 4]), (4, [32, 8])])
def test_split_merge_round_trip(cp, seqlens):
    cu = torch.tensor([0] + seqlens).cumsum(0).to(torch.int32)
    x = torch.randn(sum(seqlens), 3, 2)
    parts = [zigzag_split(x, cu, cp, r) for r in range(cp)]
    assert all(p.shape[0] == sum(seqlens) // cp for p in parts)
    torch.testing.assert_close(zigzag_merge(parts, cu), x, rtol=0, atol=0)


def test_rank_holds_chunks_r_and_mirror():
    x = torch.arange(16)
    # 2*cp = 4 chunks of 4 tokens: rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2 (Megatron's split).
    assert zigzag_split(x, None, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert zigzag_split(x, None, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    assert zigzag_split(x, cu, 2, 1).tolist() == [2, 3, 4, 5, 10, 11, 12, 13]
    assert zigzag_positions(cu, 16, 2, 1).tolist() == [2, 3, 4, 5, 2, 3, 4, 5]


def test_owners_point_at_the_token():
    seqlens, cp = [24, 40], 2
    layout = ZigzagLayout(seqlens, cp)
    cu = torch.tensor([0] + seqlens).cumsum(0)
    x = torch.arange(sum(seqlens))
    parts = [zigzag_split(x, cu, cp, r) for r in range(cp)]
    for s, n in enumerate(seqlens):
        ranks, rows = layout.owners(s, torch.arange(n))
        got = torch.stack([parts[r][w] for r, w in zip(ranks.tolist(), rows.tolist())])
        assert got.tolist() == (torch.arange(n) + cu[s]).tolist()


def test_length_not_divisible_by_2cp_is_rejected():
    with pytest.raises(ValueError, match="sequence 1 has 6 tokens, not divisible by 2 \\* context_parallel_size"):
        ZigzagLayout([8, 6], 2)
