"""FG-A (activity perturbation): unbiased, exact where it must be, and never runs backward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import toy_models
from fwdgrad_plugins import ForwardGradient, ForwardGradientEstimator, get, registered
from fwdgrad_plugins.estimators.activity import (
    ActivityPerturbation,
    NoPerturbableLayerError,
    PerExampleLossError,
)

GAUSSIAN = get("tangent_samplers", "gaussian")()


pytestmark = pytest.mark.usefixtures("one_thread")


def estimate(closure, params, seed=0, num_directions=1, orthogonal=False, reduce=None):
    return ActivityPerturbation(orthogonal=orthogonal).estimate(
        closure, list(params), sampler=GAUSSIAN, num_directions=num_directions, seed=seed, reduce=reduce)


def autograd_gradients(closure, params):
    with torch.enable_grad():
        return torch.autograd.grad(closure(), list(params), allow_unused=True)


def layer_norm_mlp():
    """Linear layers (activity-perturbed) and a LayerNorm (weight-perturbed fallback)."""
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    return model, lambda: F.cross_entropy(model(x), y)


def small_cnn():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3))
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,))
    return model, lambda: F.cross_entropy(model(x), y)


def test_registered_next_to_weight_perturbation():
    assert {"weight", "activity"} <= set(registered("estimators"))


@pytest.mark.parametrize("layer, shape, target_shape", [
    (nn.Linear(5, 3), (4, 5), None),
    (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 2, 5, 5), (2, 3, 3, 3)),
    (nn.Conv2d(4, 2, 2, groups=2, dilation=2, padding="same", bias=False), (2, 4, 5, 5), None),
])
def test_one_layer_with_a_full_orthogonal_basis_is_exact(layer, shape, target_shape):
    # With K = n orthogonal directions per example, (1/K) Σ_k (g·u_k) u_k = g exactly, so the
    # outer products (unfolded for convolutions) must match autograd to float tolerance.
    x = torch.randn(shape)
    if isinstance(layer, nn.Linear):
        y = torch.randint(0, 3, (shape[0],))
        closure = lambda: F.cross_entropy(layer(x), y)  # noqa: E731
    else:
        target = torch.randn(target_shape or layer(x).shape)
        closure = lambda: F.mse_loss(layer(x), target)  # noqa: E731
    n = layer(x)[0].numel()
    result = estimate(closure, layer.parameters(), num_directions=n, orthogonal=True)
    for got, expected in zip(result.grads, autograd_gradients(closure, layer.parameters())):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("make, orthogonal", [
    (layer_norm_mlp, False), (layer_norm_mlp, True), (small_cnn, False), (toy_models.tied, False),
])
def test_mean_over_draws_is_the_task_loss_gradient(make, orthogonal):
    model, closure = make()
    params = list(model.parameters())
    draws = 800
    estimates = [estimate(closure, params, seed=s, num_directions=2, orthogonal=orthogonal).grads
                 for s in range(draws)]
    for i, expected in enumerate(autograd_gradients(closure, params)):
        samples = torch.stack([e[i] for e in estimates])
        standard_error = samples.std(0) / draws ** 0.5
        assert ((samples.mean(0) - expected).abs() <= 5 * standard_error + 1e-6).all(), i


def test_per_example_vector_sum_reduction_and_scaling_give_the_same_estimate():
    model, _ = toy_models.mlp()
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    params = list(model.parameters())
    mean = estimate(lambda: F.cross_entropy(model(x), y), params, seed=3)
    vector = estimate(lambda: F.cross_entropy(model(x), y, reduction="none"), params, seed=3)
    summed = estimate(lambda: F.cross_entropy(model(x), y, reduction="sum") / 5, params, seed=3)
    halved = estimate(lambda: F.cross_entropy(model(x), y) * 0.5, params, seed=3)
    for a, b, c, d in zip(mean.grads, vector.grads, summed.grads, halved.grads):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(a / 2, d)
    torch.testing.assert_close(mean.loss, F.cross_entropy(model(x), y))


def test_per_example_derivatives_are_those_of_each_example():
    # Changing one example's input must leave the other examples' contributions unchanged:
    # the estimate is a sum of per-example terms (no cross-example mixing).
    model, _ = toy_models.mlp()
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    params = list(model.parameters())

    def grads(inputs):
        return estimate(lambda: F.cross_entropy(model(inputs), y, reduction="sum"), params, seed=1).grads

    full = grads(x)
    x2 = x.clone()
    x2[0] = torch.randn(6)
    changed = grads(x2)
    first_only = [a - b for a, b in zip(full, changed)]
    # the difference is carried by example 0 alone: its weight-gradient rows lie in span(x[0], x2[0])
    basis = torch.linalg.qr(torch.stack([x[0], x2[0]]).T).Q
    residual = first_only[0] - first_only[0] @ basis @ basis.T
    assert residual.abs().max() < 1e-5


def test_no_backward_pass(no_backward):
    model, closure = small_cnn()
    no_backward(model)
    fg = ForwardGradientEstimator(estimator="activity", num_directions=2, seed=0)
    fg.backward(closure, model.parameters())
    assert all(p.grad is not None and p.grad.grad_fn is None for p in model.parameters())


def test_reduce_is_applied_once_to_derivatives_and_gradients():
    model, closure = toy_models.mlp()
    params = list(model.parameters())
    calls = []

    def reduce(values):
        calls.append(values.shape)
        return values * 2

    plain, reduced = estimate(closure, params, seed=5), estimate(closure, params, seed=5, reduce=reduce)
    assert calls == [(1 + sum(p.numel() for p in params),)]
    for a, b in zip(plain.grads, reduced.grads):
        torch.testing.assert_close(2 * a, b)


def test_clear_errors():
    w = nn.Parameter(torch.randn(3, 2))
    x = torch.randn(4, 3)
    with pytest.raises(NoPerturbableLayerError, match="estimator='weight'"):
        estimate(lambda: (x @ w).pow(2).mean(), [w])
    model, _ = toy_models.mlp()
    with pytest.raises(PerExampleLossError, match="per-example losses"):
        estimate(lambda: model(torch.randn(5, 6)).pow(2).mean(), model.parameters())


def test_trains_through_the_optimizer_wrapper_reproducibly():
    def run():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        x = torch.randn(64, 4)
        y = (x @ torch.randn(4, 3)).argmax(1)
        opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1), estimator="activity", seed=7)
        losses = []
        for _ in range(60):
            opt.zero_grad()
            losses.append(opt.step(lambda: F.cross_entropy(model(x), y)).item())
        return losses, [p.detach().clone() for p in model.parameters()]

    (losses, params), (_, params_again) = run(), run()
    assert losses[-1] < 0.6 * losses[0]
    for a, b in zip(params, params_again):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_trains_through_the_transformers_trainer_with_the_same_option(name, tmp_path):
    # The model computes its loss itself (BERT: CrossEntropyLoss; GPT-2: a summed token loss
    # divided by the token count); GPT-2's Conv1D weights and embeddings fall back to weight
    # perturbation, its linear lm_head is tied to the token embedding.
    from fwdgrad_plugins import FwdGradTrainer
    from tiny_transformers import MODELS, arguments, snapshot

    make_model, make_data, _ = MODELS[name]
    model = make_model()
    before = snapshot(model)
    trainer = FwdGradTrainer(model=model, args=arguments(tmp_path, fwdgrad_estimator="activity", max_steps=2),
                             train_dataset=make_data())
    result = trainer.train()
    after = snapshot(model)
    assert [n for n, p in model.named_parameters() if torch.equal(before[n], after[n])] == []
    assert torch.isfinite(torch.tensor(result.training_loss))
