"""Bad input gets an error that names the problem and the fix, and changes nothing."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad_plugins
from fwdgrad_plugins import (
    BackwardInClosureError,
    ForwardGradient,
    LossNotScalarError,
    ParametersNotUsedError,
    UnknownNameError,
    UnsupportedOperationError,
)


class NoForwardRule(torch.autograd.Function):
    """An op with a backward but no jvp."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 2


def setup(num_directions=1, keep_grads=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = ForwardGradient(torch.optim.Adam(model.parameters(), lr=0.1), num_directions=num_directions,
                          keep_grads=keep_grads)
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    good = lambda: F.cross_entropy(model(x), y)
    opt.step(good)  # give the inner optimizer some state (and, keeping them, the parameters a .grad)
    return model, opt, x, y


def snapshot(model, opt):
    return (copy.deepcopy(model.state_dict()), [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            copy.deepcopy(opt.state_dict()))


def assert_unchanged(model, opt, before):
    params, grads, state = before
    for key, value in model.state_dict().items():
        assert torch.equal(value, params[key]), key
    for p, g in zip(model.parameters(), grads):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    after = opt.state_dict()
    assert after["forward_gradient"] == state["forward_gradient"]
    for key, value in after["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(state["optimizer"]["state"][key][name]))


BAD_CLOSURES = {
    "no closure": (None, TypeError, "needs a closure"),
    "non-tensor": (lambda m, x, y: 1.0, LossNotScalarError, "not a tensor"),
    "non-scalar": (lambda m, x, y: F.cross_entropy(m(x), y, reduction="none"), LossNotScalarError,
                   r"shape \(5,\), not a scalar"),
    "calls backward": (lambda m, x, y: F.cross_entropy(m(x), y).backward(), BackwardInClosureError,
                       "without calling loss.backward"),
    "op without forward rule": (lambda m, x, y: NoForwardRule.apply(m(x)).sum(),
                                UnsupportedOperationError, "no forward-mode AD rule.*jvp"),
    "parameters not in the model": (lambda m, x, y: nn.Linear(4, 3)(x).sum(), ParametersNotUsedError,
                                    "used none of the parameters"),
}


@pytest.mark.parametrize("keep_grads", [False, True])
@pytest.mark.parametrize("num_directions", [1, 3])
@pytest.mark.parametrize("case", list(BAD_CLOSURES))
def test_bad_closure_raises_and_changes_nothing(case, num_directions, keep_grads):
    model, opt, x, y = setup(num_directions, keep_grads)
    make_closure, error, message = BAD_CLOSURES[case]
    before = snapshot(model, opt)
    closure = None if make_closure is None else (lambda: make_closure(model, x, y))
    with pytest.raises(error, match=message):
        opt.step(closure)
    assert_unchanged(model, opt, before)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_directional_derivative_skips_the_update(bad):
    model, opt, x, y = setup()
    before = snapshot(model, opt)
    with pytest.warns(RuntimeWarning, match="not finite"):
        loss = opt.step(lambda: F.cross_entropy(model(x), y) * bad)
    assert math.isnan(loss.item()) and opt.skipped_steps == 1
    params, grads, _ = before
    for key, value in model.state_dict().items():
        assert torch.equal(value, params[key])
    # the next step draws fresh tangents and trains normally
    opt.step(lambda: F.cross_entropy(model(x), y))
    assert opt.estimator.step == 3


@pytest.mark.parametrize("options, message", [
    ({"tangents": "gausian"}, "unknown tangent sampler 'gausian'; registered: gaussian"),
    ({"estimator": "backprop"}, "unknown estimator 'backprop'; registered: .*weight"),
    ({"num_directions": 0}, "num_directions must be a positive integer"),
    ({"num_directions": 2.5}, "num_directions must be a positive integer"),
])
def test_bad_options_fail_at_construction(options, message):
    model = nn.Linear(2, 2)
    with pytest.raises((ValueError, UnknownNameError), match=message):
        ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1), **options)


def test_wrapping_something_that_is_not_an_optimizer():
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        ForwardGradient(nn.Linear(2, 2).parameters())


def test_unknown_plugin_kind():
    with pytest.raises(UnknownNameError, match="known kinds: tangent_samplers, estimators, integrations"):
        fwdgrad_plugins.registered("optimizers")
