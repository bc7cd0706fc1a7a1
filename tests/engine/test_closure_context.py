"""No silent failure: a loss without a tangent raises, and an op without a forward-mode rule
is reported with the module that ran it and a fix that fits the op."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad_plugins import ForwardGradient, LossWithoutTangentError, UnsupportedOperationError
from fwdgrad_plugins.estimators.activity import PerExampleLossError
from fwdgrad_plugins.engine.closure_context import unsupported_op_fix


class NoJvp(torch.autograd.Function):
    """Doubles its input; has a backward but no jvp (forward-mode rule)."""

    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return NoJvp.apply(self.proj(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList([nn.Linear(4, 4), Block()])})
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        for layer in self.encoder["layers"]:
            x = layer(x)
        return self.head(x)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


LOSSES_WITHOUT_TANGENT = {
    "detached output": lambda model, x, y: F.cross_entropy(model(x).detach(), y),
    "argmax": lambda model, x, y: (model(x).argmax(1) == y).float().mean(),
    "item": lambda model, x, y: torch.tensor(F.cross_entropy(model(x), y).item()),
}


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["weight", "activity"])
@pytest.mark.parametrize("num_directions", [1, 3])
@pytest.mark.parametrize("case", list(LOSSES_WITHOUT_TANGENT))
def test_a_loss_without_tangent_raises_and_changes_nothing(case, num_directions, estimator):
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1), num_directions=num_directions,
                          estimator=estimator)
    before = snapshot(model)
    error, match = LossWithoutTangentError, "carries no tangent.*detach"
    if estimator == "activity" and case != "detached output":  # refused first by its own check
        error, match = PerExampleLossError, "one loss per example"
    with pytest.raises(error, match=match):
        opt.step(lambda: LOSSES_WITHOUT_TANGENT[case](model, x, y))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters()) and opt.estimator.step == 0


@pytest.mark.parametrize("num_directions", [1, 3])
def test_an_op_without_rule_names_the_module_and_the_fix(num_directions):
    model, x = Net(), torch.randn(2, 4)
    opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1), num_directions=num_directions)
    with pytest.raises(UnsupportedOperationError) as raised:
        opt.step(lambda: model(x).sum())
    message = str(raised.value)
    assert "run by module encoder.layers.1 (Block)" in message
    assert "give that torch.autograd.Function a jvp() staticmethod" in message


def test_the_module_path_is_relative_to_a_compiled_module():
    model, x = torch.compile(Net()), torch.randn(2, 4)
    opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(UnsupportedOperationError, match=r"run by module encoder\.layers\.1 \(Block\)"):
        opt.step(lambda: model(x).sum())


@pytest.mark.parametrize("message, op, fix", [
    ("Trying to use forward AD with mkldnn_rnn_layer that does not support it because", "mkldnn_rnn_layer",
     "torch.backends.mkldnn.enabled = False"),
    ("Trying to use forward AD with _scaled_dot_product_flash_attention_for_cpu that does not support it",
     "_scaled_dot_product_flash_attention_for_cpu", "math SDPA kernel"),
    ("Trying to use forward AD with some_new_op that does not support it", "some_new_op", "defines jvp()"),
])
def test_the_fix_fits_the_op(message, op, fix):
    found, suggestion = unsupported_op_fix(message)
    assert found == op and fix in suggestion


def test_rnn_kernels_are_restored_after_an_error():
    lstm = nn.LSTM(3, 3)
    enabled = torch.backends.mkldnn.enabled

    def closure():
        lstm(torch.randn(2, 1, 3))
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        ForwardGradient(torch.optim.SGD(lstm.parameters(), lr=0.1)).step(closure)
    assert torch.backends.mkldnn.enabled == enabled


def test_an_error_caught_inside_the_closure_does_not_confuse_the_module_path():
    class Tolerant(nn.Module):
        def __init__(self):
            super().__init__()
            self.fails, self.after = Block(), Net()

        def forward(self, x):
            try:
                self.fails(x)
            except (RuntimeError, NotImplementedError):
                pass  # the model recovers: the module path must not still point into self.fails
            return NoJvp.apply(self.after.head(x))

    model, x = Tolerant(), torch.randn(2, 4)
    with pytest.raises(UnsupportedOperationError, match=r"run by module Tolerant \(the outermost module\)"):
        ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1)).step(lambda: model(x).sum())


@pytest.mark.slow
def test_a_first_step_shows_none_of_torchs_own_deprecation_warnings():
    """torch's first dual tensor loads decompositions through the deprecated torch.jit.script;
    its FutureWarning is torch's, not the user's, and must not reach them (a fresh process)."""
    import subprocess
    import sys

    script = ("import torch; from fwdgrad_plugins import ForwardGradient; m = torch.nn.Linear(2, 1); "
              "opt = ForwardGradient(torch.optim.SGD(m.parameters(), lr=0.1)); "
              "opt.step(lambda: m(torch.ones(3, 2)).sum())")
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("num_directions", [1, 3])
def test_a_warning_of_the_models_own_shows_once_over_many_steps(num_directions):
    """Nothing the closure runs under resets Python's warning registries, so a model's
    warning (a deprecation, say) shows once, as it would under backprop, not at every step."""
    import warnings

    class Warns(nn.Linear):
        def forward(self, x):
            warnings.warn("a model's own warning", UserWarning)
            return super().forward(x)

    model = Warns(2, 1)
    opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1), num_directions=num_directions)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        for _ in range(4):
            opt.step(lambda: model(torch.ones(3, 2)).sum())
    assert sum("a model's own warning" in str(w.message) for w in seen) == 1
