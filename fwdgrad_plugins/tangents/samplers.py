"""Tangent samplers: random directions v with E[v vᵀ] = I, drawn reproducibly from a seed.

The values come from :mod:`fwdgrad_plugins.tangents.counter_rng`, a counter-based generator: a call's
tangents depend on the seed and the parameters' shapes alone, so all processes of a
distributed run draw identical tangents without sending them, a resumed run redraws the same
ones, and a step's tangents are one fused kernel on the CPU.

>>> import torch
>>> from fwdgrad_plugins.tangents import GaussianSampler
>>> w = torch.zeros(3, 4)
>>> [t.shape for t in GaussianSampler().sample([w], num_directions=2, seed=0)]
[torch.Size([2, 3, 4])]
"""

from __future__ import annotations

from fwdgrad_plugins.hookspecs import hookimpl
from fwdgrad_plugins.tangents import counter_rng
from fwdgrad_plugins.tangents.streaming import CounterStream
from fwdgrad_plugins.tangents.tangent import RankOne, draw_like

__all__ = ["GaussianSampler", "RademacherSampler", "RankOneGaussianSampler"]


class GaussianSampler:
    """Dense N(0, 1) tangents: the paper's choice."""

    def sample(self, params, num_directions, seed, workspace=None):
        return draw_like([(num_directions, *p.shape) for p in params], params, seed, counter_rng.normal, workspace)

    def stream(self, params, num_directions, seed):
        """The same tangents, drawn per parameter on demand (see :mod:`fwdgrad_plugins.tangents.streaming`)."""
        return _dense_stream(params, num_directions, seed, counter_rng.normal)


class RademacherSampler:
    """Dense ±1 tangents: the lowest-variance unbiased choice (E[v⁴] = 1)."""

    def sample(self, params, num_directions, seed, workspace=None):
        return draw_like([(num_directions, *p.shape) for p in params], params, seed, counter_rng.signs, workspace)

    def stream(self, params, num_directions, seed):
        """The same tangents, drawn per parameter on demand (see :mod:`fwdgrad_plugins.tangents.streaming`)."""
        return _dense_stream(params, num_directions, seed, counter_rng.signs)


class RankOneGaussianSampler:
    """Rank-one Gaussian tangents ``u wᵀ`` for every 2-D parameter (linear weights), dense
    N(0, 1) for the rest. Fastest when the 2-D parameters are used by ``F.linear``."""

    def sample(self, params, num_directions, seed, workspace=None):
        shapes, like = [], []
        for p in params:
            factors = [(num_directions, n) for n in p.shape] if p.dim() == 2 else [(num_directions, *p.shape)]
            shapes += factors
            like += [p] * len(factors)
        drawn = iter(draw_like(shapes, like, seed, counter_rng.normal, workspace))
        return [RankOne(next(drawn), next(drawn)) if p.dim() == 2 else next(drawn) for p in params]

    def stream(self, params, num_directions, seed):
        """The same tangents, drawn per parameter on demand (see :mod:`fwdgrad_plugins.tangents.streaming`)."""
        pieces = [[(n,) for n in p.shape] if p.dim() == 2 else [tuple(p.shape)] for p in params]
        return CounterStream(params, num_directions, seed, counter_rng.normal, pieces)


def _dense_stream(params, num_directions, seed, draw):
    return CounterStream(params, num_directions, seed, draw, [[tuple(p.shape)] for p in params])


@hookimpl
def register_tangent_samplers(register):
    register("gaussian", GaussianSampler)
    register("rademacher", RademacherSampler)
    register("rank1-gaussian", RankOneGaussianSampler)
