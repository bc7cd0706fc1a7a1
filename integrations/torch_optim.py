"""``ForwardGradient``: any torch optimizer, driven by forward gradients instead of backprop.

>>> import torch
>>> from fwdgrad_plugins import ForwardGradient
>>> model = torch.nn.Linear(4, 2)
>>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
>>> opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1), num_directions=1, seed=0)
>>> opt.zero_grad()
>>> loss = opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))  # no backward
>>> loss.shape
torch.Size([])
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch import Tensor

from fwdgrad_plugins.estimators import ForwardGradientEstimator


class ForwardGradient(torch.optim.Optimizer):
    """Wraps ``optimizer``: ``step(closure)`` estimates the gradient of ``closure()`` in
    forward mode, writes it to ``.grad`` and runs ``optimizer.step()``.

    The wrapper *is* a ``torch.optim.Optimizer`` sharing the inner optimizer's
    ``param_groups``, ``state`` and ``defaults``: LR schedulers, step hooks and
    ``clip_grad_norm_`` work on it. To clip the estimate before the update, hook the inner
    optimizer: ``opt.optimizer.register_step_pre_hook(lambda *_: clip_grad_norm_(params, 1.0))``.

    A non-finite directional derivative skips the update with a warning; ``skipped_steps``
    counts them. ``state_dict()`` holds the inner optimizer's state and the estimator's
    (seed, step), so a resumed run ends bit-identical to an uninterrupted one.

    Args:
        optimizer: the torch optimizer to drive (SGD, Adam, AdamW, ...).
        num_directions: tangents averaged per step (K).
        tangents: tangent sampler name (``fwdgrad_plugins.registered("tangent_samplers")``).
        seed: seed of the tangents.
        estimator: estimator name (``fwdgrad_plugins.registered("estimators")``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, num_directions: int = 1,
                 tangents: str = "gaussian", seed: int = 0, estimator: str = "weight",
                 estimator_options: Optional[dict] = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"ForwardGradient wraps a torch.optim.Optimizer, got {type(optimizer).__name__}: "
                "pass e.g. torch.optim.SGD(model.parameters(), lr=...)."
            )
        self.optimizer = optimizer
        self.estimator = ForwardGradientEstimator(
            estimator=estimator, tangents=tangents, num_directions=num_directions, seed=seed,
            estimator_options=estimator_options,
        )
        # torch.optim.Optimizer's bookkeeping, without a second copy of the parameter groups.
        for name in ("step_pre", "step_post", "state_dict_pre", "state_dict_post",
                     "load_state_dict_pre", "load_state_dict_post"):
            setattr(self, f"_optimizer_{name}_hooks", OrderedDict())
        self._patch_step_function()

    # The inner optimizer owns the groups and state (load_state_dict replaces its lists).
    param_groups = property(lambda self: self.optimizer.param_groups)
    state = property(lambda self: self.optimizer.state)
    defaults = property(lambda self: self.optimizer.defaults)

    @property
    def skipped_steps(self) -> int:
        return self.estimator.skipped

    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Tensor:
        """One update from the loss ``closure()`` returns; returns that loss (detached)."""
        if closure is None:
            raise TypeError(
                "ForwardGradient.step needs a closure that computes the loss, because the "
                "gradient is estimated by running it in forward mode: "
                "opt.step(lambda: loss_fn(model(x), y)), with no loss.backward()."
            )
        params = [p for group in self.param_groups for p in group["params"]]
        estimate = self.estimator.backward(closure, params)
        if not estimate.skipped:
            self.optimizer.step()
        return estimate.loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "forward_gradient": self.estimator.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.estimator.load_state_dict(state_dict["forward_gradient"])
        self.optimizer.load_state_dict(state_dict["optimizer"])

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.estimator.state_dict().items())
        return f"ForwardGradient({options},\n{self.optimizer!r})"
