"""LG-FG-A (activity perturbation with local losses): the wrapper, and an estimator whose mean
is each block's local-loss gradient, with no gradient path between blocks and no backward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad_plugins import ForwardGradient, get, registered
from fwdgrad_plugins.estimators.local_losses import (
    LocalActivityPerturbation,
    NotLocalLossModelError,
    with_local_losses,
)
from paper_models import paper_mlp

GAUSSIAN = get("tangent_samplers", "gaussian")()
RADEMACHER = get("tangent_samplers", "rademacher")()

pytestmark = pytest.mark.usefixtures("one_thread")


def estimate(closure, params, seed=0, num_directions=1, sampler=GAUSSIAN):
    return LocalActivityPerturbation().estimate(
        closure, list(params), sampler=sampler, num_directions=num_directions, seed=seed)


def sequential_mlp():
    mlp = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    return with_local_losses(mlp, num_classes=3, example_input=torch.zeros(1, 5))


def grouped_blocks():
    """A block of two layers whose output forms two groups, each with its own local loss."""
    blocks = [nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 8), nn.Tanh()), nn.Linear(8, 3)]
    return with_local_losses(blocks, num_classes=3, example_input=torch.zeros(1, 5), groups=2)


def one_unit_per_group():
    """Ren et al.'s setting: every unit of an auxiliary block is its own group."""
    mlp = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    model = with_local_losses(mlp, num_classes=3, example_input=torch.zeros(1, 5))
    for head in model.heads:
        head.groups = head.classifier.in_features
    return model


def local_loss_gradient(model, x, y):
    """Autograd's gradient of Σ local losses (each block's input detached) + the task loss.
    Ren et al.'s group losses (a head reading the whole block output, the other groups'
    features detached) give each unit its gradient of this block's loss, whatever the groups."""
    return torch.autograd.grad(sum(F.cross_entropy(out, y) for out in model.local_outputs(x)),
                               list(model.parameters()))


def test_registered():
    assert "local-activity" in registered("estimators")


def test_wraps_a_sequential_into_blocks_that_share_its_modules():
    mlp = paper_mlp()
    model = with_local_losses(mlp, num_classes=10, example_input=torch.zeros(2, 1, 28, 28), groups=4)
    assert [len(block) for block in model.blocks] == [3, 2, 1]  # cut after each ReLU
    assert len(model.heads) == 2 and model.heads[0](torch.zeros(2, 1024)).shape == (2, 10)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(model(x), mlp(x))
    assert {id(p) for p in mlp.parameters()} <= {id(p) for p in model.parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("make", [sequential_mlp, grouped_blocks, one_unit_per_group])
def test_mean_over_draws_is_each_blocks_local_loss_gradient(make):
    model = make()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    params = list(model.parameters())
    draws = 800
    estimates = [estimate(closure, params, seed=s).grads for s in range(draws)]
    for i, expected in enumerate(local_loss_gradient(model, x, y)):
        samples = torch.stack([e[i] for e in estimates])
        standard_error = samples.std(0) / draws ** 0.5
        assert ((samples.mean(0) - expected).abs() <= 5 * standard_error + 1e-6).all(), i
    torch.testing.assert_close(estimate(closure, params).loss, closure())


def test_one_unit_per_group_with_rademacher_tangents_is_exact():
    """With one unit per group, d·v = ∂L/∂z·v² = ∂L/∂z: each auxiliary block's estimate (and
    its head's, computed exactly) equals autograd's local-loss gradient in a single draw; the
    last block (the task loss, one group) stays a noisy estimate."""
    model = one_unit_per_group()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    expected = local_loss_gradient(model, x, y)
    last = {id(p) for p in model.blocks[-1].parameters()}
    for seed in range(3):
        grads = estimate(lambda: F.cross_entropy(model(x), y), model.parameters(), seed=seed,
                         sampler=RADEMACHER).grads
        for p, grad, exact in zip(model.parameters(), grads, expected):
            if id(p) not in last:
                torch.testing.assert_close(grad, exact, rtol=1e-5, atol=1e-6)


def test_no_gradient_path_between_blocks():
    model = sequential_mlp()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    params = list(model.blocks[0].parameters()) + list(model.heads[0].parameters())
    before = estimate(lambda: F.cross_entropy(model(x), y), model.parameters(), seed=3).grads
    with torch.no_grad():
        for p in model.blocks[1].parameters():  # later blocks change, the first block's estimate not
            p.mul_(-2.0)
    after = estimate(lambda: F.cross_entropy(model(x), y), model.parameters(), seed=3).grads
    index = {id(p): i for i, p in enumerate(model.parameters())}
    for p in params:
        torch.testing.assert_close(before[index[id(p)]], after[index[id(p)]])


def test_no_backward_pass(no_backward):  # noqa: F811
    model = grouped_blocks()
    no_backward(model)
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1), estimator="local-activity",
                          num_directions=2)
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert all(p.grad is not None and p.grad.grad_fn is None for p in model.parameters())


def test_clear_errors():
    mlp = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    with pytest.raises(NotLocalLossModelError, match="with_local_losses"):
        estimate(lambda: F.cross_entropy(mlp(x), y), mlp.parameters())
    model = with_local_losses(mlp, 3, torch.zeros(1, 5))
    with pytest.raises(NotLocalLossModelError, match="applied to the LocalLossNetwork's output"):
        estimate(lambda: model(x).pow(2).mean(), model.parameters())
    with pytest.raises(ValueError, match="single block"):
        with_local_losses(nn.Sequential(nn.Linear(5, 3)), 3, torch.zeros(1, 5))
    with pytest.raises(ValueError, match="cannot be split into 3 groups"):
        with_local_losses(mlp, 3, torch.zeros(1, 5), groups=3)


@pytest.mark.slow
def test_trains_through_the_optimizer_wrapper():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x @ torch.randn(4, 3)).argmax(1)
    mlp = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    model = with_local_losses(mlp, 3, x[:1], groups=2)
    opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1), estimator="local-activity", seed=1)
    losses = []
    for _ in range(80):
        opt.zero_grad()
        losses.append(opt.step(lambda: F.cross_entropy(model(x), y)).item())
    assert losses[-1] < 0.6 * losses[0]
