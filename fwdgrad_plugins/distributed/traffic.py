"""Count what a block of code sends through ``torch.distributed`` collectives.

:class:`CollectiveTraffic` wraps the collectives of ``torch.distributed`` that FSDP2 and a
data-parallel loop call (looked up at call time, so FSDP2's calls are seen) and records, per
collective, the calls and the bytes of the whole tensor each one moves: an all-gather's
gathered output, a reduce-scatter's input, an all-reduce's tensor. A ring sends about
(N − 1)/N of that per rank for an all-gather or a reduce-scatter and twice that for an
all-reduce; the counts compare runs, whatever the algorithm.

>>> with CollectiveTraffic() as traffic:
...     pass
>>> traffic.bytes, dict(traffic.calls)
(0, {})
"""

from __future__ import annotations

import collections
import functools
import time

import torch.distributed as dist
from torch import Tensor

# name -> which argument holds the tensor whose size is counted
_COUNTED = {
    "all_gather_single": 0, "all_gather_into_tensor": 0, "all_gather": 0,
    "reduce_scatter_single": 1, "reduce_scatter_tensor": 1, "reduce_scatter": 1,
    "all_reduce": 0, "broadcast": 0, "all_to_all_single": 1,
}


def _nbytes(value) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


class CollectiveTraffic:
    """Within the block, ``calls[name]`` and ``sent[name]`` (bytes) for each collective, and
    ``seconds`` spent inside them (a blocking call's wait; an ``async_op`` call's launch)."""

    def __init__(self):
        self.calls: collections.Counter = collections.Counter()
        self.sent: collections.Counter = collections.Counter()
        self.seconds = 0.0
        self._saved: dict = {}

    @property
    def bytes(self) -> int:
        return sum(self.sent.values())

    def __enter__(self) -> "CollectiveTraffic":
        for name, position in _COUNTED.items():
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            @functools.wraps(original)
            def counted(*args, _name=name, _position=position, _original=original, **kwargs):
                self.calls[_name] += 1
                self.sent[_name] += _nbytes(args[_position] if len(args) > _position else None)
                started = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    self.seconds += time.perf_counter() - started

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)
        self._saved.clear()
