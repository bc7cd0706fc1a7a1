"""Tangent samplers: random directions v with E[v vᵀ] = I, drawn reproducibly from a seed.

Every tangent is regenerated from ``(seed, parameter index, chunk)`` with its own
``torch.Generator``, so a run's tangents depend on the seed alone: all processes of a
distributed run draw identical tangents without sending them, a resumed run redraws the same
ones, and large tensors are filled in parallel chunks on the CPU.

>>> import torch
>>> from fwdgrad_plugins.tangents import GaussianSampler
>>> w = torch.zeros(3, 4)
>>> [t.shape for t in GaussianSampler().sample([w], num_directions=2, seed=0)]
[torch.Size([2, 3, 4])]
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, Sequence, Union

import torch
from torch import Tensor

from fwdgrad_plugins.hookspecs import hookimpl

CHUNK = 1 << 18  # elements per generator; fixed so results do not depend on the thread count
_MASK64 = (1 << 64) - 1


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 over the parts)."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (int(part) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


@dataclass
class RankOne:
    """K rank-one tangents ``u_k w_kᵀ`` for a 2-D weight, kept factored: ``u`` is (K, out),
    ``w`` is (K, in). With independent N(0, 1) factors, E[(u wᵀ) ⊗ (u wᵀ)] = I, so the
    estimate stays unbiased while drawing and applying it costs O(in + out)."""

    u: Tensor
    w: Tensor

    @property
    def num_directions(self) -> int:
        return self.u.shape[0]

    def dense(self) -> Tensor:
        """The (K, out, in) tangents, materialised."""
        return self.u.unsqueeze(2) * self.w.unsqueeze(1)


Tangent = Union[Tensor, RankOne]  # a dense tangent is a (K, *param.shape) tensor


def combine(tangent: Tangent, coefficients: Tensor) -> Tensor:
    """Σ_k c_k v_k, shaped like the parameter. May reuse a dense tangent's memory."""
    if isinstance(tangent, RankOne):
        return (tangent.u * coefficients.to(tangent.u.dtype).unsqueeze(1)).T @ tangent.w
    if tangent.shape[0] == 1:
        return tangent[0].mul_(coefficients[0].to(tangent.dtype))
    return torch.tensordot(coefficients.to(tangent.dtype), tangent, dims=1)


class TangentSampler(Protocol):
    """Draws ``num_directions`` tangents for each parameter from ``seed``."""

    def sample(self, params: Sequence[Tensor], num_directions: int, seed: int) -> list[Tangent]: ...


@lru_cache(maxsize=None)
def _thread_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))


def _generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def fill_(tensors: Sequence[Tensor], seed: int, fill) -> None:
    """Fill each tensor in place with ``fill(chunk, generator)``, one generator per
    ``(seed, tensor index, chunk)``; CPU chunks run in parallel threads (torch's RNG kernels
    release the GIL)."""
    jobs = []
    for index, tensor in enumerate(tensors):
        flat = tensor.view(-1)
        for chunk, start in enumerate(range(0, flat.numel(), CHUNK)):
            jobs.append((flat[start : start + CHUNK], derive_seed(seed, index, chunk)))

    def run(job):
        part, part_seed = job
        fill(part, _generator(part.device, part_seed))

    # Threads pay off only with more than one chunk of work (rank-one factors are tiny).
    if sum(part.numel() for part, _ in jobs) > CHUNK and all(part.device.type == "cpu" for part, _ in jobs):
        list(_thread_pool().map(run, jobs))
    else:
        for job in jobs:
            run(job)


def _gaussian(part: Tensor, generator: torch.Generator) -> None:
    part.normal_(generator=generator)


@lru_cache(maxsize=None)
def _sign_shifts(device: torch.device) -> Tensor:
    return torch.arange(7, -1, -1, dtype=torch.int8, device=device)  # bit j of a byte to bit 7


def _rademacher(part: Tensor, generator: torch.Generator) -> None:
    """±1 from packed random bits: one 64-bit draw gives 64 signs (4× faster than one draw per
    entry on a CPU). Each bit is moved to an int8's sign bit, spread by an arithmetic shift
    right to 0 or -1, and ``| 1`` makes that 1 or -1."""
    words = torch.empty((part.numel() + 63) // 64, dtype=torch.int64, device=part.device)
    words.random_(-(2**63), None, generator=generator)  # the full 64-bit range: every bit fair
    shifted = words.view(torch.int8).unsqueeze(1) << _sign_shifts(part.device)  # (bytes, 8)
    signs = (shifted.view(-1)[: part.numel()] >> 7) | 1
    part.copy_(signs.view(part.shape))


class GaussianSampler:
    """Dense N(0, 1) tangents: the paper's choice."""

    def sample(self, params, num_directions, seed):
        tangents = [p.new_empty((num_directions, *p.shape)) for p in params]
        fill_(tangents, seed, _gaussian)
        return tangents


class RademacherSampler:
    """Dense ±1 tangents: the lowest-variance unbiased choice (E[v⁴] = 1)."""

    def sample(self, params, num_directions, seed):
        tangents = [p.new_empty((num_directions, *p.shape)) for p in params]
        fill_(tangents, seed, _rademacher)
        return tangents


class RankOneGaussianSampler:
    """Rank-one Gaussian tangents ``u wᵀ`` for every 2-D parameter (linear weights), dense
    N(0, 1) for the rest. Fastest when the 2-D parameters are used by ``F.linear``."""

    def sample(self, params, num_directions, seed):
        tangents: list[Tangent] = []
        buffers = []
        for p in params:
            if p.dim() == 2:
                u = p.new_empty((num_directions, p.shape[0]))
                w = p.new_empty((num_directions, p.shape[1]))
                tangents.append(RankOne(u, w))
                buffers += [u, w]
            else:
                dense = p.new_empty((num_directions, *p.shape))
                tangents.append(dense)
                buffers.append(dense)
        fill_(buffers, seed, _gaussian)
        return tangents


@hookimpl
def register_tangent_samplers(register):
    register("gaussian", GaussianSampler)
    register("rademacher", RademacherSampler)
    register("rank1-gaussian", RankOneGaussianSampler)
