"""Cross-entropy over a large class dimension, in forward mode, a block of rows at a time.

``F.cross_entropy(logits, target)`` on (N, C) logits makes the log-softmax, N × C values, and
in forward mode its tangent and the temporaries of its rule beside it: for a causal LM's loss
(N = batch × tokens, C = the vocabulary) several copies of the logits, 16 MiB each for
2 × 256 tokens over 8192 classes, 2 GiB each for 4096 tokens over 128 k. This rule computes
the same loss ``block_rows`` rows at a time, each block's sum (and, in forward mode, its
tangent) added to the total, so only one block's log-softmax exists at a time. The mean
divides the total by the weight of the rows that count (their number without ``weight``;
``ignore_index`` rows count for nothing), as torch's reduction does; ``reduction="none"``
concatenates the blocks' rows.

The forward-mode engine (:mod:`fwdgrad_plugins.engine.forward_mode`) applies it to every
``F.cross_entropy`` (HuggingFace's ``loss_function``, ``nn.CrossEntropyLoss``, a direct call)
whose logits carry a tangent and have at least ``MIN_CLASSES`` classes; other calls (class
probabilities as targets, logits of another shape, the deprecated ``size_average``/``reduce``)
take torch's own rule.

>>> import torch
>>> import torch.nn.functional as F
>>> logits, target = torch.randn(10, 7), torch.randint(0, 7, (10,))
>>> torch.allclose(blocked_cross_entropy(logits, target, block_rows=3), F.cross_entropy(logits, target))
True
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_CLASSES = 1024  # fewer classes: the log-softmax is no larger than the logits' other uses
BLOCK_ELEMENTS = 2**20  # values of one block's logits (4 MiB in float32)

_SIGNATURE = inspect.signature(F.cross_entropy)


def blocked_cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                          ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                          *, block_rows: Optional[int] = None) -> Tensor:
    """``F.cross_entropy(input, target, ...)`` for (N, C) ``input`` and (N,) class indices,
    computed ``block_rows`` rows at a time (by default ``BLOCK_ELEMENTS // C``)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}.")
    rows = block_rows or max(1, BLOCK_ELEMENTS // input.shape[-1])
    block_reduction = "none" if reduction == "none" else "sum"
    parts = [F.cross_entropy(input[start : start + rows], target[start : start + rows], weight,
                             ignore_index=ignore_index, reduction=block_reduction, label_smoothing=label_smoothing)
             for start in range(0, input.shape[0], rows)]
    if reduction == "none":
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    if reduction == "sum":
        return total
    counted = target != ignore_index
    denominator = counted.sum() if weight is None else weight[torch.where(counted, target, 0)].masked_fill(~counted, 0).sum()
    return total / denominator.to(total.dtype)


def blocked_arguments(args: tuple, kwargs: dict) -> Optional[dict]:
    """``F.cross_entropy``'s arguments as :func:`blocked_cross_entropy`'s, or None where
    the blocked rule does not apply (fewer than ``MIN_CLASSES`` classes, not (N, C) logits
    with (N,) class indices, the deprecated ``size_average``/``reduce``)."""
    try:
        bound = _SIGNATURE.bind(*args, **kwargs)
    except TypeError:
        return None  # torch's own call raises the error
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    input, target = arguments["input"], arguments["target"]
    if arguments.pop("size_average") is not None or arguments.pop("reduce") is not None:
        return None
    if not (isinstance(input, Tensor) and isinstance(target, Tensor)):
        return None
    if input.dim() != 2 or input.shape[1] < MIN_CLASSES or target.shape != input.shape[:1]:
        return None
    if target.is_floating_point() or arguments["reduction"] not in ("mean", "sum", "none"):
        return None
    return arguments
