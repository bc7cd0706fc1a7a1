"""Forward gradients on sharded parameters (FSDP2). See :mod:`fwdgrad_plugins.distributed.fsdp`."""

from fwdgrad_plugins.distributed.fsdp import Sharding, sharding

__all__ = ["Sharding", "sharding"]
