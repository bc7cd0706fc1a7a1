"""Directional derivatives ∇f(θ)·v of a closure's loss, in forward mode, with no backward pass.

The closure runs the user's model unchanged. A ``TorchFunctionMode`` swaps each trainable
parameter for a dual tensor (primal θ, tangent v) whenever a torch function receives it, so
the model, its parameters and the optimizer are never modified. ``F.linear``, ``torch.addmm``,
``F.embedding`` and the convolutions get rules of their own: they skip the products with
absent tangents that torch's rules compute on zeros, sum the tangent in one buffer, and
apply rank-one weight tangents ``u wᵀ`` as ``(x·w) uᵀ`` in O(batch·(in + out)).
``F.cross_entropy`` over a large class dimension (a language model's vocabulary) runs a
block of rows at a time (:mod:`~fwdgrad_plugins.engine.cross_entropy`). A large streamed
tangent (an embedding, an LM head) is drawn and used a block of rows at a time by the lookup,
the linear and addmm rules and ``narrow`` (:mod:`~fwdgrad_plugins.engine.row_blocks`); reading
a parameter's metadata draws nothing.

One direction runs with ``torch.autograd.forward_ad`` dual tensors; K directions run as one
``torch.func.vmap`` over ``torch.func.jvp`` (the primal is computed once), falling back to K
single-direction passes that share one RNG state (one dropout mask) and update BatchNorm
running statistics once.

>>> import torch
>>> model = torch.nn.Linear(3, 1)
>>> x = torch.ones(2, 3)
>>> params = list(model.parameters())
>>> tangents = [torch.ones(1, *p.shape) for p in params]
>>> result = directional_derivatives(lambda: model(x).sum(), params, tangents)
>>> result.derivatives   # d/dε Σ (x (W + ε)ᵀ + b + ε) = 2 · (3 + 1)
tensor([8.])
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from fwdgrad_plugins.distributed.fsdp import refuse_sharded
from fwdgrad_plugins.engine import attention, cross_entropy
from fwdgrad_plugins.engine.closure_context import (
    load_decompositions_quietly,
    module_path,
    reads_metadata,
    run_closure,
    unsupported_op_fix,
)
from fwdgrad_plugins.engine.rng_state import RngState
from fwdgrad_plugins.engine.row_blocks import add_product_by_rows, looked_up_rows, row_blocks_of
from fwdgrad_plugins.engine.vmap_fallback import Refusals, warn_fallback
from fwdgrad_plugins.errors import (
    BackwardInClosureError,
    ForwardGradientError,
    LossNotScalarError,
    ParametersNotUsedError,
    UnsupportedOperationError,
)
from fwdgrad_plugins.tangents.streaming import LazyDirection, TangentStream, is_streamed
from fwdgrad_plugins.tangents.tangent import RankOne, Tangent, cast

_BACKWARD_FUNCTIONS = (Tensor.backward, torch.autograd.backward, torch.autograd.grad)
_CONVOLUTIONS = (F.conv1d, F.conv2d, F.conv3d)
_PRODUCTS = (Tensor.__mul__, Tensor.__rmul__, Tensor.mul, torch.mul)
_QUOTIENTS = (Tensor.__truediv__, Tensor.div, torch.div)
_NARROWS = (Tensor.narrow, torch.narrow)
_MISSING_RULE_HINTS = ("forward AD", "forward-mode", "forward mode", "jvp")


@dataclass
class DirectionalDerivatives:
    loss: Tensor  # the primal loss, a detached scalar
    derivatives: Tensor  # (K,) float32: ∇f(θ)·v_k
    used: list[bool]  # per parameter: did the closure use it?
    frozen_rows: list[list[int]]  # per parameter: rows the estimate must leave at zero


class _PerturbParameters(TorchFunctionMode):
    """Replaces parameters by their perturbed versions in every torch call of the closure.

    ``perturbed`` maps ``id(param)`` to a ready perturbed tensor (a dual). ``tangents`` maps
    ``id(param)`` to its tangent, a tensor or ``(u, w)`` for ``u wᵀ``, which the linear, addmm
    and embedding rules apply directly and which becomes a dual, once, for any other use. The
    rules unpack their inputs' duals, compute the primal and the tangent, and make the
    output's dual. ``dual_tensors`` is True for one direction (``forward_ad`` duals), False
    under ``torch.func.vmap`` over ``torch.func.jvp`` (K directions), where ``u`` arrives as
    the tangent of a dual with primal 0.
    """

    def __init__(self, perturbed, tangents, dual_tensors, freeze_running_stats=False):
        super().__init__()
        self.perturbed = perturbed
        self.tangents = tangents
        self.dual_tensors = dual_tensors
        self.freeze_running_stats = freeze_running_stats
        self.used: set[int] = set()
        self.padding_rows: dict[int, set[int]] = {}  # id(weight) -> rows no tangent may touch
        self._materialized: dict[int, Tensor] = {}

    def _swap(self, value):
        key = id(value)
        if key in self.perturbed:
            self.used.add(key)
            return self.perturbed[key]
        if key in self.tangents:
            self.used.add(key)
            if isinstance(self.tangents, LazyDirection):  # streamed: drawn per use, never kept
                return self._materialize(value, self.tangents[key])
            if key not in self._materialized:
                self._materialized[key] = self._materialize(value, self.tangents[key])
            return self._materialized[key]
        if type(value) in (list, tuple):
            return type(value)(self._swap(item) for item in value)
        return value

    def _materialize(self, param, tangent):
        """``param`` as a dual, for an op without a rule of its own: a rank-one tangent
        becomes u wᵀ."""
        tangent = torch.outer(*self._factors(param)) if isinstance(tangent, tuple) else _own_storage(tangent)
        return fwAD.make_dual(param, tangent)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _BACKWARD_FUNCTIONS:
            raise BackwardInClosureError(
                "the closure called backward(), but forward-gradient training computes the "
                "gradient estimate itself: return the loss from the closure without calling "
                "loss.backward() or torch.autograd.grad."
            )
        if reads_metadata(func):  # a parameter's shape or dtype draws no tangent
            return func(*args, **kwargs)
        if func is F.linear:
            return self._linear(*args, **kwargs)
        if func is torch.addmm:
            return self._addmm(*args, **kwargs)
        if func is F.embedding:
            return self._embedding(*args, **kwargs)
        if func in _NARROWS and row_blocks_of(self.tangents, args[0]) is not None:
            return self._narrow(*args, **kwargs)
        if func in _CONVOLUTIONS:
            return self._convolution(func, *args, **kwargs)
        if self.freeze_running_stats:
            if func is F.batch_norm:
                args, kwargs = _with_copied_running_stats(args, kwargs)
            elif func is Tensor.add_ and not args[0].is_floating_point():
                return args[0]  # a step counter such as BatchNorm's num_batches_tracked
        args = tuple(self._swap(a) for a in args)
        kwargs = {k: self._swap(v) for k, v in kwargs.items()}
        if func is F.scaled_dot_product_attention:  # closure_context() selects the math kernel
            return attention.scaled_dot_product_attention(*args, single_direction=self.dual_tensors, **kwargs)
        if func is F.cross_entropy:
            blocked = cross_entropy.blocked_arguments(args, kwargs)
            if blocked is not None and _has_tangent(blocked["input"]):
                return cross_entropy.blocked_cross_entropy(**blocked)
        if self.dual_tensors and not kwargs and len(args) == 2 and (func in _PRODUCTS or func in _QUOTIENTS):
            product = _product(func, *args)
            if product is not None:
                return product
        return func(*args, **kwargs)

    def _embedding(self, input, weight, padding_idx=None, max_norm=None, *rest, **kwargs):
        """``F.embedding``. A rank-one tangent u wᵀ gives the looked-up rows u[i] w, in
        O(tokens · dim) and without materialising u wᵀ (a vocabulary-sized matrix).

        Autograd never updates the padding row, but torch's forward-mode rule differentiates
        through it: that row gets no tangent, and is recorded so the estimate leaves it alone."""
        key = id(weight)
        blocks = row_blocks_of(self.tangents, weight)
        tangent = None if blocks is not None else self.tangents.get(key)
        padding_row = None
        if padding_idx is not None and (key in self.perturbed or tangent is not None or blocks is not None):
            padding_row = padding_idx if padding_idx >= 0 else padding_idx + weight.shape[0]
            self.padding_rows.setdefault(key, set()).add(padding_row)
        if blocks is not None and max_norm is None:  # a large streamed table: only the rows looked up
            self.used.add(key)
            out = F.embedding(input, weight, padding_idx, max_norm, *rest, **kwargs)
            return fwAD.make_dual(out, looked_up_rows(self.tangents, key, blocks, input, padding_row, out))
        if isinstance(tangent, tuple) and max_norm is None:  # max_norm renormalises rows in place
            self.used.add(key)
            out = F.embedding(input, weight, padding_idx, max_norm, *rest, **kwargs)
            return fwAD.make_dual(out, _embedding_rows(input, *self._factors(weight), padding_row))
        if padding_row is not None:
            is_padding = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
            is_padding[padding_row] = True
            weight = torch.where(is_padding, weight.detach(), self._swap(weight))
        return F.embedding(input, self._swap(weight), padding_idx, max_norm, *rest, **kwargs)

    def _narrow(self, value, dim, start, length):
        """``value.narrow(dim, start, length)`` of a streamed parameter drawn by rows: along
        dimension 0 the dual carries only those rows of the tangent, drawn alone (an LM head
        applied a block of the vocabulary at a time)."""
        dim = dim + value.dim() if dim < 0 else dim
        if dim != 0:
            return torch.narrow(self._swap(value), dim, start, length)
        self.used.add(id(value))
        rows = self.tangents.rows(id(value), int(start), int(start) + int(length))
        # The primal on a storage of its own: forward AD gives a view's whole base a tangent.
        primal = _own_storage(value.detach().narrow(0, start, length))
        return fwAD.make_dual(primal, _own_storage(rows))

    def _linear(self, input, weight, bias=None):
        if weight.dim() != 2:  # a 1-D weight (never rank-one): forward AD's own rule
            return F.linear(input, self._swap(weight), self._swap(bias) if bias is not None else None)
        x, x_t = fwAD.unpack_dual(input)
        blocks = row_blocks_of(self.tangents, weight)
        if blocks is not None:
            return self._linear_by_rows(x, x_t, weight, bias, blocks)
        w_p, w_t = self._primal_and_tangent(weight)
        b_p, b_t = self._primal_and_tangent(bias) if bias is not None else (None, None)
        out = F.linear(x, w_p, b_p)
        tangent = _linear_tangent(x, x_t, w_p, w_t, self._factors(weight), b_t, out.dtype, self.dual_tensors)
        return out if tangent is None else fwAD.make_dual(out, tangent)

    def _linear_by_rows(self, x, x_t, weight, bias, blocks):
        """``F.linear`` with a streamed weight drawn by rows (an LM head tied to a large
        embedding): the x W_tᵀ term is added a block of output features at a time, each
        block of the weight's tangent drawn, used and dropped."""
        b_p, b_t = self._primal_and_tangent(bias) if bias is not None else (None, None)
        out = F.linear(x, weight, b_p)
        tangent = _linear_tangent(x, x_t, weight, None, None, b_t, out.dtype, self.dual_tensors)
        tangent = out.new_zeros(out.shape) if tangent is None else tangent
        add_product_by_rows(self.tangents, id(weight), blocks, _rows(x), tangent.view(-1, out.shape[-1]))
        self.used.add(id(weight))
        return fwAD.make_dual(out, tangent)

    def _convolution(self, conv, input, weight, bias=None, *options, **named_options):
        """``F.conv1d/2d/3d``: the tangent conv(x_t, W) + conv(x, W_t) + b_t, with only the
        terms that have a tangent (torch's rule convolves the first layer's absent input
        tangent as zeros), summed in place in the first term's buffer: under ``vmap`` each
        term is K activations, and a new buffer for every sum costs a CPU page faults. The
        x_t term comes first: under ``vmap`` its buffer has the layout ``make_dual`` keeps,
        where the W_t term's (directions inside the channels) would be zero-filled and copied."""
        x, x_t = fwAD.unpack_dual(input)
        w_p, w_t = self._primal_and_tangent(weight)
        b_p, b_t = self._primal_and_tangent(bias) if bias is not None else (None, None)
        out = conv(x, w_p, b_p, *options, **named_options)
        tangent = None
        for a, b in ((x_t, w_p), (x, w_t)):
            if a is not None and b is not None:
                term = cast(conv(a, b, None, *options, **named_options), out.dtype)
                tangent = term if tangent is None else tangent.add_(term)
        if b_t is not None:
            b_t = cast(b_t, out.dtype).view(-1, *[1] * (out.dim() - 2))
            tangent = b_t.expand_as(out).clone() if tangent is None else tangent.add_(b_t)
        if tangent is not None and not self.dual_tensors:
            tangent = tangent.contiguous()  # the W_t term alone (first layer): directions first
        return out if tangent is None else fwAD.make_dual(out, tangent)

    def _primal_and_tangent(self, value):
        """A layer's weight or bias as (primal, dense tangent or None). A parameter's
        own tangent is used as it is: making it a dual would copy it unless it owns its storage."""
        tangent = self.tangents.get(id(value))
        if tangent is None:
            return fwAD.unpack_dual(self._swap(value))
        self.used.add(id(value))
        return value, None if isinstance(tangent, tuple) else tangent

    def _factors(self, weight):
        """The rank-one tangent ``(u, w)`` of ``weight``, or None. Under ``torch.func.jvp`` u
        arrives as the tangent of a dual with primal 0."""
        factors = self.tangents.get(id(weight))
        if not isinstance(factors, tuple):
            return None
        u, w = factors
        return (u, w) if self.dual_tensors else (fwAD.unpack_dual(u).tangent, w)

    def _addmm(self, input, mat1, mat2, *, beta=1, alpha=1, out=None):
        """``torch.addmm(b, x, W)``, as in HuggingFace's Conv1D (GPT-2): the linear layer's
        rule on Wᵀ. A rank-one tangent u wᵀ of W is w uᵀ of Wᵀ, so its term is (x·u) wᵀ, in
        O(N·(in + out)) instead of materialising u wᵀ. An addmm with alpha or beta other
        than 1, a bias of more than one dimension or ``out=`` (rare) takes torch's rule, on
        the materialised weight."""
        if alpha != 1 or beta != 1 or input.dim() != 1 or out is not None:
            args = (self._swap(input), self._swap(mat1), self._swap(mat2))
            return torch.addmm(*args, beta=beta, alpha=alpha, **({} if out is None else {"out": out}))
        x, x_t = fwAD.unpack_dual(self._swap(mat1))
        b_p, b_t = self._primal_and_tangent(input)
        blocks = row_blocks_of(self.tangents, mat2)
        if blocks is not None:  # W's rows are its inputs: x W_t = Σ_blocks x[:, rows] W_t[rows]
            result = torch.addmm(b_p, x, mat2)
            tangent = _linear_tangent(x, x_t, mat2.t(), None, None, b_t, result.dtype, self.dual_tensors)
            tangent = result.new_zeros(result.shape) if tangent is None else tangent
            add_product_by_rows(self.tangents, id(mat2), blocks, x, tangent, rows_are_inputs=True)
            self.used.add(id(mat2))
            return fwAD.make_dual(result, tangent)
        w_p, w_t = self._primal_and_tangent(mat2)
        factors = self._factors(mat2)
        result = torch.addmm(b_p, x, w_p)
        tangent = _linear_tangent(x, x_t, w_p.t(), None if w_t is None else w_t.t(),
                                  None if factors is None else factors[::-1], b_t, result.dtype, self.dual_tensors)
        return result if tangent is None else fwAD.make_dual(result, tangent)


def _linear_tangent(x, x_t, weight, weight_t, factors, bias_t, dtype, in_place) -> Optional[Tensor]:
    """The tangent of ``F.linear``: b_t + x_t Wᵀ + x W_tᵀ + (x·w) uᵀ, with only the terms
    that have a tangent (torch's rule multiplies absent ones as zeros, which ``vmap``
    materialises), in one (N, out) buffer (N: the input's leading dimensions): the first
    product starts from b_t (F.linear's addmm, or addr), so there is no pass of its own for
    the bias. None when no term has a tangent.

    With ``in_place`` the other products add to that buffer in place (addmm_/addr_), so a
    layer holds one tangent-sized temporary. Under ``vmap`` (K directions) they are computed,
    then added in place: ``vmap`` has no rule for in-place matrix products, and its addmm
    makes a pass to scale by beta.

    ``dtype`` is the primal output's: under autocast the operands are cast to it, as autocast
    casts them for F.linear (in-place ops are not autocast)."""
    x, weight, x_t, weight_t, bias_t = (cast(t, dtype) for t in (x, weight, x_t, weight_t, bias_t))
    inputs = _rows(x)  # (N, in)
    products = []  # (a, b, outer): the matrix product a bᵀ, or the outer product a ⊗ b
    if x_t is not None:
        products.append((_rows(x_t), weight, False))
    if weight_t is not None:
        products.append((inputs, weight_t, False))
    if factors is not None:
        u, w = (cast(f, dtype) for f in factors)
        products.append((torch.mv(inputs, w), u, True))  # (x·w) uᵀ
    tangent = None
    for a, b, outer in products:
        if tangent is not None:  # our own buffer
            if in_place:
                tangent = tangent.addr_(a, b) if outer else tangent.addmm_(a, b.t())
            else:
                tangent = tangent.add_(torch.outer(a, b) if outer else F.linear(a, b))
        elif not outer:
            tangent = F.linear(a, b, bias_t)
        elif bias_t is None:
            tangent = torch.outer(a, b)
        else:
            tangent = torch.addr(bias_t, a, b) if in_place else torch.outer(a, b).add_(bias_t)
    if tangent is None and bias_t is not None:  # a bias tangent alone
        tangent = bias_t.expand(inputs.shape[0], -1).clone()
    if tangent is None or x.dim() == 2:
        return tangent
    return tangent.view(*x.shape[:-1], weight.shape[0])


def _rows(x: Tensor) -> Tensor:
    """``x`` as a matrix of rows (N, features)."""
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def _embedding_rows(indices, u, w, padding_row):
    """(u wᵀ)[indices] = u[indices] wᵀ, with the padding row's entries left at zero."""
    coefficients = u[indices]
    if padding_row is not None:
        coefficients = coefficients.masked_fill(indices == padding_row, 0)
    return coefficients.unsqueeze(-1) * w


def _with_copied_running_stats(args, kwargs):
    """F.batch_norm updates running_mean/var in place; give it copies on repeated passes."""
    args = list(args)
    for position, name in ((1, "running_mean"), (2, "running_var")):
        if len(args) > position and args[position] is not None:
            args[position] = args[position].clone()
        elif kwargs.get(name) is not None:
            kwargs = {**kwargs, name: kwargs[name].clone()}
    return tuple(args), kwargs


def _check_loss(loss) -> Tensor:
    if not isinstance(loss, Tensor):
        raise LossNotScalarError(
            f"the closure returned {type(loss).__name__}, not a tensor: return the loss "
            "tensor itself, e.g. `lambda: loss_fn(model(x), y)`."
        )
    if loss.numel() != 1:
        raise LossNotScalarError(
            f"the closure returned a tensor of shape {tuple(loss.shape)}, not a scalar: reduce "
            "it to one number (e.g. `.mean()`, or a loss with reduction='mean')."
        )
    return loss.reshape(())


@contextlib.contextmanager
def _forward_ad_errors():
    """Turn torch's 'no forward-mode rule' errors into one that names the fix."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as error:
        message = str(error)
        if isinstance(error, BackwardInClosureError) or not any(
            hint in message for hint in _MISSING_RULE_HINTS
        ):
            raise
        op, fix = unsupported_op_fix(message)
        where = module_path(error)
        raise UnsupportedOperationError(
            f"{op or 'an operation'} in the closure"
            + (f", run by module {where}," if where else "")
            + f" has no forward-mode AD rule: {message.strip()}\nFix: {fix}."
        ) from error


def _result(loss, derivatives, params, modes) -> DirectionalDerivatives:
    used = set().union(*(mode.used for mode in modes))
    rows: dict[int, set[int]] = {}
    for mode in modes:
        for key, found in mode.padding_rows.items():
            rows.setdefault(key, set()).update(found)
    return DirectionalDerivatives(
        loss.detach(), derivatives, [id(p) in used for p in params],
        [sorted(rows.get(id(p), ())) for p in params],
    )


def _num_directions(tangents: Sequence[Tangent]) -> int:
    first = tangents[0]
    return first.num_directions if isinstance(first, RankOne) else first.shape[0]


def directional_derivatives(
    closure: Callable[[], Tensor], params: Sequence[Tensor], tangents: Sequence[Tangent]
) -> DirectionalDerivatives:
    """The loss ``closure()`` and its K directional derivatives along ``tangents``.

    ``params`` are the tensors being trained (each used by the closure through the model);
    ``tangents[i]`` is a (K, *params[i].shape) tensor or a :class:`RankOne`; or ``tangents``
    is a :class:`~fwdgrad_plugins.tangents.streaming.TangentStream`. A streamed one (the built-in
    samplers') draws each parameter's tangent when the closure uses it and drops it after,
    in one pass per direction (K passes for K > 1: the memory of one direction, where one
    ``vmap`` pass over whole tangents holds K copies of the parameters); a
    :class:`~fwdgrad_plugins.tangents.streaming.WholeTangents` takes the whole-tangent path.
    """
    if not params:
        raise ParametersNotUsedError("no parameters to perturb: pass the model's trainable parameters.")
    refuse_sharded(params, "directional_derivatives")  # FSDP computes with gathered tensors
    if isinstance(tangents, TangentStream) and not is_streamed(tangents):
        tangents = tangents.whole()
    with torch.no_grad(), _forward_ad_errors():
        if isinstance(tangents, TangentStream) and tangents.num_directions > 1:
            result = _sequential_directions(closure, params, tangents)
        elif isinstance(tangents, TangentStream):  # streamed, one direction
            result = _single_direction(closure, params, tangents.direction_mapping(0))
        elif _num_directions(tangents) == 1:
            result = _single_direction(closure, params, [_direction(t, 0) for t in tangents])
        else:
            result = _many_directions(closure, params, tangents)
    if not any(result.used):
        raise ParametersNotUsedError(
            "the closure used none of the parameters being trained, so the loss does not "
            "depend on them: pass the parameters of the model that the closure calls "
            "(and give frozen ones requires_grad=False)."
        )
    return result


def _product(func, a, b) -> Optional[Tensor]:
    """``a * b`` or ``a / b`` with a dual among them, primal and tangent apart; None for a call
    this does not cover (complex or integer values, a dual divisor). torch's forward-mode rule
    treats an operand without a tangent (a Python number, a constant tensor such as a rotary
    embedding's cos) as one whose tangent is zero, and in summing the product rule's two terms
    makes a full-size copy; for two duals it holds both terms before adding them. Here the
    tangent is ``a_t * b`` (``+ a * b_t`` accumulated in place): the values of torch's rule,
    one activation-sized tensor fewer at each product (a LoRA ``* scaling``, GPT-2's tanh GELU,
    Llama's gated MLP)."""
    if func in _PRODUCTS and not _has_tangent(a) and _has_tangent(b):
        a, b = b, a
    if not _has_tangent(a):
        return None
    a_p, a_t = fwAD.unpack_dual(a)
    b_p, b_t = fwAD.unpack_dual(b) if isinstance(b, Tensor) else (b, None)
    if isinstance(b_p, bool) or not isinstance(b_p, (int, float, Tensor)):
        return None
    if not a_p.is_floating_point() or (isinstance(b_p, Tensor) and not b_p.is_floating_point()):
        return None
    if func in _QUOTIENTS:
        if b_t is not None:
            return None
        return fwAD.make_dual(a_p / b_p, a_t / b_p)
    if b_t is not None and torch.result_type(a_t, b_p) != torch.result_type(a_p, b_t):
        return None  # the two terms' dtypes differ: torch's rule promotes their sum
    primal, tangent = a_p * b_p, a_t * b_p  # both of the broadcast shape
    if b_t is not None:
        tangent.addcmul_(a_p, b_t)
    return fwAD.make_dual(primal, tangent)


def _has_tangent(value) -> bool:
    return isinstance(value, Tensor) and fwAD.unpack_dual(value).tangent is not None


def _own_storage(tangent: Tensor) -> Tensor:
    """``tangent`` on a storage of its own that shares its memory. Forward AD copies a tangent
    into a fresh buffer when it makes a dual unless the tangent is all of its storage, and a
    sampler's tangents are views into one buffer (one draw for all parameters); a storage
    slice of exactly the tangent's bytes passes that check without a copy."""
    storage = tangent.untyped_storage()
    if not tangent.is_contiguous() or (tangent.storage_offset() == 0 and storage.nbytes() == tangent.nbytes):
        return tangent
    start = tangent.storage_offset() * tangent.element_size()
    own = torch.empty(0, dtype=tangent.dtype, device=tangent.device)
    return own.set_(storage[start : start + tangent.nbytes], 0, tangent.shape)


def _direction(tangent: Tangent, k: int):
    if isinstance(tangent, RankOne):
        return RankOne(tangent.u[k], tangent.w[k])
    return tangent[k]


def _single_direction(closure, params, tangents, freeze_running_stats=False):
    """``tangents``: one per parameter, or a ``LazyDirection`` (streamed)."""
    if not isinstance(tangents, LazyDirection):
        tangents = {id(p): (t.u, t.w) if isinstance(t, RankOne) else t for p, t in zip(params, tangents)}
    with fwAD.dual_level():
        mode = _PerturbParameters(
            {},
            tangents,
            dual_tensors=True,
            freeze_running_stats=freeze_running_stats,
        )
        with mode:
            loss = _check_loss(run_closure(closure, mode.used))
        primal, tangent = fwAD.unpack_dual(loss)
        derivative = torch.zeros((), dtype=torch.float32) if tangent is None else tangent.float()
    return _result(primal, derivative.reshape(1), params, [mode])


_NOT_VMAPPABLE = Refusals()  # models whose K directions run as K passes


def _many_directions(closure, params, tangents):
    if tuple(params) not in _NOT_VMAPPABLE:
        rng_state = RngState(params)
        try:
            return _vmapped_directions(closure, params, tangents)
        except ForwardGradientError:
            raise
        except Exception as error:
            # torch.func refuses some models, e.g. BatchNorm updating its running statistics
            # in place; those take one pass per direction from now on.
            _NOT_VMAPPABLE.add(tuple(params))
            rng_state.restore()
            warn_fallback(error, module_path(error))
    return _sequential_directions(closure, params, tangents)


def _vmapped_directions(closure, params, tangents):
    dense = [i for i, t in enumerate(tangents) if not isinstance(t, RankOne)]
    rank_one = [i for i, t in enumerate(tangents) if isinstance(t, RankOne)]
    primals = tuple(params[i].detach() for i in dense) + tuple(
        tangents[i].u.new_zeros(tangents[i].u.shape[1]) for i in rank_one
    )
    modes = []

    def one_direction(direction_tangents, w_factors):
        def loss_of(*values):
            mode = _PerturbParameters(
                {id(params[i]): v for i, v in zip(dense, values)},
                {id(params[i]): (u, w) for i, u, w in zip(rank_one, values[len(dense):], w_factors)},
                dual_tensors=False,
            )
            with mode:
                loss = _check_loss(run_closure(closure, mode.used))
            modes.append(mode)
            return loss

        return torch.func.jvp(loss_of, primals, direction_tangents)

    direction_tangents = tuple(_own_storage(t) for t in
                               [tangents[i] for i in dense] + [tangents[i].u for i in rank_one])
    w_factors = tuple(tangents[i].w for i in rank_one)
    load_decompositions_quietly()  # jvp makes its duals before the closure (and closure_context) runs
    losses, derivatives = torch.func.vmap(one_direction, randomness="same")(direction_tangents, w_factors)
    return _result(losses[0], derivatives.float(), params, modes)


def _sequential_directions(closure, params, tangents):
    rng_state = RngState(params)
    results = []
    streamed = isinstance(tangents, TangentStream)
    for k in range(tangents.num_directions if streamed else _num_directions(tangents)):
        # Every pass starts from the same RNG state, so dropout draws one mask for all.
        rng_state.restore()
        direction = tangents.direction_mapping(k) if streamed else [_direction(t, k) for t in tangents]
        results.append(_single_direction(closure, params, direction, freeze_running_stats=k > 0))
    return DirectionalDerivatives(
        results[0].loss,
        torch.cat([r.derivatives for r in results]),
        results[0].used,  # every pass runs the same closure
        results[0].frozen_rows,
    )
