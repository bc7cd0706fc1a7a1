"""The Accelerate loop, in one process: it applies exactly the estimator's (or backprop's)
update, logs through trackers, resumes bit-identically and reports divergence."""

import contextlib
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import DataLoader

from fwdgrad_plugins import ForwardGradientEstimator
from fwdgrad_plugins.integrations.accelerate_loop import (
    TrainingOptions,
    communicated_bytes_per_step,
    parameter_digest,
    train,
)
from fwdgrad_plugins.integrations.accelerate_trackers import file_trackers

from tiny_loop import DECAY, dataset, fresh_model


def run_loop(method, model, *, lr=0.1, shuffle=False, accelerator=None, **options):
    accelerator = accelerator or Accelerator(
        dataloader_config=DataLoaderConfiguration(split_batches=True, use_seedable_sampler=True, data_seed=3))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=DECAY)
    estimator = ForwardGradientEstimator(num_directions=2, seed=5) if method == "fwdgrad" else None
    options = TrainingOptions(**{"progress_bar": False, "measure_memory": False, **options})
    return train(accelerator, model, optimizer, DataLoader(dataset(), batch_size=8, shuffle=shuffle, drop_last=True),
                 DataLoader(dataset(), batch_size=20), F.cross_entropy, method=method, estimator=estimator,
                 scheduler=scheduler, options=options)


def manual_run(method, model, steps, lr=0.1):
    """The same training written out by hand: the reference the loop must match."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    estimator = ForwardGradientEstimator(num_directions=2, seed=5)
    batches = list(DataLoader(dataset(), batch_size=8, drop_last=True))
    for step in range(steps):
        x, y = batches[step % len(batches)]
        optimizer.zero_grad()
        if method == "fwdgrad":
            estimator.backward(lambda: F.cross_entropy(model(x), y), model.parameters())
        else:
            F.cross_entropy(model(x), y).backward()
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] *= DECAY
    return model


@pytest.mark.parametrize("method", ["fwdgrad", "backprop"])
def test_loop_applies_exactly_the_method_update_and_one_scheduler_step(method):
    steps = 7  # crosses the end of the 5-batch epoch
    result = run_loop(method, looped := fresh_model(), max_steps=steps, epochs=2)
    reference = manual_run(method, fresh_model(), steps)
    assert result.steps == steps and [s for s, _, _ in result.losses] == list(range(1, steps + 1))
    for got, expected in zip(looped.parameters(), reference.parameters()):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def test_both_methods_see_the_same_batches_and_start_from_the_same_loss():
    first = {m: run_loop(m, fresh_model(), max_steps=3, shuffle=True).losses[0][1] for m in ("fwdgrad", "backprop")}
    assert first["fwdgrad"] == pytest.approx(first["backprop"], rel=1e-6)


def test_trackers_record_losses_evaluations_and_configuration(tmp_path):
    accelerator = Accelerator(log_with=file_trackers(tmp_path), project_dir=str(tmp_path))
    accelerator.init_trackers("loop-test", config={"lr": 0.1})
    result = run_loop("fwdgrad", fresh_model(), accelerator=accelerator, max_steps=4, eval_every=2)
    accelerator.end_training()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"config": {"lr": 0.1}}
    logged = {r["step"]: r["fwdgrad/train_loss"] for r in records if "fwdgrad/train_loss" in r}
    assert logged == {s: pytest.approx(loss) for s, loss, _ in result.losses}
    assert [r["step"] for r in records if "fwdgrad/test_accuracy" in r] == [0, 2, 4]  # step 0 too
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,name,value" and sum(",fwdgrad/train_loss," in row for row in rows) == 4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fwdgrad", "backprop"])
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(tmp_path, method):
    options = dict(epochs=3, max_steps=8, shuffle=True, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=3)
    uninterrupted = run_loop(method, fresh_model(), **{**options, "checkpoint_dir": str(tmp_path / "whole")})
    run_loop(method, fresh_model(), **{**options, "max_steps": 3})  # stops after checkpoint-3 (mid-epoch)
    resumed_model = fresh_model()
    with torch.no_grad():  # the checkpoint, not the initial weights, must decide the result
        for p in resumed_model.parameters():
            p.add_(1.0)
    resumed = run_loop(method, resumed_model, **options, resume_from=str(tmp_path / "ckpt" / "checkpoint-3"))
    assert resumed.parameter_digests == uninterrupted.parameter_digests
    assert [loss for _, loss, _ in resumed.losses] == [loss for _, loss, _ in uninterrupted.losses]


@pytest.mark.parametrize("method", ["fwdgrad", "backprop"])
def test_divergence_is_reported_and_stops_the_run(method):
    torch.manual_seed(0)
    relu_model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))  # overflows to inf
    with pytest.warns(RuntimeWarning) if method == "fwdgrad" else contextlib.nullcontext():
        result = run_loop(method, relu_model, lr=1e30, max_steps=20, epochs=5)
    assert result.diverged and result.diverged_at < 20 and result.steps == result.diverged_at
    assert math.isnan(result.final_train_loss)


def test_communicated_bytes_compare_k_scalars_with_all_gradients():
    model = fresh_model()
    parameter_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert communicated_bytes_per_step("backprop", model, 4) == parameter_bytes
    assert communicated_bytes_per_step("fwdgrad", model, 4, num_directions=3) == 12
    assert communicated_bytes_per_step("backprop", model, 1) == 0


def test_parameter_digest_tells_bit_differences():
    model = fresh_model()
    other = copy.deepcopy(model)
    assert parameter_digest(model) == parameter_digest(other)
    with torch.no_grad():
        other[0].bias[0] = torch.nextafter(other[0].bias[0], torch.tensor(1.0))
    assert parameter_digest(model) != parameter_digest(other)


@pytest.mark.parametrize("bad, error", [
    (dict(method="adam"), "method must be one of"),
    (dict(method="backprop", estimator=ForwardGradientEstimator()), "estimator was given"),
    (dict(options=TrainingOptions(resume_from="/nonexistent")), "not a checkpoint"),
    (dict(options=TrainingOptions(epochs=0)), "at least 1"),
])
def test_bad_arguments_fail_before_training(bad, error):
    model = fresh_model()
    before = parameter_digest(model)
    kwargs = {"method": "fwdgrad", **bad}
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        train(Accelerator(), model, torch.optim.SGD(model.parameters(), lr=0.1),
              DataLoader(dataset(), batch_size=8), DataLoader(dataset(), batch_size=8), F.cross_entropy, **kwargs)
    assert parameter_digest(model) == before
