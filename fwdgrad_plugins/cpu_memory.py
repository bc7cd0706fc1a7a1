"""Keep freed CPU memory for reuse, so that a step's large buffers do not fault in anew.

glibc's malloc gives blocks above its mmap threshold (dynamic, at most 32 MiB) back to the
system when they are freed, and trims free memory off the top of its heap. The next step's
buffers of that size are then mapped afresh, and the kernel faults in and zero-fills every
4 KiB page on its first write. A training step allocates the same buffers every time, so it
pays this on every step: forward-gradient steps with K directions the most, since their
activation tangents are K times a batch's activations (the paper CNN's are 51 MB at K = 4),
but backprop too. On a 2-core CPU the faults take about two fifths of the paper CNN's K = 4
step time and a fifth of its backprop step's (``benchmarks/step.py`` counts them per step,
and ``--keep-freed-memory`` times without them).

``keep_freed_memory()`` makes glibc serve every block from its heap and keep freed memory
there for the next step, as torch's CUDA caching allocator does on a GPU; ``empty_cache()``
gives the free part back. It trades memory for time: resident memory stays at the heap's
high-water mark, which fragmentation puts at 1.2 to 2.4 times a step's own peak in the
project's benchmarks (4.4 for the smallest). Both act on the whole process, so call them
from a training script, not from a library. Where malloc is not glibc's (macOS, Windows,
musl) they do nothing; jemalloc or tcmalloc (``LD_PRELOAD``, see ``python -m
torch.backends.xeon.run_cpu``) and torch's ``THP_MEM_ALLOC_ENABLE=1`` are the alternatives
there.

>>> from fwdgrad_plugins import cpu_memory
>>> cpu_memory.keep_freed_memory()  # doctest: +SKIP
True
"""

from __future__ import annotations

import ctypes
import functools
import platform
import warnings
from typing import Optional

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1  # free memory at the heap's top beyond this goes back; -1: never
_M_MMAP_MAX = -4  # how many blocks may be mapped on their own; 0: none, all come from the heap


@functools.cache
def _glibc() -> Optional[ctypes.CDLL]:
    """The process's glibc, or None where its C library is another."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)  # the symbols already loaded into this process
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse, for the rest of the process.

    Every block then comes from malloc's heap, however large, and freed memory stays there
    for the next allocation instead of going back to the system: a training step's buffers
    stop faulting in page by page. The process's resident memory stays at its peak until
    ``empty_cache()``. Returns whether glibc took both settings; without glibc it warns and
    returns False.
    """
    libc = _glibc()
    if libc is None:
        warnings.warn(
            "keep_freed_memory() tunes glibc's malloc, and this process's C library is not "
            "glibc; it changed nothing. Preload jemalloc or tcmalloc instead "
            "(see python -m torch.backends.xeon.run_cpu).", RuntimeWarning, stacklevel=2)
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


def empty_cache() -> bool:
    """Give the free memory that glibc's malloc holds back to the system (``malloc_trim``).

    Returns whether any went back; False without glibc.
    """
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))
