"""``ForwardSGD``: SGD on forward gradients with no ``.grad`` and no copy of the parameters.

Forward-gradient SGD's update is a function of (θ, d, v) alone, so it needs no gradient
tensor: after the closure's K directional derivatives d_k are known, each parameter's K
tangents are redrawn from the counter-based stream (:mod:`fwdgrad_plugins.tangents.streaming`) and the
parameter is updated in place, one at a time:

    θ ← θ − lr · ((1/K) Σ_k d_k v_k + weight_decay · θ)

(the update of ``torch.optim.SGD`` without momentum, given the forward gradient as ``.grad``,
computed in the same order). Below ``WeightPerturbation.STREAM_MIN_BYTES`` (32 MiB) of
parameters, one direction's tangent is drawn once, whole, and reused by the update, since
a second draw would cost more time than the memory it saves. A step holds the parameters,
the activations of the layers in flight and one parameter's tangents: for a model whose parameters dominate its memory (an
LLM), about what running it costs. Optimizers with state the size of the parameters (Adam)
gain nothing from this: use :class:`~fwdgrad_plugins.integrations.torch_optim.ForwardGradient`.

>>> import torch
>>> from fwdgrad_plugins import ForwardSGD
>>> model = torch.nn.Linear(4, 2)
>>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
>>> opt = ForwardSGD(model.parameters(), lr=0.1, num_directions=1, seed=0)
>>> loss = opt.step(lambda: torch.nn.functional.cross_entropy(model(x), y))  # no backward, no .grad
>>> model.weight.grad is None
True
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor

from fwdgrad_plugins import plugins
from fwdgrad_plugins.distributed.fsdp import sharding
from fwdgrad_plugins.errors import NonFiniteDirectionalDerivativeError
from fwdgrad_plugins.estimators.core import (
    Estimate,
    Reduce,
    applies_without_grad,
    check_finite,
    trainable_parameters,
)
from fwdgrad_plugins.tangents.counter_rng import derive_seed
from fwdgrad_plugins.tangents.streaming import CounterStream, combination, is_streamed, tangent_stream


NEEDS_GRAD = ("forms its estimate from more than directional derivatives and tangents, so ForwardSGD "
              "cannot apply it without .grad")


class ForwardSGD(torch.optim.Optimizer):
    """Forward-gradient SGD (Baydin et al. 2022), applied without ``.grad``.

    Constructed like ``torch.optim.SGD`` (parameters or parameter groups; ``lr`` and
    ``weight_decay`` per group; LR schedulers act on it). ``step(closure)`` runs the closure
    in forward mode (``estimator="weight"``, the paper's FG-W) or as two forward passes
    (``estimator="spsa"``, MeZO), then updates every parameter the loss used, in place; a
    parameter the loss did not use is left alone, as SGD leaves one without ``.grad``.

    ``state_dict()`` holds the groups and (seed, step, options): a resumed run redraws the
    same tangents and ends bit-identical to an uninterrupted one. Across processes pass
    ``reduce`` (the mean over processes of a tensor, e.g. ``lambda d:
    accelerator.reduce(d, "mean")``) to ``step``: the K derivatives are all that is
    communicated, and every process applies the same update.

    Gradient accumulation: ``accumulate(closure)`` per micro-batch (each draws its own
    tangents), then ``step()`` applies their sum once. A non-finite directional derivative
    skips that micro-batch with a warning (``skipped_steps`` counts them).

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        weight_decay: L2 penalty, as SGD's.
        num_directions: K, tangents averaged per step.
        tangents: tangent sampler name (``fwdgrad_plugins.registered("tangent_samplers")``).
        seed: seed of the tangents.
        estimator: "weight" (forward mode) or "spsa" (finite differences), or a plugin's
            estimator with ``tangents()`` and ``derivatives()`` methods.
        estimator_options: keyword arguments for the estimator (``{"epsilon": 1e-3}``). For
            "weight" with K > 1 the default is ``{"streamed": True}``: K streamed
            forward-mode passes, with the memory of one (``{"streamed": None}``: one ``vmap``
            pass over whole tangents, faster, K copies of the parameters). One direction is
            streamed above ``WeightPerturbation.STREAM_MIN_BYTES`` of parameters; below, its
            tangent is drawn once, whole, and the update reuses it instead of redrawing it.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, *, num_directions: int = 1,
                 tangents: str = "gaussian", seed: int = 0, estimator: str = "weight",
                 estimator_options: Optional[dict] = None):
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}.")
        if isinstance(num_directions, bool) or not isinstance(num_directions, int) or num_directions < 1:
            raise ValueError(
                f"num_directions must be a positive integer, got {num_directions!r}: "
                "use 1 for the paper's estimator, more to lower its variance."
            )
        self.sampler = plugins.get("tangent_samplers", tangents)()
        if estimator_options is None and estimator == "weight" and num_directions > 1:
            estimator_options = {"streamed": True}  # K streamed passes: the memory of K = 1
        self.estimator = plugins.get("estimators", estimator)(**(estimator_options or {}))
        if not applies_without_grad(self.estimator):
            raise ValueError(
                f"estimator {estimator!r} {NEEDS_GRAD}: use "
                f"ForwardGradient(torch.optim.SGD(...), estimator={estimator!r}), or estimator='weight' or 'spsa'."
            )
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.options = {"estimator": estimator, "tangents": tangents, "num_directions": num_directions}
        self.seed = int(seed)
        self.forward_step = 0  # micro-batches estimated so far: the tangents' counter
        self.skipped_steps = 0
        self._pending: list = []  # (seed, derivatives, used, frozen rows, whole tangents or None) since the last update
        self._accumulated = False

    @property
    def num_directions(self) -> int:
        return self.options["num_directions"]

    def _parameters(self) -> list[Tensor]:
        return trainable_parameters(p for group in self.param_groups for p in group["params"])

    def accumulate(self, closure: Callable[[], Tensor], *, reduce: Optional[Reduce] = None) -> Estimate:
        """Estimate one micro-batch's directional derivatives, to be applied by ``step()``.
        Returns its loss and derivatives (``grads`` is empty: there are none); on an error
        nothing changes."""
        params = self._parameters()
        sharded = sharding(params)  # FSDP2 shards (None: none); refuses other sharding
        seed = derive_seed(self.seed, self.forward_step)
        if sharded is None:
            tangents = self.estimator.tangents(self.sampler, params, self.num_directions, seed)
            result = self.estimator.derivatives(closure, params, tangents)
        else:  # streamed: the update redraws this rank's rows
            tangents = None
            result = sharded.derivatives(self.estimator, closure, self.sampler, self.num_directions, seed)
            reduce = reduce or sharded.mean
        derivatives = result.derivatives if reduce is None else reduce(result.derivatives)
        self._accumulated = True
        self.forward_step += 1
        try:
            check_finite(result.loss, derivatives)
        except NonFiniteDirectionalDerivativeError as error:
            self.skipped_steps += 1
            warnings.warn(f"skipped update {self.forward_step - 1} ({self.skipped_steps} so far): {error}",
                          RuntimeWarning, stacklevel=2)
            return Estimate(torch.tensor(float("nan")), derivatives, [], skipped=True)
        whole = None if tangents is None or is_streamed(tangents) else tangents  # a whole draw is reused
        self._pending.append((seed, derivatives, result.used, result.frozen_rows, whole))
        return Estimate(result.loss, derivatives, [])

    def step(self, closure: Optional[Callable[[], Tensor]] = None, *,
             reduce: Optional[Reduce] = None) -> Optional[Tensor]:
        """``accumulate(closure)``, then the update; without a closure, the update of what
        ``accumulate`` gathered. Returns the closure's loss (detached)."""
        if closure is None and not self._accumulated:
            raise TypeError(
                "ForwardSGD.step needs a closure that computes the loss, because the gradient "
                "is estimated by running it in forward mode: opt.step(lambda: loss_fn(model(x), y)), "
                "with no loss.backward() (or call opt.accumulate(closure) first)."
            )
        loss = self.accumulate(closure, reduce=reduce).loss if closure is not None else None
        self._update()
        return loss

    @torch.no_grad()
    def _update(self) -> None:
        """θ ← θ − lr·(Σ_micro-batches (1/K) Σ_k d_k v_k + weight_decay·θ), a parameter at a time."""
        pending, self._pending, self._accumulated = self._pending, [], False
        if not pending:
            return
        params = self._parameters()
        index = {id(p): i for i, p in enumerate(params)}
        K = self.num_directions
        sharded = sharding(params)  # FSDP2: each rank writes its shard, from its rows of the tangents
        targets = params if sharded is None else sharded.local
        draw = (functools.partial(tangent_stream, self.sampler, params, K) if sharded is None
                else functools.partial(sharded.local_tangents, self.sampler, K))
        streams = [(whole or draw(seed), d / K if K > 1 else d, used, rows)
                   for seed, d, used, rows, whole in pending]
        for group in self.param_groups:
            lr, weight_decay = group["lr"], group["weight_decay"]
            for p in group["params"]:
                i = index.get(id(p))
                if i is None:
                    continue
                target = targets[i]
                if len(streams) == 1 and K == 1 and weight_decay == 0 and _one_pass_update(target, i, lr, *streams[0]):
                    continue
                _update_parameter(target, i, lr, weight_decay, streams)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["forward_sgd"] = {**self.options, "seed": self.seed, "step": self.forward_step,
                                "skipped": self.skipped_steps}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        saved = state_dict.pop("forward_sgd", None)
        if saved is None:
            raise ValueError("this state dict was not saved by ForwardSGD (no 'forward_sgd' entry): "
                             "load a ForwardSGD checkpoint, or start a new run.")
        mismatched = {k: (saved.get(k), v) for k, v in self.options.items() if saved.get(k, v) != v}
        if mismatched:
            raise ValueError(
                f"checkpoint was saved with other forward-gradient options {mismatched} "
                "(saved, current): construct ForwardSGD with the saved options to resume."
            )
        super().load_state_dict(state_dict)
        self.seed, self.forward_step, self.skipped_steps = int(saved["seed"]), int(saved["step"]), int(saved["skipped"])
        self._pending, self._accumulated = [], False


def _update_parameter(p: Tensor, index: int, lr: float, weight_decay: float, streams) -> None:
    """θ ← θ − lr·(Σ_micro-batches Σ_k c_k v_k + weight_decay·θ) for one parameter (a
    function of its own, so that its temporaries are freed before the next parameter's)."""
    update = None
    for stream, coefficients, used, rows in streams:
        if not used[index]:
            continue
        term = combination(stream, index, coefficients)
        if rows[index]:
            term[rows[index]] = 0  # e.g. an embedding's padding row, which autograd never updates
        update = term if update is None else update.add_(term)
    if update is None:
        return
    if weight_decay != 0:
        update = update.add_(p, alpha=weight_decay)
    p.add_(update, alpha=-lr)


def _one_pass_update(p: Tensor, index: int, lr: float, tangents, coefficients: Tensor, used, rows) -> bool:
    """θ ← θ − lr·d·v in one pass over θ for one dense direction (no ``d·v`` tensor, no
    second pass); False where the general update applies (rank one, frozen rows)."""
    if not used[index]:
        return True
    if rows[index]:
        return False
    blocks = tangents.row_blocks(index) if isinstance(tangents, CounterStream) else None
    if blocks is not None:  # a large tangent (an embedding), a block of rows at a time
        for start, stop in blocks:
            direction = tangents.draw_rows(index, 0, start, stop)
            p[start:stop].addcmul_(direction, coefficients[0].to(direction.dtype), value=-lr)
        return True
    direction = tangents.draw(index, 0)
    if isinstance(direction, tuple):
        return False
    p.addcmul_(direction, coefficients[0].to(direction.dtype), value=-lr)
    return True
