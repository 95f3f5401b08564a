"""Per-frame flow-matching losses of spec 3 against hand-computed values."""

import torch

from lbva.training.objectives import per_frame_weighted_mse


def test_loss_is_a_weighted_mean_of_per_frame_means():
    # Frame 0: errors 1, 3 over 2 tokens x 1 channel -> mean 5; frame 1: error 2 -> 4.
    prediction = torch.tensor([[1.0], [3.0], [2.0]])
    target = torch.zeros(3, 1)
    mask = torch.ones(3, 1, dtype=torch.bool)
    loss = per_frame_weighted_mse(prediction, target, mask, torch.tensor([0, 0, 1]), torch.tensor([2.0, 0.5]))
    assert torch.isclose(loss, torch.tensor((5.0 * 2.0 + 4.0 * 0.5) / 2))


def test_masked_channels_are_neither_counted_nor_penalised():
    prediction = torch.tensor([[1.0, 100.0]])
    mask = torch.tensor([[True, False]])
    loss = per_frame_weighted_mse(prediction, torch.zeros(1, 2), mask, torch.tensor([0]), torch.tensor([1.0]))
    assert torch.isclose(loss, torch.tensor(1.0))


def test_frames_without_valid_elements_drop_out_of_the_mean():
    prediction = torch.tensor([[2.0], [9.0]])
    mask = torch.tensor([[True], [False]])
    loss = per_frame_weighted_mse(prediction, torch.zeros(2, 1), mask, torch.tensor([0, 1]), torch.tensor([1.0, 1.0]))
    assert torch.isclose(loss, torch.tensor(4.0))
