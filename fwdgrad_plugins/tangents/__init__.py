"""Tangents and their randomness: what a tangent is (``tangent``), the samplers that draw
them (``samplers``, ``orthogonal``), the counter-based generator they draw from
(``counter_rng``) and per-parameter streaming (``streaming``).

>>> import torch
>>> from fwdgrad_plugins.tangents import GaussianSampler
>>> [t.shape for t in GaussianSampler().sample([torch.zeros(3, 4)], num_directions=2, seed=0)]
[torch.Size([2, 3, 4])]
"""

from fwdgrad_plugins.tangents.counter_rng import derive_seed
from fwdgrad_plugins.tangents.orthogonal import OrthogonalGaussianSampler
from fwdgrad_plugins.tangents.samplers import GaussianSampler, RademacherSampler, RankOneGaussianSampler
from fwdgrad_plugins.tangents.tangent import RankOne, Tangent, TangentSampler

__all__ = ["GaussianSampler", "OrthogonalGaussianSampler", "RademacherSampler", "RankOne",
           "RankOneGaussianSampler", "Tangent", "TangentSampler", "derive_seed"]
