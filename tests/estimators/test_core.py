"""The estimate is unbiased for every sampler, and its variance falls as 1/K."""

import pytest
import torch
from torch import nn

import fwdgrad_plugins
from fwdgrad_plugins import directional_derivatives
from fwdgrad_plugins.estimators.weight import WeightPerturbation
from fwdgrad_plugins.tangents.tangent import RankOne

SAMPLERS = fwdgrad_plugins.registered("tangent_samplers")


def small_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    closure = lambda: nn.functional.mse_loss(model(x), y)
    params = list(model.parameters())
    true_gradient = torch.cat([g.flatten() for g in torch.autograd.grad(closure(), params)])
    return closure, params, true_gradient


def flat(tangents):
    """(N, P): each of the N directions' tangents of all parameters, flattened end to end."""
    dense = [t.dense() if isinstance(t, RankOne) else t for t in tangents]
    return torch.cat([t.reshape(t.shape[0], -1) for t in dense], dim=1)


@pytest.mark.slow
@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_tangents_have_identity_second_moment(sampler_name):
    _, params, _ = small_problem()
    tangents = fwdgrad_plugins.get("tangent_samplers", sampler_name)().sample(params, 4000, seed=3)
    v = flat(tangents)  # (N, P)
    second_moment = v.T @ v / len(v)
    torch.testing.assert_close(second_moment, torch.eye(v.shape[1]), atol=0.12, rtol=0)
    torch.testing.assert_close(v.mean(0), torch.zeros(v.shape[1]), atol=0.08, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_mean_of_estimates_is_the_gradient(sampler_name):
    closure, params, true_gradient = small_problem()
    n = 4000
    tangents = fwdgrad_plugins.get("tangent_samplers", sampler_name)().sample(params, n, seed=11)
    d = directional_derivatives(closure, params, tangents).derivatives
    estimates = d[:, None] * flat(tangents)  # (N, P)
    standard_error = estimates.std(0) / n**0.5
    z = (estimates.mean(0) - true_gradient) / standard_error
    assert z.abs().max() < 5, f"mean of {n} estimates is {z.abs().max():.1f} standard errors off"


@pytest.mark.slow
@pytest.mark.parametrize("sampler_name", ["gaussian", "rademacher"])
def test_variance_falls_as_one_over_k(sampler_name):
    closure, params, true_gradient = small_problem()
    sampler = fwdgrad_plugins.get("tangent_samplers", sampler_name)()

    def total_variance(k, draws=500):
        estimates = torch.stack([
            torch.cat([g.flatten() for g in WeightPerturbation().estimate(
                closure, params, sampler=sampler, num_directions=k, seed=seed).grads])
            for seed in range(draws)
        ])
        return ((estimates - true_gradient) ** 2).sum(1).mean()

    ratio = total_variance(1) / total_variance(4)
    assert 3.0 < ratio < 5.3, f"variance ratio K=1 / K=4 is {ratio:.2f}, expected about 4"


@pytest.mark.parametrize("num_directions", [1, 3])
@pytest.mark.parametrize("sampler_name", SAMPLERS)
def test_an_estimate_outlives_the_next_one(sampler_name, num_directions):
    """K > 1 tangents are drawn into memory kept between calls; one tangent becomes the
    gradient itself, so it must not be: either way a call's gradients stay as they were."""
    closure, params, _ = small_problem()
    estimator = WeightPerturbation()
    estimator.workspace.min_bytes = 0  # this problem's draws are small
    sampler = fwdgrad_plugins.get("tangent_samplers", sampler_name)()

    def estimate(seed):
        return estimator.estimate(closure, params, sampler=sampler, num_directions=num_directions, seed=seed)

    first = estimate(1)
    kept = [g.clone() for g in first.grads]
    second = estimate(2)
    assert all(torch.equal(g, k) for g, k in zip(first.grads, kept))
    assert not all(torch.equal(g, h) for g, h in zip(first.grads, second.grads))
    assert (estimator.workspace.nbytes > 0) == (num_directions > 1)
