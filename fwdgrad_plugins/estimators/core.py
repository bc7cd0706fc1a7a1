"""Gradient estimators, and the stateful ``ForwardGradientEstimator`` that every integration
uses in place of ``loss.backward()``.

>>> import torch
>>> from fwdgrad_plugins import ForwardGradientEstimator
>>> model = torch.nn.Linear(4, 1)
>>> x, y = torch.randn(8, 4), torch.randn(8, 1)
>>> fg = ForwardGradientEstimator(num_directions=2, tangents="gaussian", seed=0)
>>> estimate = fg.backward(lambda: torch.nn.functional.mse_loss(model(x), y), model.parameters())
>>> model.weight.grad.shape, estimate.directional_derivatives.shape
(torch.Size([1, 4]), torch.Size([2]))
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor

from fwdgrad_plugins import plugins
from fwdgrad_plugins.distributed.fsdp import Sharding, sharding
from fwdgrad_plugins.engine.forward_mode import DirectionalDerivatives
from fwdgrad_plugins.errors import NonFiniteDirectionalDerivativeError, UnsupportedShardingError
from fwdgrad_plugins.tangents.counter_rng import derive_seed
from fwdgrad_plugins.tangents.streaming import TangentStream, combination
from fwdgrad_plugins.tangents.tangent import cast

Reduce = Callable[[Tensor], Tensor]


@dataclass
class Estimate:
    loss: Tensor  # primal loss (detached scalar)
    directional_derivatives: Tensor  # (K,), after any cross-process reduction
    grads: list[Optional[Tensor]]  # one per parameter; None for parameters the loss did not use
    skipped: bool = False  # True when a derivative was not finite and no gradient was written


def check_finite(loss: Tensor, derivatives: Tensor) -> None:
    """Raise NonFiniteDirectionalDerivativeError unless every derivative is finite."""
    values = derivatives.tolist()  # one call: K is small, and the test syncs a GPU either way
    if not all(map(math.isfinite, values)):
        raise NonFiniteDirectionalDerivativeError(
            f"directional derivatives {values} are not finite (loss "
            f"{loss.item():.4g}): lower the learning rate, or check the loss for log(0) and overflow."
        )


def estimate_from_derivatives(result: DirectionalDerivatives, tangents: TangentStream,
                              reduce: Optional[Reduce] = None) -> Estimate:
    """The estimate (1/K) Σ_k d_k v_k from K directional derivatives and their tangents,
    formed parameter by parameter (a streamed tangent is redrawn for its parameter alone, so
    the estimates plus one parameter's tangents are all that is held). ``reduce`` maps the
    K local derivatives to global ones first; a non-finite one raises
    :class:`NonFiniteDirectionalDerivativeError`."""
    derivatives = reduced_derivatives(result, reduce)
    return Estimate(result.loss, derivatives, list(parameter_estimates(result, tangents, derivatives)))


def reduced_derivatives(result: DirectionalDerivatives, reduce: Optional[Reduce] = None) -> Tensor:
    """The K derivatives after ``reduce`` (the mean over processes, if given); a non-finite
    one raises :class:`NonFiniteDirectionalDerivativeError`."""
    derivatives = result.derivatives if reduce is None else reduce(result.derivatives)
    check_finite(result.loss, derivatives)
    return derivatives


def parameter_estimates(result: DirectionalDerivatives, tangents: TangentStream,
                        derivatives: Tensor) -> Iterator[Optional[Tensor]]:
    """Each parameter's estimate (1/K) Σ_k d_k v_k in turn (None for one the closure did not
    use), formed when asked for: a consumer that drops each one holds one at a time."""
    num_directions = tangents.num_directions
    coefficients = derivatives / num_directions if num_directions > 1 else derivatives
    for index, (used, rows) in enumerate(zip(result.used, result.frozen_rows)):
        grad = combination(tangents, index, coefficients) if used else None
        if rows:
            grad[rows] = 0  # e.g. an embedding's padding row, which autograd never updates
        yield grad


def trainable_parameters(params: Iterable[Tensor]) -> list[Tensor]:
    """Parameters with ``requires_grad``, each once (a shared parameter is one parameter)."""
    unique = {id(p): p for p in params if p.requires_grad}
    return list(unique.values())


def applies_without_grad(estimator) -> bool:
    """Whether ``estimator`` (an estimator object) can be applied without ``.grad``
    (``ForwardSGD``, sharded parameters): it must give its tangents and directional
    derivatives apart, so the update can redraw the tangents."""
    return all(callable(getattr(estimator, method, None)) for method in ("tangents", "derivatives"))


class ForwardGradientEstimator:
    """Forward-gradient ``backward()``: runs a loss closure in forward mode and accumulates
    the gradient estimate into ``.grad``, like ``loss.backward()`` would.

    The tangents of call number ``step`` come from ``(seed, step)`` alone, so ``state_dict()``
    (seed, step, options) is all a checkpoint needs to resume bit-identically, and processes
    sharing a seed draw the same tangents.

    Args:
        estimator: a registered estimator name (``fwdgrad_plugins.registered("estimators")``).
        tangents: a registered tangent sampler name.
        num_directions: K, the number of tangents averaged per call.
        seed: the run's seed.
        estimator_options: keyword arguments for the estimator's factory.
    """

    def __init__(self, *, estimator: str = "weight", tangents: str = "gaussian",
                 num_directions: int = 1, seed: int = 0, estimator_options: Optional[dict] = None):
        if isinstance(num_directions, bool) or not isinstance(num_directions, int) or num_directions < 1:
            raise ValueError(
                f"num_directions must be a positive integer, got {num_directions!r}: "
                "use 1 for the paper's estimator, more to lower its variance."
            )
        self.sampler = plugins.get("tangent_samplers", tangents)()
        self.estimator = plugins.get("estimators", estimator)(**(estimator_options or {}))
        self.options = {"estimator": estimator, "tangents": tangents, "num_directions": num_directions}
        self.seed = int(seed)
        self.step = 0
        self.skipped = 0

    @property
    def num_directions(self) -> int:
        return self.options["num_directions"]

    def backward(self, closure: Callable[[], Tensor], params: Iterable[Tensor], *,
                 reduce: Optional[Reduce] = None,
                 consume: Optional[Callable[[list[Tensor]], None]] = None) -> Estimate:
        """Estimate the gradient of ``closure()`` and add it to each parameter's ``.grad``.

        With ``consume`` (where :meth:`can_consume` allows it), the estimate is written a few
        parameters at a time, about ``CONSUME_BYTES``, and each group of parameters is passed
        to ``consume``, which must use and drop their ``.grad`` (``ForwardGradient`` steps the
        inner optimizer on them): the whole estimate never exists at once, and the returned
        ``Estimate.grads`` is empty.

        A non-finite directional derivative skips the update (``Estimate.skipped``), counts
        it in ``self.skipped`` and warns; nothing is written. On any error in the closure,
        nothing changes.
        """
        params = trainable_parameters(params)
        sharded = sharding(params)  # FSDP2 shards (None: none); refuses other sharding
        seed = derive_seed(self.seed, self.step)
        if consume is not None and not self._can_consume(params, sharded):
            raise ValueError(f"estimator {self.options['estimator']!r} cannot hand its estimate out a few "
                             "parameters at a time here (see can_consume): call backward without consume.")
        try:
            if sharded is not None:
                estimate = self._sharded_estimate(sharded, closure, seed, reduce or sharded.mean)
            elif consume is not None:
                tangents = self.estimator.tangents(self.sampler, params, self.num_directions, seed)
                result = self.estimator.derivatives(closure, params, tangents)
                estimate = Estimate(result.loss, reduced_derivatives(result, reduce), [])
            else:
                estimate = self.estimator.estimate(closure, params, sampler=self.sampler,
                                                   num_directions=self.num_directions, seed=seed, reduce=reduce)
        except NonFiniteDirectionalDerivativeError as error:
            self.step += 1
            self.skipped += 1
            warnings.warn(f"skipped update {self.step - 1} ({self.skipped} so far): {error}",
                          RuntimeWarning, stacklevel=2)
            return Estimate(torch.tensor(float("nan")), torch.full((self.num_directions,), float("nan")),
                            [None] * len(params), skipped=True)
        self.step += 1
        if consume is not None:
            _hand_out(params, parameter_estimates(result, tangents, estimate.directional_derivatives), consume)
            return estimate
        for p, grad in zip(params, estimate.grads):
            if grad is None:
                continue
            if p.grad is None:
                p.grad = cast(grad, p.dtype)
            else:
                p.grad.add_(grad)
        return estimate

    def can_consume(self, params: Sequence[Tensor]) -> bool:
        """Whether :meth:`backward` can hand the estimate out a few parameters at a time: an
        estimator formed from K directional derivatives and their tangents, parameters that are
        not sharded, and no ``.grad`` to add to (every one None, as after ``zero_grad()``)."""
        return self._can_consume(params, sharding(params))

    def _can_consume(self, params: Sequence[Tensor], sharded: Optional[Sharding]) -> bool:
        return applies_without_grad(self.estimator) and sharded is None and all(p.grad is None for p in params)

    def _sharded_estimate(self, sharded: Sharding, closure, seed: int, reduce: Reduce) -> Estimate:
        """The estimate on FSDP2-sharded parameters: the derivatives from a forward pass over
        the gathered layers, each ``.grad`` a DTensor holding this rank's rows of the estimate.
        Only estimators formed from K directional derivatives and their tangents qualify."""
        if getattr(self.estimator, "reduces_gradients", True) or not applies_without_grad(self.estimator):
            raise UnsupportedShardingError(
                f"estimator {self.options['estimator']!r} forms its estimate from more than K "
                "directional derivatives and their tangents (whole tangents, gradients or "
                "examples of each rank), which FSDP2-sharded parameters do not allow: use "
                "estimator='weight' or 'spsa', or train unsharded."
            )
        K = self.num_directions
        result = sharded.derivatives(self.estimator, closure, self.sampler, K, seed)
        estimate = estimate_from_derivatives(result, sharded.local_tangents(self.sampler, K, seed), reduce)
        estimate.grads = [sharded.as_grad(i, grad) for i, grad in enumerate(estimate.grads)]
        return estimate

    def state_dict(self) -> dict:
        state = {**self.options, "seed": self.seed, "step": self.step, "skipped": self.skipped}
        if hasattr(self.estimator, "state_dict"):  # an estimator with state of its own (e.g. "guided")
            state["estimator_state"] = self.estimator.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        mismatched = {k: (state.get(k), v) for k, v in self.options.items() if state.get(k, v) != v}
        if mismatched:
            raise ValueError(
                f"checkpoint was saved with other forward-gradient options {mismatched} "
                "(saved, current): construct the estimator with the saved options to resume."
            )
        self.seed, self.step, self.skipped = int(state["seed"]), int(state["step"]), int(state["skipped"])
        if "estimator_state" in state and hasattr(self.estimator, "load_state_dict"):
            self.estimator.load_state_dict(state["estimator_state"])


CONSUME_BYTES = 32 << 20  # how much of the estimate backward(consume=...) writes before handing it out


def _hand_out(params, grads: Iterator[Optional[Tensor]], consume) -> None:
    """Write each parameter's estimate to its ``.grad`` and pass the parameters to ``consume``
    about ``CONSUME_BYTES`` at a time."""
    group, size = [], 0
    for p, grad in zip(params, grads):
        if grad is None:
            continue
        p.grad = cast(grad, p.dtype)
        group.append(p)
        size += p.grad.nbytes
        if size >= CONSUME_BYTES:
            consume(group)
            group, size = [], 0
    if group:
        consume(group)
