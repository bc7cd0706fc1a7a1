"""HuggingFace ``Trainer`` with forward gradients: ``FwdGradTrainer`` and ``--optim fwdgrad``.

``FwdGradTrainingArguments`` accepts ``optim="fwdgrad"`` and the ``fwdgrad_*`` options below;
``FwdGradTrainer`` runs Trainer's own ``training_step`` with ``compute_loss`` as the closure
of ``ForwardGradientEstimator.backward`` (the estimate takes backward's place) and keeps the
rest of ``Trainer``: the inner optimizer (``--fwdgrad_inner_optim``, built by Trainer from
``--learning_rate``, ``--weight_decay``, ``--adam_*`` and ``--optim_args``), LR schedulers,
``max_grad_norm`` (the estimate sits in ``.grad``), evaluation, logging and checkpoints. On a
causal LM with a linear head, Trainer's own ``compute_loss`` gets the model's loss from
:func:`~fwdgrad_plugins.engine.lm_loss.blocked_causal_lm_loss` (the same value; the vocabulary
a block at a time, so the whole logits and their tangent never exist).

>>> import tempfile, torch
>>> from transformers import BertConfig, BertForSequenceClassification
>>> from fwdgrad_plugins import FwdGradTrainer, FwdGradTrainingArguments
>>> config = BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
...                     intermediate_size=16, max_position_embeddings=8)
>>> model = BertForSequenceClassification(config)
>>> data = [{"input_ids": torch.randint(20, (8,)), "labels": i % 2} for i in range(8)]
>>> args = FwdGradTrainingArguments(tempfile.mkdtemp(), optim="fwdgrad", fwdgrad_num_directions=2,
...                                 learning_rate=1e-3, max_steps=2, per_device_train_batch_size=4,
...                                 use_cpu=True, report_to="none", save_strategy="no")
>>> trainer = FwdGradTrainer(model=model, args=args, train_dataset=data)
>>> trainer.train().global_step  # doctest: +ELLIPSIS
{'train_runtime': ...}
2
"""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from transformers import Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

from fwdgrad_plugins import plugins
from fwdgrad_plugins.engine.lm_loss import blocked_causal_lm_loss
from fwdgrad_plugins.estimators.core import ForwardGradientEstimator, trainable_parameters
from fwdgrad_plugins.optim import NEEDS_GRAD, ForwardSGD, applies_without_grad

FWDGRAD = "fwdgrad"
FORWARD_SGD = "forward_sgd"  # --fwdgrad_inner_optim value: ForwardSGD, the update without .grad
ESTIMATOR_STATE_NAME = "forward_gradient.json"  # in each checkpoint folder, next to optimizer.pt
# An estimator's own state (tensors, e.g. the "guided" estimator's running mean), beside it.
ESTIMATOR_TENSORS_NAME = "forward_gradient_estimator.pt"
ENABLE_HINT = (
    "use `from fwdgrad_plugins import FwdGradTrainer, FwdGradTrainingArguments` in place of "
    "Trainer and TrainingArguments (HfArgumentParser(FwdGradTrainingArguments) for scripts)"
)

# Inner optimizers that update parameters inside backward() (LOMO) or from gradient hooks
# (layer-wise GaLore/APOLLO): forward-gradient training calls neither, so they would never step.
_INNER_OPTIMIZERS_NEEDING_BACKWARD = frozenset(
    name.value for name in OptimizerNames if name.value in ("lomo", "adalomo") or name.value.endswith("layerwise")
)


def _refuse_plain_trainer(context):
    raise ValueError(
        "optim='fwdgrad' needs FwdGradTrainer: the plain transformers.Trainer would train with "
        f"backpropagation. Replace `Trainer(...)` by `FwdGradTrainer(...)` ({ENABLE_HINT})."
    )


def _register_refusal_with_trainer() -> None:
    """A plain Trainer looks ``optim`` up in its (private) optimizer table when it builds the
    optimizer, before the first step: for "fwdgrad" it then raises the message of
    ``_refuse_plain_trainer``. Should a transformers release drop the table, Trainer still
    refuses, with its generic "cannot instantiate unsupported optimizer: fwdgrad"."""
    try:
        from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS
    except ImportError:
        return
    _OPTIMIZER_HANDLERS.setdefault(FWDGRAD, _refuse_plain_trainer)


_register_refusal_with_trainer()


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class FwdGradTrainingArguments(TrainingArguments):
    """``TrainingArguments`` that also accept ``optim="fwdgrad"`` (``--optim fwdgrad``).

    With ``optim="fwdgrad"``, ``FwdGradTrainer`` estimates gradients in forward mode and
    steps the inner optimizer ``fwdgrad_inner_optim``, which Trainer builds from the usual
    ``learning_rate``, ``weight_decay``, ``adam_*`` and ``optim_args``
    (``--optim_args momentum=0.9`` for SGD momentum). Every ``fwdgrad_*`` value is checked
    here, so a bad one fails before training. ``optim`` stays ``"fwdgrad"`` after
    ``__post_init__``: a plain ``Trainer`` refuses it when it builds its optimizer.

    >>> args = FwdGradTrainingArguments("out", optim="fwdgrad", fwdgrad_num_directions=4, use_cpu=True)
    >>> args.forward_gradient, args.fwdgrad_inner_optim, args.fwdgrad_seed == args.seed
    (True, 'sgd', True)
    """

    optim: str = field(
        default=TrainingArguments.__dataclass_fields__["optim"].default,
        metadata={
            "help": "The optimizer to use: 'fwdgrad' for forward-gradient training (no backward "
            "pass; see the --fwdgrad_* options), or any `OptimizerNames` value for backpropagation.",
            "choices": [FWDGRAD, *(name.value for name in OptimizerNames)],
        },
    )
    fwdgrad_num_directions: int = field(
        default=1, metadata=_help("Forward gradient: tangents averaged per micro-batch (K >= 1; "
                                  "more lowers the variance of the estimate, each costs a jvp).")
    )
    fwdgrad_tangents: str = field(
        default="gaussian", metadata=_help("Forward gradient: registered tangent sampler "
                                           "(`python -m fwdgrad_plugins list`): gaussian, rademacher, rank1-gaussian, ...")
    )
    fwdgrad_estimator: str = field(
        default="weight", metadata=_help("Forward gradient: registered gradient estimator ('weight' is the paper's FG-W).")
    )
    fwdgrad_estimator_options: Optional[str] = field(
        default=None, metadata=_help("Forward gradient: the estimator's keyword options as a JSON object, "
                                     "e.g. '{\"blocks\": \"parameter\"}' for weight-per-example-span-blockwise "
                                     "or '{\"epsilon\": 1e-3}' for spsa.")
    )
    fwdgrad_seed: Optional[int] = field(
        default=None, metadata=_help("Forward gradient: seed of the tangents (default: --seed). Every "
                                     "process uses the same one, so tangents are shared without communication.")
    )
    fwdgrad_inner_optim: str = field(
        default="sgd",
        metadata={
            "help": "Forward gradient: the optimizer that applies the estimate, any --optim value that "
            "steps from .grad (sgd as in the paper, adamw_torch, ...); it takes --learning_rate, "
            "--weight_decay, --adam_* and --optim_args. 'forward_sgd': fwdgrad_plugins.ForwardSGD, SGD "
            "applied parameter by parameter with no .grad (the least memory; --max_grad_norm does not apply).",
            "choices": sorted([FORWARD_SGD] + [name.value for name in OptimizerNames
                                               if name.value not in _INNER_OPTIMIZERS_NEEDING_BACKWARD]),
        },
    )

    def __post_init__(self):
        if self.fwdgrad_seed is None:
            self.fwdgrad_seed = self.seed
        forward_gradient = self.optim == FWDGRAD
        if forward_gradient:
            self._check_fwdgrad_options()
            # TrainingArguments checks the rest against it (ForwardSGD's options are SGD's)
            self.optim = "sgd" if self.fwdgrad_inner_optim == FORWARD_SGD else self.fwdgrad_inner_optim
        else:
            self._warn_if_fwdgrad_options_unused()
        super().__post_init__()
        if forward_gradient:
            self.optim = FWDGRAD

    @property
    def estimator_options(self) -> dict:
        """``--fwdgrad_estimator_options`` read as keyword arguments (``{}`` when not given)."""
        if self.fwdgrad_estimator_options in (None, ""):
            return {}
        if isinstance(self.fwdgrad_estimator_options, dict):
            return dict(self.fwdgrad_estimator_options)
        try:
            options = json.loads(self.fwdgrad_estimator_options)
        except json.JSONDecodeError as error:
            options = error
        if not isinstance(options, dict):
            raise ValueError(f"--fwdgrad_estimator_options must be a JSON object such as "
                             f"'{{\"blocks\": \"parameter\"}}', got {self.fwdgrad_estimator_options!r}.")
        return options

    @property
    def forward_gradient(self) -> bool:
        """True when training runs with forward gradients (``optim="fwdgrad"``)."""
        return self.optim == FWDGRAD

    def _check_fwdgrad_options(self) -> None:
        n = self.fwdgrad_num_directions
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(
                f"--fwdgrad_num_directions must be an integer >= 1, got {n!r}: use 1 for the "
                "paper's estimator, more to lower its variance."
            )
        for kind, option in (("tangent_samplers", "fwdgrad_tangents"), ("estimators", "fwdgrad_estimator")):
            try:
                plugins.get(kind, getattr(self, option))
            except plugins.UnknownNameError as error:
                raise ValueError(f"--{option}: {error}") from None
        options = self.estimator_options
        try:
            estimator = plugins.get("estimators", self.fwdgrad_estimator)(**options)
        except (TypeError, ValueError) as error:
            raise ValueError(f"--fwdgrad_estimator_options {json.dumps(options)} do not fit --fwdgrad_estimator "
                             f"{self.fwdgrad_estimator}: {error}") from None
        inner = str(getattr(self.fwdgrad_inner_optim, "value", self.fwdgrad_inner_optim))
        known = {name.value for name in OptimizerNames} | {FORWARD_SGD}
        if inner not in known or inner in _INNER_OPTIMIZERS_NEEDING_BACKWARD:
            why = ("updates parameters during backward(), which forward-gradient training never calls"
                   if inner in known else "is not an optimizer Trainer knows")
            usable = ", ".join(sorted(known - _INNER_OPTIMIZERS_NEEDING_BACKWARD))
            raise ValueError(f"--fwdgrad_inner_optim {inner!r} {why}: choose one of {usable}.")
        if inner == FORWARD_SGD:
            if not applies_without_grad(estimator):
                raise ValueError(
                    f"--fwdgrad_estimator {self.fwdgrad_estimator} {NEEDS_GRAD} (--fwdgrad_inner_optim "
                    "forward_sgd): pass --fwdgrad_inner_optim sgd (or another optimizer that steps from "
                    ".grad), or --fwdgrad_estimator weight or spsa.")
        self.fwdgrad_inner_optim = inner

    def _warn_if_fwdgrad_options_unused(self) -> None:
        defaults = type(self).__dataclass_fields__
        changed = [name for name in ("fwdgrad_num_directions", "fwdgrad_tangents", "fwdgrad_estimator",
                                     "fwdgrad_estimator_options", "fwdgrad_inner_optim")
                   if getattr(self, name) != defaults[name].default]
        if changed:
            warnings.warn(
                f"{', '.join('--' + name for name in changed)} set but --optim is {self.optim!r}, so "
                "training uses backpropagation: pass --optim fwdgrad to train with forward gradients.",
                UserWarning, stacklevel=_callers_stacklevel(),
            )


def _callers_stacklevel() -> int:
    """The ``stacklevel`` that attributes a warning, raised by the function calling this one
    while arguments are built, to the user's code: the first frame outside this module,
    dataclasses' generated ``__init__`` (``<string>``) and transformers (``HfArgumentParser``,
    ``TrainingArguments``)."""
    import transformers

    skipped = (os.path.dirname(os.path.abspath(transformers.__file__)), os.path.abspath(__file__))

    def skip(frame) -> bool:
        name = frame.f_code.co_filename
        return name == "<string>" or os.path.abspath(name).startswith(skipped)

    frame, level = sys._getframe(2), 2  # the caller of the function that warns
    while frame.f_back is not None and skip(frame):
        frame, level = frame.f_back, level + 1
    return level


class FwdGradTrainer(Trainer):
    """``Trainer`` whose ``training_step`` estimates gradients in forward mode when
    ``args.optim == "fwdgrad"``; with any other ``optim`` it is ``Trainer``.

    - Each micro-batch of a gradient-accumulation step draws its own tangents (the
      estimator's step advances per micro-batch) and adds its estimate to ``.grad``; the loss
      is scaled for accumulation exactly as ``Trainer`` scales it.
    - ``max_grad_norm`` clips the accumulated estimate; schedulers and warm-up act on the
      inner optimizer.
    - Logs add ``fwdgrad_mean_abs_dd`` / ``fwdgrad_max_abs_dd`` (the directional derivatives
      ∇f·v of the accumulation-scaled loss, since the last log) and ``fwdgrad_skipped``.
    - Checkpoints hold ``forward_gradient.json`` (seed, step): a resumed run redraws the same
      tangents and ends bit-identical to an uninterrupted one.
    - Several processes (``accelerate launch``): the K derivatives are averaged over
      processes and every process applies the same update from shared tangents, so there is
      no gradient all-reduce; the unwrapped model is called (torch.func cannot trace DDP).
    - Frozen parameters (``requires_grad=False``) are not in the optimizer and never perturbed.

    See the module docstring for a runnable example.
    """

    def __init__(self, *args, **kwargs):
        self.forward_gradient: Optional[ForwardGradientEstimator] = None
        super().__init__(*args, **kwargs)
        if not getattr(self.args, "forward_gradient", False):
            return
        self._check_supported_setup()
        self._check_estimator_fits_model()
        if self.args.fwdgrad_inner_optim == FORWARD_SGD:
            self.forward_gradient = _AccumulateIntoForwardSGD(self)
            if self.args.max_grad_norm:
                warnings.warn(
                    f"--max_grad_norm {self.args.max_grad_norm} does not apply with --fwdgrad_inner_optim "
                    "forward_sgd, which never builds .grad: pass --max_grad_norm 0, or an inner optimizer "
                    "such as sgd to clip the estimate.", UserWarning, stacklevel=2)
        else:
            self.forward_gradient = ForwardGradientEstimator(
                estimator=self.args.fwdgrad_estimator, tangents=self.args.fwdgrad_tangents,
                num_directions=self.args.fwdgrad_num_directions, seed=self.args.fwdgrad_seed,
                estimator_options=self.args.estimator_options,
            )
        self._derivative_stats = _DerivativeStats()

    def _check_supported_setup(self) -> None:
        from fwdgrad_plugins.distributed.accelerate_fsdp import warn_if_fsdp_ignored
        from fwdgrad_plugins.integrations.torch_optim import ForwardGradient

        warn_if_fsdp_ignored(self.accelerator)

        unsupported = [name for name, on in (
            ("DeepSpeed", self.is_deepspeed_enabled), ("FSDP", self.is_fsdp_enabled),
            ("tensor, context or sequence parallelism", max(self.get_tp_size(), self.get_cp_size(), self.get_sp_size()) > 1),
            (f"DataParallel over {self.args.n_gpu} GPUs", self.args.n_gpu > 1),
        ) if on]
        if unsupported:
            sharded = ("; for a model sharded with FSDP2, train in your own loop with fully_shard and "
                       "ForwardSGD or ForwardGradient under torchrun (docs/distributed.md)"
                       if self.is_fsdp_enabled else "")
            raise ValueError(
                f"FwdGradTrainer (optim='fwdgrad') does not support {' or '.join(unsupported)}: it keeps "
                "every parameter whole on each process and calls the unwrapped model. Use data "
                "parallelism with one process per device: `accelerate launch --multi_gpu "
                f"--num_processes N script.py ...` (add --use_cpu without GPUs){sharded}."
            )
        if isinstance(self.optimizer, ForwardGradient):
            raise ValueError(
                "pass the inner optimizer to FwdGradTrainer (optimizers=(opt.optimizer, scheduler)), "
                "not a ForwardGradient wrapper: with optim='fwdgrad' the trainer runs the estimator itself."
            )

    def _check_estimator_fits_model(self) -> None:
        """``local-activity`` trains a ``LocalLossNetwork`` and nothing else: with any other
        model it could only fail at the first step."""
        from fwdgrad_plugins.estimators.local_losses import LocalActivityPerturbation, LocalLossNetwork

        estimator = plugins.get("estimators", self.args.fwdgrad_estimator)
        if estimator is LocalActivityPerturbation and not any(
                isinstance(m, LocalLossNetwork) for m in self.model.modules()):
            raise ValueError(
                f"--fwdgrad_estimator {self.args.fwdgrad_estimator} trains a LocalLossNetwork (blocks with "
                f"auxiliary heads, from fwdgrad_plugins.estimators.local_losses.with_local_losses) and "
                f"{type(self.model).__name__} is none: choose another estimator (weight, blockwise, "
                "activity, ...; `python -m fwdgrad_plugins list`).")

    @staticmethod
    def get_optimizer_cls_and_kwargs(args, model=None):
        """Trainer's optimizer table, with ``optim="fwdgrad"`` read as its inner optimizer."""
        if getattr(args, "forward_gradient", False) and args.fwdgrad_inner_optim == FORWARD_SGD:
            return ForwardSGD, {"lr": args.learning_rate, "num_directions": args.fwdgrad_num_directions,
                                "tangents": args.fwdgrad_tangents, "seed": args.fwdgrad_seed,
                                "estimator": args.fwdgrad_estimator,
                                "estimator_options": args.estimator_options or None}
        if getattr(args, "forward_gradient", False):
            args = copy.copy(args)  # a shallow view; __post_init__ does not run again
            args.optim = OptimizerNames(args.fwdgrad_inner_optim)
        return Trainer.get_optimizer_cls_and_kwargs(args, model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """``Trainer.training_step``, with ``compute_loss`` run as a forward-gradient step.

        While Trainer's own ``training_step`` runs, ``self.compute_loss`` (a subclass's
        override included) becomes the closure of ``ForwardGradientEstimator.backward``, which
        writes the estimate to ``.grad``, and returns the loss plus ``s - s.detach()`` for a
        zero leaf ``s``. Trainer then scales that loss for gradient accumulation (and a
        GradScaler for fp16) and calls ``accelerator.backward``, which reaches only ``s``:
        ``s.grad`` is the factor Trainer scaled the loss by, and the estimate is scaled by it.
        So accumulation follows Trainer's own rule, whatever its release."""
        if self.forward_gradient is None:
            return super().training_step(model, inputs, num_items_in_batch)
        factor = torch.zeros((), device=self.args.device, requires_grad=True)
        estimates = []
        compute_loss = self.compute_loss

        def forward_gradient_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            unwrapped = self.accelerator.unwrap_model(model)
            if self._blocked_loss_applies(unwrapped, inputs):
                unwrapped = _BlockedCausalLMLoss(unwrapped)
            # A copy: compute_loss may pop "labels", and the closure can run K times.
            closure = lambda: compute_loss(unwrapped, dict(inputs), num_items_in_batch=num_items_in_batch)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            reduce = (lambda d: self.accelerator.reduce(d, "mean")) if self.accelerator.num_processes > 1 else None
            estimates.append(self.forward_gradient.backward(closure, params, reduce=reduce))
            return estimates[-1].loss.to(self.args.device) + (factor - factor.detach())

        self.compute_loss = forward_gradient_loss
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            del self.compute_loss  # the class's (or subclass's) method again
        scale = 1.0 if factor.grad is None else factor.grad.item()
        for estimate in estimates:
            self._derivative_stats.add(estimate.directional_derivatives * scale)
            _scale_estimate(estimate, self.optimizer.param_groups, scale)
        return loss

    def _blocked_loss_applies(self, model, inputs) -> bool:
        """Whether Trainer's own ``compute_loss`` on a causal LM with a linear head can get its
        loss from ``blocked_causal_lm_loss`` (the same value, without the whole logits): no
        ``compute_loss`` override, label smoother or ``compute_loss_func``, a batch of
        ``input_ids`` and ``labels``, and an estimator formed from K directional derivatives
        and their tangents (``weight``, ``spsa``; the layer-wise ones, such as ``activity``,
        perturb the head as a layer of the model's own call)."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
        estimator = getattr(self.forward_gradient, "estimator", None)  # None: ForwardSGD's (weight, spsa)
        return ((estimator is None or applies_without_grad(estimator))
                and type(self).compute_loss is Trainer.compute_loss and self.label_smoother is None
                and self.compute_loss_func is None and {"input_ids", "labels"} <= set(inputs)
                and "inputs_embeds" not in inputs and type(head) is torch.nn.Linear
                and type(base).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())

    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        if self.forward_gradient is not None and "loss" in logs:
            logs.update(self._derivative_stats.flush())
            logs["fwdgrad_skipped"] = self.forward_gradient.skipped
        if self.forward_gradient is not None:
            self._warn_if_clipped(logs.get("grad_norm"))
        super().log(logs, start_time)

    def _warn_if_clipped(self, grad_norm) -> None:
        """Once: ``max_grad_norm`` clipped the estimate. A forward-gradient estimate's norm is
        about √(number of parameters) times the gradient's, so Trainer's default of 1.0 clips
        every step and, with SGD's small default learning rate, training barely moves."""
        limit = self.args.max_grad_norm
        if getattr(self, "_warned_clipping", False) or grad_norm is None or not limit or grad_norm <= limit:
            return
        self._warned_clipping = True
        warnings.warn(
            f"--max_grad_norm {limit:g} clipped the forward-gradient estimate (norm {grad_norm:.3g}): an "
            "estimate's norm is about sqrt(number of parameters) times the gradient's, so this threshold "
            "clips every step, and with SGD every update shrinks to it and training may not move. Pass "
            "--max_grad_norm 0 (no clipping) or a value above the logged grad_norm. (Adam-type inner "
            "optimizers are nearly unaffected by the scale: --fwdgrad_inner_optim adamw_torch with a "
            "learning rate of 1e-3 to 1e-2 learns.)",
            UserWarning, stacklevel=2,
        )

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.forward_gradient is not None and self.args.should_save:
            state = dict(self.forward_gradient.state_dict())
            own = state.pop("estimator_state", None)
            with open(os.path.join(output_dir, ESTIMATOR_STATE_NAME), "w") as file:
                json.dump(state, file, indent=2)
            if own is not None:
                torch.save(own, os.path.join(output_dir, ESTIMATOR_TENSORS_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.forward_gradient is None or checkpoint is None:
            return
        path = os.path.join(checkpoint, ESTIMATOR_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint} has no {ESTIMATOR_STATE_NAME}, so it was not saved by a forward-gradient "
                "run and its tangents cannot be continued: resume it with the optim it was trained "
                "with, or load its weights with from_pretrained() and start a new --optim fwdgrad run."
            )
        with open(path) as file:
            state = json.load(file)
        tensors = os.path.join(checkpoint, ESTIMATOR_TENSORS_NAME)
        if os.path.isfile(tensors):
            state["estimator_state"] = torch.load(tensors, map_location="cpu", weights_only=True)
        self.forward_gradient.load_state_dict(state)


class _BlockedCausalLMLoss:
    """A causal LM called as Trainer's ``compute_loss`` calls it, ``model(**inputs)``, whose
    output holds only the loss, from :func:`~fwdgrad_plugins.engine.lm_loss.blocked_causal_lm_loss`:
    the vocabulary a block at a time, so the whole logits and their tangent never exist."""

    def __init__(self, model):
        self.model = model

    def __call__(self, input_ids, labels, num_items_in_batch=None, **model_kwargs):
        loss = blocked_causal_lm_loss(self.model, input_ids, labels, num_items_in_batch=num_items_in_batch,
                                      **model_kwargs)
        return {"loss": loss}


def _scale_estimate(estimate, param_groups, scale: float) -> None:
    """Multiply the estimate that was added to each ``.grad`` by ``scale``: ``.grad`` holds
    (earlier micro-batches) + g, and becomes (earlier) + scale·g. ``g`` may be ``.grad``
    itself (the first micro-batch's), which the in-place sum scales alike. A ForwardSGD
    micro-batch's estimate writes no ``.grad``: its derivatives, which ``ForwardSGD.step()``
    applies, are scaled in place."""
    if scale == 1.0 or estimate.skipped:
        return
    if not estimate.grads:
        estimate.directional_derivatives.mul_(scale)
        return
    params = trainable_parameters(p for group in param_groups for p in group["params"])
    for p, grad in zip(params, estimate.grads):  # the parameters backward() wrote, in its order
        if grad is not None:
            p.grad.add_(grad.to(p.grad.dtype), alpha=scale - 1)


class _AccumulateIntoForwardSGD:
    """The trainer's estimator for ``--fwdgrad_inner_optim forward_sgd``: ``backward`` hands
    each micro-batch's closure to ``ForwardSGD.accumulate``, and Trainer's
    ``optimizer.step()`` applies their sum. ForwardSGD's seed and step live in its own
    state dict (``optimizer.pt``); ``forward_gradient.json`` repeats them."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    @property
    def optimizer(self):
        optimizer = self.trainer.optimizer
        return getattr(optimizer, "optimizer", optimizer)  # inside Accelerate's wrapper

    def backward(self, closure, params, *, reduce=None):
        return self.optimizer.accumulate(closure, reduce=reduce)

    @property
    def step(self) -> int:
        return self.optimizer.forward_step

    @property
    def skipped(self) -> int:
        return self.optimizer.skipped_steps

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()["forward_sgd"]

    def load_state_dict(self, state: dict) -> None:
        """Checks that ``optimizer.pt`` (already loaded) and the JSON agree."""
        if state != self.state_dict():
            raise ValueError(f"{ESTIMATOR_STATE_NAME} ({state}) does not match the ForwardSGD state in "
                             f"optimizer.pt ({self.state_dict()}): the checkpoint is inconsistent.")


class _DerivativeStats:
    """Running |∇f·v| statistics between two logs, kept on the device until logged."""

    def __init__(self):
        self.abs_sum, self.abs_max, self.count = None, None, 0

    def add(self, derivatives: torch.Tensor) -> None:
        finite = derivatives[torch.isfinite(derivatives)].abs()
        if finite.numel() == 0:
            return
        total, largest = finite.sum(), finite.max()
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.abs_max = largest if self.abs_max is None else torch.maximum(self.abs_max, largest)
        self.count += finite.numel()

    def flush(self) -> dict:
        if not self.count:
            return {}
        stats = {"fwdgrad_mean_abs_dd": self.abs_sum.item() / self.count, "fwdgrad_max_abs_dd": self.abs_max.item()}
        self.__init__()
        return stats
