"""Streamed tangents: each parameter's tangent drawn when it is needed, never the whole set.

A sampler's ``sample(params, K, seed)`` draws every parameter's K tangents at once: one copy
of the parameters per direction, held for the whole step. The built-in samplers draw from the
counter-based stream of :mod:`fwdgrad_plugins.tangents.counter_rng`, in which parameter ``i``'s values
occupy a known slice (the parameters' K-direction draws laid end to end, in order), and any
slice can be drawn on its own. A :class:`TangentStream` draws exactly that slice, for one
parameter and one direction (``draw``) or all K (``draw_all``), as often as asked: the values
that the whole draw gives that parameter, to the float rounding noted in ``counter_rng``
(normals may differ in the last bit between a slice and the whole draw, or between a compiled
and an eager draw; signs are exact).

:func:`tangent_stream` gives a sampler's stream: its own ``stream(params, K, seed)`` where it
has one (``gaussian``, ``rademacher``, ``rank1-gaussian``), else :class:`WholeTangents`, which
draws the whole set once through ``sample`` and serves slices of it (a plugin sampler that
only draws whole tangents keeps working, at the old memory cost).

>>> import torch
>>> from fwdgrad_plugins.tangents import GaussianSampler
>>> params = [torch.zeros(3, 4), torch.zeros(5)]
>>> whole = GaussianSampler().sample(params, num_directions=2, seed=7)
>>> stream = tangent_stream(GaussianSampler(), params, num_directions=2, seed=7)
>>> torch.allclose(stream.draw(1, k=1), whole[1][1])  # parameter 1, direction 1, drawn alone
True
"""

from __future__ import annotations

import collections
import collections.abc
import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from fwdgrad_plugins.tangents.tangent import RankOne, Tangent, accepts_workspace, cast, combine

Direction = Union[Tensor, tuple]  # one direction of one parameter: dense, or (u, w) for u wᵀ

ROWS_ALONE_MIN = 1 << 22  # values (16 MiB in float32): a dense tangent this large is drawn a block of rows at a time
ROW_BLOCK = 1 << 20  # values per block of rows (4 MiB in float32)


class TangentStream:
    """The K tangents of every parameter of one step, drawn on demand.

    ``draw(i, k)`` is parameter ``i``'s tangent along direction ``k``: a tensor shaped like
    the parameter, or ``(u, w)`` for a rank-one tangent u wᵀ. ``draw_all(i)`` is its K
    tangents as a sampler returns them (a (K, *shape) tensor or a :class:`RankOne`). Each
    call draws afresh: nothing is kept between calls.
    """

    params: Sequence[Tensor]
    num_directions: int

    def draw(self, index: int, k: int) -> Direction:
        raise NotImplementedError

    def draw_all(self, index: int) -> Tangent:
        raise NotImplementedError

    def whole(self) -> list[Tangent]:
        """Every parameter's K tangents at once (the sampler's whole draw)."""
        return [self.draw_all(i) for i in range(len(self.params))]

    def direction_mapping(self, k: int) -> "LazyDirection":
        """Direction ``k`` as a mapping ``id(param) -> tangent`` that draws on lookup."""
        return LazyDirection(self, k)


class CounterStream(TangentStream):
    """The stream of a built-in sampler: parameter ``i``'s K directions are ``pieces[i]``,
    consecutive runs of ``draw`` values (one run for a dense tangent, the (K, out) and (K, in)
    factors for a rank-one one), laid end to end from value 0 of stream ``seed``."""

    def __init__(self, params: Sequence[Tensor], num_directions: int, seed: int, draw,
                 pieces: Sequence[Sequence[tuple[int, ...]]]):
        self.params = list(params)
        self.num_directions = num_directions
        self.seed = seed
        self._draw = draw
        self._pieces = [list(p) for p in pieces]  # per parameter: shapes without the K axis
        self._starts = []
        start = 0
        for shapes in self._pieces:
            self._starts.append(start)
            start += sum(num_directions * math.prod(shape) for shape in shapes)

    def _values(self, index: int, piece: int, first: int, count: int) -> Tensor:
        """Directions ``first .. first + count - 1`` of piece ``piece`` of parameter ``index``."""
        param = self.params[index]
        shapes = self._pieces[index]
        offset = self._starts[index] + sum(self.num_directions * math.prod(s) for s in shapes[:piece])
        size = math.prod(shapes[piece])
        values = self._draw(self.seed, offset + first * size, count * size, param.device)
        return cast(values.view(count, *shapes[piece]), param.dtype)

    def draw(self, index: int, k: int) -> Direction:
        if len(self._pieces[index]) == 2:
            return self._values(index, 0, k, 1)[0], self._values(index, 1, k, 1)[0]
        return self._values(index, 0, k, 1)[0]

    def draw_rows(self, index: int, k: int, start: int, stop: int) -> Direction:
        """Rows ``start .. stop - 1`` (along dimension 0) of ``draw(index, k)``, drawn alone:
        the rows of a parameter's shard (a rank-one tangent's u rows, and all of w)."""
        shapes = self._pieces[index]
        param = self.params[index]
        offset = self._starts[index] + k * math.prod(shapes[0]) + start * math.prod(shapes[0][1:])
        count = (stop - start) * math.prod(shapes[0][1:])
        rows = cast(self._draw(self.seed, offset, count, param.device), param.dtype)
        rows = rows.view(stop - start, *shapes[0][1:])
        return (rows, self._values(index, 1, k, 1)[0]) if len(shapes) == 2 else rows

    def row_blocks(self, index: int) -> Optional[list[tuple[int, int]]]:
        """``(start, stop)`` row ranges of about ``ROW_BLOCK`` values covering parameter
        ``index``, for a dense tangent of at least ``ROWS_ALONE_MIN`` values (an embedding, an
        LM head), which the engine and the update then draw a block at a time; None for a
        smaller or rank-one one (drawn whole). Blocks hold a multiple of 128 rows."""
        shapes = self._pieces[index]
        if len(shapes) != 1 or len(shapes[0]) < 2 or math.prod(shapes[0]) < ROWS_ALONE_MIN:
            return None
        rows = shapes[0][0]
        step = max(128, ROW_BLOCK // math.prod(shapes[0][1:]) // 128 * 128)
        return [(start, min(start + step, rows)) for start in range(0, rows, step)]

    def draw_all(self, index: int) -> Tangent:
        K = self.num_directions
        if len(self._pieces[index]) == 2:
            return RankOne(self._values(index, 0, 0, K), self._values(index, 1, 0, K))
        return self._values(index, 0, 0, K)


class WholeTangents(TangentStream):
    """A stream over tangents drawn whole (for samplers without a ``stream`` method)."""

    def __init__(self, params: Sequence[Tensor], tangents: Sequence[Tangent]):
        self.params = list(params)
        self.tangents = list(tangents)
        first = self.tangents[0]
        self.num_directions = first.num_directions if isinstance(first, RankOne) else first.shape[0]

    def draw(self, index: int, k: int) -> Direction:
        tangent = self.tangents[index]
        return (tangent.u[k], tangent.w[k]) if isinstance(tangent, RankOne) else tangent[k]

    def draw_all(self, index: int) -> Tangent:
        return self.tangents[index]

    def whole(self) -> list[Tangent]:
        return self.tangents


class LazyDirection(collections.abc.Mapping):
    """``id(param) -> tangent`` of one direction, drawn when looked up.

    A layer looks its weight up a few times in one call (its tangent, then its rank-one
    factors), so the last ``keep`` lookups are kept; older ones are dropped, so a pass holds
    a few parameters' tangents at a time, never all of them.
    """

    def __init__(self, stream: TangentStream, k: int, keep: int = 2):
        self.stream = stream
        self.k = k
        self.keep = keep
        self._index = {id(p): i for i, p in enumerate(stream.params)}
        self._recent: collections.OrderedDict[int, Direction] = collections.OrderedDict()
        self.draws = 0  # how many tangents were drawn (a test reads it)

    def __getitem__(self, key: int) -> Direction:
        if key in self._recent:
            self._recent.move_to_end(key)
            return self._recent[key]
        value = self.stream.draw(self._index[key], self.k)  # KeyError for a non-parameter
        self.draws += 1
        self._recent[key] = value
        while len(self._recent) > self.keep:
            self._recent.popitem(last=False)
        return value

    def __contains__(self, key) -> bool:
        return key in self._index

    def __iter__(self):
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def release(self) -> None:
        """Drop the kept tangents."""
        self._recent.clear()

    def row_blocks(self, key: int) -> Optional[list[tuple[int, int]]]:
        """The row ranges in which parameter ``key``'s tangent is drawn, or None where it is
        drawn whole (see :meth:`CounterStream.row_blocks`)."""
        row_blocks = getattr(self.stream, "row_blocks", None)
        return None if row_blocks is None else row_blocks(self._index[key])

    def rows(self, key: int, start: int, stop: int) -> Direction:
        """Rows ``start .. stop - 1`` of parameter ``key``'s tangent, drawn alone, not kept."""
        self.draws += 1
        return self.stream.draw_rows(self._index[key], self.k, start, stop)


def tangent_stream(sampler, params: Sequence[Tensor], num_directions: int, seed: int,
                   workspace=None) -> TangentStream:
    """``sampler``'s tangents for ``params`` as a :class:`TangentStream`: streamed where the
    sampler offers ``stream(params, num_directions, seed)``, else drawn whole through
    ``sample`` (into ``workspace`` if the sampler accepts one)."""
    stream = getattr(sampler, "stream", None)
    if stream is not None:
        return stream(params, num_directions, seed)
    if workspace is not None and num_directions > 1 and accepts_workspace(sampler):
        return WholeTangents(params, sampler.sample(params, num_directions, seed, workspace=workspace))
    return WholeTangents(params, sampler.sample(params, num_directions, seed))


def is_streamed(tangents) -> bool:
    """Whether ``tangents`` draws on demand (a stream that is not a whole draw)."""
    return isinstance(tangents, TangentStream) and not isinstance(tangents, WholeTangents)


def combination(tangents: TangentStream, index: int, coefficients: Tensor) -> Tensor:
    """Σ_k c_k v_k for parameter ``index``, shaped like it: from a stream, one direction at a
    time (K tangents of an embedding at once would be K copies of it), else from the whole
    draw (:func:`~fwdgrad_plugins.tangents.tangent.combine`)."""
    if not is_streamed(tangents) or len(coefficients) == 1:
        return combine(tangents.draw_all(index), coefficients)
    total = None
    for k, c in enumerate(coefficients.tolist()):
        direction = tangents.draw(index, k)
        term = torch.outer(direction[0] * c, direction[1]) if isinstance(direction, tuple) else direction.mul_(c)
        total = term if total is None else total.add_(term)
    return total
