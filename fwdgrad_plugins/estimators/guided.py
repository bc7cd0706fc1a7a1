"""``guided``: FG-W along a guess of the gradient (the running mean of past estimates) plus
isotropic directions off it; unbiased, with no error along the guess."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fwdgrad_plugins.engine.forward_mode import directional_derivatives
from fwdgrad_plugins.estimators.core import Estimate, Reduce, check_finite
from fwdgrad_plugins.hookspecs import hookimpl
from fwdgrad_plugins.tangents.counter_rng import derive_seed
from fwdgrad_plugins.tangents.tangent import TangentSampler, dense


class GuidedWeightPerturbation:
    """FG-W along a guess of the gradient plus isotropic directions off it; unbiased.

    The guess û is the running mean of past estimates (m ← β m + (1 - β) ĝ), normalised over
    all parameters. With v_1..v_{K-1} ~ N(0, I) and P = I - û ûᵀ, the estimate

        ĝ = (∇f·û) û + 1/(K-1) Σ_k (∇f·P v_k) P v_k

    has expectation û ûᵀ g + P g = g, and no error along û. The K derivatives are ∇f·û and
    ∇f·v_k; ∇f·P v_k = ∇f·v_k - (∇f·û)(û·v_k). Before the first step (no guess yet) it is
    plain FG-W over the K directions. Keeps one parameter-sized buffer.

    With K = 1 a step takes one of the two parts, each with probability 1/2 (from the step's
    seed, the same on every process), times 2: 2 (∇f·û) û or 2 (∇f·P v) P v; still unbiased.

    Args:
        momentum: β, the weight of the past in the running mean.
    """

    reduces_gradients = False

    def __init__(self, *, momentum: float = 0.9):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
        self.momentum = float(momentum)
        self.mean: Optional[list[Tensor]] = None  # the running mean of estimates, per parameter

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "mean": None if self.mean is None else [m.clone() for m in self.mean]}

    def load_state_dict(self, state: dict) -> None:
        self.momentum = float(state["momentum"])
        self.mean = None if state["mean"] is None else [m.clone() for m in state["mean"]]

    def estimate(self, closure, params, *, sampler: TangentSampler, num_directions: int,
                 seed: int, reduce: Optional[Reduce] = None) -> Estimate:
        if self.mean is not None and [m.shape for m in self.mean] != [p.shape for p in params]:
            raise ValueError("the guided estimator's running mean was built for other parameters: "
                             "use one estimator per set of parameters.")
        norm = None if self.mean is None else math.sqrt(sum(float(m.double().pow(2).sum()) for m in self.mean))
        if num_directions == 1:
            return self._one_direction(closure, params, sampler, seed, reduce, norm)
        random = [dense(t) for t in sampler.sample(params, num_directions - 1, seed)]
        if not norm:  # no guess yet: plain FG-W over K random directions
            extra = [dense(t) for t in sampler.sample(params, 1, derive_seed(seed, 1))]
            tangents = [torch.cat([e, r]) for e, r in zip(extra, random)]
        else:
            tangents = [torch.cat([(m / norm).unsqueeze(0).to(r.dtype), r]) for m, r in zip(self.mean, random)]
        result = directional_derivatives(closure, params, tangents)
        derivatives = result.derivatives if reduce is None else reduce(result.derivatives)
        check_finite(result.loss, derivatives)
        used = result.used
        if not norm:
            grads = [torch.tensordot(derivatives / num_directions, t, dims=1) if u else None
                     for t, u in zip(tangents, used)]
        else:
            guess = [t[0] for t in tangents]
            overlap = sum(t[1:].reshape(num_directions - 1, -1).double() @ g.reshape(-1).double()
                          for g, t, u in zip(guess, tangents, used) if u).float()  # (K-1,): û·v_k
            along = derivatives[0]
            projected = (derivatives[1:] - along * overlap) / (num_directions - 1)  # ∇f·P v_k / (K-1)
            grads = []
            for g, t, u in zip(guess, tangents, used):
                if not u:
                    grads.append(None)
                    continue
                # Σ_k c_k P v_k + (∇f·û) û  with P v_k = v_k - (û·v_k) û
                grads.append(torch.tensordot(projected, t[1:], dims=1)
                             + (along - (projected * overlap).sum()) * g)
        for grad, rows in zip(grads, result.frozen_rows):
            if rows and grad is not None:
                grad[rows] = 0
        self._update_mean(params, grads)
        return Estimate(result.loss, derivatives, grads)

    def _one_direction(self, closure, params, sampler, seed, reduce, norm) -> Estimate:
        """K = 1: along the guess or, as likely, along a direction projected off it, times 2."""
        (tangents,) = [[dense(t) for t in sampler.sample(params, 1, seed)]]
        scale = 1.0
        if norm:
            guess = [(m / norm).to(t.dtype) for m, t in zip(self.mean, tangents)]
            scale = 2.0
            if derive_seed(seed, 0x6E55) % 2:  # along the guess
                tangents = [g.unsqueeze(0) for g in guess]
            else:  # P v = v - (û·v) û
                overlap = sum(float((g.double() * t[0].double()).sum()) for g, t in zip(guess, tangents))
                tangents = [t - overlap * g.unsqueeze(0) for g, t in zip(guess, tangents)]
        result = directional_derivatives(closure, params, tangents)
        derivatives = result.derivatives if reduce is None else reduce(result.derivatives)
        check_finite(result.loss, derivatives)
        grads = [t[0] * (scale * derivatives[0]).to(t.dtype) if u else None for t, u in zip(tangents, result.used)]
        for grad, rows in zip(grads, result.frozen_rows):
            if rows and grad is not None:
                grad[rows] = 0
        self._update_mean(params, grads)
        return Estimate(result.loss, derivatives, grads)

    def _update_mean(self, params, grads) -> None:
        if self.mean is None:
            self.mean = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for m, g in zip(self.mean, grads):
            if g is not None:
                m.mul_(self.momentum).add_(g.float(), alpha=1 - self.momentum)


@hookimpl
def register_estimators(register):
    register("guided", GuidedWeightPerturbation)
