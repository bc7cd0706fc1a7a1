"""Forward-mode rules for activation modules written as a chain of elementwise ops.

HuggingFace's ``gelu_new`` (GPT-2, GPT-J, CodeGen, ...) is ``NewGELUActivation``, eight torch
ops: ``0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))``. Forward AD differentiates each op, so a
pass runs the eight primal kernels and about as many more for the tangent, each over an
MLP-wide activation. The function is the tanh GELU, whose derivative torch computes in one
kernel (``gelu_backward``, the rule torch's own forward AD uses for
``F.gelu(approximate="tanh")``). :func:`activation_rules` hands such a module its input's
primal alone, so the module computes its own primal exactly as without forward mode, and
gives the output the tangent ``gelu'(x) · x_t`` in that one kernel.

>>> import torch
>>> import torch.autograd.forward_ad as fwAD
>>> from transformers.activations import NewGELUActivation
>>> gelu, x, x_t = NewGELUActivation(), torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
>>> with fwAD.dual_level(), activation_rules():
...     out, out_t = fwAD.unpack_dual(gelu(fwAD.make_dual(x, x_t)))
>>> expected = torch.func.jvp(gelu, (x,), (x_t,))
>>> torch.equal(out, expected[0]), torch.allclose(out_t, expected[1])
(True, True)
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from fwdgrad_plugins.engine.module_hooks import global_forward_hooks


def _tanh_gelu_tangent(x: Tensor, x_t: Tensor) -> Tensor:
    return torch.ops.aten.gelu_backward(x_t, x, approximate="tanh")


_TANH_GELUS = ("NewGELUActivation", "FastGELUActivation")  # 0.5 x (1 + tanh(√(2/π)(x + 0.044715 x³)))


def rules() -> dict[type, Callable[[Tensor, Tensor], Tensor]]:
    """Module class -> the tangent of its output, a function of (x, x_t): the tanh GELU's
    forms in transformers, once something has imported ``transformers.activations`` (a model
    that uses them has; a closure never imports transformers itself)."""
    activations = sys.modules.get("transformers.activations")
    if activations is None:
        return {}
    return {getattr(activations, name): _tanh_gelu_tangent for name in _TANH_GELUS if hasattr(activations, name)}


class _Rules:
    """Global forward hooks: a ruled module's pre-hook swaps its dual input for the primal and
    keeps the tangent; its forward hook makes the output's dual."""

    def __init__(self):
        self.rules = rules()
        self.pending: list[tuple[nn.Module, Tensor, Tensor]] = []  # (module, x, x_t)

    def _enter(self, module, args):
        rule = self.rules.get(type(module))
        if rule is None or len(args) != 1 or not isinstance(args[0], Tensor):
            return None
        x, x_t = fwAD.unpack_dual(args[0])
        if x_t is None or not x.is_floating_point():
            return None
        self.pending.append((module, x, x_t))
        return (x,)

    def _leave(self, module, args, output):
        if not self.pending or self.pending[-1][0] is not module:
            return None
        _, x, x_t = self.pending.pop()
        if output is None:  # the module raised: nothing to return
            return None
        tangent = self.rules[type(module)](x, x_t)
        return fwAD.make_dual(output, tangent if tangent.dtype == output.dtype else tangent.to(output.dtype))

    def hooks(self):
        return global_forward_hooks(self._enter, self._leave) if self.rules else contextlib.nullcontext()


def activation_rules():
    """While the block runs, the activation modules of :func:`rules` take their one-kernel
    forward-mode rule."""
    return _Rules().hooks()
