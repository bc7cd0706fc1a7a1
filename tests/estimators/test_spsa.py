"""SPSA / MeZO ('spsa'): finite differences of two forward passes along the same tangents."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fwdgrad_plugins
from fwdgrad_plugins import (BackwardInClosureError, ForwardGradient, ForwardGradientEstimator,
                             LossNotScalarError, ParametersNotUsedError, directional_derivatives)
from fwdgrad_plugins.estimators.core import trainable_parameters
from fwdgrad_plugins.estimators.spsa import SimultaneousPerturbation
from fwdgrad_plugins.tangents.streaming import tangent_stream

from toy_models import MODELS

SAMPLERS = ["gaussian", "rademacher", "rank1-gaussian"]


def sampler(name):
    return fwdgrad_plugins.get("tangent_samplers", name)()


class Quadratic(nn.Module):
    def __init__(self, n=6):
        super().__init__()
        a = torch.randn(n, n, dtype=torch.float64)
        self.register_buffer("a", a @ a.T + torch.eye(n, dtype=torch.float64))
        self.theta = nn.Parameter(torch.randn(n, dtype=torch.float64))
        self.matrix = nn.Parameter(torch.randn(3, n, dtype=torch.float64))

    def forward(self):
        return 0.5 * self.theta @ self.a @ self.theta + (self.matrix @ self.theta).pow(2).sum()


def derivatives_both_ways(model, closure, name, num_directions, epsilon):
    params = trainable_parameters(model.parameters())
    stream = tangent_stream(sampler(name), params, num_directions, seed=2)
    torch.manual_seed(5)
    exact = directional_derivatives(closure, params, stream.whole()).derivatives.double()
    torch.manual_seed(5)
    with sdpa_kernel([SDPBackend.MATH]):  # the kernel forward mode runs: the same dropout draws
        spsa = SimultaneousPerturbation(epsilon).derivatives(closure, params, stream)
    return spsa.derivatives.double(), exact


@pytest.mark.parametrize("name", SAMPLERS)
def test_on_a_quadratic_it_converges_to_the_forward_gradient(name):
    # θ's quadratic is exact for any ε; `matrix` enters quartically (θ and it both move), so
    # the error shrinks as ε² there.
    model = Quadratic()
    errors = []
    for epsilon in (1e-1, 1e-2, 1e-3):
        spsa, exact = derivatives_both_ways(model, model, name, 3, epsilon)
        errors.append((spsa - exact).abs().max().item() / exact.abs().max().item())
    assert errors[0] > 1e-4  # the finite difference is not the derivative at large ε ...
    assert errors[1] < errors[0] / 50 and errors[2] < errors[1] / 50  # ... and converges as ε²
    assert errors[2] < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("model_name, epsilon, atol", [
    ("mlp", 1e-5, 1e-7), ("dropout_mlp", 1e-5, 1e-7), ("tied", 1e-5, 1e-7), ("matmul_weight", 1e-5, 1e-7),
    ("tiny_gpt2", 3e-4, 5e-3),  # HF computes the loss in float32: rounding / 2ε dominates
])
def test_close_to_the_jvp_on_models(model_name, epsilon, atol):
    torch.set_default_dtype(torch.float64)  # models and data: float rounding out of the way
    try:
        model, closure = MODELS[model_name]()
    finally:
        torch.set_default_dtype(torch.float32)
    model.train()  # dropout: both passes see the forward pass's mask
    spsa, exact = derivatives_both_ways(model, closure, "gaussian", 2, epsilon)
    assert exact.abs().max() > 10 * atol
    torch.testing.assert_close(spsa, exact, rtol=1e-5, atol=atol)


def test_estimate_is_d_times_the_samplers_tangents():
    model, closure = MODELS["mlp"]()
    params = list(model.parameters())
    estimate = ForwardGradientEstimator(estimator="spsa", tangents="rank1-gaussian", num_directions=3,
                                        seed=1).backward(closure, params)
    from fwdgrad_plugins.tangents.counter_rng import derive_seed

    whole = sampler("rank1-gaussian").sample(params, 3, derive_seed(1, 0))
    d = estimate.directional_derivatives
    for p, t in zip(params, whole):
        dense = t.dense() if hasattr(t, "dense") else t
        torch.testing.assert_close(p.grad, torch.tensordot(d / 3, dense, dims=1), rtol=1e-5, atol=1e-6)


def test_parameters_are_theta_bit_for_bit_before_the_update():
    model, closure = MODELS["cnn_batchnorm_dropout"]()
    before = copy.deepcopy(model.state_dict())
    opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1), estimator="spsa", num_directions=2)
    seen = []
    opt.optimizer.register_step_pre_hook(
        lambda *_: seen.append(all(torch.equal(p, before[k]) for k, p in model.named_parameters())))
    opt.step(closure)
    assert seen == [True]
    assert all(not torch.equal(p, before[k]) for k, p in model.named_parameters())
    # BatchNorm's running statistics moved once (by the first pass), not 2K times
    assert model[1].num_batches_tracked.item() == 1


def test_embedding_padding_row_is_never_updated():
    embedding = nn.Embedding(6, 4, padding_idx=0)
    opt = ForwardGradient(torch.optim.SGD(embedding.parameters(), lr=0.5), estimator="spsa")
    ids = torch.tensor([[0, 1, 2, 0]])
    for _ in range(3):
        opt.zero_grad()
        opt.step(lambda: embedding(ids).pow(2).sum())
    assert torch.equal(embedding.weight[0], torch.zeros(4))
    assert not torch.equal(embedding.weight[1:3], embedding.weight[1:3] * 0)


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
    model, closure = MODELS["mlp"]()
    start = copy.deepcopy(model.state_dict())
    make = lambda m: ForwardGradient(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                                     estimator="spsa", num_directions=2, seed=3)
    opt = make(model)
    for _ in range(4):
        opt.zero_grad()
        opt.step(closure)
    final = copy.deepcopy(model.state_dict())
    model.load_state_dict(start)
    opt = make(model)
    for _ in range(2):
        opt.zero_grad()
        opt.step(closure)
    saved = copy.deepcopy(opt.state_dict())
    opt = make(model)
    opt.load_state_dict(saved)
    for _ in range(2):
        opt.zero_grad()
        opt.step(closure)
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())


def test_a_non_finite_difference_skips_the_update():
    model = nn.Linear(3, 1)
    before = copy.deepcopy(model.state_dict())
    opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1), estimator="spsa")
    with pytest.warns(RuntimeWarning, match="skipped update 0"):
        opt.step(lambda: model(torch.ones(2, 3)).sum() * float("nan"))
    assert opt.skipped_steps == 1 and model.weight.grad is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("epsilon", [0, -1e-3, float("nan"), "1e-3", True])
def test_bad_epsilon_is_refused(epsilon):
    with pytest.raises(ValueError, match="epsilon must be a finite number > 0"):
        ForwardGradientEstimator(estimator="spsa", estimator_options={"epsilon": epsilon})


@pytest.mark.parametrize("closure, error", [
    (lambda m: (lambda: m(torch.ones(2, 3)).sum().backward()), BackwardInClosureError),
    (lambda m: (lambda: m(torch.ones(2, 3))), LossNotScalarError),
    (lambda m: (lambda: torch.ones(()).sum()), ParametersNotUsedError),
])
def test_bad_closures_fail_clearly_and_change_nothing(closure, error):
    model = nn.Linear(3, 1)
    before = copy.deepcopy(model.state_dict())
    opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1), estimator="spsa")
    with pytest.raises(error):
        opt.step(closure(model))
    assert model.weight.grad is None and opt.estimator.step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_no_backward_pass(no_backward):
    model, closure = MODELS["tiny_gpt2"]()
    no_backward(model)
    opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.01), estimator="spsa", num_directions=2)
    opt.step(closure)
