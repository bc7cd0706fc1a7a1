"""Accelerate's FSDP plugin where Accelerate ignores it: say so, rather than train replicated
without a word.

Accelerate applies its FSDP plugin (``accelerate launch --use_fsdp``, an ``fsdp_config`` in
the config file, or ``Accelerator(fsdp_plugin=...)``, all of which set ``ACCELERATE_USE_FSDP``)
only on GPUs and other accelerators. On CPUs it drops the plugin, and the model trains whole
on every process. The Accelerate loop and ``FwdGradTrainer`` call :func:`warn_if_fsdp_ignored`
after the accelerator is built.

>>> from accelerate import Accelerator
>>> warn_if_fsdp_ignored(Accelerator(cpu=True))   # no FSDP asked for: silent
False
"""

from __future__ import annotations

import warnings

from accelerate.utils import DistributedType, parse_flag_from_env


def warn_if_fsdp_ignored(accelerator) -> bool:
    """Warn, and return True, if FSDP was asked for but ``accelerator`` does not shard."""
    if not parse_flag_from_env("ACCELERATE_USE_FSDP") or accelerator.distributed_type == DistributedType.FSDP:
        return False
    warnings.warn(
        f"Accelerate was configured for FSDP (ACCELERATE_USE_FSDP), but ignores its FSDP plugin on this "
        f"{accelerator.device.type} run (distributed type {accelerator.distributed_type.value}): the model "
        f"trains replicated, whole on each of the {accelerator.num_processes} process(es), with the K "
        "directional derivatives all-reduced. To shard it on CPUs, apply "
        "torch.distributed.fsdp.fully_shard yourself and launch with torchrun (see "
        "recipes/sharded_finetune.py and docs/distributed.md); on GPUs, Accelerate's FSDP2 plugin "
        "(fsdp_version: 2) shards it.",
        UserWarning, stacklevel=3,
    )
    return True
