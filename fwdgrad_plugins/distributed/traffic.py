"""Count what a block of code sends through ``torch.distributed`` collectives.

:class:`CollectiveTraffic` wraps the collectives of ``torch.distributed`` that FSDP2 and a
data-parallel loop call (looked up at call time, so FSDP2's calls are seen) and records, per
collective, the calls and the bytes of the whole tensor each one moves: an all-gather's
gathered output, a reduce-scatter's input, an all-reduce's tensor. A ring sends about
(N − 1)/N of that per rank for an all-gather or a reduce-scatter and twice that for an
all-reduce; the counts compare runs, whatever the algorithm.

>>> import torch
>>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
>>> with CollectiveTraffic() as traffic:
...     _ = dist.all_reduce(torch.zeros(4))                               # 16 bytes
...     _ = dist.reduce_scatter_single(output=torch.zeros(2), input=torch.zeros(2))  # 8 bytes
>>> traffic.bytes, dict(traffic.calls)
(24, {'all_reduce': 1, 'reduce_scatter_single': 1})
>>> dist.destroy_process_group()
"""

from __future__ import annotations

import collections
import functools
import time

import torch.distributed as dist
from torch import Tensor

# name -> (position, keyword) of the argument whose size is counted
_COUNTED = {
    "all_gather_single": (0, "output"), "all_gather_into_tensor": (0, "output_tensor"),
    "all_gather": (0, "tensor_list"), "reduce_scatter_single": (1, "input"),
    "reduce_scatter_tensor": (1, "input"), "reduce_scatter": (1, "input_list"),
    "all_reduce": (0, "tensor"), "broadcast": (0, "tensor"), "all_to_all_single": (1, "input"),
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
            def counted(*args, _name=name, _where=position, _original=original, **kwargs):
                self.calls[_name] += 1
                position, keyword = _where
                self.sent[_name] += _nbytes(args[position] if len(args) > position else kwargs.get(keyword))
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
