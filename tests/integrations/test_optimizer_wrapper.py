"""ForwardGradient keeps torch.optim's contract and trains real models."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad_plugins import ForwardGradient
from mnist_data import mnist

INNER = {
    "sgd": (lambda params: torch.optim.SGD(params, lr=5e-3)),
    "adam": (lambda params: torch.optim.Adam(params, lr=3e-3)),
}


@pytest.fixture(scope="module")
def mnist_subset(mnist_root):
    return mnist(mnist_root, train=True, limit=2048).tensors


def small_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))


def train(model, opt, images, labels, steps, batch=64, scheduler=None):
    losses = []
    for step in range(steps):
        i = torch.arange(step * batch, (step + 1) * batch) % len(images)
        opt.zero_grad()
        losses.append(opt.step(lambda: F.cross_entropy(model(images[i]), labels[i])).item())
        if scheduler is not None:
            scheduler.step()
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("inner", list(INNER))
def test_trains_mnist_subset(inner, mnist_subset):
    images, labels = mnist_subset
    model = small_mlp()
    opt = ForwardGradient(INNER[inner](model.parameters()), num_directions=4, seed=0)
    losses = train(model, opt, images, labels, steps=200)
    start, end = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert end < 0.8 * start, f"loss went from {start:.3f} to {end:.3f}"


def test_is_an_optimizer_sharing_the_inner_state():
    model = small_mlp()
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = ForwardGradient(inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    loss = opt.step(lambda: F.cross_entropy(model(x), y))
    assert loss.shape == () and torch.isfinite(loss) and len(inner.state) == 4


def test_step_lr_scheduler_drives_the_inner_learning_rate(recwarn):
    model = small_mlp()
    opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.01))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    train(model, opt, x, y, steps=7, batch=8, scheduler=scheduler)
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 0.1**2)
    # torch warns when the scheduler steps before the optimizer: it must see opt.step()
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


@pytest.mark.slow
def test_resume_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    make = lambda m: ForwardGradient(torch.optim.Adam(m.parameters(), lr=1e-3), num_directions=2,
                                     tangents="rademacher", seed=5)
    model = small_mlp()
    start = copy.deepcopy(model.state_dict())

    uninterrupted = small_mlp()
    uninterrupted.load_state_dict(start)
    opt = make(uninterrupted)
    train(uninterrupted, opt, x, y, steps=10, batch=16)

    first = small_mlp()
    first.load_state_dict(start)
    opt = make(first)
    train(first, opt, x, y, steps=5, batch=16)
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")

    checkpoint = torch.load(tmp_path / "ckpt.pt")
    resumed = small_mlp()
    resumed.load_state_dict(checkpoint["model"])
    opt = make(resumed)
    opt.load_state_dict(checkpoint["opt"])
    # the second half sees batches 5..9, as the uninterrupted run did
    for step in range(5, 10):
        i = torch.arange(step * 16, (step + 1) * 16) % 64
        opt.zero_grad()
        opt.step(lambda: F.cross_entropy(resumed(x[i]), y[i]))
    for a, b in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_state_dict_holds_tensors_and_plain_values_only():
    model = small_mlp()
    opt = ForwardGradient(torch.optim.Adam(model.parameters()), seed=3)
    opt.step(lambda: model(torch.randn(2, 1, 28, 28)).sum())
    state = opt.state_dict()["forward_gradient"]
    assert state == {"estimator": "weight", "tangents": "gaussian", "num_directions": 1,
                     "seed": 3, "step": 1, "skipped": 0}


def test_loading_a_checkpoint_with_other_options_fails_clearly():
    model = small_mlp()
    saved = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1), num_directions=2).state_dict()
    opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1), num_directions=4)
    with pytest.raises(ValueError, match="num_directions"):
        opt.load_state_dict(saved)


def test_clip_grad_norm_through_an_inner_step_pre_hook():
    model = small_mlp()
    opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.0))
    norms = []
    opt.optimizer.register_step_pre_hook(
        lambda *_: norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
    opt.step(lambda: F.cross_entropy(model(torch.randn(8, 1, 28, 28)), torch.randint(0, 10, (8,))))
    total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norms[0] > 0.5 and total == pytest.approx(0.5, rel=1e-4)


def test_parameters_the_loss_does_not_use_are_left_alone():
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
    before = copy.deepcopy(model.state_dict())
    opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1))
    opt.step(lambda: model["used"](torch.randn(4, 3)).pow(2).mean())
    assert model["unused"].weight.grad is None
    assert torch.equal(model["unused"].weight, before["unused.weight"])
    assert not torch.equal(model["used"].weight, before["used.weight"])


def test_embedding_padding_row_is_never_updated():
    embedding = nn.Embedding(10, 4, padding_idx=0)
    head = nn.Linear(4, 1)
    params = list(embedding.parameters()) + list(head.parameters())
    opt = ForwardGradient(torch.optim.SGD(params, lr=0.1), num_directions=3, keep_grads=True)
    ids = torch.tensor([[0, 1, 2], [0, 3, 0]])
    for _ in range(3):
        opt.zero_grad()
        opt.step(lambda: head(embedding(ids)).pow(2).mean())
    assert torch.equal(embedding.weight[0], torch.zeros(4))
    assert embedding.weight.grad[0].abs().sum() == 0 and embedding.weight.grad[1].abs().sum() > 0


def _stepped(seed=3):
    model = small_mlp()
    opt = ForwardGradient(torch.optim.Adam(model.parameters(), lr=1e-3), num_directions=2, seed=seed)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(2):
        opt.zero_grad()
        opt.step(lambda: F.cross_entropy(model(x), y))
    return model, opt


def test_runs_the_base_initialiser_and_fires_step_and_state_dict_hooks():
    model, opt = _stepped()
    assert opt.param_groups is opt.optimizer.param_groups and opt.defaults is opt.optimizer.defaults
    fired = []
    handles = [
        opt.register_step_pre_hook(lambda *_: fired.append("step_pre")),
        opt.register_step_post_hook(lambda *_: fired.append("step_post")),
        opt.register_state_dict_pre_hook(lambda *_: fired.append("state_dict_pre")),
        opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1}),
        opt.register_load_state_dict_pre_hook(lambda o, sd: fired.append("load_pre")),
        opt.register_load_state_dict_post_hook(lambda *_: fired.append("load_post")),
    ]
    opt.step(lambda: model(torch.randn(2, 1, 28, 28)).sum())
    state = opt.state_dict()
    assert state["extra"] == 1  # a post hook's return value replaces the state dict
    opt.load_state_dict(state)
    assert fired == ["step_pre", "step_post", "state_dict_pre", "load_pre", "load_post"]
    for handle in handles:
        handle.remove()
    opt.step(lambda: model(torch.randn(2, 1, 28, 28)).sum())
    assert len(fired) == 5


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_deepcopy_and_pickle_keep_the_inner_optimizer_and_the_estimator(copier):
    import pickle

    model, opt = _stepped()
    opt.register_step_pre_hook(lambda *_: None)  # hooks are dropped, as torch drops its own
    copied = copy.deepcopy(opt) if copier == "deepcopy" else pickle.loads(pickle.dumps(opt))
    assert isinstance(copied.optimizer, torch.optim.Adam) and copied.optimizer is not opt.optimizer
    assert copied.param_groups is copied.optimizer.param_groups
    assert copied.estimator.state_dict() == opt.estimator.state_dict()
    original, restored = opt.optimizer.state_dict(), copied.optimizer.state_dict()
    assert restored["param_groups"] == original["param_groups"]
    for key, state in original["state"].items():
        for name, value in state.items():
            assert torch.equal(restored["state"][key][name], value)
    assert len(copied._optimizer_step_pre_hooks) == 0
    # the copy trains its own copies of the parameters, exactly as the original trains its own
    params = [p for group in copied.param_groups for p in group["params"]]
    assert all(a is not b for a, b in zip(params, model.parameters()))
    x = torch.randn(4, 784)
    loss_of = lambda ps: lambda: (x @ ps[0].T + ps[1]).relu().sum()
    for o, ps in ((opt, list(model.parameters())), (copied, params)):
        o.zero_grad()
        o.step(loss_of(ps))
    for a, b in zip(params, model.parameters()):
        assert torch.equal(a, b)


def test_a_bad_inner_state_dict_leaves_the_wrapper_unchanged():
    _, opt = _stepped()
    before = opt.estimator.state_dict()
    state = opt.state_dict()
    state["forward_gradient"] = {**state["forward_gradient"], "step": 99}
    state["optimizer"] = {**state["optimizer"], "param_groups": []}
    with pytest.raises(ValueError):
        opt.load_state_dict(state)
    assert opt.estimator.state_dict() == before
    with pytest.raises(KeyError, match="opt.optimizer.load_state_dict"):
        opt.load_state_dict(opt.optimizer.state_dict())


def three_steps(make_inner, keep_grads, num_directions, hook=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(20, 16), nn.Flatten(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 3))
    ids, y = torch.randint(0, 20, (8, 3)), torch.randint(0, 3, (8,))
    inner = make_inner(model.parameters())
    if hook:  # the class docstring's way to clip the estimate: it needs every .grad at once
        inner.register_step_pre_hook(lambda *_: torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1) and None)
    opt = ForwardGradient(inner, num_directions=num_directions, seed=3, keep_grads=keep_grads)
    for _ in range(3):
        opt.zero_grad()
        opt.step(lambda: F.cross_entropy(model(ids), y))
    return model, opt


STATEFUL_INNER = {
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, foreach=True),
}


@pytest.mark.parametrize("num_directions", [1, 2])
@pytest.mark.parametrize("inner", list(STATEFUL_INNER))
def test_steps_a_few_parameters_at_a_time_with_the_same_updates_and_no_whole_grad(inner, num_directions,
                                                                                  monkeypatch):
    from fwdgrad_plugins.estimators import core

    monkeypatch.setattr(core, "CONSUME_BYTES", 2000)  # several groups on this small model
    held = []
    consume = ForwardGradient._step_parameters

    def recording(self, params):
        held.append(sum(p.grad.nbytes for p in self.estimator_params if p.grad is not None))
        consume(self, params)

    monkeypatch.setattr(ForwardGradient, "_step_parameters", recording)
    monkeypatch.setattr(ForwardGradient, "estimator_params", property(
        lambda self: [p for group in self.param_groups for p in group["params"]]), raising=False)
    lean, lean_opt = three_steps(STATEFUL_INNER[inner], keep_grads=False, num_directions=num_directions)
    kept, _ = three_steps(STATEFUL_INNER[inner], keep_grads=True, num_directions=num_directions)
    for a, b in zip(lean.parameters(), kept.parameters()):
        assert torch.equal(a, b)
        assert a.grad is None and b.grad is not None  # the lean step leaves no .grad behind
    largest = max(p.nbytes for p in lean.parameters())
    assert len(held) == 2 * 3 and max(held) <= 2000 + largest  # two groups of about CONSUME_BYTES a step
    assert lean_opt.state_dict()["optimizer"]["state"].keys() == set(range(len(list(lean.parameters()))))


def test_the_whole_estimate_is_written_where_the_optimizer_needs_it():
    """A step hook that clips sees every .grad; an optimizer the wrapper does not know, and a
    .grad already there (accumulation), keep the whole-estimate path."""
    hooked, _ = three_steps(STATEFUL_INNER["sgd-momentum"], keep_grads=False, num_directions=1, hook=True)
    assert all(p.grad is not None for p in hooked.parameters())
    norm = torch.nn.utils.clip_grad_norm_(list(hooked.parameters()), float("inf"))
    assert norm <= 0.1 + 1e-6  # clipped as a whole

    class MyOptimizer(torch.optim.SGD):
        pass

    custom, _ = three_steps(lambda p: MyOptimizer(p, lr=0.1), keep_grads=False, num_directions=1)
    assert all(p.grad is not None for p in custom.parameters())
    model = nn.Linear(3, 1)
    opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.0), seed=1)
    model.weight.grad = torch.ones_like(model.weight)
    opt.step(lambda: model(torch.ones(2, 3)).sum())
    assert model.weight.grad is not None and model.bias.grad is not None  # added to, and kept


def test_a_global_step_hook_or_unknown_hook_bookkeeping_keeps_the_whole_estimate(monkeypatch):
    """A global optimizer hook would run once per group of parameters; where torch keeps its
    hooks elsewhere the wrapper cannot tell, so both take the whole-estimate path."""
    import types

    from torch.optim import optimizer as torch_optimizer

    seen = []
    handle = torch_optimizer.register_optimizer_step_pre_hook(lambda opt, *_: seen.append(opt))
    try:
        hooked, opt = three_steps(STATEFUL_INNER["adam"], keep_grads=False, num_directions=1)
    finally:
        handle.remove()
    assert all(p.grad is not None for p in hooked.parameters())
    assert seen.count(opt.optimizer) == 3  # once per step
    from fwdgrad_plugins.integrations import torch_optim

    monkeypatch.setattr(torch_optim, "torch_optimizer", types.SimpleNamespace())  # a torch that keeps them elsewhere
    unknown, _ = three_steps(STATEFUL_INNER["adam"], keep_grads=False, num_directions=1)
    assert all(p.grad is not None for p in unknown.parameters())
