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

from typing import Any, Callable, Optional

import torch
from torch import Tensor
from torch.optim import optimizer as torch_optimizer

from fwdgrad_plugins.estimators.core import ForwardGradientEstimator, trainable_parameters


class ForwardGradient(torch.optim.Optimizer):
    """Wraps ``optimizer``: ``step(closure)`` estimates the gradient of ``closure()`` in
    forward mode, writes it to ``.grad`` and runs ``optimizer.step()``.

    The wrapper *is* a ``torch.optim.Optimizer`` sharing the inner optimizer's
    ``param_groups``, ``state`` and ``defaults``: LR schedulers, step hooks and
    ``clip_grad_norm_`` work on it. To clip the estimate before the update, hook the inner
    optimizer: ``opt.optimizer.register_step_pre_hook(lambda *_: clip_grad_norm_(params, 1.0))``.

    The estimate does not outlive the step: with a torch optimizer that updates each parameter
    on its own (SGD, Adam, AdamW, ...; see ``PER_PARAMETER``), no step hooks (its own or global), and every
    ``.grad`` None when the step starts (as ``zero_grad()`` leaves it), the estimate is
    written to ``.grad`` about 32 MiB at a time, the inner optimizer steps those parameters,
    and their ``.grad`` is dropped: a step never holds a whole ``.grad``, and its updates are
    the same, bit for bit. Otherwise (``keep_grads=True``, another optimizer, a hook that
    clips the estimate) the whole estimate is written to ``.grad``, added to what is there,
    and kept after the step.

    A non-finite directional derivative skips the update with a warning; ``skipped_steps``
    counts them. ``state_dict()`` holds the inner optimizer's state and the estimator's
    (seed, step), so a resumed run ends bit-identical to an uninterrupted one.

    The whole ``Optimizer`` contract holds: the base initialiser runs (hook registries and the
    step wrapper that fires step hooks), state-dict and load-state-dict hooks fire, and
    ``copy.deepcopy`` and ``pickle`` carry the inner optimizer and the estimator (hooks are
    dropped, as torch drops them). The base initialiser's fresh ``param_groups``, ``state``
    and ``defaults`` are not kept: those three are the inner optimizer's, read through.

    Args:
        optimizer: the torch optimizer to drive (SGD, Adam, AdamW, ...).
        num_directions: tangents averaged per step (K).
        tangents: tangent sampler name (``fwdgrad_plugins.registered("tangent_samplers")``).
        seed: seed of the tangents.
        estimator: estimator name (``fwdgrad_plugins.registered("estimators")``).
        keep_grads: write the whole estimate to ``.grad`` and keep it after the step.
    """

    # torch optimizers whose step updates each parameter from its own gradient and state
    PER_PARAMETER = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax,
                     torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.RMSprop, torch.optim.Rprop,
                     torch.optim.NAdam, torch.optim.RAdam, torch.optim.ASGD)

    def __init__(self, optimizer: torch.optim.Optimizer, *, num_directions: int = 1,
                 tangents: str = "gaussian", seed: int = 0, estimator: str = "weight",
                 estimator_options: Optional[dict] = None, keep_grads: bool = False):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"ForwardGradient wraps a torch.optim.Optimizer, got {type(optimizer).__name__}: "
                "pass e.g. torch.optim.SGD(model.parameters(), lr=...)."
            )
        self.optimizer = optimizer
        self.keep_grads = keep_grads
        self.estimator = ForwardGradientEstimator(
            estimator=estimator, tangents=tangents, num_directions=num_directions, seed=seed,
            estimator_options=estimator_options,
        )
        super().__init__([p for group in optimizer.param_groups for p in group["params"]], optimizer.defaults)
        self._initialised = True

    def _inner(name: str):  # noqa: N805 (a property factory used in the class body)
        """The inner optimizer's ``name``, read and written through (its ``load_state_dict``
        replaces its lists, so no alias would stay valid). ``Optimizer.__init__``'s own empty
        containers are dropped: the inner optimizer keeps its groups and state."""

        def get(self):
            return getattr(self.optimizer, name)

        def set(self, value):
            if self.__dict__.get("_initialised"):
                setattr(self.optimizer, name, value)

        return property(get, set)

    param_groups = _inner("param_groups")
    state = _inner("state")
    defaults = _inner("defaults")
    del _inner

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
        if self._steps_by_parameter(params):
            return self.estimator.backward(closure, params, consume=self._step_parameters).loss
        estimate = self.estimator.backward(closure, params)
        if not estimate.skipped:
            self.optimizer.step()
        return estimate.loss

    def _steps_by_parameter(self, params) -> bool:
        """Whether the inner optimizer can step a few parameters at a time, their estimate
        dropped after (see the class docstring)."""
        return (not self.keep_grads and type(self.optimizer) in self.PER_PARAMETER
                and not _has_step_hooks(self.optimizer)
                and self.estimator.can_consume(trainable_parameters(params)))

    def _step_parameters(self, params: list[Tensor]) -> None:
        """The inner optimizer's step on ``params``, the only ones with a ``.grad``, which is
        then dropped."""
        self.optimizer.step()
        for p in params:
            p.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        if self.__dict__.get("_initialised"):  # Optimizer.__init__'s calls: the groups are there
            self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict:
        """``{"optimizer": the inner state dict, "forward_gradient": the estimator's}``; the
        hooks of ``register_state_dict_pre_hook`` / ``_post_hook`` fire as for any optimizer."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = {"optimizer": self.optimizer.state_dict(), "forward_gradient": self.estimator.state_dict()}
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            changed = post_hook(self, state)
            state = state if changed is None else changed
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what :meth:`state_dict` returned; the load-state-dict hooks fire. The estimator's
        options are checked first; on any error nothing changes."""
        state_dict = dict(state_dict)
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            changed = pre_hook(self, state_dict)
            state_dict = state_dict if changed is None else changed
        if not {"optimizer", "forward_gradient"} <= set(state_dict):
            raise KeyError(
                "not a ForwardGradient state dict (it needs 'optimizer' and 'forward_gradient'): "
                "load an inner optimizer's own state dict with opt.optimizer.load_state_dict."
            )
        before = self.estimator.state_dict()
        self.estimator.load_state_dict(state_dict["forward_gradient"])
        try:
            self.optimizer.load_state_dict(state_dict["optimizer"])
        except Exception:
            self.estimator.load_state_dict(before)  # a bad inner state leaves both unchanged
            raise
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        """Everything but the hooks (torch's optimizers drop theirs too), so ``copy.deepcopy``
        and ``pickle`` keep the inner optimizer and the estimator."""
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in self.estimator.state_dict().items())
        return f"ForwardGradient({options},\n{self.optimizer!r})"


def _has_step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a step hook, the optimizer's own or a global one, would run at its step (and so
    once per group of parameters if it were stepped a few at a time). torch keeps them in
    private dicts, read here only; where a torch release moves them, the answer is True and
    the step takes the whole-estimate path."""
    hooks = [getattr(optimizer, "_optimizer_step_pre_hooks", None), getattr(optimizer, "_optimizer_step_post_hooks", None),
             getattr(torch_optimizer, "_global_optimizer_pre_hooks", None),
             getattr(torch_optimizer, "_global_optimizer_post_hooks", None)]
    return any(h is None or len(h) > 0 for h in hooks)
