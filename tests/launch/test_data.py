"""launch/data.py: prompt masking by a marker token (``data.loss_from_token``)."""
import torch

from nsa_launch.data import mask_loss_before, micro_batches


def _batch(rows):
    tokens = torch.tensor(rows)
    return {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": torch.ones(tokens.shape),
            "position_ids": torch.arange(tokens.shape[1]).expand_as(tokens)}


def test_loss_starts_at_the_first_marker_of_each_row():
    out = mask_loss_before(_batch([[5, 5, 3, 7, 3, 8], [3, 1, 1, 1, 1, 1], [1, 2, 4, 5, 6, 7]]), token=3)
    assert out["loss_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]]


def test_micro_batches_apply_the_mask_only_when_asked():
    samples = [{"tokens": [9, 3, 4], "labels": [3, 4, 0], "loss_mask": [1.0, 1.0, 1.0], "position_ids": [0, 1, 2]}]
    plain = next(micro_batches(samples, 0, 1, 1, 0, 1))
    masked = next(micro_batches(samples, 0, 1, 1, 0, 1, loss_from_token=3))
    assert plain["loss_mask"].tolist() == [[1.0, 1.0, 1.0]]
    assert masked["loss_mask"].tolist() == [[0.0, 1.0, 1.0]]
