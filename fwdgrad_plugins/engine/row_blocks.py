"""A layer's use of a large streamed tangent, a block of the weight's rows at a time.

A streamed tangent of at least ``ROWS_ALONE_MIN`` values (an embedding table, an LM head) is
never drawn whole (:meth:`~fwdgrad_plugins.tangents.streaming.LazyDirection.row_blocks`). The
three ways a model uses such a weight W get its tangent Z's contribution block by block:
an embedding lookup Z[indices], a linear layer's x Zᵀ and an ``addmm``'s x Z (GPT-2's Conv1D,
whose weight's rows are its inputs). The forward-mode engine adds them to a layer's tangent;
SPSA adds them, scaled by ±ε, to the layer's output at θ.

>>> import torch
>>> from fwdgrad_plugins.tangents import GaussianSampler
>>> from fwdgrad_plugins.tangents.streaming import LazyDirection, tangent_stream
>>> W = torch.zeros(300, 8)
>>> directions = LazyDirection(tangent_stream(GaussianSampler(), [W], 1, seed=0), 0)
>>> blocks = [(0, 128), (128, 256), (256, 300)]
>>> x, out = torch.randn(4, 8), torch.zeros(4, 300)
>>> add_product_by_rows(directions, id(W), blocks, x, out)
>>> torch.allclose(out, x @ directions[id(W)].t(), atol=1e-5)
True
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from fwdgrad_plugins.tangents.streaming import LazyDirection
from fwdgrad_plugins.tangents.tangent import cast

Blocks = list[tuple[int, int]]


def row_blocks_of(directions, value) -> Optional[Blocks]:
    """The row ranges in which ``value``'s tangent is drawn, for a parameter of ``directions``
    (a :class:`~fwdgrad_plugins.tangents.streaming.LazyDirection`) large enough to be drawn by
    rows; None for anything else."""
    if not isinstance(directions, LazyDirection) or not isinstance(value, Tensor) or id(value) not in directions:
        return None
    return directions.row_blocks(id(value))


def looked_up_rows(directions, key: int, blocks: Blocks, indices: Tensor, skip_row: Optional[int],
                   like: Tensor) -> Tensor:
    """Z[indices] (zero where an index is ``skip_row``, an embedding's padding row), shaped and
    typed like ``like``: each block that holds a looked-up index is drawn, its rows copied
    out, and dropped."""
    flat = indices.reshape(-1)
    rows_out = like.new_zeros(like.shape)
    view = rows_out.view(flat.numel(), -1)
    for start, stop in blocks:
        hit = (flat >= start) & (flat < stop)
        if skip_row is not None:
            hit &= flat != skip_row
        positions = hit.nonzero().squeeze(1)
        if positions.numel():
            rows = directions.rows(key, start, stop)
            view[positions] = cast(rows[flat[positions] - start], like.dtype)
    return rows_out


def add_product_by_rows(directions, key: int, blocks: Blocks, inputs: Tensor, out: Tensor, *,
                        rows_are_inputs: bool = False, alpha: float = 1.0) -> None:
    """out += alpha · inputs Zᵀ for a linear layer's weight W (out_features, in_features), or,
    with ``rows_are_inputs``, out += alpha · inputs Z for ``addmm``'s W (in_features,
    out_features): ``inputs`` (N, in), ``out`` (N, out), a block of W's rows at a time."""
    inputs = cast(inputs, out.dtype)
    for start, stop in blocks:
        rows = cast(directions.rows(key, start, stop), out.dtype)
        if rows_are_inputs:
            out.addmm_(inputs[:, start:stop], rows, alpha=alpha)
        else:
            out[:, start:stop].addmm_(inputs, rows.t(), alpha=alpha)
