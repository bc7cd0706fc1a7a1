"""``orthogonal-gaussian``: per parameter, K Gaussian directions made orthogonal to each other
and scaled to length √n (a random orthonormal frame times √n), so E[v vᵀ] = I still holds and
FG-W stays unbiased, while the K directions never repeat each other."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fwdgrad_plugins.hookspecs import hookimpl
from fwdgrad_plugins.tangents import counter_rng
from fwdgrad_plugins.tangents.tangent import draw_like


class OrthogonalGaussianSampler:
    """K tangents per parameter that are orthogonal to each other, each of length √n (n: the
    parameter's size): the first K columns of a Haar-random orthogonal matrix, times √n, so
    E[v vᵀ] = I and FG-W stays unbiased. When K > n, the directions come in groups of n, each
    group orthogonal. Drawn from the same counter-based stream as ``gaussian``.

    >>> w = torch.zeros(5, 2)
    >>> v = OrthogonalGaussianSampler().sample([w], num_directions=3, seed=0)[0].flatten(1)
    >>> torch.allclose(v @ v.T, 10 * torch.eye(3), atol=1e-4)
    True
    """

    def sample(self, params, num_directions, seed, workspace=None):
        drawn = draw_like([(num_directions, *p.shape) for p in params], params, seed, counter_rng.normal, workspace)
        if workspace is None:
            return [orthogonalise(t) for t in drawn]
        return [t.copy_(orthogonalise(t)) for t in drawn]  # stay in the workspace's memory


def orthogonalise(tangent: Tensor) -> Tensor:
    """The (K, *shape) Gaussian ``tangent``'s K rows made orthonormal (in groups of at most n
    rows), times √n. QR with the signs of R's diagonal fixed gives a Haar-random frame."""
    k, n = tangent.shape[0], tangent[0].numel()
    if n == 1:
        return torch.sign(tangent) + (tangent == 0)  # ±1: the only directions of length 1
    group = min(k, n)
    groups = -(-k // group)
    flat = tangent.reshape(k, n).float()
    if groups * group > k:  # pad the last group with more Gaussian rows (dropped after QR)
        flat = torch.cat([flat, flat[: groups * group - k].flip(1)])
    q, r = torch.linalg.qr(flat.view(groups, group, n).transpose(1, 2))  # (G, n, group)
    signs = torch.sign(torch.diagonal(r, dim1=1, dim2=2))
    frames = (q * torch.where(signs == 0, 1.0, signs).unsqueeze(1)).transpose(1, 2)
    rows = frames.reshape(groups * group, n)[:k]
    return (rows * math.sqrt(n)).to(tangent.dtype).reshape(tangent.shape)


@hookimpl
def register_tangent_samplers(register):
    register("orthogonal-gaussian", OrthogonalGaussianSampler)
