"""Global forward hooks on every module, installed only while a block runs.

The closure context uses them to track the running modules, to switch a HuggingFace model's
KV cache off and to give activation modules their forward-mode rules.

>>> import torch
>>> seen = []
>>> with global_forward_hooks(lambda m, args: seen.append(type(m).__name__), lambda m, args, out: None):
...     _ = torch.nn.Sequential(torch.nn.Linear(2, 2))(torch.ones(2))
>>> seen
['Sequential', 'Linear']
"""

from __future__ import annotations

import contextlib
from typing import Callable

from torch import nn


@contextlib.contextmanager
def global_forward_hooks(enter: Callable, leave: Callable):
    """While the block runs, ``enter(module, args)`` runs before every module's forward and
    ``leave(module, args, output)`` after it, also when the forward raises (``output`` is
    then None). As with ``nn.Module`` hooks, a value either returns replaces the arguments or
    the output."""
    pre = nn.modules.module.register_module_forward_pre_hook(enter)
    post = nn.modules.module.register_module_forward_hook(leave, always_call=True)
    try:
        yield
    finally:
        pre.remove()
        post.remove()
