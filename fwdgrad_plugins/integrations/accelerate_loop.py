"""The Accelerate training loop: forward gradient or backprop behind one switch, so a comparison
of the two differs in nothing else (same data order, schedule, logging, evaluation, checkpoints).

Forward gradient across N processes: every process draws the same tangents (same seed), takes
the K directional derivatives of the loss on its own shard of the global batch, and averages
them with ``accelerator.reduce`` (K floats). Every process then writes the same estimate and
applies the same update, so parameters stay identical with no gradient all-reduce; the jvp
runs on ``accelerator.unwrap_model(model)``, outside DDP. Backprop uses the prepared (DDP)
model and ``accelerator.backward`` as usual.

>>> import torch
>>> from accelerate import Accelerator
>>> from torch.utils.data import DataLoader, TensorDataset
>>> from fwdgrad_plugins import ForwardGradientEstimator
>>> from fwdgrad_plugins.integrations.accelerate_loop import TrainingOptions, train
>>> data = TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))
>>> model = torch.nn.Linear(4, 2)
>>> result = train(Accelerator(), model, torch.optim.SGD(model.parameters(), lr=0.1),
...                DataLoader(data, batch_size=16), DataLoader(data, batch_size=32),
...                torch.nn.functional.cross_entropy, method="fwdgrad",
...                estimator=ForwardGradientEstimator(seed=0),
...                options=TrainingOptions(progress_bar=False, measure_memory=False))
>>> result.steps, result.bytes_per_step, 0.0 <= result.test_accuracy <= 1.0
(4, 0, True)
"""

from __future__ import annotations

import hashlib
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from fwdgrad_plugins.distributed.accelerate_fsdp import warn_if_fsdp_ignored
from fwdgrad_plugins.estimators.core import ForwardGradientEstimator
from fwdgrad_plugins.optim import ForwardSGD

METHODS = ("fwdgrad", "backprop")


@dataclass
class TrainingOptions:
    """How long to train and what to record; the same for both methods."""

    epochs: int = 1
    max_steps: Optional[int] = None  # stop after this many updates, across epochs
    eval_every: Optional[int] = None  # steps between evaluations; always at each epoch end
    log_every: int = 1  # steps between logged training losses
    checkpoint_dir: Optional[str] = None  # save_state writes <checkpoint_dir>/checkpoint-<step>
    checkpoint_every: Optional[int] = None  # steps; the last step is always saved
    resume_from: Optional[str] = None  # a checkpoint-<step> folder this loop wrote
    run_name: Optional[str] = None  # prefix of logged names; default: the method
    stop_on_divergence: bool = True  # stop at the first non-finite training loss
    progress_bar: bool = True
    measure_memory: bool = True  # the second step's peak memory, on CUDA (see peak_step_memory)


@dataclass
class TrainingProgress:
    """Everything the loop must carry across a checkpoint besides model, optimizer, scheduler
    and estimator: position and history. Registered with ``register_for_checkpointing``."""

    method: str = ""
    step: int = 0
    losses: list = field(default_factory=list)  # (step, loss, seconds of training so far)
    evaluations: list = field(default_factory=list)  # (step, accuracy, loss)
    step_times: list = field(default_factory=list)  # seconds per timed step
    training_seconds: float = 0.0
    peak_step_memory_bytes: Optional[int] = None
    diverged_at: Optional[int] = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for f in fields(self):
            setattr(self, f.name, state[f.name])


@dataclass
class TrainResult:
    method: str
    steps: int
    num_processes: int
    losses: list  # (step, loss, seconds)
    evaluations: list  # (step, accuracy, loss)
    final_train_loss: float  # mean of the last min(50, steps) logged losses; nan if diverged
    test_accuracy: float  # at the last evaluation
    median_step_seconds: float
    steps_per_second: float  # steps / training seconds (evaluation excluded)
    training_seconds: float
    peak_step_memory_bytes: Optional[int]  # above what was allocated before the step; CUDA only
    bytes_per_step: int  # all-reduce payload per update (see communicated_bytes_per_step)
    skipped_steps: int
    diverged: bool
    diverged_at: Optional[int]
    parameter_digests: list  # sha256 of the parameters, one per process

    def summary(self) -> dict:
        """The scalar results (no histories)."""
        return {k: v for k, v in asdict(self).items() if k not in ("losses", "evaluations")}


def communicated_bytes_per_step(method: str, model: torch.nn.Module, num_processes: int,
                                num_directions: int = 1, reduces_gradients: bool = False) -> int:
    """Bytes each process contributes to the all-reduce of one update: K float32 directional
    derivatives for forward gradient, every trainable parameter's gradient for backprop (DDP),
    nothing on one process. (A ring all-reduce moves about twice this over the wire.)
    ``reduces_gradients``: the estimator all-reduces its gradient estimates with the K
    derivatives (its class says so, e.g. ``"activity"`` and ``"local-activity"``).

    >>> model = torch.nn.Linear(1000, 10)
    >>> communicated_bytes_per_step("fwdgrad", model, 2, num_directions=4)
    16
    >>> communicated_bytes_per_step("backprop", model, 2)
    40040
    >>> communicated_bytes_per_step("fwdgrad", model, 2, num_directions=4, reduces_gradients=True)
    40056
    """
    if num_processes <= 1:
        return 0
    gradients = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if method == "fwdgrad":
        return 4 * num_directions + (gradients if reduces_gradients else 0)
    return gradients


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 of the parameters' bytes: equal digests mean bit-identical parameters."""
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def peak_step_memory(step: Callable[[], object], device: torch.device):
    """Run ``step()`` and return ``(its result, peak bytes allocated above what was allocated
    before it)``, from the CUDA allocator's statistics; ``None`` for the bytes on other devices,
    whose allocators keep no such count (``benchmarks/step.py`` measures CPU memory, in a fresh
    process per method)."""
    if device.type != "cuda":
        return step(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = step()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - before


def evaluate(accelerator: Accelerator, network: torch.nn.Module, loader, loss_fn) -> tuple[float, float]:
    """(accuracy, loss) over the whole evaluation set, gathered from every process."""
    network.eval()
    logits, labels = [], []
    with torch.no_grad():
        for inputs, targets in loader:
            batch_logits, batch_labels = accelerator.gather_for_metrics((network(inputs), targets))
            logits.append(batch_logits)
            labels.append(batch_labels)
    network.train()
    logits, labels = torch.cat(logits), torch.cat(labels)
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    return accuracy, float(loss_fn(logits, labels))


def _check(method, options, train_loader, estimator, forward_sgd):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if forward_sgd and (method != "fwdgrad" or estimator is not None):
        raise ValueError("the optimizer is a ForwardSGD, which estimates and applies the forward gradient "
                         "itself: pass method='fwdgrad' and no estimator (its options go to ForwardSGD).")
    if method == "backprop" and estimator is not None:
        raise ValueError("an estimator was given with method='backprop': pass method='fwdgrad' "
                         "to train with it, or drop it.")
    if options.epochs < 1 or (options.max_steps is not None and options.max_steps < 1):
        raise ValueError(f"epochs ({options.epochs}) and max_steps ({options.max_steps}) must be "
                         "at least 1.")
    if len(train_loader) == 0:
        raise ValueError("the training loader yields no batch: lower the batch size or use more data.")
    if options.resume_from is not None and not (Path(options.resume_from) / "custom_checkpoint_0.pkl").exists():
        raise FileNotFoundError(
            f"{options.resume_from} is not a checkpoint of this loop (no custom_checkpoint_0.pkl): "
            "pass a checkpoint-<step> folder from TrainingOptions.checkpoint_dir."
        )


def train(accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
          train_loader, eval_loader, loss_fn: Callable, *, method: str = "fwdgrad",
          estimator: Optional[ForwardGradientEstimator] = None, scheduler=None,
          options: Optional[TrainingOptions] = None) -> TrainResult:
    """Train ``model`` with forward gradient (``method="fwdgrad"``) or backprop, and evaluate.

    ``loss_fn(model(inputs), targets)`` is the loss; ``scheduler`` (optional) steps once per
    update. The loop prepares everything with ``accelerator.prepare``, logs ``<run>/train_loss``,
    ``<run>/lr``, ``<run>/test_accuracy`` through ``accelerator.log`` (call
    ``accelerator.init_trackers`` first to record them), shows tqdm on the main process, and
    checkpoints with ``save_state`` (the estimator's seed and step included). The test set is
    evaluated before the first step too (step 0). A training loss that is not finite marks the
    run as diverged and, by default, stops it.

    ``optimizer`` may be a :class:`~fwdgrad_plugins.ForwardSGD` (with ``method="fwdgrad"``
    and no ``estimator``): it then estimates and applies each update itself, with no ``.grad``.

    The forward-gradient part is the ``update`` below; in a loop of your own it is::

        estimate = estimator.backward(lambda: loss_fn(model(inputs), targets), model.parameters())
        if not estimate.skipped:  # a non-finite directional derivative skips the update
            optimizer.step()
        optimizer.zero_grad()
    """
    options = options or TrainingOptions()
    forward_sgd = optimizer if isinstance(optimizer, ForwardSGD) else None
    if method == "fwdgrad" and estimator is None and forward_sgd is None:
        estimator = ForwardGradientEstimator()
    _check(method, options, train_loader, estimator, forward_sgd)
    warn_if_fsdp_ignored(accelerator)
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    network = accelerator.unwrap_model(model)  # forward mode runs outside DDP
    progress = TrainingProgress(method=method)
    accelerator.register_for_checkpointing(progress)
    # Registered, not prepared: a prepared scheduler steps once per process when batches are
    # not split; here it steps exactly once per update.
    for state in (estimator, scheduler):
        if state is not None:
            accelerator.register_for_checkpointing(state)
    if options.resume_from is not None:
        accelerator.load_state(options.resume_from)
        if progress.method != method:
            raise ValueError(f"{options.resume_from} holds a {progress.method} run, not {method}: "
                             "resume each method from its own checkpoints.")

    many = accelerator.num_processes > 1
    reduce = (lambda values: accelerator.reduce(values, "mean")) if many else None
    run = options.run_name or method
    steps_per_epoch = len(train_loader)
    total = min(options.epochs * steps_per_epoch, options.max_steps or math.inf)

    def update(inputs, targets):
        if method == "backprop":
            loss = loss_fn(model(inputs), targets)
            accelerator.backward(loss)
            loss, applied = loss.detach(), True
        elif forward_sgd is not None:  # estimates and applies the update in one call
            loss, applied = forward_sgd.step(lambda: loss_fn(network(inputs), targets), reduce=reduce), False
        else:
            estimate = estimator.backward(lambda: loss_fn(network(inputs), targets),
                                          network.parameters(), reduce=reduce)
            loss, applied = estimate.loss, not estimate.skipped
        if applied:
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def record_evaluation():
        accuracy, loss = evaluate(accelerator, network, eval_loader, loss_fn)
        progress.evaluations.append((progress.step, accuracy, loss))
        accelerator.log({f"{run}/test_accuracy": accuracy, f"{run}/test_loss": loss}, step=progress.step)

    def save_checkpoint():
        accelerator.save_state(os.path.join(options.checkpoint_dir, f"checkpoint-{progress.step}"))

    if not progress.evaluations:
        record_evaluation()  # step 0: the initial weights
    bar = tqdm(total=total, initial=progress.step, desc=run,
               disable=not (options.progress_bar and accelerator.is_local_main_process))
    while progress.step < total and not (progress.diverged_at is not None and options.stop_on_divergence):
        epoch, done_in_epoch = divmod(progress.step, steps_per_epoch)
        train_loader.set_epoch(epoch)  # the seedable sampler's order depends on the epoch alone
        batches = accelerator.skip_first_batches(train_loader, done_in_epoch) if done_in_epoch else train_loader
        for inputs, targets in batches:
            # The second step's memory is measured: the first makes one-time allocations
            # (cuBLAS workspace).
            profile = (options.measure_memory and progress.peak_step_memory_bytes is None
                       and progress.step == 1 and accelerator.device.type == "cuda")
            started = time.perf_counter()
            if profile:  # the profiled step is not timed
                loss, progress.peak_step_memory_bytes = peak_step_memory(
                    lambda: update(inputs, targets), accelerator.device)
            else:
                loss = update(inputs, targets)
            seconds = time.perf_counter() - started
            if not profile:
                progress.step_times.append(seconds)
            progress.training_seconds += seconds
            progress.step += 1
            bar.update(1)
            if len(progress.step_times) == 20 and total - progress.step > 20 and not bar.disable:
                left = statistics.median(progress.step_times) * (total - progress.step)
                bar.write(f"{run}: {total - progress.step} steps left, about {left:.0f} s of "
                          "training at the speed of the first 20 (evaluations not included)")

            loss = (reduce(loss.reshape(1)) if many else loss).item()
            if not math.isfinite(loss) and progress.diverged_at is None:
                progress.diverged_at = progress.step
            if progress.step % options.log_every == 0 or progress.diverged_at is not None:
                progress.losses.append((progress.step, loss, progress.training_seconds))
                lr = optimizer.param_groups[0]["lr"]
                accelerator.log({f"{run}/train_loss": loss, f"{run}/lr": lr}, step=progress.step)
                bar.set_postfix(loss=f"{loss:.4f}")
            stop = progress.step >= total or (progress.diverged_at is not None and options.stop_on_divergence)
            end_of_epoch = progress.step % steps_per_epoch == 0
            if stop or end_of_epoch or (options.eval_every and progress.step % options.eval_every == 0):
                record_evaluation()
            if options.checkpoint_dir and (stop or (options.checkpoint_every
                                                    and progress.step % options.checkpoint_every == 0)):
                save_checkpoint()
            if stop:
                break
    bar.close()
    if not progress.evaluations or progress.evaluations[-1][0] != progress.step:
        record_evaluation()  # a resumed run that had already finished
    return _result(accelerator, network, method, estimator if forward_sgd is None else forward_sgd, progress)


def _result(accelerator, network, method, estimator, progress) -> TrainResult:
    """``estimator``: the ForwardGradientEstimator or ForwardSGD (None for backprop)."""
    skipped = getattr(estimator, "skipped", getattr(estimator, "skipped_steps", 0))
    last_losses = [loss for _, loss, _ in progress.losses[-50:]]
    diverged = progress.diverged_at is not None
    timed = progress.step_times or [math.nan]
    return TrainResult(
        method=method,
        steps=progress.step,
        num_processes=accelerator.num_processes,
        losses=progress.losses,
        evaluations=progress.evaluations,
        final_train_loss=math.nan if diverged or not last_losses else statistics.fmean(last_losses),
        test_accuracy=progress.evaluations[-1][1],
        median_step_seconds=statistics.median(timed),
        steps_per_second=progress.step / progress.training_seconds if progress.training_seconds else math.nan,
        training_seconds=progress.training_seconds,
        peak_step_memory_bytes=progress.peak_step_memory_bytes,
        bytes_per_step=communicated_bytes_per_step(
            method, network, accelerator.num_processes, estimator.num_directions if estimator else 1,
            reduces_gradients=getattr(getattr(estimator, "estimator", None), "reduces_gradients", False)),
        skipped_steps=skipped,
        diverged=diverged or skipped > 0,
        diverged_at=progress.diverged_at,
        parameter_digests=gather_object([parameter_digest(network)]),
    )
