"""Per-example weight perturbation: FG-W with a rank-one weight tangent of each example's own,
optionally restricted to the span of the example's inputs to each layer."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fwdgrad_plugins.engine.forward_mode import directional_derivatives
from fwdgrad_plugins.engine.rng_state import RngState
from fwdgrad_plugins.errors import ParametersNotUsedError
from fwdgrad_plugins.estimators.activity import (
    _SEED_PER_EXAMPLE,
    NoPerturbableLayerError,
    PerExampleLossError,
    _conv2d_columns,
    _Layer,
    activity_perturbation,
    reduced_estimate,
)
from fwdgrad_plugins.estimators.blockwise import parameter_blocks
from fwdgrad_plugins.estimators.core import Estimate, Reduce, estimate_from_derivatives
from fwdgrad_plugins.hookspecs import hookimpl
from fwdgrad_plugins.tangents.counter_rng import derive_seed
from fwdgrad_plugins.tangents.streaming import WholeTangents
from fwdgrad_plugins.tangents.tangent import TangentSampler, dense


def per_example_factors(sampler: TangentSampler, param: Tensor, index: int, batch_size: int,
                        num_directions: int, seed: int) -> list[Tensor]:
    """The per-example weight-tangent factors of ``params[index]``: for a weight of shape
    (out, *fan_in), ``[a (K, B, out), c (K, B, fan_in numel)]``, V_b = a_b c_bᵀ; for a bias,
    ``[e (K, B, out)]``. Each factor is drawn by ``sampler`` as one flat tensor, so with any
    sampler whose draws have E[v vᵀ] = I, E[vec V_b vec V_bᵀ] = I."""
    sizes = [param.shape[0], param[0].numel()] if param.dim() >= 2 else [param.numel()]
    like = [param.new_empty(batch_size * n) for n in sizes]
    drawn = sampler.sample(like, num_directions, derive_seed(seed, _SEED_PER_EXAMPLE, index))
    return [dense(t).view(num_directions, batch_size, n)
            for t, n in zip(drawn, sizes)]


def _rank_one_output_tangent(layer: _Layer, a: Tensor, c: Tensor, out_shape) -> Tensor:
    """The output tangent of a rank-one weight tangent a_b c_bᵀ per example b:
    a_b (c_b · x_{b,t}) at every token / position t. a: (B, out), c: (B, fan_in)."""
    batch = a.shape[0]
    if layer.func is F.linear:
        x = layer.input.reshape(batch, -1, layer.input.shape[-1])  # (B, T, in)
        projected = torch.bmm(x, c.to(x.dtype).unsqueeze(2))  # (B, T, 1)
        return (projected * a.to(x.dtype).unsqueeze(1)).reshape(out_shape)
    columns = _conv2d_columns(layer)  # (B, G, fan_in, L)
    projected = torch.einsum("bgil,bi->bgl", columns, c.to(columns.dtype))  # (B, G, L)
    projected = projected.repeat_interleave(a.shape[1] // columns.shape[1], dim=1)  # (B, Cout, L)
    return (projected * a.to(columns.dtype).unsqueeze(2)).reshape(out_shape)


def _input_rows(layer: _Layer) -> Tensor:
    """Each example's inputs to a layer call, as rows in the weight's fan-in space:
    (B, tokens, in) for a linear layer, (B, groups · positions, Cin/G·kh·kw) for a conv2d."""
    if layer.func is F.linear:
        return layer.input.reshape(layer.input.shape[0], -1, layer.input.shape[-1])
    columns = _conv2d_columns(layer)  # (B, G, fan_in, L)
    return columns.transpose(2, 3).reshape(columns.shape[0], -1, columns.shape[2])


def _input_row_count(layer: _Layer) -> int:
    """How many rows :func:`_input_rows` gives per example, read off the shapes (a conv2d's
    unfolded input is formed only where the span is smaller than the fan-in)."""
    if layer.func is F.linear:
        return layer.input[0].numel() // layer.input.shape[-1]
    return layer.options.get("groups", 1) * math.prod(layer.tangent.shape[2:])


def _input_span_basis(rows: Tensor) -> Tensor:
    """Per example, orthonormal columns (B, fan_in, R) whose span contains the example's R
    input rows (B, R, fan_in), R < fan_in. Householder QR gives orthonormal columns even when
    the rows are dependent or zero, and a larger span than the rows' only adds noise, never
    bias; a zero input vector gets a zero column (its gradient is zero too)."""
    rows = rows.float().transpose(1, 2)
    if rows.shape[2] == 1:  # one input vector (an MLP): x / ‖x‖, without QR's per-example cost
        return rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)
    return torch.linalg.qr(rows).Q


class PerExampleWeightTangents:
    """Per-example weight perturbation: example b's tangent on a perturbed layer's weight is
    V_b = a_b c_bᵀ (its bias's e_b), one per trained weight, shared by all the weight's calls;
    the output tangent a_b (c_b · x_b) + e_b is computed without forming V_b. The estimate is
    Σ_b s_b V_b = Aᵀ diag(s) C (Σ_b s_b e_b for the bias), s_b = d_b / K.

    ``input_span``: the estimate uses P_b c_b instead of c_b, P_b the projector onto the span
    of example b's inputs to the weight (all its calls): the derivative is the same (c_b only
    meets those inputs), the part of c_b it could not see is left out of the estimate."""

    def __init__(self, sampler: TangentSampler, num_directions: int, seed: int, trained: dict,
                 input_span: bool = False):
        self.sampler, self.num_directions, self.seed, self.trained = sampler, num_directions, seed, trained
        self.input_span = input_span
        self.factors: dict[int, list[Tensor]] = {}  # parameter index -> its factors (K, B, ·)
        self.shapes: dict[int, torch.Size] = {}
        self.bases: dict[int, Optional[Tensor]] = {}  # weight index -> its input-span basis

    def _factors(self, param: Tensor, batch_size: int) -> list[Tensor]:
        index = self.trained[id(param)]
        if index not in self.factors:
            self.factors[index] = per_example_factors(self.sampler, param, index, batch_size,
                                                      self.num_directions, self.seed)
            self.shapes[index] = param.shape
        factors = self.factors[index]
        if factors[0].shape[1] != batch_size:
            raise PerExampleLossError(
                f"a layer output has {batch_size} examples in dimension 0, another call of the same "
                f"weight had {factors[0].shape[1]}: per-example weight perturbation needs the batch "
                "first in every linear and conv2d output.")
        return factors

    def output_tangent(self, k: int, call: int, layer: _Layer, primal: Tensor) -> Tensor:
        batch = primal.shape[0]
        a, c = (f[k] for f in self._factors(layer.weight, batch))
        tangent = _rank_one_output_tangent(layer, a, c, primal.shape)
        if layer.bias is not None:
            (e,) = (f[k] for f in self._factors(layer.bias, batch))
            shape = [batch] + [1] * (primal.dim() - 1)
            shape[primal.dim() - 1 if layer.func is F.linear else 1] = e.shape[1]
            tangent = tangent + e.to(tangent.dtype).reshape(shape)
        return tangent.to(primal.dtype)

    def _basis(self, index: int, layers: list[_Layer]) -> Optional[Tensor]:
        """The input-span basis of weight ``index``, from its calls' inputs (the same primal
        inputs in every direction's pass, so computed once); None where the inputs may span
        the whole fan-in (P_b = I: nothing to project)."""
        if index not in self.bases:
            calls = [l for l in layers if self.trained[id(l.weight)] == index]
            whole_space = sum(map(_input_row_count, calls)) >= calls[0].weight[0].numel()
            self.bases[index] = None if whole_space else _input_span_basis(
                torch.cat([_input_rows(l) for l in calls], dim=1))
        return self.bases[index]

    def add_gradients(self, k: int, layers: list[_Layer], per_example: Tensor, add, first_grouped: int):
        s = per_example.sum(1)  # (B,)
        for index, factors in self.factors.items():
            if len(factors) == 2:
                a, c = factors[0][k], factors[1][k]
                basis = self._basis(index, layers) if self.input_span else None
                if basis is not None:  # P_b c_b = Q_b Q_bᵀ c_b
                    c = (basis @ (basis.transpose(1, 2) @ c.float().unsqueeze(2))).squeeze(2).to(c.dtype)
                add(index, ((a * s.to(a.dtype).unsqueeze(1)).T @ c).view(self.shapes[index]))
            else:
                add(index, s.to(factors[0].dtype) @ factors[0][k])


class PerExampleWeightPerturbation:
    """FG-W with a weight tangent of each example's own: for every trained ``F.linear`` /
    ``F.conv2d`` weight W (out × fan_in) example b gets V_b = a_b c_bᵀ (a_b, c_b independent
    draws of ``sampler``, so E[vec V_b vec V_bᵀ] = I) and its bias e_b. One forward-mode pass
    gives each example's derivative d_b = Σ_layers ∇_W ℓ_b · V_b + ∇_bias ℓ_b · e_b of its own
    share ℓ_b of the loss, and

        ĝ_W = (1/K) Σ_k Σ_b d_bk a_bk c_bkᵀ,    ĝ_bias = (1/K) Σ_k Σ_b d_bk e_bk.

    Each term is unbiased for ∇ℓ_b and the B terms are independent, so the mean over the batch
    is unbiased for ∇f with about 1/B of the variance of one tangent shared by the batch
    (when the examples' gradients agree; like Flipout, Wen et al. 2018). The layer's output
    tangent a_b (c_b · x_{b,t}) + e_b costs a matrix-vector product per example; no
    B × out × in tensor is formed. Parameters outside perturbed layers get ordinary (shared)
    weight perturbation, as with ``activity``. Examples must not interact (no BatchNorm in
    training mode), and the loss must split into one part per example, as for ``activity``.

    The tangents come from the step's seed, but the estimate depends on each process's own
    examples: ``reduce`` all-reduces the gradient estimates (``reduces_gradients``).
    K directions run as K passes.

    >>> import torch
    >>> import torch.nn.functional as F
    >>> from fwdgrad_plugins import ForwardGradientEstimator
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    >>> fg = ForwardGradientEstimator(estimator="weight-per-example", seed=0)
    >>> estimate = fg.backward(lambda: F.cross_entropy(model(x), y), model.parameters())
    >>> [tuple(g.shape) for g in estimate.grads]
    [(8, 4), (8,), (3, 8), (3,)]

    Args:
        blocks: None (one pass perturbs every layer), or ``"layer"`` / ``"parameter"``
            (:func:`fwdgrad_plugins.estimators.blockwise.parameter_blocks`): one pass per block, each
            perturbing that block alone, so a block's derivatives carry no other block's noise
            (as ``blockwise``). A block that no perturbed layer uses (an embedding) gets shared
            weight perturbation in its pass. Every pass draws the same dropout mask.
        input_span: estimate with P_b c_b in place of c_b, P_b the orthogonal projector onto
            the span of example b's inputs to the layer (its tokens, a conv's patches, every
            call of a shared weight). Example b's gradient on W is Σ_t δ_bt x_btᵀ, whose rows
            lie in that span, so ∇_W ℓ_b P_b = ∇_W ℓ_b and E[P_b c_b c_bᵀ P_b] = P_b keep the
            estimate unbiased; the derivative is unchanged (c_b meets only those inputs), and
            the in − rank(X_b) components of c_b that it could not see leave the estimate. With
            one input vector per example (an MLP) a layer's error falls from about (out + 2)(in + 2)
            to (out + 2)·3 times its gradient's square norm; where an example has at least as many
            inputs as the fan-in (most convolutions) nothing changes, and nothing is computed.
            One QR per example and weight per step (of the fan-in × inputs matrix; x/‖x‖ for
            one input). Registered as ``weight-per-example-span`` and
            ``weight-per-example-span-blockwise``.
    """

    reduces_gradients = True  # the estimate depends on each process's own examples

    def __init__(self, *, blocks: Optional[str] = None, input_span: bool = False):
        if blocks is not None:
            parameter_blocks([], blocks)  # validates the name
        self.blocks, self.input_span = blocks, input_span

    def _tangents(self, sampler: TangentSampler, num_directions: int, seed: int):
        return lambda trained: PerExampleWeightTangents(sampler, num_directions, seed, trained, self.input_span)

    def estimate(self, closure, params, *, sampler: TangentSampler, num_directions: int,
                 seed: int, reduce: Optional[Reduce] = None) -> Estimate:
        if self.blocks is None:
            loss, derivatives, grads, used = activity_perturbation(
                closure, params, sampler=sampler, num_directions=num_directions, seed=seed,
                weight_tangents=self._tangents(sampler, num_directions, seed))
            return reduced_estimate(reduce, loss, derivatives, [g if u else None for g, u in zip(grads, used)])
        return self._blockwise(closure, params, sampler, num_directions, seed, reduce)

    def _blockwise(self, closure, params, sampler, num_directions, seed, reduce) -> Estimate:
        grads: list[Optional[Tensor]] = [None] * len(params)
        parts, loss = [], None
        rng_state = RngState(params)  # every pass draws the same dropout mask
        for b, group in enumerate(parameter_blocks(params, self.blocks)):
            block, block_seed = [params[i] for i in group], derive_seed(seed, b)
            rng_state.restore()
            try:
                block_loss, derivatives, block_grads, used = activity_perturbation(
                    closure, block, sampler=sampler, num_directions=num_directions, seed=block_seed,
                    weight_tangents=self._tangents(sampler, num_directions, block_seed),
                    freeze_running_stats=b > 0)
                block_grads = [g if u else None for g, u in zip(block_grads, used)]
            except NoPerturbableLayerError:  # no F.linear / conv2d uses this block
                tangents = WholeTangents(block, sampler.sample(block, num_directions, block_seed))
                try:
                    result = directional_derivatives(closure, block, tangents)
                except ParametersNotUsedError:  # nor does anything else
                    parts.append(torch.zeros(num_directions))
                    continue
                block_loss, derivatives = result.loss, result.derivatives
                block_grads = estimate_from_derivatives(result, tangents).grads
            loss = block_loss if loss is None else loss
            parts.append(derivatives)
            for i, grad in zip(group, block_grads):
                grads[i] = grad
        if loss is None:
            raise ParametersNotUsedError(
                "the closure used none of the parameters being trained: pass the parameters of "
                "the model that the closure calls (and give frozen ones requires_grad=False).")
        return reduced_estimate(reduce, loss, torch.cat(parts), grads)


@hookimpl
def register_estimators(register):
    register("weight-per-example", PerExampleWeightPerturbation)
    register("weight-per-example-blockwise",
             lambda **options: PerExampleWeightPerturbation(**{"blocks": "layer", **options}))
    register("weight-per-example-span",
             lambda **options: PerExampleWeightPerturbation(**{"input_span": True, **options}))
    register("weight-per-example-span-blockwise",
             lambda **options: PerExampleWeightPerturbation(**{"blocks": "layer", "input_span": True, **options}))
