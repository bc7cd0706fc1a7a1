"""A forward-gradient training state for ``torch.distributed.checkpoint`` (DCP).

:class:`TrainingState` is DCP's ``Stateful`` for a model (sharded by FSDP2 or not) and its
forward-gradient optimizer: the model's and the inner optimizer's state through torch's
``get_state_dict`` / ``set_state_dict`` (each rank saves and loads its own shards; the
optimizer state is keyed by parameter name, so it loads into a model sharded over another
number of ranks), and the estimator's (seed, step) beside them. A resumed run redraws the
same tangents and ends bit-identical to an uninterrupted one.

Example (every rank runs it; ``model`` sharded with ``fully_shard``)::

    import torch.distributed.checkpoint as dcp
    from fwdgrad_plugins.distributed.checkpoint import TrainingState

    state = {"train": TrainingState(model, opt)}
    dcp.save(state, checkpoint_id="checkpoints/step-100")
    ...                                 # a new process: the same model, sharding and optimizer
    dcp.load(state, checkpoint_id="checkpoints/step-100")
"""

from __future__ import annotations

from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.optim import Optimizer

from fwdgrad_plugins.optim import ForwardSGD


class TrainingState(Stateful):
    """``model`` and ``optimizer`` (``ForwardGradient``, ``ForwardSGD`` or any torch
    optimizer) as one DCP ``Stateful``."""

    def __init__(self, model: nn.Module, optimizer: Optimizer):
        self.model = model
        self.optimizer = optimizer

    def _inner(self) -> Optimizer:
        """The optimizer whose state is per parameter: a ``ForwardGradient``'s inner one."""
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def state_dict(self) -> dict:
        if isinstance(self.optimizer, ForwardSGD):  # no per-parameter state: its own dict is plain values
            model, _ = get_state_dict(self.model, [])
            return {"model": model, "optimizer": self.optimizer.state_dict()}
        model, optimizer = get_state_dict(self.model, self._inner())
        state = {"model": model, "optimizer": optimizer}
        if self._inner() is not self.optimizer:
            state["forward_gradient"] = self.optimizer.estimator.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if isinstance(self.optimizer, ForwardSGD):
            set_state_dict(self.model, [], model_state_dict=state["model"], optim_state_dict={})
            self.optimizer.load_state_dict(state["optimizer"])
            return
        if "forward_gradient" in state:  # checked first: wrong options change nothing
            self.optimizer.estimator.load_state_dict(state["forward_gradient"])
        set_state_dict(self.model, self._inner(), model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
