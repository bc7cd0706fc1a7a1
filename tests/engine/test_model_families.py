"""Any model a user brings: for each family, forward-mode directional derivatives equal
autograd's ∇f·v (K = 1 and K = 2), and a few forward-gradient steps lower the loss. The
families are built in ``tests/model_families.py``.
"""

import math

import pytest
import torch

from fwdgrad_plugins import ForwardGradient, directional_derivatives
from fwdgrad_plugins.estimators.core import trainable_parameters

from model_families import FAMILIES, autograd_derivatives


@pytest.mark.parametrize("num_directions", [1, 2])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_directional_derivatives_equal_autograd(family, num_directions, one_thread):
    torch.manual_seed(0)
    model, closure, reference = FAMILIES[family]()
    model.train()
    params = trainable_parameters(model.parameters())
    tangents = [torch.randn(num_directions, *p.shape) for p in params]
    result = directional_derivatives(closure, params, tangents)
    expected = autograd_derivatives(reference, params, tangents)
    assert expected.abs().max() > 1e-3  # a derivative that a silent zero would fail
    torch.testing.assert_close(result.derivatives, expected, rtol=2e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "llama", "t5", "resnet18_batchnorm", "lstm",
                                    "transformer_encoder", "lora_gpt2", "compiled_mlp"])
def test_a_few_steps_lower_the_loss(family, one_thread):
    """With a small step, each forward-gradient update −lr (∇f·v) v changes the loss by
    −lr (∇f·v)² to first order: the loss falls, whatever v is drawn."""
    torch.manual_seed(0)
    model, closure, reference = FAMILIES[family]()
    model.train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    size = sum(p.numel() for _, p in named)
    opt = ForwardGradient(torch.optim.SGD([p for _, p in named], lr=0.05 / size), num_directions=1, seed=3)
    with torch.no_grad():
        before = reference().item()
    for _ in range(3):
        opt.zero_grad()
        opt.step(closure)
    with torch.no_grad():
        after = reference().item()
    assert math.isfinite(after) and after < before
    for n, p in model.named_parameters():  # LoRA: only the adapter's weights moved
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
