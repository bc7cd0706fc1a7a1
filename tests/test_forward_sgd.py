"""ForwardSGD: forward-gradient SGD applied parameter by parameter, with no .grad."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad_plugins import ForwardGradient, ForwardSGD, LossNotScalarError

from toy_models import MODELS


def run(opt, closure, steps):
    losses = []
    for _ in range(steps):
        losses.append(opt.step(closure))
        opt.zero_grad()
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["weight", "spsa"])
@pytest.mark.parametrize("tangents", ["gaussian", "rademacher", "rank1-gaussian"])
@pytest.mark.parametrize("num_directions", [1, 3])
def test_is_forward_gradient_sgd_without_grad(estimator, tangents, num_directions):
    model, closure = MODELS["tiny_gpt2"]()
    model.eval()
    start = copy.deepcopy(model.state_dict())
    options = dict(num_directions=num_directions, tangents=tangents, seed=4, estimator=estimator)
    groups = lambda m: [{"params": [p for n, p in m.named_parameters() if "ln" not in n]},
                        {"params": [p for n, p in m.named_parameters() if "ln" in n], "weight_decay": 0.0}]
    reference = ForwardGradient(torch.optim.SGD(groups(model), lr=0.05, weight_decay=0.01), **options)
    run(reference, closure, 3)
    expected = copy.deepcopy(model.state_dict())
    model.load_state_dict(start)
    opt = ForwardSGD(groups(model), lr=0.05, weight_decay=0.01, **options)
    run(opt, closure, 3)
    assert all(p.grad is None for p in model.parameters())
    changed = 0
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6)
        changed += not torch.equal(value, start[key])
    assert changed > 10


def test_small_model_draws_its_tangent_once_and_matches_the_streamed_update():
    model, closure = MODELS["mlp"]()
    start = copy.deepcopy(model.state_dict())
    streamed = ForwardSGD(model.parameters(), lr=0.1, seed=2, estimator_options={"streamed": True})
    run(streamed, closure, 2)
    expected = copy.deepcopy(model.state_dict())
    model.load_state_dict(start)
    opt = ForwardSGD(model.parameters(), lr=0.1, seed=2)  # 1 direction, far below STREAM_MIN_BYTES
    draws = []
    sample = opt.sampler.sample
    opt.sampler.sample = lambda *args, **kwargs: draws.append(1) or sample(*args, **kwargs)
    opt.sampler.stream = None  # a redraw for the update would now fail
    run(opt, closure, 2)
    assert len(draws) == 2  # one whole draw per step, reused by the update
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=1e-6, atol=1e-7)
        assert not torch.equal(value, start[key])


@pytest.mark.slow
def test_resume_is_bit_identical():
    model, closure = MODELS["mlp"]()
    start = copy.deepcopy(model.state_dict())
    make = lambda: ForwardSGD(model.parameters(), lr=0.1, num_directions=2, tangents="rank1-gaussian", seed=3)
    scheduler = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt = make()
    sched = scheduler(opt)
    for _ in range(4):
        opt.step(closure)
        sched.step()
    final = copy.deepcopy(model.state_dict())
    model.load_state_dict(start)
    opt = make()
    sched = scheduler(opt)
    for _ in range(2):
        opt.step(closure)
        sched.step()
    saved, saved_sched = copy.deepcopy(opt.state_dict()), sched.state_dict()
    assert saved["forward_sgd"]["step"] == 2 and saved["param_groups"][0]["lr"] == 0.025
    opt = make()
    opt.load_state_dict(saved)
    sched = scheduler(opt)
    sched.load_state_dict(saved_sched)
    for _ in range(2):
        opt.step(closure)
        sched.step()
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())


def test_accumulation_applies_the_sum_once():
    model, closure = MODELS["mlp"]()
    start = copy.deepcopy(model.state_dict())
    opt = ForwardSGD(model.parameters(), lr=0.1, weight_decay=0.1, seed=1)
    opt.accumulate(closure)
    opt.accumulate(closure)
    assert all(torch.equal(v, start[k]) for k, v in model.state_dict().items())  # nothing applied yet
    opt.step()
    accumulated = copy.deepcopy(model.state_dict())
    model.load_state_dict(start)
    reference = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1), seed=1)
    reference.estimator.backward(closure, model.parameters())
    reference.estimator.backward(closure, model.parameters())
    reference.optimizer.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(accumulated[k], v, rtol=1e-6, atol=1e-7)


def test_unused_parameters_and_padding_rows_are_left_alone():
    model = nn.ModuleDict({"used": nn.Embedding(5, 3, padding_idx=0), "unused": nn.Linear(2, 2)})
    before = copy.deepcopy(model.state_dict())
    opt = ForwardSGD(model.parameters(), lr=0.5, weight_decay=0.1)
    opt.step(lambda: model["used"](torch.tensor([0, 1, 2])).pow(2).sum())
    assert torch.equal(model["unused"].weight, before["unused.weight"])
    assert torch.equal(model["used"].weight[0], before["used.weight"][0])
    assert not torch.equal(model["used"].weight[1], before["used.weight"][1])


def test_a_non_finite_derivative_skips_the_update():
    model = nn.Linear(3, 1)
    before = copy.deepcopy(model.state_dict())
    opt = ForwardSGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="skipped update 0"):
        loss = opt.step(lambda: model(torch.ones(2, 3)).sum() * float("nan"))
    assert loss.isnan() and opt.skipped_steps == 1 and opt.state_dict()["forward_sgd"]["step"] == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_input_fails_clearly_and_changes_nothing():
    model = nn.Linear(3, 1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="lr must be"):
        ForwardSGD(model.parameters(), lr=-1)
    with pytest.raises(ValueError, match="num_directions"):
        ForwardSGD(model.parameters(), num_directions=0)
    with pytest.raises(ValueError, match="cannot apply it without .grad"):
        ForwardSGD(model.parameters(), estimator="activity")
    opt = ForwardSGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
    with pytest.raises(LossNotScalarError):
        opt.step(lambda: model(torch.ones(2, 3)))
    assert opt.state_dict()["forward_sgd"]["step"] == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="other forward-gradient options"):
        ForwardSGD(model.parameters(), num_directions=2).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="not saved by ForwardSGD"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())


def test_step_hooks_fire_and_no_backward_runs(no_backward):
    model, closure = MODELS["tiny_bert"]()
    no_backward(model)
    opt = ForwardSGD(model.parameters(), lr=0.01)
    calls = []
    opt.register_step_pre_hook(lambda *_: calls.append("pre"))
    opt.register_step_post_hook(lambda *_: calls.append("post"))
    opt.step(closure)
    assert calls == ["pre", "post"]


@pytest.mark.slow
def test_learns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(64, 8)
    y = x[:, :1] * 0.5
    opt = ForwardSGD(model.parameters(), lr=0.02, num_directions=4)
    first = F.mse_loss(model(x), y).item()
    for _ in range(200):
        opt.step(lambda: F.mse_loss(model(x), y))
    assert F.mse_loss(model(x), y).item() < 0.5 * first
