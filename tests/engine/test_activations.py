"""Activation modules with a one-kernel rule: the module computes its own primal from the
input's primal alone, and the directional derivatives equal autograd's."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from transformers.activations import FastGELUActivation, NewGELUActivation

from fwdgrad_plugins import directional_derivatives
from fwdgrad_plugins.engine import activations

from model_families import autograd_derivatives


class MLP(nn.Module):
    def __init__(self, activation):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(6, 16), activation, nn.Linear(16, 3)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize("num_directions", [1, 2])
@pytest.mark.parametrize("activation", [NewGELUActivation, FastGELUActivation])
def test_the_rule_gives_autograds_derivatives_and_the_modules_own_primal(activation, num_directions):
    torch.manual_seed(0)
    model = MLP(activation()).double()
    x = torch.randn(5, 6, dtype=torch.float64) * 3
    seen = []  # what the activation's own forward receives: a dual or the primal alone
    model.act.register_forward_pre_hook(lambda module, args: seen.append(fwAD.unpack_dual(args[0]).tangent is None))
    params = list(model.parameters())
    tangents = [torch.randn(num_directions, *p.shape, dtype=torch.float64) for p in params]
    closure = lambda: model(x).square().mean()  # noqa: E731
    result = directional_derivatives(closure, params, tangents)
    assert seen and all(seen), "the activation computed with dual tensors, not the rule"
    torch.testing.assert_close(result.derivatives, autograd_derivatives(closure, params, tangents).float(),
                               rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        assert torch.equal(result.loss, closure())  # the primal is the module's own, bit for bit


def test_a_subclass_keeps_its_own_forward():
    """Rules are keyed by the exact class: a subclass may compute something else."""

    class Doubled(NewGELUActivation):
        def forward(self, input):
            return 2 * super().forward(input)

    model = MLP(Doubled()).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    params = list(model.parameters())
    tangents = [torch.randn(1, *p.shape, dtype=torch.float64) for p in params]
    closure = lambda: model(x).sum()  # noqa: E731
    result = directional_derivatives(closure, params, tangents)
    torch.testing.assert_close(result.derivatives, autograd_derivatives(closure, params, tangents).float())


def test_an_error_inside_the_module_leaves_no_rule_pending():
    gelu = NewGELUActivation()
    gelu.forward = lambda input: input.view(-1, 5)  # raises for 6 values
    rules = activations._Rules()
    with fwAD.dual_level(), rules.hooks():
        with pytest.raises(RuntimeError):
            gelu(fwAD.make_dual(torch.ones(6), torch.ones(6)))
        assert rules.pending == []
        del gelu.forward
        out_t = fwAD.unpack_dual(gelu(fwAD.make_dual(torch.zeros(6), torch.ones(6)))).tangent
    torch.testing.assert_close(out_t, torch.full((6,), 0.5))  # gelu'(0) = 1/2


def test_a_closure_without_transformers_does_not_import_it():
    """The rules look transformers up only where a model has imported it."""
    import subprocess
    import sys

    script = ("import sys, torch\n"
              "from fwdgrad_plugins import directional_derivatives\n"
              "m, x = torch.nn.Linear(3, 1), torch.ones(2, 3)\n"
              "directional_derivatives(lambda: m(x).sum(), list(m.parameters()),\n"
              "                        [torch.ones(1, *p.shape) for p in m.parameters()])\n"
              "print('transformers' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
