"""K > 1 directions fall back to K forward passes when torch.func.vmap refuses a model: once
per model, visibly, and with the random generators as one pass leaves them."""

import gc
import warnings

import pytest
import torch
from torch import nn

from fwdgrad_plugins import directional_derivatives
from fwdgrad_plugins.engine import forward_mode


def batchnorm_dropout_net():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout(0.5), nn.Flatten(), nn.Linear(32, 2))


def run(model, x, k=2):
    params = list(model.parameters())
    return directional_derivatives(lambda: model(x).sum(), params, [torch.randn(k, *p.shape) for p in params])


def test_a_fallback_warns_once_naming_the_op_and_the_module():
    model, x = batchnorm_dropout_net(), torch.randn(3, 1, 6, 6)
    with pytest.warns(RuntimeWarning, match=r"vmap refused aten::add_\.Tensor in module 1 \(BatchNorm2d\)"):
        run(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(model, x)  # decided: no second attempt, no second warning


def test_a_fallback_leaves_the_generator_as_one_forward_pass_does():
    model, x = batchnorm_dropout_net(), torch.randn(3, 1, 6, 6)
    params = list(model.parameters())
    tangents = [torch.randn(2, *p.shape) for p in params]
    torch.manual_seed(5)
    with torch.no_grad():
        model(x)
    after_one_pass = torch.get_rng_state()
    torch.manual_seed(5)
    with pytest.warns(RuntimeWarning, match="vmap refused"):
        directional_derivatives(lambda: model(x).sum(), params, tangents)
    assert torch.equal(torch.get_rng_state(), after_one_pass)


def test_the_decision_goes_with_the_model():
    model, x = batchnorm_dropout_net(), torch.randn(3, 1, 6, 6)
    with pytest.warns(RuntimeWarning):
        run(model, x)
    assert tuple(model.parameters()) in forward_mode._NOT_VMAPPABLE
    del model
    gc.collect()
    assert len(forward_mode._NOT_VMAPPABLE) == 0
    with pytest.warns(RuntimeWarning, match="vmap refused"):  # a new model is tried afresh
        run(batchnorm_dropout_net(), x)
