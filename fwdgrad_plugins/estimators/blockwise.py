"""Lower-variance weight perturbation: orthogonal, block-wise and guided directions.

FG-W's estimate (∇f·v) v has a variance that grows with the number n of perturbed
parameters (E‖ĝ - g‖² = (n + 1)‖g‖² for one Gaussian v). The estimators and the sampler
here lower it without a backward pass:

- ``orthogonal-gaussian`` (sampler): per parameter, the K directions are orthogonalised and
  scaled to length √n (a random orthonormal frame times √n), so E[v vᵀ] = I still holds and
  FG-W stays unbiased, while the K directions never repeat each other.
- ``blockwise`` (estimator): every block (by default a layer: a weight and the 1-D parameters
  after it, such as its bias) gets directional derivatives of its own, perturbing that block
  alone, so a derivative speaks for n_b parameters, not n: block b's error is (n_b + 1)‖g_b‖²,
  without the other blocks' n_b Σ‖g_c‖². Unbiased; costs one forward pass per block (the
  primal is recomputed for each; dropout draws the same mask in every pass).
  ``blocks_per_step=m`` perturbs m random blocks per step, scaled by B/m (still unbiased).
  ``blockwise-parameter`` is ``blockwise`` with one block per tensor (a bias apart from its
  weight).
- ``blockwise-scaled`` (estimator): ``blockwise`` with each block's estimate divided by
  √(n_b + 2), its expected excess norm, so every block's update has about backprop's norm
  and one learning rate suits blocks of any size. That is a positive per-block scaling of
  an unbiased estimate: it estimates D g, not g (biased in scale, a descent direction).
- ``guided`` (estimator): direction 1 is a guess, the normalised running mean of past
  estimates, û; the other K - 1 are Gaussian directions projected off û. The estimate
  (∇f·û) û + (1/(K-1)) Σ (∇f·P v) P v is unbiased (û depends on past steps only) and has no
  error along û. Its state (the running mean) is in ``state_dict()``.

>>> import torch
>>> from fwdgrad_plugins import ForwardGradientEstimator
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
>>> x, y = torch.randn(8, 4), torch.randn(8, 1)
>>> fg = ForwardGradientEstimator(estimator="blockwise", seed=0)
>>> estimate = fg.backward(lambda: torch.nn.functional.mse_loss(model(x), y), model.parameters())
>>> estimate.directional_derivatives.shape   # one derivative per layer
torch.Size([2])
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from fwdgrad_plugins.engine.forward_mode import directional_derivatives
from fwdgrad_plugins.engine.rng_state import RngState
from fwdgrad_plugins.errors import ParametersNotUsedError
from fwdgrad_plugins.estimators.core import Estimate, Reduce, check_finite
from fwdgrad_plugins.hookspecs import hookimpl
from fwdgrad_plugins.tangents.counter_rng import derive_seed
from fwdgrad_plugins.tangents.tangent import TangentSampler, combine

__all__ = ["BlockwiseWeightPerturbation", "parameter_blocks", "size_scaled_param_groups"]


# ---- blocks of parameters --------------------------------------------------------------------

BLOCKINGS = ("layer", "parameter")


def parameter_blocks(params: Sequence[Tensor], blocks: str = "layer") -> list[list[int]]:
    """Indices of ``params`` grouped into blocks. ``"parameter"``: one block per tensor.
    ``"layer"``: a parameter of two or more dimensions and the 1-D ones that follow it (a
    layer's weight and its bias, as ``module.parameters()`` lists them); 1-D parameters
    before the first weight join it.

    >>> layer = torch.nn.Linear(3, 2)
    >>> parameter_blocks([layer.weight, layer.bias, torch.zeros(4, 4)])
    [[0, 1], [2]]
    """
    if blocks not in BLOCKINGS:
        raise ValueError(f"blocks must be one of {BLOCKINGS}, got {blocks!r}: 'layer' groups a "
                         "weight with its bias, 'parameter' makes every tensor a block.")
    if blocks == "parameter":
        return [[i] for i in range(len(params))]
    groups: list[list[int]] = []
    pending: list[int] = []  # 1-D parameters seen before any weight
    for i, p in enumerate(params):
        if p.dim() >= 2:
            groups.append(pending + [i])
            pending = []
        elif groups:
            groups[-1].append(i)
        else:
            pending.append(i)
    if pending:
        groups.append(pending)
    return groups


def size_scaled_param_groups(params, lr: float, *, blocks: str = "layer", power: float = 0.5) -> list[dict]:
    """Optimizer parameter groups with a learning rate per block, lr · (n_min / n_b)^power (n_b:
    the block's size, n_min: the smallest block's): the smallest block trains at ``lr``, a block
    100x larger at lr/10 with the default power. For an optimizer that normalises the update
    per coordinate (Adam), where scaling the estimate itself changes nothing: a block's
    forward-gradient noise grows as √n_b, so a large block needs a smaller step.

    >>> model = torch.nn.Sequential(torch.nn.Linear(100, 4), torch.nn.Linear(4, 1))
    >>> [round(g["lr"], 4) for g in size_scaled_param_groups(model.parameters(), 1e-2)]
    [0.0011, 0.01]
    """
    params = [p for p in params if p.requires_grad]
    groups = parameter_blocks(params, blocks)
    sizes = [sum(params[i].numel() for i in g) for g in groups]
    return [{"params": [params[i] for i in g], "lr": lr * (min(sizes) / n) ** power} for g, n in zip(groups, sizes)]


class BlockwiseWeightPerturbation:
    """Block-wise FG-W: each block's K directions perturb that block alone.

    For block b of n_b parameters, ĝ_b = (B/m)(1/K) Σ_k (∇_b f·v_bk) v_bk (m of the B blocks
    chosen per step, all by default), optionally times 1/√(n_b + 2) (``scale_by_size``).

    Args:
        blocks: ``"layer"`` or ``"parameter"`` (see :func:`parameter_blocks`).
        blocks_per_step: perturb this many blocks per step, chosen at random from the step's
            seed (the same on every process); None: every block.
        scale_by_size: divide each block's estimate by √(n_b + 2) (biased in scale: see the
            module's docstring).
    """

    reduces_gradients = False

    def __init__(self, *, blocks: str = "layer", blocks_per_step: Optional[int] = None,
                 scale_by_size: bool = False):
        parameter_blocks([], blocks)  # validates the name
        if blocks_per_step is not None and (isinstance(blocks_per_step, bool) or not isinstance(
                blocks_per_step, int) or blocks_per_step < 1):
            raise ValueError(f"blocks_per_step must be a positive integer or None, got {blocks_per_step!r}.")
        self.blocks, self.blocks_per_step, self.scale_by_size = blocks, blocks_per_step, scale_by_size

    def chosen_blocks(self, num_blocks: int, seed: int) -> list[int]:
        m = num_blocks if self.blocks_per_step is None else min(self.blocks_per_step, num_blocks)
        if m == num_blocks:
            return list(range(num_blocks))
        generator = torch.Generator().manual_seed(derive_seed(seed, 0xB10C) & ((1 << 62) - 1))
        return sorted(torch.randperm(num_blocks, generator=generator)[:m].tolist())

    def estimate(self, closure, params, *, sampler: TangentSampler, num_directions: int,
                 seed: int, reduce: Optional[Reduce] = None) -> Estimate:
        groups = parameter_blocks(params, self.blocks)
        chosen = self.chosen_blocks(len(groups), seed)
        tangents: dict[int, object] = {}
        parts, loss, frozen = [], None, {}
        rng_state = RngState(params)  # every pass draws the same dropout mask
        for b in chosen:
            block = [params[i] for i in groups[b]]
            drawn = sampler.sample(block, num_directions, derive_seed(seed, b))
            rng_state.restore()
            try:
                result = directional_derivatives(closure, block, drawn)
            except ParametersNotUsedError:  # this block is not used by the loss
                parts.append(torch.zeros(num_directions))
                continue
            loss = result.loss if loss is None else loss
            parts.append(result.derivatives)
            for i, t, used, rows in zip(groups[b], drawn, result.used, result.frozen_rows):
                if used:
                    tangents[i] = t
                    frozen[i] = rows
        if loss is None:
            raise ParametersNotUsedError(
                "the closure used none of the parameters being trained: pass the parameters of "
                "the model that the closure calls (and give frozen ones requires_grad=False).")
        derivatives = torch.cat(parts)
        if reduce is not None:
            derivatives = reduce(derivatives)
        check_finite(loss, derivatives)
        per_block = derivatives.view(len(chosen), num_directions) * (len(groups) / len(chosen) / num_directions)
        grads: list[Optional[Tensor]] = [None] * len(params)
        for row, b in enumerate(chosen):
            scale = 1.0
            if self.scale_by_size:
                scale = 1 / math.sqrt(sum(params[i].numel() for i in groups[b]) + 2)
            for i in groups[b]:
                if i in tangents:
                    grads[i] = combine(tangents[i], per_block[row] * scale)
                    if frozen[i]:
                        grads[i][frozen[i]] = 0
        return Estimate(loss, derivatives, grads)


@hookimpl
def register_estimators(register):
    register("blockwise", BlockwiseWeightPerturbation)
    register("blockwise-parameter", lambda **options: BlockwiseWeightPerturbation(**{"blocks": "parameter", **options}))
    register("blockwise-scaled", lambda **options: BlockwiseWeightPerturbation(**{"scale_by_size": True, **options}))
