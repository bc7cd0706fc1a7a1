"""FG-W, the paper's estimator: weight perturbation along K tangents from a sampler."""

from __future__ import annotations

from typing import Optional

from fwdgrad_plugins.engine.forward_mode import DirectionalDerivatives, directional_derivatives
from fwdgrad_plugins.estimators.core import Estimate, Reduce, estimate_from_derivatives
from fwdgrad_plugins.hookspecs import hookimpl
from fwdgrad_plugins.tangents.streaming import TangentStream, WholeTangents, tangent_stream
from fwdgrad_plugins.tangents.tangent import TangentSampler, Workspace, accepts_workspace


class WeightPerturbation:
    """FG-W, the paper's estimator: g = (1/K) Σ_k (∇f(θ)·v_k) v_k, with v_k ~ ``sampler``.

    ``reduce`` maps the K local derivatives to global ones (the mean over processes in
    data-parallel training): each process then forms the same update from shared tangents.

    By default (``streamed=None``) one direction (K = 1) is streamed where the sampler can
    (the built-in ones) and the trained parameters take more than ``STREAM_MIN_BYTES``
    (32 MiB): each parameter's tangent is drawn when the closure uses it and again when its
    estimate is formed, so no full tangent is held (:mod:`fwdgrad_plugins.tangents.streaming`). The
    second draw costs time, and below that size the memory it saves is small, so smaller
    models draw the tangent once, whole, and it becomes the gradient. ``streamed=True``
    streams any size and K > 1 too, as K forward-mode passes (the memory of one direction,
    K times its time); by default K > 1 tangents are drawn whole for one ``vmap`` pass, into
    ``self.workspace``, kept from one call to the next where a fresh buffer would cost more
    (CPU draws above 32 MiB; see :class:`~fwdgrad_plugins.tangents.tangent.Workspace`;
    ``workspace.clear()`` frees it).
    """

    STREAM_MIN_BYTES = 32 << 20

    reduces_gradients = False  # ``reduce`` sees the K derivatives only

    def __init__(self, streamed: Optional[bool] = None):
        self.streamed = streamed
        self.workspace = Workspace()

    def tangents(self, sampler: TangentSampler, params, num_directions: int, seed: int) -> TangentStream:
        """The step's tangents: streamed for one direction over more than
        ``STREAM_MIN_BYTES`` of parameters (or any K and size with ``streamed=True``), drawn
        whole otherwise (always with ``streamed=False``)."""
        streamed = self.streamed
        if streamed is None:
            size = sum(p.numel() * p.element_size() for p in params)
            streamed = num_directions == 1 and size > self.STREAM_MIN_BYTES
        if streamed:
            return tangent_stream(sampler, params, num_directions, seed)
        if num_directions > 1 and accepts_workspace(sampler):  # one tangent becomes the gradient itself
            return WholeTangents(params, sampler.sample(params, num_directions, seed, workspace=self.workspace))
        return WholeTangents(params, sampler.sample(params, num_directions, seed))

    def derivatives(self, closure, params, tangents: TangentStream) -> DirectionalDerivatives:
        """The loss and its K directional derivatives along ``tangents`` (one jvp pass)."""
        return directional_derivatives(closure, params, tangents)

    def estimate(self, closure, params, *, sampler: TangentSampler, num_directions: int,
                 seed: int, reduce: Optional[Reduce] = None) -> Estimate:
        tangents = self.tangents(sampler, params, num_directions, seed)
        return estimate_from_derivatives(self.derivatives(closure, params, tangents), tangents, reduce)


@hookimpl
def register_estimators(register):
    register("weight", WeightPerturbation)
