import torch

from lbva.training.baselines import channel_statistics, gaussian_prior_velocity


def _draws(n: int, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator):
    x0 = mean + std * torch.randn(n, mean.shape[0], generator=generator)
    eps = torch.randn(n, mean.shape[0], generator=generator)
    sigma = torch.rand(n, 1, generator=generator) * 0.98 + 0.01
    return (1 - sigma) * x0 + sigma * eps, sigma, eps - x0


def test_the_gaussian_prior_is_the_best_predictor_from_the_noised_input_on_gaussian_data():
    # On truly Gaussian data the analytic conditional mean cannot be beaten by any predictor of
    # the noised input alone; a per-noise-level linear least-squares fit is the strongest such
    # predictor here and may only tie it.
    generator = torch.Generator().manual_seed(0)
    mean, std = torch.tensor([0.5, -1.0, 0.0]), torch.tensor([0.2, 1.0, 2.0])
    noised, sigma, target = _draws(200_000, mean, std, generator)
    prior_mse = ((gaussian_prior_velocity(noised, sigma, mean, std**2) - target) ** 2).mean()
    bins = (sigma[:, 0] * 20).long()
    fitted = torch.empty_like(target)
    for b in bins.unique():
        rows = bins == b
        design = torch.cat([noised[rows], torch.ones(int(rows.sum()), 1)], dim=1)
        fitted[rows] = design @ torch.linalg.lstsq(design, target[rows]).solution
    fitted_mse = ((fitted - target) ** 2).mean()
    assert prior_mse <= fitted_mse * 1.002
    assert prior_mse < ((noised / sigma - target) ** 2).mean()  # dividing out the noise level is worse


def test_the_gaussian_prior_predicts_pure_noise_and_clean_data_exactly_in_the_limits():
    mean, variance = torch.tensor([0.3]), torch.tensor([0.5])
    noise = torch.tensor([[1.7]])
    assert torch.allclose(gaussian_prior_velocity(noise, torch.ones(1, 1), mean, variance), noise - mean)


def test_channel_statistics_pool_latents_of_different_sizes():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.ones(2, 1, 4, 4)
    a[1] = 2.0
    mean, variance = channel_statistics([a, b])
    assert torch.allclose(mean, torch.tensor([0.25, 1.75]))
    assert variance[0] > 0 and variance[1] > 0
