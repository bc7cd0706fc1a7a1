"""LG-FG-A, activity perturbation with local losses (Ren, Kornblith, Liao and Hinton, ICLR 2023).

A network is cut into blocks; every block but the last owns a small auxiliary head (average
pooling, then a linear classifier) trained with the task's loss function on the block's
output, and the input of every block is detached, so no gradient path joins two blocks. Each
block's parameters then only answer to the block's own loss, and activity perturbation
(:mod:`fwdgrad_plugins.estimators.activity`) estimates each block's gradient from that block's activities
alone: far fewer dimensions than the whole network's, so far less variance. The last block
ends in the main head and is trained on the task loss.

Groups (Ren et al.'s local greedy losses): with ``groups`` G the units of a block's output
form G groups; group g's loss is the head's loss on the whole block output with the other
groups' features detached. Its gradient on group g's units is the block loss's gradient
there, so the estimate stays unbiased for the block's local-loss gradient while each unit's
tangent is only credited with its own group's derivative: with one unit per group and
Rademacher (±1) tangents, d·v = (∂L/∂z·v)·v = ∂L/∂z is exact. The heads' own gradients are
exact too (the loss's gradient with respect to the logits comes from forward mode, one
tangent per class, and the head is linear).

``with_local_losses`` wraps an ``nn.Sequential`` (cut after each activation) or a list of
blocks into a :class:`LocalLossNetwork`; the closure stays ``loss_fn(model(x), y)``. The
``"local-activity"`` estimator runs the closure once without tangents, recording each block's
input and the loss call, then does each block's forward-mode work on its own and releases it
before the next block: tangent memory is that of one block. (Dropout inside a block draws
its mask again in that block's pass; BatchNorm running statistics update in the first run
only. Modules after a block's last linear or convolution must act on each channel separately,
e.g. activations and pooling, for the groups to hold.)

>>> import torch
>>> import torch.nn.functional as F
>>> from fwdgrad_plugins import ForwardGradientEstimator
>>> mlp = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> model = with_local_losses(mlp, num_classes=3, example_input=torch.zeros(1, 4))
>>> [len(list(block.parameters())) for block in model.blocks], len(model.heads)
([2, 2], 1)
>>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
>>> fg = ForwardGradientEstimator(estimator="local-activity", seed=0)
>>> estimate = fg.backward(lambda: F.cross_entropy(model(x), y), model.parameters())
>>> all(p.grad is not None for p in model.parameters())
True
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Optional, Sequence, Union

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from fwdgrad_plugins.engine.closure_context import closure_context
from fwdgrad_plugins.engine.forward_mode import _forward_ad_errors
from fwdgrad_plugins.errors import ForwardGradientError, LossNotScalarError
from fwdgrad_plugins.estimators.activity import _PerturbActivities, activity_perturbation, reduced_estimate
from fwdgrad_plugins.estimators.core import Estimate, Reduce
from fwdgrad_plugins.hookspecs import hookimpl
from fwdgrad_plugins.tangents.counter_rng import derive_seed
from fwdgrad_plugins.tangents.tangent import TangentSampler

ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU)


class NotLocalLossModelError(ForwardGradientError, ValueError):
    """The local-loss estimator needs a model built by ``with_local_losses``."""


class AuxiliaryHead(nn.Module):
    """Average-pools a block's output to one vector per example, then a linear classifier
    reading all of it: output (B, num_classes).

    ``groups`` G splits the block's output features (channels) into G equal groups for the
    local losses of Ren et al.: group g's loss is this head's loss with every other group's
    features detached, so a group's units answer only to the gradient of the block's loss
    with respect to themselves. The forward value is the same for every group.

    (B, C, H, W) is pooled over H and W, (B, T, C) over T, (B, C) is used as it is.
    """

    def __init__(self, features: int, num_classes: int, groups: int = 1):
        super().__init__()
        if features % groups:
            raise ValueError(f"a block output of {features} features cannot be split into "
                             f"{groups} groups: pass a number of groups that divides it.")
        self.groups = groups
        self.classifier = nn.Linear(features, num_classes)

    @staticmethod
    def pool(h: Tensor) -> Tensor:
        if h.dim() == 4:
            return h.mean((2, 3))
        if h.dim() == 3:
            return h.mean(1)
        return h.flatten(1)

    def forward(self, h: Tensor) -> Tensor:
        return self.classifier(self.pool(h))

    def group_tangents(self, h_tangent: Tensor) -> Tensor:
        """(B, G, num_classes): the tangent of the logits that each group's features alone
        cause (the head is affine in the pooled features, so this is exact)."""
        pooled = self.pool(h_tangent)
        batch, features = pooled.shape
        weight = self.classifier.weight.reshape(-1, self.groups, features // self.groups)
        return torch.einsum("bgc,kgc->bgk", pooled.reshape(batch, self.groups, -1), weight.to(pooled.dtype))


class _BlockInputs:
    """What one run of the closure records: each block's input and each network's output."""

    def __init__(self):
        self.inputs: list[tuple["LocalLossNetwork", int, Tensor]] = []
        self.outputs: dict[int, Tensor] = {}  # by id, kept alive


_recording: ContextVar[Optional[_BlockInputs]] = ContextVar("fwdgrad_block_inputs", default=None)


class LocalLossNetwork(nn.Module):
    """``blocks`` run in turn on detached inputs; ``heads[i]`` reads ``blocks[i]``'s output.

    ``forward`` returns the last block's output (the main head's); the auxiliary heads are
    used by the ``"local-activity"`` estimator, or by ``local_outputs`` for other training.
    """

    def __init__(self, blocks: Sequence[nn.Module], heads: Sequence[nn.Module]):
        super().__init__()
        if len(heads) != len(blocks) - 1:
            raise ValueError(f"{len(blocks)} blocks need {len(blocks) - 1} auxiliary heads "
                             f"(every block but the last, which ends in the main head), got {len(heads)}.")
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(heads)

    def forward(self, x: Tensor) -> Tensor:
        recording = _recording.get()
        for index, block in enumerate(self.blocks):
            x = x.detach()  # no gradient path between blocks
            if recording is not None:
                recording.inputs.append((self, index, x))
            x = block(x)
        if recording is not None:
            recording.outputs[id(x)] = x
        return x

    def local_outputs(self, x: Tensor) -> list[Tensor]:
        """Every head's output, the main one last: for training the same local losses by
        backprop (sum the losses of all outputs and call ``backward()``)."""
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x.detach())
            outputs.append(self.heads[index](x) if index < len(self.heads) else x)
        return outputs


def split_after_activations(model: nn.Sequential, activations=ACTIVATIONS) -> list[nn.Sequential]:
    """Cut ``model`` after each activation module; the rest forms the last block."""
    blocks, current = [], []
    for module in model:
        current.append(module)
        if isinstance(module, activations):
            blocks.append(nn.Sequential(*current))
            current = []
    if current:
        blocks.append(nn.Sequential(*current))
    return blocks


def with_local_losses(model: Union[nn.Sequential, Sequence[nn.Module]], num_classes: int,
                      example_input: Tensor, groups: int = 1, activations=ACTIVATIONS) -> LocalLossNetwork:
    """Wrap ``model`` into blocks with auxiliary heads of ``num_classes`` outputs.

    With ``groups`` G > 1 each block's output features form G equal groups, each with its
    own local loss: the head's loss with the other groups detached (Ren et al.'s local greedy
    losses). A group's units then answer to their own loss only, which divides the variance
    of their estimate by about G; one unit per group (G = the block's width) with Rademacher
    tangents makes it exact.

    An ``nn.Sequential`` is cut after each activation (``split_after_activations``); a list of
    modules is used as the blocks. ``example_input`` (one batch, any size) gives each block's
    output shape. The blocks share the given modules (and their parameters).
    """
    if isinstance(model, nn.Sequential):
        blocks = split_after_activations(model, activations)
    elif isinstance(model, (list, tuple, nn.ModuleList)):
        blocks = list(model)
    else:
        raise TypeError(f"with_local_losses takes an nn.Sequential or a list of blocks, got "
                        f"{type(model).__name__}: pass the model's layers as a list of blocks.")
    if len(blocks) < 2:
        raise ValueError("the model forms a single block, so there is nothing to train locally: "
                         "pass a list of blocks, or a Sequential with activations between layers.")
    heads, x = [], example_input
    with torch.no_grad():
        for block in blocks[:-1]:
            x = block(x)
            features = AuxiliaryHead.pool(x).shape[1]
            heads.append(AuxiliaryHead(features, num_classes, groups).to(x.device, x.dtype))
    return LocalLossNetwork(blocks, heads)


def _task_loss_call(mode: _PerturbActivities, recording: _BlockInputs, returned: Tensor):
    """The loss call applied to a network's output, and the factor the closure scaled it by."""
    if returned.numel() != 1:
        raise LossNotScalarError(f"the closure returned a tensor of shape {tuple(returned.shape)}: "
                                 "return the scalar loss of a torch loss function.")
    found = mode.scaled.get(id(returned))
    if found is None or id(found[0].args[0]) not in recording.outputs:
        raise NotLocalLossModelError(
            "local losses need the closure to return a torch loss function (e.g. F.cross_entropy) "
            "applied to the LocalLossNetwork's output: `lambda: F.cross_entropy(model(x), y)`.")
    return found


def _row_losses(call, logits: Tensor, rows_per_example: int) -> Tensor:
    """(B, R) losses: the task's loss function on R rows of logits per example (``logits`` of
    shape (B·R, classes)), unreduced, then averaged over each row's elements."""
    target = call.args[1] if len(call.args) > 1 else call.kwargs["target"]
    kwargs = {k: v for k, v in call.kwargs.items() if k not in ("target", "reduction")}
    unreduced = call.func(logits, target.repeat_interleave(rows_per_example, 0),
                          *call.args[2:], reduction="none", **kwargs)
    return unreduced.reshape(target.shape[0], rows_per_example, -1).mean(2)


def _logit_gradients(call, logits: Tensor) -> tuple[Tensor, Tensor]:
    """Each example's local loss (B,) and its exact gradient with respect to the example's
    logits (B, classes), from one forward-mode call of the loss function alone: the logits
    repeated once per class, with one-hot tangents (inside the caller's dual level)."""
    batch, classes = logits.shape
    rows = logits.detach().repeat_interleave(classes, 0)  # (B·classes, classes)
    one_hot = torch.eye(classes, dtype=logits.dtype, device=logits.device).repeat(batch, 1)
    losses, gradients = fwAD.unpack_dual(_row_losses(call, fwAD.make_dual(rows, one_hot), classes))
    return losses[:, 0], gradients


def _grouped_local_loss(block, head: AuxiliaryHead, x: Tensor, call, factor: float, head_grads: dict):
    """The closure of one auxiliary block for :func:`activity_perturbation`: (B, G) dual
    local losses, group g's tangent being the derivative of the block's local loss along the
    tangent of group g's units alone (Ren et al.'s losses with the other groups detached).
    Also stores the head's exact gradient in ``head_grads`` (the same in every direction)."""
    primal, tangent = fwAD.unpack_dual(block(x))
    pooled = head.pool(primal)
    logits = head.classifier(pooled)
    losses, logit_grads = _logit_gradients(call, logits)  # (B,), (B, classes)
    logit_grads = logit_grads * factor
    if not head_grads:
        scale = logit_grads / logits.shape[0]  # the local loss is a mean over the batch
        head_grads[id(head.classifier.weight)] = scale.T.to(pooled.dtype) @ pooled
        if head.classifier.bias is not None:
            head_grads[id(head.classifier.bias)] = scale.sum(0)
    if tangent is None:
        tangent = torch.zeros_like(primal)
    group_derivatives = torch.einsum("bgk,bk->bg", head.group_tangents(tangent).float(), logit_grads.float())
    group_losses = (losses * factor).unsqueeze(1).repeat(1, head.groups)
    return fwAD.make_dual(group_losses, group_derivatives.to(group_losses.dtype))


class LocalActivityPerturbation:
    """LG-FG-A: activity perturbation of each block of a :class:`LocalLossNetwork` on its own
    local loss (the last block on the task loss), one block after another.

    For an auxiliary block with G groups, the tangent on the units of group g is credited
    with the derivative of the block's local loss along that tangent alone (the logits'
    tangent that group's features cause through the head, times the loss's exact gradient
    with respect to the logits, itself from forward mode): an unbiased estimate of the local
    loss's gradient, and with one unit per group and Rademacher (±1) tangents the exact one.
    Layers of the block before its last one get the sum over groups, as in FG-A. The
    auxiliary heads' own gradients are exact (forward mode, one tangent per class).

    ``reduce`` is applied once to all derivatives and gradient estimates (see
    :mod:`fwdgrad_plugins.estimators.activity`). ``directional_derivatives`` are the sums over blocks.
    """

    reduces_gradients = True  # ``reduce`` all-reduces the gradient estimates, not only K floats

    def __init__(self, *, orthogonal: bool = False):
        self.orthogonal = orthogonal

    def estimate(self, closure, params, *, sampler: TangentSampler, num_directions: int,
                 seed: int, reduce: Optional[Reduce] = None) -> Estimate:
        recording = _BlockInputs()
        mode = _PerturbActivities(set(), None, None, {}, freeze_running_stats=False)
        token = _recording.set(recording)
        try:
            with torch.no_grad(), _forward_ad_errors(), closure_context(), fwAD.dual_level(), mode:
                returned = closure()
        finally:
            _recording.reset(token)
        if not isinstance(returned, Tensor):
            raise LossNotScalarError(f"the closure returned {type(returned).__name__}: return the loss tensor.")
        if not recording.inputs:
            raise NotLocalLossModelError(
                "the closure ran no LocalLossNetwork: wrap the model with "
                "fwdgrad_plugins.estimators.local_losses.with_local_losses(model, num_classes, example_input).")
        call, factor = _task_loss_call(mode, recording, returned)
        index_of = {id(p): i for i, p in enumerate(params)}
        grads: list[Optional[Tensor]] = [None] * len(params)

        def add(param_id, grad):
            i = index_of[param_id]
            grads[i] = grad if grads[i] is None else grads[i].add_(grad)

        total: Optional[Tensor] = None  # Σ over blocks of each direction's derivative
        for network, index, x in recording.inputs:
            block = network.blocks[index]
            head = network.heads[index] if index < len(network.heads) else None
            block_params = [p for p in block.parameters() if id(p) in index_of]
            head_grads: dict[int, Tensor] = {}
            if head is None:  # the main block: the task loss itself
                def local_loss(block=block, x=x):
                    return call.func(block(x), *call.args[1:], **call.kwargs) * factor
                groups = 1
            else:
                def local_loss(block=block, head=head, x=x, head_grads=head_grads):
                    return _grouped_local_loss(block, head, x, call, factor, head_grads)
                groups = head.groups
            if block_params:
                _, derivatives, block_grads, used = activity_perturbation(
                    local_loss, block_params, sampler=sampler, num_directions=num_directions,
                    seed=derive_seed(seed, index), orthogonal=self.orthogonal, freeze_running_stats=True,
                    groups=groups, grouped_calls=1)
                total = derivatives if total is None else total + derivatives
                for p, grad, is_used in zip(block_params, block_grads, used):
                    if is_used and grad is not None:
                        add(id(p), grad)
            elif head is not None and any(id(p) in index_of for p in head.parameters()):
                with torch.no_grad(), fwAD.dual_level():  # only the head trains: no tangents
                    local_loss()
            for param_id, grad in head_grads.items():
                if param_id in index_of:
                    add(param_id, grad)
        if total is None:
            raise NotLocalLossModelError("no block of the LocalLossNetwork has a trained parameter: "
                                         "pass the model's parameters.")
        loss = fwAD.unpack_dual(returned).primal.detach().reshape(())
        return reduced_estimate(reduce, loss, total, grads)


@hookimpl
def register_estimators(register):
    register("local-activity", LocalActivityPerturbation)
