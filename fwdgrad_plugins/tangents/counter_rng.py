"""Counter-based random numbers for tangents: value ``i`` of stream ``seed`` is a pure function
of ``(seed, i)``.

As in JAX's and cuRAND's counter-based generators there is no generator state, so any slice
of a stream can be drawn on its own, on any device and any number of threads, and gives the
same values: tangents are regenerated from their seed rather than stored or sent, and a CPU
run and a CUDA run draw the same ones. Signs are exact; normals agree to float rounding of
log, sin and cos, which can differ in the last bit between kernels (and so between slicings);
the same call always gives the same bits.

The bits come from a keyed 32-bit integer hash (two rounds of Chris Wellons' ``lowbias32``,
keyed by 128 bits of the seed), normals from the Box–Muller transform. Everything is
elementwise torch ops, which inductor (``torch.compile``'s compiler) fuses into one
vectorised, multi-threaded kernel on the CPU: there 1.86 M normals take about 0.85 ms on two
cores, where torch's mt19937 ``normal_`` takes 4.7 ms (``benchmarks/tangent_draw.py``). Other
devices, draws inside ``torch.func`` transforms or ``TorchFunctionMode``s, and machines where
``torch.compile`` cannot build a kernel (no C++ compiler, or ``TORCH_COMPILE_DISABLE=1``) run
the same ops eagerly.

The compiled kernel uses torch internals (inductor's ``standalone_compile``, ``make_fx``,
functorch's and torch-function mode's state); all of them sit in :func:`_compiled_draw`, which
falls back to the eager ops (the public path, the same values to float rounding) on any
failure, so a torch release that changes them costs speed, never correctness.
:func:`use_compiled_kernel` turns the compiled path off or on; :func:`build_kernels` builds
the kernels up front and says how long that took (a training loop then times its steps
without the one-off build).

>>> import torch
>>> from fwdgrad_plugins.tangents.counter_rng import normal, signs
>>> z = normal(seed=7, start=0, count=6)
>>> torch.allclose(normal(seed=7, start=2, count=3), z[2:5])  # any slice, drawn on its own
True
>>> sorted(set(signs(seed=7, start=0, count=100).tolist()))
[-1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from functools import lru_cache
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

LANES = 64  # counters per unit: a kernel computes whole units, stored as contiguous runs
BLOCK = 1 << 24  # units per key: counters stay within int32
EAGER_CHUNK = 1 << 12  # units per eager pass (512 K normals): its temporaries stay a few MiB
OUT_PIECE = 1 << 20  # values per piece when drawing into a given buffer: 4 MB stay in the cache
_MASK64 = (1 << 64) - 1

# (keys, first unit, units, device) -> (units, width). keys and first are int32 tensor
# elements when traced for the compiled kernel, and Python ints in eager mode (so a CUDA draw
# copies nothing from the host).
Kernel = Callable[..., Tensor]


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 over the parts)."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (int(part) & _MASK64)) & _MASK64
        x = (x + 0x9E3779B97F4A7C15) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        x ^= x >> 31
    return x >> 1


# --------------------------------------------------------------------------- kernels (int32)


def _shift_right(x: Tensor, bits: int) -> Tensor:
    """Logical shift right of int32 values (torch's ``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def _lowbias32(x: Tensor) -> Tensor:
    x = (x ^ _shift_right(x, 16)) * 0x7FEB352D
    x = (x ^ _shift_right(x, 15)) * (0x846CA68B - (1 << 32))  # the multiplier, as an int32
    return x ^ _shift_right(x, 16)


def _hash(counter: Tensor, key0, key1) -> Tensor:
    return _lowbias32(_lowbias32(counter ^ key0) ^ key1)


def _open_unit_interval(bits: Tensor) -> Tensor:
    """(0, 1] from the top 24 bits, exact in float32."""
    return (_shift_right(bits, 8).to(torch.float32) + 1.0) * 2.0**-24


def _counters(first, units: int, device: torch.device) -> Tensor:
    """(units, LANES) counters of the units from ``first`` on."""
    counters = torch.arange(units * LANES, dtype=torch.int32, device=device) + first * LANES
    return counters.view(units, LANES)


def _normals(keys, first, units: int, device: torch.device) -> Tensor:
    """(units, 2 · LANES) N(0, 1) values: Box–Muller on two independent hashes of each
    counter, a unit's cosines then its sines (so that a CPU stores whole vectors).

    The angle is uniform in a quarter turn, reflected into a uniformly chosen quadrant by two
    sign bits, so it is uniform over the whole turn, and short polynomials replace a general
    sin and cos, which must reduce any argument."""
    counter = _counters(first, units, device)
    # sqrt(-2 ln u) / √2: the √2 that _quarter_turn_cos_sin leaves in its results
    radius = torch.sqrt(-torch.log(_open_unit_interval(_hash(counter, keys[0], keys[1]))))
    angle_bits = _hash(counter, keys[2], keys[3])
    cos, sin = _quarter_turn_cos_sin(angle_bits)
    x = torch.where((angle_bits & 1) == 0, radius, -radius) * cos
    y = torch.where((angle_bits & 2) == 0, radius, -radius) * sin
    return torch.cat([x, y], dim=1)


def _quarter_turn_cos_sin(bits: Tensor) -> tuple[Tensor, Tensor]:
    """√2 cos θ and √2 sin θ for θ uniform in (0, π/2), taken from the top 22 bits: from Taylor
    series of cos and sin of φ = θ − π/4 ∈ (−π/4, π/4), whose error is below 4e-7."""
    phi = (_shift_right(bits, 10).to(torch.float32) + 0.5) * (math.pi / 2 * 2.0**-22) - math.pi / 4
    phi2 = phi * phi
    sin_phi = phi * (1.0 + phi2 * (-1 / 6 + phi2 * (1 / 120 + phi2 * (-1 / 5040))))
    cos_phi = 1.0 + phi2 * (-1 / 2 + phi2 * (1 / 24 + phi2 * (-1 / 720 + phi2 * (1 / 40320))))
    return cos_phi - sin_phi, cos_phi + sin_phi


def _signs(keys, first, units: int, device: torch.device) -> Tensor:
    """(units, LANES) values ±1 from the top bit of each counter's hash."""
    top_bit = _shift_right(_hash(_counters(first, units, device), keys[0], keys[1]), 31)
    return 1.0 - 2.0 * top_bit.to(torch.float32)


# --------------------------------------------------------------------------- dispatch

_compile_failed = False  # a build or call failed once: draw eagerly from then on
_compiled_enabled = True


@contextlib.contextmanager
def use_compiled_kernel(enabled: bool) -> Iterator[None]:
    """Within the block, draw with the compiled CPU kernel (``True``, the default) or with
    eager torch ops only (``False``); both give the same values, to float rounding.

    >>> with use_compiled_kernel(False):
    ...     eager = normal(seed=1, start=0, count=1000)
    >>> torch.allclose(eager, normal(seed=1, start=0, count=1000), atol=1e-6)
    True
    """
    global _compiled_enabled
    previous, _compiled_enabled = _compiled_enabled, enabled
    try:
        yield
    finally:
        _compiled_enabled = previous


def build_kernels() -> float:
    """Build the compiled CPU kernels now (a few seconds, once per process) rather than on the
    first draw; returns the seconds it took (0 where draws run eagerly)."""
    started = time.perf_counter()
    for kernel in (_normals, _signs):
        _run(kernel, [0, 0, 0, 0], 0, 1, torch.device("cpu"))
    compiled = _compiled_enabled and not _compile_failed
    return time.perf_counter() - started if compiled else 0.0


@lru_cache(maxsize=None)
def _build(kernel: Kernel) -> Callable[[Tensor, int], Tensor]:
    """``kernel`` built by inductor once for any number of units, as ``(state, units) ->
    values`` with ``state`` the int32 tensor ``[key0, key1, key2, key3, first unit]``.

    The kernel is traced with a symbolic unit count and compiled by
    ``torch._inductor.standalone_compile``, so a call runs the kernel without ``torch.compile``'s
    frame evaluation and guards: a path that runs cold inside a training step, whose data has
    pushed it out of the caches. Compiled in this process
    (``compile_threads=1``): a kernel this small gains nothing from a pool of compile workers,
    which would stay alive in every training process. Called only by :func:`_compiled_draw`."""
    import torch._inductor
    import torch._inductor.config as inductor_config
    from torch.fx.experimental.proxy_tensor import make_fx

    def traced(state: Tensor, shaped: Tensor) -> Tensor:  # shaped: (units, 0), carries the count
        return kernel(state[:4], state[4], shaped.shape[0], shaped.device)

    # a large example count: inductor sizes its threading for it (a small one gives one thread)
    example = [torch.zeros(5, dtype=torch.int32), torch.empty(1 << 14, 0)]
    graph = make_fx(traced, tracing_mode="symbolic")(*example)
    # torch.utils.cpp_extension logs "No CUDA runtime is found" on a CPU-only machine: noise here
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with inductor_config.patch(compile_threads=1):
            built = torch._inductor.standalone_compile(graph, example, dynamic_shapes="from_graph")
    finally:
        quiet.setLevel(level)
    return lambda state, units: built(state, torch.empty(units, 0))


def _compiled_draw(kernel: Kernel, keys: list[int], first: int, units: int,
                   device: torch.device) -> Optional[Tensor]:
    """``kernel`` on ``units`` units from ``first`` through the compiled CPU kernel, or ``None``
    where that path is not taken: off (:func:`use_compiled_kernel`, ``TORCH_COMPILE_DISABLE=1``),
    not the CPU, inside a functorch transform (the kernel is not batched) or a
    TorchFunctionMode (it would see no ops), or after a failed build (warned once).

    The one place that touches torch internals; any failure here, an internal that a torch
    release renamed included, falls back to the eager ops."""
    global _compile_failed
    if not _compiled_enabled or _compile_failed or device.type != "cpu":
        return None
    try:
        import torch._dynamo.config as dynamo_config

        if (dynamo_config.disable or torch._C._functorch.maybe_current_level() is not None
                or torch._C._len_torch_function_stack() != 0):
            return None
        return _build(kernel)(torch.tensor([*keys, first], dtype=torch.int32), units)
    except Exception as error:  # no C++ compiler, an unsupported platform, a changed internal
        _compile_failed = True
        warnings.warn(
            f"torch.compile could not build the tangent kernel ({type(error).__name__}: "
            f"{str(error)[:200]}); tangents are drawn with eager torch ops instead: the "
            "same values (to float rounding), several times slower. Install a C++ compiler "
            "to speed them up, or set TORCH_COMPILE_DISABLE=1 to draw eagerly without this "
            "warning.",
            RuntimeWarning, stacklevel=4,
        )
        return None


def _run(kernel: Kernel, keys: list[int], first: int, units: int, device: torch.device) -> Tensor:
    """``kernel`` on ``units`` units from ``first``: compiled where it can be, else in eager
    passes of ``EAGER_CHUNK`` units."""
    compiled = _compiled_draw(kernel, keys, first, units, device)
    if compiled is not None:
        return compiled
    parts = [kernel(keys, first + offset, min(EAGER_CHUNK, units - offset), device)
             for offset in range(0, units, EAGER_CHUNK)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _keys(seed: int, block: int) -> list[int]:
    """Four keys (128 bits) for one block of a stream, as int32 values."""
    words = [derive_seed(seed, block, lane) & 0xFFFFFFFF for lane in range(4)]
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def _draw(kernel: Kernel, width: int, seed: int, start: int, count: int,
          device: Optional[torch.device], out: Optional[Tensor] = None) -> Tensor:
    """Values ``start .. start + count - 1`` of the stream, ``width`` values per unit; into
    ``out`` in pieces of ``OUT_PIECE`` values, each drawn, then copied while in the cache."""
    if out is not None:
        if out.dtype != torch.float32 or out.shape != (count,) or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous float32 tensor of shape ({count},), got "
                             f"{out.dtype} {tuple(out.shape)}: pass a slice of a flat float32 buffer.")
        for offset in range(0, count, OUT_PIECE):
            piece = out[offset : offset + OUT_PIECE]
            piece.copy_(_draw(kernel, width, seed, start + offset, piece.numel(), out.device))
        return out
    device = torch.device(device if device is not None else "cpu")
    if count == 0:
        return torch.empty(0, device=device)
    first, end = start // width, (start + count - 1) // width + 1  # units covering the range
    parts = []
    for block in range(first // BLOCK, (end - 1) // BLOCK + 1):
        lo, hi = max(first, block * BLOCK), min(end, (block + 1) * BLOCK)
        parts.append(_run(kernel, _keys(seed, block), lo - block * BLOCK, hi - lo, device).view(-1))
    values = parts[0] if len(parts) == 1 else torch.cat(parts)
    skip = start - first * width
    return values[skip : skip + count]


def normal(seed: int, start: int, count: int, device: Optional[torch.device] = None, *,
           out: Optional[Tensor] = None) -> Tensor:
    """float32 N(0, 1) values number ``start`` to ``start + count - 1`` of stream ``seed``;
    written into ``out`` (a contiguous float32 tensor of ``count`` values, on its device) if
    given, with no buffer of ``count`` values allocated (the values of a fresh draw, to the
    float rounding noted above)."""
    return _draw(_normals, 2 * LANES, seed, start, count, device, out)


def signs(seed: int, start: int, count: int, device: Optional[torch.device] = None, *,
          out: Optional[Tensor] = None) -> Tensor:
    """float32 ±1 values (each with probability 1/2) number ``start`` to ``start + count - 1``;
    ``out`` as for :func:`normal`."""
    return _draw(_signs, LANES, seed, start, count, device, out)
