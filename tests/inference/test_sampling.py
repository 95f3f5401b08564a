"""Inference schedules: the full grid, partial denoising's stop level, guidance."""

import pytest
import torch

from inference_fixtures import reference_sigmas
from lbva.inference.sampling import denoising_sigmas, guided


def test_the_full_schedule_is_the_shifted_grid_down_to_zero():
    sigmas = denoising_sigmas(5, 5.0)
    assert sigmas.tolist() == pytest.approx(reference_sigmas(5, 5.0))
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == 6


def test_stop_level_zero_is_the_full_schedule():
    torch.testing.assert_close(denoising_sigmas(7, 3.0, stop_sigma=0.0), denoising_sigmas(7, 3.0), rtol=0, atol=0)


def test_partial_denoising_runs_the_levels_above_the_stop_and_lands_on_it():
    full = denoising_sigmas(10, 5.0)
    partial = denoising_sigmas(10, 5.0, stop_sigma=0.4)
    above = int((full > 0.4).sum())
    assert len(partial) == above + 1  # `above` Euler steps, then the cached level
    torch.testing.assert_close(partial[:-1], full[:above], rtol=0, atol=0)
    assert partial[-1] == pytest.approx(0.4)


@pytest.mark.parametrize("stop", [-0.1, 1.0])
def test_a_stop_level_outside_zero_to_one_is_refused(stop):
    with pytest.raises(ValueError, match="stop level"):
        denoising_sigmas(5, 5.0, stop_sigma=stop)


def test_guidance_combines_prompt_and_negative_rows():
    prediction = torch.stack([torch.full((2, 3), 3.0), torch.full((2, 3), 1.0)])
    assert torch.equal(guided(prediction, 1.0), prediction[0])
    assert torch.equal(guided(prediction, 5.0), torch.full((2, 3), 11.0))  # 1 + 5 * (3 - 1)
