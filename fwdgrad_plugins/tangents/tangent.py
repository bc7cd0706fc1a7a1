"""What a tangent is, and how samplers draw one: a dense (K, *shape) tensor or a factored
:class:`RankOne`, the :class:`TangentSampler` protocol, and ``draw_like``, which lays a step's
tangents end to end on the counter-based stream (:mod:`fwdgrad_plugins.tangents.counter_rng`).
"""

from __future__ import annotations

import collections
import inspect
import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Protocol, Sequence, Union

import torch
from torch import Tensor


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


def dense(tangent: Tangent) -> Tensor:
    """A tangent as a dense tensor: a :class:`RankOne`'s outer products, or the tensor itself."""
    return tangent.dense() if isinstance(tangent, RankOne) else tangent


def cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t.to(dtype)``, without a dispatcher call when it is a no-op: most casts in a training
    step are, and a step makes dozens."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def combine(tangent: Tangent, coefficients: Tensor) -> Tensor:
    """Σ_k c_k v_k, shaped like the parameter. May reuse a dense tangent's memory."""
    coefficients = cast(coefficients, tangent.u.dtype if isinstance(tangent, RankOne) else tangent.dtype)
    if isinstance(tangent, RankOne):
        if tangent.num_directions == 1:
            return torch.outer(tangent.u[0] * coefficients[0], tangent.w[0])
        return (tangent.u * coefficients.unsqueeze(1)).T @ tangent.w
    if tangent.shape[0] == 1:
        return tangent[0].mul_(coefficients[0])
    return torch.tensordot(coefficients, tangent, dims=1)


class TangentSampler(Protocol):
    """Draws ``num_directions`` tangents for each parameter from ``seed``.

    A sampler may also accept ``workspace``, a :class:`Workspace` to draw into: the caller
    then uses the tangents only until its next call with that workspace."""

    def sample(self, params: Sequence[Tensor], num_directions: int, seed: int) -> list[Tangent]: ...


def accepts_workspace(sampler: TangentSampler) -> bool:
    """Whether ``sampler.sample`` takes a ``workspace`` argument (read once per sampler class:
    the estimator asks every step)."""
    return _sample_takes_workspace(type(sampler))


@lru_cache(maxsize=None)
def _sample_takes_workspace(sampler_type: type) -> bool:
    return "workspace" in inspect.signature(sampler_type.sample).parameters


class Workspace:
    """float32 memory to draw tangents into, kept from one draw to the next (a buffer per
    device, grown when a draw needs more). Tangents drawn into it are valid until the next
    draw into it.

    K directions are K × the parameters' size. Allocated afresh for every step, a buffer that
    large costs a CPU more than drawing its values: glibc maps each block above 32 MiB anew
    from the system, and the first write to every 4 KiB page faults. Smaller blocks it
    reuses, and CUDA's caching allocator keeps blocks itself; there drawing into kept memory
    would only add a copy (the kernel draws in pieces that it copies into the buffer). So a
    workspace serves CPU draws of more than ``min_bytes`` only; ``draw_like`` draws the
    others afresh.

    >>> import torch
    >>> from fwdgrad_plugins.tangents import GaussianSampler
    >>> workspace = Workspace(min_bytes=0)
    >>> w = torch.zeros(3, 4)
    >>> first = GaussianSampler().sample([w], num_directions=2, seed=0, workspace=workspace)[0]
    >>> second = GaussianSampler().sample([w], num_directions=2, seed=1, workspace=workspace)[0]
    >>> first.data_ptr() == second.data_ptr()   # the same memory: ``first`` now holds seed 1's values
    True
    """

    def __init__(self, min_bytes: int = 32 << 20):
        self.min_bytes = min_bytes
        self._buffers: dict[torch.device, Tensor] = {}

    def take(self, counts: dict[torch.device, int]) -> dict[torch.device, Tensor]:
        """A flat float32 tensor of ``counts[device]`` values for each device that it serves."""
        taken = {}
        for device, count in counts.items():
            if device.type != "cpu" or 4 * count <= self.min_bytes:
                continue
            if device not in self._buffers or self._buffers[device].numel() < count:
                self._buffers.pop(device, None)  # free the old buffer before allocating
                self._buffers[device] = torch.empty(count, device=device)
            taken[device] = self._buffers[device][:count]
        return taken

    @property
    def nbytes(self) -> int:
        return sum(buffer.nbytes for buffer in self._buffers.values())

    def clear(self) -> None:
        """Free the memory (a later draw allocates it again)."""
        self._buffers.clear()


Draw = Callable[..., Tensor]  # counter_rng.normal or counter_rng.signs


def draw_like(shapes: Sequence[tuple[int, ...]], like: Sequence[Tensor], seed: int, draw: Draw,
              workspace: Optional[Workspace] = None) -> list[Tensor]:
    """One tensor per shape, on ``like``'s device and of its dtype, with consecutive values of
    the stream ``seed``: one draw (one fused kernel) for each run of tensors on one device;
    into ``workspace`` if given."""
    sizes = [math.prod(shape) for shape in shapes]
    buffers: dict[torch.device, Tensor] = {}
    if workspace is not None:
        counts: dict[torch.device, int] = collections.Counter()
        for size, tensor in zip(sizes, like):
            counts[tensor.device] += size
        buffers = workspace.take(counts)
    out: list[Tensor] = []
    start = 0
    for device, run in itertools.groupby(zip(shapes, sizes, like), key=lambda item: item[2].device):
        run = list(run)
        total = sum(size for _, size, _ in run)
        if device in buffers:
            into, buffers[device] = buffers[device][:total], buffers[device][total:]
            values = draw(seed, start, total, device, out=into)
        else:
            values = draw(seed, start, total, device)
        for (shape, _, tensor), part in zip(run, values.split([size for _, size, _ in run])):
            out.append(cast(part.view(shape), tensor.dtype))
        start += total
    return out
