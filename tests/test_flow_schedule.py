"""The flow-matching noise schedule of spec 3 against hand-computed values."""

import pytest
import torch

from lbva.models.flow_schedule import FlowMatchGrid, add_noise, bell_weights, velocity_target


def test_unshifted_grid_runs_from_one_down_to_one_thousandth():
    grid = FlowMatchGrid(shift=1.0)
    assert grid.sigmas.shape == (1000,)
    assert torch.isclose(grid.sigmas[0], torch.tensor(1.0))
    assert torch.isclose(grid.sigmas[999], torch.tensor(0.001))
    assert torch.isclose(grid.sigmas[500], torch.tensor(0.5))


def test_shift_five_maps_the_midpoint_to_five_sixths():
    grid = FlowMatchGrid(shift=5.0)
    assert torch.isclose(grid.sigmas[500], torch.tensor(2.5 / 3.0))
    assert torch.isclose(grid.timesteps[500], torch.tensor(2500.0 / 3.0))


def test_bell_weights_average_one_and_peak_as_the_spec_says():
    video, action = FlowMatchGrid(5.0).weights, FlowMatchGrid(1.0).weights
    assert torch.isclose(video.mean(), torch.tensor(1.0)) and torch.isclose(action.mean(), torch.tensor(1.0))
    assert abs(video.max().item() - 2.08) < 0.01
    assert abs(action.max().item() - 1.58) < 0.01


def test_bell_weight_vanishes_at_pure_noise():
    weights = bell_weights(torch.tensor([1000.0, 500.0, 0.5]), size=1000)
    assert weights[0] == 0 and weights[1] == weights.max()


def test_frame_indices_are_uniform_over_the_grid():
    grid = FlowMatchGrid(1.0)
    indices = grid.sample_indices(20000, torch.Generator().manual_seed(0))
    assert indices.min() >= 0 and indices.max() <= 999
    assert abs(indices.float().mean().item() - 499.5) < 10


def test_noisy_history_levels_follow_the_shifted_upper_half_of_the_grid():
    grid = FlowMatchGrid(5.0)
    indices = grid.sample_history_indices(5000, torch.Generator().manual_seed(0))
    sigmas = grid.sigmas[indices]
    assert indices.min() >= 500
    # shift 5: sigma(s=0.5) = 5/6 and sigma(s=0.001) = 0.005 / 1.004
    assert sigmas.max() <= 2.5 / 3.0 + 1e-6 and sigmas.min() >= 0.005 / 1.004 - 1e-7


def test_noise_interpolates_and_target_is_noise_minus_data():
    x0, noise = torch.tensor([2.0]), torch.tensor([-1.0])
    assert torch.allclose(add_noise(x0, noise, torch.tensor(0.25)), torch.tensor([1.25]))
    assert torch.allclose(velocity_target(x0, noise), torch.tensor([-3.0]))


def test_uniform_weighting_weighs_every_level_one_and_unknown_ones_are_refused():
    grid = FlowMatchGrid(5.0, weighting="uniform")
    assert torch.equal(grid.weights, torch.ones(1000))
    assert torch.equal(grid.sigmas, FlowMatchGrid(5.0).sigmas)  # the levels drawn are the same
    with pytest.raises(ValueError, match="bell, uniform"):
        FlowMatchGrid(5.0, weighting="triangle")
