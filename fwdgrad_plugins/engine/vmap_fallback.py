"""Which models ``torch.func.vmap`` refused, so their K directions run as K forward passes.

``torch.func`` refuses some closures, e.g. BatchNorm updating its running statistics in place
during a ``jvp``. ``forward_mode`` then runs the K directions one pass each (the same
derivatives, more time) and records the parameter set here, so later steps do not try again.
An entry holds weak references: it goes with its model, and a later model can never inherit it
(as it could an ``id()``). The first fallback of a model warns, naming the op and module.

>>> import torch
>>> refused = Refusals()
>>> params = (torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(2)))
>>> refused.add(params)
>>> params in refused, params[::-1] in refused
(True, False)
"""

from __future__ import annotations

import re
import warnings
import weakref
from typing import Optional, Sequence

from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary


class Refusals:
    """Parameter sets (sequences of tensors) whose closure ``vmap`` refused."""

    def __init__(self):
        self._by_first = WeakIdKeyDictionary()  # params[0] -> weak references to all params

    def __contains__(self, params: Sequence[Tensor]) -> bool:
        refs = self._by_first.get(params[0])
        return refs is not None and len(refs) == len(params) and all(r() is p for r, p in zip(refs, params))

    def add(self, params: Sequence[Tensor]) -> None:
        self._by_first[params[0]] = [weakref.ref(p) for p in params]

    def __len__(self) -> int:
        return len(self._by_first)


def warn_fallback(error: Exception, module: Optional[str]) -> None:
    """Say once per model that ``vmap`` refused it: the op (when torch names it), the module
    that ran it, and torch's first line."""
    op = re.search(r"\((aten::[\w.]+)\)", str(error))
    first_line = (str(error).strip().splitlines() or [""])[0][:200]
    warnings.warn(
        f"torch.func.vmap refused {op.group(1) if op else 'an op'}"
        + (f" in module {module}" if module else "")
        + f" ({type(error).__name__}: {first_line}); this model's K directions run as K forward "
        "passes from now on: the same derivatives, more time.",
        RuntimeWarning, stacklevel=5,
    )
