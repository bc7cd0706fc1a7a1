"""FG-A, activity perturbation (Ren, Kornblith, Liao and Hinton, ICLR 2023): forward gradients
that perturb the outputs of linear and convolution layers instead of their weights.

Every ``F.linear`` / ``F.conv2d`` call whose weight is a trained parameter gets a random
per-example tangent ``u`` on its output ``z``. One forward-mode pass then gives each example's
directional derivative ``d_b = Σ_layers ∇_{z[b]} ℓ_b · u[b]`` of its own loss ``ℓ_b``, and
``d_b u[b]`` is an unbiased estimate of ``∇_{z[b]} ℓ_b``. The weight and bias estimates are the
local outer products that backprop would form from the same output gradient:
``ĝ_W = Σ_b (d_b u[b])ᵀ x[b]`` (unfolded for convolutions), ``ĝ_b = Σ_b d_b u[b]``. Each
activity tangent has the size of one layer's output, not of its weights, so the variance is
far lower than weight perturbation's.

Per-example losses: the estimator intercepts the closure's loss function (``F.cross_entropy``,
``F.nll_loss``, ``F.mse_loss`` and the other ``LOSS_FUNCTIONS``), evaluates it unreduced and
splits the returned loss into one part per example (dimension 0 of the layer outputs). The
closure must return that call's result, optionally multiplied or divided by constants, or
return the per-example losses itself (a vector of shape (batch,), whose mean is the loss).
Examples must not interact (no BatchNorm in training mode): each example's loss may only
depend on its own activities.

Parameters that no perturbed layer covers (LayerNorm weights, embeddings, a weight also used
outside ``F.linear``) are estimated in the same pass by weight perturbation, so every trained
parameter gets an unbiased estimate.

``reduce``: the estimates depend on each process's own examples, so, given ``reduce`` (the
mean over processes of a tensor), the estimator applies it once to all directional
derivatives and gradient estimates, concatenated: one gradient all-reduce, after which all
processes hold the same estimate.

>>> import torch
>>> import torch.nn.functional as F
>>> from fwdgrad_plugins import ForwardGradientEstimator
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
>>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
>>> fg = ForwardGradientEstimator(estimator="activity", num_directions=2, seed=0)
>>> estimate = fg.backward(lambda: F.cross_entropy(model(x), y), model.parameters())
>>> [tuple(g.shape) for g in estimate.grads]
[(8, 4), (8,), (3, 8), (3,)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

from fwdgrad_plugins.engine.closure_context import closure_context, loss_without_tangent
from fwdgrad_plugins.engine.forward_mode import _forward_ad_errors, _PerturbParameters
from fwdgrad_plugins.engine.rng_state import RngState
from fwdgrad_plugins.errors import ForwardGradientError, LossNotScalarError, ParametersNotUsedError
from fwdgrad_plugins.estimators.core import Estimate, Reduce, check_finite
from fwdgrad_plugins.hookspecs import hookimpl
from fwdgrad_plugins.tangents.counter_rng import derive_seed
from fwdgrad_plugins.tangents.tangent import TangentSampler, dense


class NoPerturbableLayerError(ForwardGradientError, ValueError):
    """Activity perturbation found no layer whose output it could perturb."""


class PerExampleLossError(ForwardGradientError, ValueError):
    """The closure's loss could not be split into one part per example."""


LOSS_FUNCTIONS = (
    F.cross_entropy, F.nll_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss,
    F.binary_cross_entropy, F.binary_cross_entropy_with_logits, F.kl_div,
)
_LAYERS = {F.linear: ("input", "weight", "bias"),
           F.conv2d: ("input", "weight", "bias", "stride", "padding", "dilation", "groups")}
_SCALINGS = {torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.mul, torch.mul,
             torch.Tensor.__truediv__, torch.Tensor.div, torch.div}
_SAME_VALUE = {torch.Tensor.float, torch.Tensor.to, torch.Tensor.clone, torch.Tensor.reshape,
               torch.Tensor.view, torch.Tensor.squeeze, torch.Tensor.mean, torch.Tensor.sum}
_SEED_ACTIVITIES, _SEED_WEIGHTS, _SEED_PER_EXAMPLE = 0, 1, 2  # derive_seed tags
_PER_EXAMPLE_HELP = (
    "activity perturbation needs one loss per example: return the result of a torch loss "
    "function (F.cross_entropy, F.nll_loss, F.mse_loss, ...; optionally times or divided by "
    "constants) from the closure, or return the per-example losses, a vector of shape (batch,)."
)


@dataclass
class _Layer:
    """One perturbed layer call: what its local outer product needs."""

    func: Callable
    weight: Tensor
    bias: Optional[Tensor]
    input: Tensor  # primal input x
    tangent: Optional[Tensor]  # the output's added tangent (u for FG-A), shaped like the output
    options: dict  # stride, padding, dilation, groups for conv2d


@dataclass
class _LossCall:
    func: Callable  # the loss function, its arguments (input first) and keyword arguments
    args: tuple
    kwargs: dict
    output: Tensor  # what the loss function returned (a dual tensor)
    per_example: Tensor  # (N,) parts whose sum is ``output``: unreduced losses / divisor
    scaled_copies: list = field(default_factory=list)  # kept alive so their ids stay unique


def _bind(func, args, kwargs, names):
    values = dict(zip(names, args), **kwargs)
    return [values.get(name) for name in names[:3]], {k: values[k] for k in names[3:] if k in values}


def _mean_divisor(func, input, target, kwargs, unreduced: Tensor) -> Tensor:
    """The number ``reduction='mean'`` divides the summed losses by."""
    if func in (F.cross_entropy, F.nll_loss) and not torch.is_floating_point(target):
        valid = target != kwargs.get("ignore_index", -100)
        weight = kwargs.get("weight")
        if weight is None:
            return valid.sum().to(unreduced.dtype)
        return (fwAD.unpack_dual(weight).primal[target.masked_fill(~valid, 0)] * valid).sum()
    if func is F.kl_div and kwargs.get("reduction") == "batchmean":
        return torch.tensor(float(input.shape[0]))
    return torch.tensor(float(unreduced.numel()))


class _PerturbActivities(_PerturbParameters):
    """The core's parameter-swapping mode, plus: perturbed outputs of the layers whose weight
    is in ``layer_weights``, recorded loss calls, and lazily drawn weight tangents for the
    parameters used elsewhere (``weight_tangent(param)``)."""

    def __init__(self, layer_weights, output_tangent, weight_tangent, trained, freeze_running_stats):
        super().__init__({}, {}, dual_tensors=True, freeze_running_stats=freeze_running_stats)
        self.layer_weights = layer_weights
        self.output_tangent = output_tangent  # (call index, _Layer, output primal) -> tangent
        self.weight_tangent = weight_tangent
        self.trained = trained
        self.layers: list[_Layer] = []
        self.loss_calls: list[_LossCall] = []
        self.scaled: dict[int, tuple[_LossCall, float]] = {}  # id(tensor) -> (loss call, factor)

    def _swap(self, value):
        key = id(value)
        if key in self.trained and key not in self.perturbed:
            self.perturbed[key] = fwAD.make_dual(value, self.weight_tangent(value))
        return super()._swap(value)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LAYERS:
            (input, weight, bias), options = _bind(func, args, kwargs, _LAYERS[func])
            if id(weight) in self.layer_weights:
                return self._perturbed_layer(func, input, weight, bias, options)
        if func in LOSS_FUNCTIONS:
            return self._loss(func, args, kwargs)
        result = super().__torch_function__(func, types, args, kwargs)
        if (func in _SCALINGS or func in _SAME_VALUE) and args and id(args[0]) in self.scaled:
            self._track_scaling(func, args, kwargs, result)
        return result

    def _perturbed_layer(self, func, input, weight, bias, options):
        self.used.add(id(weight))
        bias_estimated = bias is not None and id(bias) in self.trained
        out = func(input, weight, bias, **options)
        primal, upstream = fwAD.unpack_dual(out)
        if bias_estimated:
            self.used.add(id(bias))
        layer = _Layer(func, weight, bias if bias_estimated else None, fwAD.unpack_dual(input).primal,
                       None, options)
        layer.tangent = tangent = self.output_tangent(len(self.layers), layer, primal)
        self.layers.append(layer)
        return fwAD.make_dual(primal, tangent if upstream is None else upstream + tangent)

    def _loss(self, func, args, kwargs):
        reduction = kwargs.get("reduction", "mean")
        output = super().__torch_function__(func, (), args, kwargs)
        unreduced = super().__torch_function__(func, (), args, {**kwargs, "reduction": "none"})
        if reduction == "sum":
            per_example = unreduced
        elif reduction in ("mean", "batchmean"):
            input, target = (list(args) + [kwargs.get("input"), kwargs.get("target")])[:2]
            per_example = unreduced / _mean_divisor(func, input, target, kwargs, unreduced)
        else:
            return output
        call = _LossCall(func, tuple(args), dict(kwargs), output, per_example.reshape(-1))
        total, expected = fwAD.unpack_dual(call.per_example).primal.sum(), fwAD.unpack_dual(output).primal
        finite = bool(torch.isfinite(expected)) and bool(torch.isfinite(total))
        if finite and not torch.allclose(total.float(), expected.float(), rtol=1e-4, atol=1e-6):
            raise PerExampleLossError(
                f"{func.__name__}'s per-example losses sum to {total.item():.6g}, not to its "
                f"result {expected.item():.6g}: {_PER_EXAMPLE_HELP}")
        self.loss_calls.append(call)
        self.scaled[id(output)] = (call, 1.0)
        return output

    def _track_scaling(self, func, args, kwargs, result):
        call, factor = self.scaled[id(args[0])]
        if func in _SCALINGS:
            other = args[1] if len(args) > 1 else kwargs.get("other")
            if isinstance(other, Tensor):
                if fwAD.unpack_dual(other).tangent is not None or other.numel() != 1:
                    return
                other = other.item()
            if not isinstance(other, (int, float)):
                return
            divide = func in (torch.Tensor.__truediv__, torch.Tensor.div, torch.div)
            factor = factor / other if divide else factor * other
        elif func in (torch.Tensor.mean, torch.Tensor.sum) and args[0].numel() != 1:
            return
        self.scaled[id(result)] = (call, factor)
        call.scaled_copies.append(result)

    def per_example_parts(self, loss: Tensor, batch_size: int, groups: int) -> Tensor:
        """(batch, groups) parts of the returned loss, one per example and group (dual tensors)."""
        if groups > 1 or loss.dim() == 2:
            if tuple(loss.shape) != (batch_size, groups):
                raise PerExampleLossError(f"with {groups} groups the closure must return the "
                                          f"(batch, groups) = ({batch_size}, {groups}) local losses, "
                                          f"got shape {tuple(loss.shape)}.")
            return loss / batch_size
        if loss.dim() == 1 and loss.shape[0] == batch_size:
            return (loss / batch_size).unsqueeze(1)
        if id(loss) not in self.scaled:
            raise PerExampleLossError(f"the closure's loss does not come from a loss function this "
                                      f"estimator can split: {_PER_EXAMPLE_HELP}")
        call, factor = self.scaled[id(loss)]
        if call.per_example.numel() % batch_size:
            raise PerExampleLossError(
                f"the loss has {call.per_example.numel()} elements, not a multiple of the batch "
                f"size {batch_size} (dimension 0 of the layer outputs): {_PER_EXAMPLE_HELP}")
        return call.per_example.reshape(batch_size, -1).sum(1, keepdim=True) * factor


def _orthogonalise(tangents: Tensor) -> Tensor:
    """Per example, replace the K directions (K, B, ...) by K orthogonal ones of norm √n, drawn
    uniformly (Haar) when the input is Gaussian, so that E[u uᵀ] = I still holds."""
    k, b = tangents.shape[:2]
    n = tangents[0, 0].numel()
    if k > n:
        raise ValueError(f"cannot orthogonalise {k} directions in a layer output of {n} values "
                         "per example: use orthogonal=False or at most that many directions.")
    q, r = torch.linalg.qr(tangents.reshape(k, b, n).permute(1, 2, 0))  # (B, n, K)
    q = q * torch.sign(torch.diagonal(r, dim1=1, dim2=2)).unsqueeze(1)
    return (q.permute(2, 0, 1) * math.sqrt(n)).reshape(tangents.shape)


def _layer_gradients(layer: _Layer, output_grad: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """The weight and bias gradients that ``output_grad`` (shaped like the output) implies."""
    if layer.func is F.linear:
        g = output_grad.reshape(-1, output_grad.shape[-1])  # (rows, out)
        weight = g.T @ layer.input.reshape(-1, layer.input.shape[-1])
        return weight, (g.sum(0) if layer.bias is not None else None)
    return _conv2d_gradients(layer, output_grad)


def _conv2d_columns(layer: _Layer) -> Tensor:
    """The conv2d input unfolded per weight group: (B, G, Cin/G·kh·kw, L), L output positions."""
    weight, x = layer.weight, layer.input
    if x.dim() != 4:
        raise NoPerturbableLayerError("activity perturbation supports batched 4-D conv2d inputs "
                                      f"only, got shape {tuple(x.shape)}: add a batch dimension.")
    kernel = weight.shape[2:]
    groups = layer.options.get("groups", 1)
    stride, dilation = layer.options.get("stride", 1), layer.options.get("dilation", 1)
    padding = layer.options.get("padding", 0)
    if isinstance(padding, str):
        dilation2 = (dilation, dilation) if isinstance(dilation, int) else dilation
        if padding == "same" and any(d * (k - 1) % 2 for d, k in zip(dilation2, kernel)):
            raise NoPerturbableLayerError("padding='same' with an even effective kernel is not "
                                          "supported: pad explicitly with F.pad.")
        padding = 0 if padding == "valid" else tuple(d * (k - 1) // 2 for d, k in zip(dilation2, kernel))
    columns = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (B, Cin·kh·kw, L)
    return columns.reshape(x.shape[0], groups, -1, columns.shape[-1])


def _conv2d_gradients(layer: _Layer, output_grad: Tensor):
    columns = _conv2d_columns(layer)  # (B, G, Cin/G·kh·kw, L)
    b, out_channels = output_grad.shape[:2]
    g = output_grad.reshape(b, columns.shape[1], out_channels // columns.shape[1], -1)  # (B, G, Cout/G, L)
    grad = torch.einsum("bgol,bgil->goi", g, columns).reshape(layer.weight.shape)
    return grad, (output_grad.sum((0, 2, 3)) if layer.bias is not None else None)


def _output_scale(layer: _Layer, per_example: Tensor, grouped: bool) -> Tensor:
    """The (B, G) derivatives, shaped to multiply the layer's output tangent: summed over
    groups, or (``grouped``) group g's for the g-th equal slice of the output features."""
    tangent = layer.tangent
    if not grouped:
        return per_example.sum(1).reshape(-1, *[1] * (tangent.dim() - 1))
    feature_dim = tangent.dim() - 1 if layer.func is F.linear else 1
    features, groups = tangent.shape[feature_dim], per_example.shape[1]
    if features % groups:
        raise PerExampleLossError(f"a layer with {features} output features cannot be split into "
                                  f"{groups} groups: use a number of groups that divides it.")
    scale = per_example.repeat_interleave(features // groups, dim=1)  # (B, features)
    shape = [tangent.shape[0]] + [1] * (tangent.dim() - 1)
    shape[feature_dim] = features
    return scale.reshape(shape)


class _ActivityTangents:
    """FG-A: a per-example tangent u on each perturbed call's output (K drawn together at the
    call's first pass); the estimate is the local outer product of d_b u[b] with the input."""

    def __init__(self, draw: Callable, orthogonal: bool, trained: dict):
        self.draw, self.orthogonal, self.trained = draw, orthogonal, trained
        self.cache: dict[int, Tensor] = {}  # call index -> (K, *output shape)

    def output_tangent(self, k: int, call: int, layer: _Layer, primal: Tensor) -> Tensor:
        if call not in self.cache:
            self.cache[call] = self.draw(primal, _SEED_ACTIVITIES, call)
            if self.orthogonal:
                self.cache[call] = _orthogonalise(self.cache[call])
        return self.cache[call][k].to(primal.dtype)

    def add_gradients(self, k: int, layers: list[_Layer], per_example: Tensor, add, first_grouped: int):
        for call, layer in enumerate(layers):
            scale = _output_scale(layer, per_example, call >= first_grouped).to(layer.tangent.dtype)
            weight_grad, bias_grad = _layer_gradients(layer, layer.tangent * scale)
            add(self.trained[id(layer.weight)], weight_grad)
            if bias_grad is not None:
                add(self.trained[id(layer.bias)], bias_grad)


def activity_perturbation(closure: Callable[[], Tensor], params: Sequence[Tensor], *,
                          sampler: TangentSampler, num_directions: int, seed: int,
                          orthogonal: bool = False, freeze_running_stats: bool = False,
                          groups: int = 1, grouped_calls: int = 0,
                          weight_tangents: Optional[Callable[[dict], object]] = None):
    """The FG-A estimate, without ``reduce``: ``(loss, derivatives (K,), grads, used)``.

    K directions run as K forward-mode passes that start from one RNG state (one dropout
    mask); each layer's K tangents are drawn together at its first call.

    With ``groups`` G > 1 the closure returns (batch, G) losses, loss g depending only on the
    g-th equal slice of the output features of the last ``grouped_calls`` layer calls (local
    losses per group of units, as in Ren et al.): those slices are credited with their own
    group's derivative, every other layer with the sum over groups.

    ``weight_tangents(trained)``, given, makes the tangent scheme that perturbs the layers'
    weights instead of their outputs (``trained`` maps ``id(param)`` to its index), such as
    :class:`fwdgrad_plugins.estimators.per_example.PerExampleWeightTangents`.
    """
    if not params:
        raise ParametersNotUsedError("no parameters to train: pass the model's trainable parameters.")
    if weight_tangents is not None and (groups > 1 or orthogonal):
        raise ValueError("per-example weight perturbation takes neither groups nor orthogonal=True.")
    trained = {id(p): i for i, p in enumerate(params)}
    layer_weights = set(trained)
    weight_cache: dict[int, Tensor] = {}

    def draw(tensor, tag, index):
        tangent = sampler.sample([tensor], num_directions, derive_seed(seed, tag, index))[0]
        return dense(tangent)

    scheme = (_ActivityTangents(draw, orthogonal, trained) if weight_tangents is None
              else weight_tangents(trained))
    grads: list[Optional[Tensor]] = [None] * len(params)

    def add(index, value):
        grads[index] = value if grads[index] is None else grads[index].add_(value)

    derivatives, used, loss = [], set(), None
    rng_state = RngState(params)
    for k in range(num_directions):
        if k > 0:  # every pass draws the same dropout mask
            rng_state.restore()

        def output_tangent(call, layer, primal):
            return scheme.output_tangent(k, call, layer, primal)

        def weight_tangent(param):
            index = trained[id(param)]
            if index not in weight_cache:
                weight_cache[index] = draw(param, _SEED_WEIGHTS, index)
            return weight_cache[index][k]

        mode = _PerturbActivities(layer_weights, output_tangent, weight_tangent, trained,
                                  freeze_running_stats or k > 0)
        with torch.no_grad(), _forward_ad_errors(), closure_context(), fwAD.dual_level():
            with mode:
                returned = closure()
            if not isinstance(returned, Tensor):
                raise LossNotScalarError(f"the closure returned {type(returned).__name__}, not a "
                                         "tensor: return the loss tensor.")
            if not mode.layers:
                raise NoPerturbableLayerError(
                    "activity perturbation found no F.linear or F.conv2d call whose weight is a "
                    "trained parameter (nn.Linear, nn.Conv2d): use estimator='weight' for this model.")
            batch_size = mode.layers[0].tangent.shape[0]
            if any(layer.tangent.shape[0] != batch_size for layer in mode.layers):
                raise PerExampleLossError(
                    "the perturbed layer outputs disagree on dimension 0 "
                    f"({sorted({l.tangent.shape[0] for l in mode.layers})}): activity perturbation "
                    "needs the batch first in every linear and conv2d output.")
            parts = mode.per_example_parts(returned, batch_size, groups)
            primal_parts, tangent_parts = fwAD.unpack_dual(parts)
            if tangent_parts is None:  # no perturbed layer reached the loss
                raise loss_without_tangent()
        per_example = tangent_parts.float() / num_directions  # (B, G): d_bg / K
        if loss is None:
            loss = primal_parts.sum().detach()
        derivatives.append(per_example.sum() * num_directions)
        first_grouped = len(mode.layers) - grouped_calls if groups > 1 else len(mode.layers)
        scheme.add_gradients(k, mode.layers, per_example, add, first_grouped)
        for index, tangent in weight_cache.items():
            add(index, tangent[k] * derivatives[-1] / num_directions)
        used |= mode.used
        del mode
    derivatives = torch.stack(derivatives)
    return loss, derivatives, grads, [id(p) in used for p in params]


def reduced_estimate(reduce: Optional[Reduce], loss: Tensor, derivatives: Tensor,
                     grads: list[Optional[Tensor]]) -> Estimate:
    """The estimate after ``reduce``, applied once to the derivatives and all gradients
    concatenated; raises NonFiniteDirectionalDerivativeError unless every derivative is finite."""
    if reduce is not None:
        derivatives, grads = _reduce_together(reduce, derivatives, grads)
    check_finite(loss, derivatives)
    return Estimate(loss, derivatives, grads)


def _reduce_together(reduce: Reduce, derivatives: Tensor, grads: list[Optional[Tensor]]):
    present = [g for g in grads if g is not None]
    flat = reduce(torch.cat([derivatives.to(present[0].dtype)] + [g.reshape(-1) for g in present]))
    derivatives, offset, reduced = flat[: len(derivatives)].float(), len(derivatives), []
    for g in grads:
        if g is None:
            reduced.append(None)
            continue
        reduced.append(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return derivatives, reduced


class ActivityPerturbation:
    """FG-A: per-example activity tangents on every trained linear / conv2d output.

    Args:
        orthogonal: make each example's K tangents of a layer orthogonal (norm √n), which
            keeps the estimate unbiased with Gaussian tangents and lowers its variance.
    """

    reduces_gradients = True  # ``reduce`` all-reduces the gradient estimates, not only K floats

    def __init__(self, *, orthogonal: bool = False):
        self.orthogonal = orthogonal

    def estimate(self, closure, params, *, sampler: TangentSampler, num_directions: int,
                 seed: int, reduce: Optional[Reduce] = None) -> Estimate:
        loss, derivatives, grads, used = activity_perturbation(
            closure, params, sampler=sampler, num_directions=num_directions, seed=seed,
            orthogonal=self.orthogonal)
        return reduced_estimate(reduce, loss, derivatives, [g if u else None for g, u in zip(grads, used)])


@hookimpl
def register_estimators(register):
    register("activity", ActivityPerturbation)
