"""The errors fwdgrad-plugins raises. Each message names the problem and the fix."""


class ForwardGradientError(RuntimeError):
    """Base class: something the user can fix; nothing was changed when it was raised."""


class LossNotScalarError(ForwardGradientError, TypeError):
    """The closure returned something other than a scalar loss tensor."""


class BackwardInClosureError(ForwardGradientError):
    """The closure called ``backward()`` or ``torch.autograd.grad``."""


class UnsupportedOperationError(ForwardGradientError):
    """An operation in the closure has no forward-mode AD rule."""


class ParametersNotUsedError(ForwardGradientError, ValueError):
    """None of the parameters being trained took part in computing the loss."""


class NonFiniteDirectionalDerivativeError(ForwardGradientError, FloatingPointError):
    """A directional derivative was NaN or infinite."""


class LossWithoutTangentError(ParametersNotUsedError):
    """The loss carries no tangent: no parameter being trained reached it (a detached
    output, an argmax), so its directional derivative would be a silent zero."""


class UnsupportedShardingError(ForwardGradientError):
    """The parameters are sharded or partitioned in a way forward gradients do not handle
    (FSDP1, DeepSpeed ZeRO-3, tensor parallelism, an unknown placement, or a torch release
    whose FSDP2 internals changed)."""
