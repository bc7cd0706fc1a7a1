"""The random generators a forward-mode step draws from, saved once and restored at will.

K forward passes of one step must draw the same dropout masks, and a pass that is abandoned
(``torch.func.vmap`` refusing the model) must leave no trace: both restore the CPU generator
and the generator of every CUDA device the parameters live on.

>>> import torch
>>> saved = RngState([torch.zeros(1)])
>>> first = torch.rand(1)
>>> saved.restore()
>>> torch.equal(torch.rand(1), first)
True
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor


class RngState:
    """The CPU generator's state and that of each CUDA device holding one of ``tensors``."""

    def __init__(self, tensors: Iterable[Tensor]):
        self.devices = sorted({t.device.index if t.device.index is not None else torch.cuda.current_device()
                               for t in tensors if t.device.type == "cuda"})
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(device) for device in self.devices]

    def restore(self) -> None:
        """Put every saved generator back in the state it was saved in."""
        torch.set_rng_state(self.cpu)
        for device, state in zip(self.devices, self.cuda):
            torch.cuda.set_rng_state(state, device)
