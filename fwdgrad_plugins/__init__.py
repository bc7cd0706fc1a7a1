"""Forward-gradient training (Baydin et al. 2022) for torch, HuggingFace and Accelerate.

>>> import torch
>>> from fwdgrad_plugins import ForwardGradient
>>> model = torch.nn.Linear(4, 2)
>>> opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1))
>>> loss = opt.step(lambda: model(torch.ones(3, 4)).pow(2).mean())
"""

from fwdgrad_plugins.errors import (
    BackwardInClosureError,
    ForwardGradientError,
    LossNotScalarError,
    LossWithoutTangentError,
    NonFiniteDirectionalDerivativeError,
    ParametersNotUsedError,
    UnsupportedOperationError,
    UnsupportedShardingError,
)
from fwdgrad_plugins.estimators.core import Estimate, ForwardGradientEstimator
from fwdgrad_plugins.engine.forward_mode import directional_derivatives
from fwdgrad_plugins.hookspecs import hookimpl
from fwdgrad_plugins.optim import ForwardSGD
from fwdgrad_plugins.plugins import UnknownNameError, get, registered

# Integrations import their frameworks only when asked for.
_LAZY = {
    "ForwardGradient": "fwdgrad_plugins.integrations.torch_optim",
    "FwdGradTrainer": "fwdgrad_plugins.integrations.transformers_trainer",
    "FwdGradTrainingArguments": "fwdgrad_plugins.integrations.transformers_trainer",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fwdgrad_plugins' has no attribute {name!r}")


__all__ = [
    "BackwardInClosureError", "Estimate", "ForwardGradient", "ForwardGradientError",
    "ForwardGradientEstimator", "ForwardSGD", "LossNotScalarError", "LossWithoutTangentError",
    "NonFiniteDirectionalDerivativeError",
    "ParametersNotUsedError", "UnknownNameError", "UnsupportedOperationError", "UnsupportedShardingError",
    "directional_derivatives", "get", "hookimpl", "registered",
]
