"""What a loss closure runs under in forward mode, and what an error inside it reports.

Torch picks some kernels that have no forward-mode AD rule, and ``torch.compile`` traces a
graph that drops dual tensors (a compiled Linear + LayerNorm MLP gives a directional
derivative of exactly 0). ``closure_context()`` runs the closure so that every op has a rule:

- compiled modules and functions run eagerly (``torch.compiler.set_stance("force_eager")``),
  so their directional derivatives are the eager model's;
- every scaled-dot-product attention, however deep (``nn.MultiheadAttention``,
  ``nn.TransformerEncoder``, torchvision's ViT, HuggingFace sdpa models), uses the math
  kernel (``torch.nn.attention.sdpa_kernel``); the fused ones have no forward-mode rule;
- recurrent modules (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) run without oneDNN (mkldnn), whose
  RNN kernel has none;
- a HuggingFace model builds no KV cache unless the call asks for one (``use_cache=True``):
  see :func:`kv_cache_off`;
- activation modules written as a chain of elementwise ops (HuggingFace's ``gelu_new``) take
  a one-kernel rule: see :mod:`~fwdgrad_plugins.engine.activations`;
- the modules being run are tracked (global forward hooks, only while the closure runs), so
  an op without a rule is reported with the module that ran it, e.g.
  ``encoder.layers.0.self_attn (MultiheadAttention)``, relative to the outermost module.

``run_closure(closure)`` also refuses a loss that carries no tangent (a detached output, an
argmax: no trainable parameter reached it), as backprop refuses one without ``grad_fn``.

>>> import torch
>>> import torch.autograd.forward_ad as fwAD
>>> model = torch.compile(torch.nn.Linear(2, 1))
>>> with fwAD.dual_level(), closure_context():
...     x = fwAD.make_dual(torch.ones(1, 2), torch.ones(1, 2))
...     fwAD.unpack_dual(model(x)).tangent.shape   # eager: the tangent survives
torch.Size([1, 1])
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from typing import Callable, Collection, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fwdgrad_plugins.engine.activations import activation_rules
from fwdgrad_plugins.engine.module_hooks import global_forward_hooks
from fwdgrad_plugins.errors import LossWithoutTangentError

MODULE_PATH = "fwdgrad_module_path"  # the attribute an error raised in a closure gets
# A compiled module called while global module hooks exist warns that the hooks see it and its
# _orig_mod; ours are installed only while a closure runs, and path() knows both. Filtered
# once here: catch_warnings() on every step would reset the warning registries, and every
# warning of the closure's own would then repeat at each step.
warnings.filterwarnings("ignore", "Using `torch.compile\\(module\\)` when there are global hooks")


class _ModuleStack:
    """The chain of modules running now, outermost first, kept by global forward hooks.

    The post-hook runs even when a module raises (``always_call``): the first module it sees
    leave with an exception in flight is the innermost one, and the path to it is recorded
    on the exception. So the stack stays right when the closure catches an error and goes on.
    Recurrent modules run with oneDNN off (their oneDNN kernel, ``mkldnn_rnn_layer``, has no
    forward-mode rule).
    """

    def __init__(self):
        self.modules: list[nn.Module] = []
        self._mkldnn: list[bool] = []  # oneDNN's setting before each recurrent module

    def _enter(self, module, args):
        self.modules.append(module)
        if isinstance(module, nn.RNNBase):
            self._mkldnn.append(torch.backends.mkldnn.enabled)
            torch.backends.mkldnn.enabled = False

    def _leave(self, module, args, output):
        error = sys.exc_info()[1] if output is None else None
        if error is not None and getattr(error, MODULE_PATH, None) is None:
            setattr(error, MODULE_PATH, self.path())
        if self.modules and self.modules[-1] is module:
            self.modules.pop()
        if isinstance(module, nn.RNNBase) and self._mkldnn:
            torch.backends.mkldnn.enabled = self._mkldnn.pop()

    @contextlib.contextmanager
    def tracking(self):
        mkldnn = torch.backends.mkldnn.enabled
        try:
            with global_forward_hooks(self._enter, self._leave):
                yield self
        finally:
            torch.backends.mkldnn.enabled = mkldnn

    def path(self) -> Optional[str]:
        """The innermost running module's path from the outermost, with its class; None
        when the error came from outside any module."""
        if not self.modules:
            return None
        root, innermost = self.modules[0], self.modules[-1]
        name = next((n for n, m in root.named_modules(remove_duplicate=False) if m is innermost), "")
        name = name.replace("_orig_mod.", "").removeprefix("_orig_mod")  # torch.compile's wrapper
        kind = type(innermost).__name__
        return f"{name} ({kind})" if name else f"{kind} (the outermost module)"


_decompositions_loaded = False


def load_decompositions_quietly() -> None:
    """torch loads its forward-AD decompositions at a process's first dual tensor (in
    ``fwAD.make_dual``, which ``torch.func.jvp`` calls too), through ``torch.jit.script``,
    which warns that it is deprecated: torch's own warning, nothing a user can act on. A
    throwaway dual loads them here, once, with that warning silenced. Call it before the first
    dual of a step is made (``catch_warnings`` around a closure would reset the warning
    registries, and the closure's own warnings would show again)."""
    global _decompositions_loaded
    if _decompositions_loaded:
        return
    _decompositions_loaded = True
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        try:
            fwAD.make_dual(torch.zeros(()), torch.zeros(()))
        except RuntimeError:  # no dual level open: the closure's first dual loads them
            pass


class _CacheOff:
    """Global forward hooks that give every model with a ``config.use_cache`` of True the
    default False while it runs, restored when it returns (or raises)."""

    def __init__(self):
        self.switched: list[tuple[nn.Module, object]] = []  # (module that switched it, its config)

    def _enter(self, module, args):
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None) is True:
            config.use_cache = False
            self.switched.append((module, config))

    def _leave(self, module, args, output):
        if self.switched and self.switched[-1][0] is module:
            self.switched.pop()[1].use_cache = True

    @contextlib.contextmanager
    def hooks(self):
        try:
            with global_forward_hooks(self._enter, self._leave):
                yield
        finally:
            while self.switched:
                self.switched.pop()[1].use_cache = True


def kv_cache_off():
    """While the block runs, HuggingFace models build no KV cache unless a call asks for one.

    A causal LM's ``config.use_cache`` is True, so a training-mode call such as
    ``model(input_ids=ids, labels=ids)`` keeps every layer's keys and values to the end of the
    pass, and in forward mode their tangents beside them (72 MiB on a 12-layer GPT-2 at
    2 × 256 tokens). A loss needs none of it. Inside this block a model whose config says
    ``use_cache=True`` runs with the config's default set to False, put back when the model
    returns; HF reads an explicit argument first, so ``model(..., use_cache=True)`` still
    builds the cache. The outputs are otherwise the same.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(vocab_size=20, n_embd=8, n_layer=1, n_head=2, n_positions=8))
    >>> ids = torch.zeros(1, 4, dtype=torch.long)
    >>> with kv_cache_off():
    ...     model(input_ids=ids).past_key_values is None, model(input_ids=ids, use_cache=True).past_key_values is None
    (True, False)
    >>> model.config.use_cache
    True
    """
    return _CacheOff().hooks()


@contextlib.contextmanager
def closure_context():
    """Run a forward-mode closure: eager, math attention, RNNs without oneDNN, no KV cache
    by default, one-kernel activation rules, modules tracked.

    An exception leaving the block carries the path of the module that raised it in its
    ``fwdgrad_module_path`` attribute (see :func:`module_path`).
    """
    load_decompositions_quietly()
    with (torch.compiler.set_stance("force_eager"), sdpa_kernel([SDPBackend.MATH]), kv_cache_off(),
          activation_rules(), _ModuleStack().tracking()):
        yield


def run_closure(closure: Callable[[], Tensor], used: Collection = ()):
    """``closure()`` under :func:`closure_context`. Call it inside a dual level or
    ``torch.func.jvp``: when the closure ``used`` parameters (a collection it fills as it
    runs) but the loss it returns carries no tangent, raises LossWithoutTangentError."""
    with closure_context():
        loss = closure()
    if used and isinstance(loss, Tensor) and fwAD.unpack_dual(loss).tangent is None:
        raise loss_without_tangent()
    return loss


def loss_without_tangent() -> LossWithoutTangentError:
    """The error for a loss that no trained parameter reached (backprop's "does not require grad")."""
    return LossWithoutTangentError(
        "the loss carries no tangent: none of the parameters being trained reached it, so "
        "its directional derivative is undefined (backprop would raise 'element 0 of "
        "tensors does not require grad'). Check that the closure calls the model whose "
        "parameters are trained and does not cut the path to the loss with .detach(), "
        ".item(), .numpy(), argmax or integer casts."
    )


def module_path(error: BaseException) -> Optional[str]:
    """The module an error raised in :func:`closure_context` came from, or None."""
    return getattr(error, MODULE_PATH, None)


_OP_NAME = re.compile(r"forward AD with (\w+) that does not support it")
_FIXES = {  # op-name fragment -> the fix for that op
    "attention": "run attention with the math SDPA kernel (fwdgrad-plugins does so for every "
                 "F.scaled_dot_product_attention it sees; a model calling a fused kernel directly "
                 "needs attn_implementation='eager' or 'sdpa')",
    "rnn": "run the recurrent layer without oneDNN: torch.backends.mkldnn.enabled = False",
    "_out": "call the op's functional form instead of its out= variant",
}


def unsupported_op_fix(message: str) -> tuple[Optional[str], str]:
    """The op an error message names (or None) and the fix that fits it."""
    found = _OP_NAME.search(message)
    op = found.group(1) if found else None
    if "custom autograd.Function" in message:
        return op, "give that torch.autograd.Function a jvp() staticmethod (its forward-mode rule)"
    for fragment, fix in _FIXES.items():
        if op is not None and fragment in op:
            return op, fix
    return op, ("use an equivalent op that has a forward-mode rule, or wrap the op in a "
                "torch.autograd.Function that defines jvp()")


# Tensor attributes and methods that read metadata only: a mode that hands torch calls another
# value for a parameter (a dual, a shifted copy) lets the parameter itself serve them.
_VALUE_PROPERTIES = frozenset({"T", "mT", "H", "mH", "real", "imag", "data"})
_METADATA_METHODS = frozenset(
    getattr(Tensor, name) for name in ("size", "dim", "numel", "nelement", "stride", "is_contiguous",
                                       "element_size", "is_floating_point", "is_complex", "storage_offset",
                                       "data_ptr", "get_device")
)


def reads_metadata(func) -> bool:
    """Whether the torch function ``func`` reads only a tensor's metadata (its shape, dtype,
    device, ...), the same for a parameter and any value that stands in for it."""
    if func in _METADATA_METHODS:
        return True
    descriptor = getattr(func, "__self__", None)
    return getattr(func, "__name__", None) == "__get__" and getattr(descriptor, "__name__", None) not in _VALUE_PROPERTIES
