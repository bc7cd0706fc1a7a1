"""SPSA / MeZO, the zeroth-order comparator: directional derivatives from two forward passes.

Simultaneous-perturbation stochastic approximation (Spall 1992), as MeZO (Malladi et al.
2023) uses it to fine-tune language models with the memory of inference:

    d_k = (f(θ + ε z_k) − f(θ − ε z_k)) / (2ε),        g = (1/K) Σ_k d_k z_k,

with z_k drawn by the same tangent samplers, from the same seed, as the forward-gradient
estimators, so the two differ only in how d_k is computed: a finite difference of two
forward passes in place of one jvp. As ε → 0, d_k → ∇f(θ)·z_k (with error O(ε²) for a
smooth loss).

The parameters are never modified: MeZO adds ±εz to θ in place and subtracts it again, which
restores θ only up to float rounding. Here each pass runs the closure under a
``TorchFunctionMode`` that hands every torch call, in place of a trained parameter, the value
θ ± εz computed for that call alone, with z redrawn from the seed (streamed, see
:mod:`fwdgrad_plugins.tangents.streaming`): no copy of the parameters exists, only the shifted values
of the layer in use, and θ is bit for bit what it was. Every pass starts from the same RNG
state (one dropout mask for both), and BatchNorm's running statistics are updated by the
first pass only.

The reported loss is the mean of the 2K passes' losses, (f(θ + εz) + f(θ − εz)) / 2 averaged
over directions: f(θ) + O(ε²), with no third pass for f(θ) itself. As in forward mode, a
HuggingFace model builds no KV cache in the closure unless the call asks for one
(:func:`~fwdgrad_plugins.engine.closure_context.kv_cache_off`).

>>> import torch
>>> from fwdgrad_plugins import ForwardGradientEstimator
>>> model = torch.nn.Linear(4, 1)
>>> x, y = torch.randn(8, 4), torch.randn(8, 1)
>>> spsa = ForwardGradientEstimator(estimator="spsa", num_directions=2, seed=0)
>>> estimate = spsa.backward(lambda: torch.nn.functional.mse_loss(model(x), y), model.parameters())
>>> estimate.directional_derivatives.shape, model.weight.grad.shape
(torch.Size([2]), torch.Size([1, 4]))
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from fwdgrad_plugins.distributed.fsdp import refuse_sharded
from fwdgrad_plugins.engine.closure_context import kv_cache_off, reads_metadata
from fwdgrad_plugins.engine.forward_mode import (
    _BACKWARD_FUNCTIONS,
    DirectionalDerivatives,
    _check_loss,
    _with_copied_running_stats,
)
from fwdgrad_plugins.engine.row_blocks import add_product_by_rows, looked_up_rows, row_blocks_of
from fwdgrad_plugins.errors import BackwardInClosureError, ParametersNotUsedError
from fwdgrad_plugins.estimators.core import Estimate, Reduce, estimate_from_derivatives
from fwdgrad_plugins.hookspecs import hookimpl
from fwdgrad_plugins.tangents.streaming import LazyDirection, TangentStream, tangent_stream

class _ShiftParameters(TorchFunctionMode):
    """Hands torch calls θ + ``scale``·z in place of each trained parameter θ, computed per
    call from ``directions`` (a :class:`~fwdgrad_plugins.tangents.streaming.LazyDirection`: z drawn
    on lookup, a rank-one z = u wᵀ materialised for that call only)."""

    def __init__(self, directions: LazyDirection, scale: float, freeze_running_stats: bool):
        super().__init__()
        self.directions = directions
        self.scale = scale
        self.freeze_running_stats = freeze_running_stats
        self.used: set[int] = set()
        self.padding_rows: dict[int, set[int]] = {}

    def _shifted(self, param: Tensor, frozen_row: Optional[int] = None) -> Tensor:
        self.used.add(id(param))
        z = self.directions[id(param)]
        if isinstance(z, tuple):
            z = torch.outer(*z)
        if frozen_row is not None:  # autograd never updates an embedding's padding row
            z = z.clone()
            z[frozen_row] = 0
        return torch.add(param, z, alpha=self.scale)

    def _swap(self, value):
        if isinstance(value, Tensor) and id(value) in self.directions:
            return self._shifted(value)
        if type(value) in (list, tuple):
            return type(value)(self._swap(item) for item in value)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _BACKWARD_FUNCTIONS:
            raise BackwardInClosureError(
                "the closure called backward(), but the SPSA estimator needs forward passes "
                "only: return the loss from the closure without calling loss.backward() or "
                "torch.autograd.grad."
            )
        if reads_metadata(func):
            return func(*args, **kwargs)
        if self.freeze_running_stats:
            if func is F.batch_norm:
                args, kwargs = _with_copied_running_stats(args, kwargs)
            elif func is Tensor.add_ and not args[0].is_floating_point():
                return args[0]  # a step counter such as BatchNorm's num_batches_tracked
        by_rows = self._by_rows(func, args, kwargs)
        if by_rows is not None:
            return by_rows
        if func is F.embedding:
            args, kwargs = self._embedding_arguments(args, kwargs)
        args = tuple(self._swap(a) for a in args)
        kwargs = {k: self._swap(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def _by_rows(self, func, args, kwargs) -> Optional[Tensor]:
        """A call that uses a large streamed parameter, whose z is drawn a block of rows at a
        time (:mod:`~fwdgrad_plugins.engine.row_blocks`): an embedding lookup, a linear layer,
        an ``addmm``, ``narrow`` along rows. Its value at θ, plus ±ε times z's part, block by
        block, so neither z nor θ ± εz exists whole; None for any other call."""
        if not args or not isinstance(args[0], Tensor):
            return None
        if func is F.embedding:
            named = dict(zip(("input", "weight", "padding_idx", "max_norm"), args), **kwargs)
            weight, padding_idx = named.get("weight"), named.get("padding_idx")
            blocks = row_blocks_of(self.directions, weight)
            if blocks is None or named.get("max_norm") is not None:  # max_norm renormalises rows in place
                return None
            row = None if padding_idx is None else padding_idx if padding_idx >= 0 else padding_idx + weight.shape[0]
            if row is not None:
                self.padding_rows.setdefault(id(weight), set()).add(row)
            self.used.add(id(weight))
            out = func(*args, **kwargs)
            return out.add_(looked_up_rows(self.directions, id(weight), blocks, named["input"], row, out),
                            alpha=self.scale)
        if func is F.linear and 2 <= len(args) <= 3 and set(kwargs) <= {"bias"}:
            blocks = row_blocks_of(self.directions, args[1])
            if blocks is None or args[1].dim() != 2:
                return None
            x, weight = args[0], args[1]
            out = F.linear(x, weight, self._swap(args[2] if len(args) > 2 else kwargs.get("bias")))
            add_product_by_rows(self.directions, id(weight), blocks, x.reshape(-1, x.shape[-1]),
                                out.view(-1, out.shape[-1]), alpha=self.scale)
            self.used.add(id(weight))
            return out
        if func is torch.addmm and len(args) == 3 and not kwargs:
            blocks = row_blocks_of(self.directions, args[2])
            if blocks is None:
                return None
            out = torch.addmm(self._swap(args[0]), args[1], args[2])
            add_product_by_rows(self.directions, id(args[2]), blocks, args[1], out, rows_are_inputs=True,
                                alpha=self.scale)
            self.used.add(id(args[2]))
            return out
        if func in (Tensor.narrow, torch.narrow) and len(args) == 4 and args[1] in (0, -args[0].dim()):
            blocks = row_blocks_of(self.directions, args[0])
            if blocks is None:
                return None
            value, _, start, length = args
            self.used.add(id(value))
            rows = self.directions.rows(id(value), int(start), int(start) + int(length))
            return torch.add(value.narrow(0, start, length), rows.to(value.dtype), alpha=self.scale)
        return None

    def _embedding_arguments(self, args, kwargs):
        """``F.embedding``'s weight with its padding row left unshifted (and recorded)."""
        args = list(args)
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        padding_idx = args[2] if len(args) > 2 else kwargs.get("padding_idx")
        if padding_idx is None or id(weight) not in self.directions:
            return tuple(args), kwargs
        row = padding_idx if padding_idx >= 0 else padding_idx + weight.shape[0]
        self.padding_rows.setdefault(id(weight), set()).add(row)
        shifted = self._shifted(weight, frozen_row=row)
        if len(args) > 1:
            args[1] = shifted
        else:
            kwargs = {**kwargs, "weight": shifted}
        return tuple(args), kwargs


class SimultaneousPerturbation:
    """SPSA / MeZO: d_k = (f(θ + εz_k) − f(θ − εz_k)) / 2ε, g = (1/K) Σ_k d_k z_k.

    ``epsilon``: the perturbation's scale ε (MeZO's default, 1e-3). Registered as
    ``"spsa"``: ``ForwardGradient(opt, estimator="spsa")``, ``ForwardSGD(...,
    estimator="spsa")``, ``--fwdgrad_estimator spsa``, ``estimator_options={"epsilon": 1e-4}``.
    """

    reduces_gradients = False  # ``reduce`` sees the K derivatives only

    def __init__(self, epsilon: float = 1e-3):
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not (
                math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(
                f"epsilon must be a finite number > 0, got {epsilon!r}: MeZO uses 1e-3; smaller "
                "values approach the exact derivative until float32 rounding of the loss dominates."
            )
        self.epsilon = float(epsilon)

    def derivatives(self, closure, params, tangents: TangentStream) -> DirectionalDerivatives:
        """The mean loss of the 2K passes and the K finite-difference derivatives."""
        if not params:
            raise ParametersNotUsedError("no parameters to perturb: pass the model's trainable parameters.")
        refuse_sharded(params, "the SPSA estimator's derivatives")  # FSDP computes with gathered tensors
        devices = sorted({p.device.index for p in params if p.device.type == "cuda"})
        rng_state = torch.get_rng_state()
        cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
        losses, modes = [], []
        with torch.no_grad():
            for k in range(tangents.num_directions):
                directions = tangents.direction_mapping(k)
                for sign in (1.0, -1.0):
                    # Every pass starts from the same RNG state, so dropout draws one mask for all.
                    torch.set_rng_state(rng_state)
                    for device, state in zip(devices, cuda_states):
                        torch.cuda.set_rng_state(state, device)
                    mode = _ShiftParameters(directions, sign * self.epsilon,
                                            freeze_running_stats=bool(modes))
                    with mode, kv_cache_off():
                        losses.append(_check_loss(closure()).detach().double())
                    modes.append(mode)
                directions.release()
        used = set().union(*(mode.used for mode in modes))
        if not used:
            raise ParametersNotUsedError(
                "the closure used none of the parameters being trained, so the loss does not "
                "depend on them: pass the parameters of the model that the closure calls "
                "(and give frozen ones requires_grad=False)."
            )
        values = torch.stack(losses).view(-1, 2)  # (K, [plus, minus]), float64
        derivatives = ((values[:, 0] - values[:, 1]) / (2 * self.epsilon)).float()
        rows: dict[int, set[int]] = {}
        for mode in modes:
            for key, found in mode.padding_rows.items():
                rows.setdefault(key, set()).update(found)
        return DirectionalDerivatives(
            values.mean().to(losses[0].device).float(), derivatives, [id(p) in used for p in params],
            [sorted(rows.get(id(p), ())) for p in params],
        )

    def tangents(self, sampler, params, num_directions: int, seed: int) -> TangentStream:
        """The step's tangents, streamed for any K (each pass uses one direction)."""
        return tangent_stream(sampler, params, num_directions, seed)

    def estimate(self, closure, params, *, sampler, num_directions: int, seed: int,
                 reduce: Optional[Reduce] = None) -> Estimate:
        tangents = self.tangents(sampler, params, num_directions, seed)
        return estimate_from_derivatives(self.derivatives(closure, params, tangents), tangents, reduce)


@hookimpl
def register_estimators(register):
    register("spsa", SimultaneousPerturbation)
