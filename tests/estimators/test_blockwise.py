"""Orthogonal, block-wise and guided directions: unbiased against autograd (or, for the
size-scaled block-wise estimate, biased as documented and still descending), no backward
pass, bit-identical resume, identical parameters across two processes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fwdgrad_plugins
from fwdgrad_plugins import ForwardGradientEstimator
from fwdgrad_plugins.estimators.blockwise import BlockwiseWeightPerturbation, parameter_blocks
from fwdgrad_plugins.estimators.guided import GuidedWeightPerturbation
from fwdgrad_plugins.tangents.orthogonal import OrthogonalGaussianSampler
from fwdgrad_plugins.estimators.weight import WeightPerturbation

HERE = Path(__file__).resolve().parents[1]

# (estimator name, options, sampler, K): every new estimator or sampler, as a user names it
VARIANTS = [
    ("weight", {}, "orthogonal-gaussian", 3),
    ("blockwise", {}, "gaussian", 2),
    ("blockwise", {"blocks": "parameter", "blocks_per_step": 2}, "gaussian", 1),
    ("guided", {}, "gaussian", 3),
]
# The orthogonal sampler's unbiasedness is tests/estimators/test_core.py's (parameterised over every
# registered sampler); blockwise-scaled is biased: tested apart. Few draws of K = 16 each.
UNBIASED = [("blockwise", {}, "gaussian"), ("blockwise", {"blocks": "parameter", "blocks_per_step": 2}, "gaussian"),
            ("guided", {}, "gaussian"), ("guided-k1", {}, "gaussian")]


def small_problem(gradient=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(6, 4), torch.randn(6, 2)
    closure = lambda: nn.functional.mse_loss(model(x), y)
    params = list(model.parameters())
    if not gradient:  # under the no_backward fixture, autograd may not run
        return model, closure, params, None
    true_gradient = torch.cat([g.flatten() for g in torch.autograd.grad(closure(), params)])
    return model, closure, params, true_gradient


def flat(grads, params):
    """One vector of the estimate; a block not perturbed this step (None) counts as zero."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])


def draws(estimator, closure, params, sampler, k, n, reset=None):
    sampler = fwdgrad_plugins.get("tangent_samplers", sampler)()
    out = []
    for seed in range(n):
        if reset is not None:
            reset()
        out.append(flat(estimator.estimate(closure, params, sampler=sampler, num_directions=k, seed=seed).grads, params))
    return torch.stack(out)  # (n, P)


def z_scores(estimates, true_gradient):
    return (estimates.mean(0) - true_gradient) / (estimates.std(0) / len(estimates) ** 0.5)


def test_every_variant_is_registered():
    assert {"blockwise", "blockwise-scaled", "guided"} <= set(fwdgrad_plugins.registered("estimators"))
    assert "orthogonal-gaussian" in fwdgrad_plugins.registered("tangent_samplers")


@pytest.mark.slow
@pytest.mark.parametrize("name, options, sampler", UNBIASED)
def test_mean_of_estimates_is_autograds_gradient(name, options, sampler):
    _, closure, params, true_gradient = small_problem()
    k = 1 if name == "guided-k1" else 16
    estimator = fwdgrad_plugins.get("estimators", name.removesuffix("-k1"))(**options)
    reset = None
    if name.startswith("guided"):  # a fixed, imperfect guess: the estimate must be unbiased for any
        guess = [torch.randn_like(p) + 3 * g for p, g in zip(params, torch.autograd.grad(closure(), params))]
        state = {"momentum": 0.9, "mean": guess}
        reset = lambda: estimator.load_state_dict(state)
    n = 400 if k == 1 else 100
    z = z_scores(draws(estimator, closure, params, sampler, k, n, reset), true_gradient)
    assert z.abs().max() < 5, f"mean of {n} estimates is {z.abs().max():.1f} standard errors off"


def test_orthogonal_directions_are_orthogonal_and_k_equal_n_is_exact():
    w = torch.zeros(3, 4)
    v = OrthogonalGaussianSampler().sample([w], 5, seed=1)[0].flatten(1)
    torch.testing.assert_close(v @ v.T, 12 * torch.eye(5), atol=1e-4, rtol=0)
    # one parameter and K = n orthogonal directions: Σ v vᵀ = n I, so the estimate is exact
    model = nn.Linear(4, 3, bias=False)
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    closure = lambda: nn.functional.mse_loss(model(x), y)
    (exact,) = torch.autograd.grad(closure(), [model.weight])
    (grad,) = WeightPerturbation().estimate(closure, [model.weight], sampler=OrthogonalGaussianSampler(),
                                            num_directions=12, seed=0).grads
    torch.testing.assert_close(grad, exact, atol=1e-5, rtol=1e-4)


def total_variance(estimates, true_gradient):
    return ((estimates - true_gradient) ** 2).sum(1).mean()


@pytest.mark.slow
def test_blockwise_and_a_good_guess_lower_the_variance():
    _, closure, params, true_gradient = small_problem()
    plain = total_variance(draws(WeightPerturbation(), closure, params, "gaussian", 2, 100), true_gradient)
    blockwise = total_variance(draws(BlockwiseWeightPerturbation(), closure, params, "gaussian", 1, 100),
                               true_gradient)  # two layers: two derivatives, as plain K = 2
    assert blockwise < 0.8 * plain, f"block-wise variance {blockwise:.3g} vs FG-W K=2 {plain:.3g}"
    guided = GuidedWeightPerturbation()
    grads = torch.autograd.grad(closure(), params)
    state = {"momentum": 0.9, "mean": [g + 0.1 * torch.randn_like(g) * g.abs().mean() for g in grads]}
    with_guess = total_variance(draws(guided, closure, params, "gaussian", 2, 100,
                                      lambda: guided.load_state_dict(state)), true_gradient)
    assert with_guess < 0.2 * plain, f"guided variance {with_guess:.3g} vs FG-W K=2 {plain:.3g}"


@pytest.mark.slow
def test_blockwise_noise_of_a_block_is_its_own():
    """Per tensor, a block's error is set by its own gradient, not by the largest block's: a
    block holding a small share of ‖g‖² (LoRA's q adapters on the repeated-phrase task) is
    estimated far better than by FG-W with as many derivatives in all, and a block whose
    gradient is zero (LoRA's A while B = 0) gets exactly zero, where FG-W gives it noise."""
    torch.manual_seed(0)
    big, small, frozen = nn.Parameter(torch.randn(40)), nn.Parameter(torch.randn(40)), nn.Parameter(torch.randn(8, 5))
    gate = torch.zeros(5)  # B = 0: the loss depends on `frozen` through gate @ frozen only
    closure = lambda: 0.5 * big.pow(2).sum() + 0.5e-4 * small.pow(2).sum() + (frozen @ gate).sum() * big.sum()
    params = [big, small, frozen]
    true_gradient = torch.cat([g.flatten() for g in torch.autograd.grad(closure(), params)])
    k = 8  # per block: 3 x 8 derivatives, against FG-W with 24
    blockwise = draws(BlockwiseWeightPerturbation(blocks="parameter"), closure, params, "gaussian", k, 60)
    plain = draws(WeightPerturbation(), closure, params, "gaussian", 3 * k, 60)
    part = slice(40, 80)  # `small`

    def relative_error(estimates):
        return ((estimates[:, part] - true_gradient[part]) ** 2).sum(1).mean() / true_gradient[part].pow(2).sum()

    assert relative_error(blockwise) < 2 * (40 + 1) / k  # its own size: E = (n_b + 1) / K
    assert relative_error(blockwise) < 1e-3 * relative_error(plain)  # FG-W: (n + 1)‖g‖² / (K ‖g_b‖²)
    assert torch.equal(blockwise[:, 80:], torch.zeros_like(blockwise[:, 80:]))
    assert plain[:, 80:].abs().max() > 1


@pytest.mark.slow
def test_size_scaled_blockwise_is_biased_by_its_documented_scale():
    """``blockwise-scaled`` estimates D g with D = 1/√(n_b + 2) per block: biased for g."""
    _, closure, params, true_gradient = small_problem()
    scales = torch.cat([torch.full((sum(params[i].numel() for i in b),), 1 / (sum(params[i].numel() for i in b) + 2) ** 0.5)
                        for b in parameter_blocks(params)])
    estimates = draws(fwdgrad_plugins.get("estimators", "blockwise-scaled")(), closure, params, "gaussian", 16, 100)
    assert z_scores(estimates, scales * true_gradient).abs().max() < 5
    assert z_scores(estimates, true_gradient).abs().max() > 8  # not the gradient itself


@pytest.mark.slow
@pytest.mark.parametrize("name", ["blockwise-scaled", "guided"])
def test_descends_on_a_quadratic(name):
    torch.manual_seed(0)
    target = torch.randn(20)
    curvature = torch.linspace(0.5, 2.0, 20)
    theta = nn.Parameter(torch.zeros(20))
    bias = nn.Parameter(torch.zeros(()))
    closure = lambda: 0.5 * (curvature * (theta - target) ** 2).sum() + bias ** 2
    start = closure().item()
    fg = ForwardGradientEstimator(estimator=name, num_directions=3, seed=0)
    optimizer = torch.optim.SGD([theta, bias], lr=0.5 if name == "blockwise-scaled" else 0.05)
    for _ in range(200):
        optimizer.zero_grad()
        fg.backward(closure, [theta, bias])
        optimizer.step()
    assert closure().item() < 0.05 * start


@pytest.mark.parametrize("name, options, sampler, k", VARIANTS + [("blockwise-scaled", {}, "rank1-gaussian", 1)])
def test_no_backward_pass_runs(no_backward, name, options, sampler, k):
    model, closure, params, _ = small_problem(gradient=False)
    no_backward(model)
    fg = ForwardGradientEstimator(estimator=name, estimator_options=options, tangents=sampler, num_directions=k)
    for _ in range(2):
        fg.backward(closure, params)
    written = [p for p in params if p.grad is not None]  # blocks_per_step leaves some out
    assert written and all(p.grad.abs().sum() > 0 for p in written)


def train(model, fg, optimizer, steps, start=0):
    generator = torch.Generator().manual_seed(1)
    data = [(torch.randn(6, 4, generator=generator), torch.randn(6, 2, generator=generator))
            for _ in range(start + steps)]
    dropout = nn.Dropout(0.2)  # the same mask for every block's pass, and resumed from the RNG
    for x, y in data[start:]:
        optimizer.zero_grad()
        fg.backward(lambda: nn.functional.mse_loss(dropout(model(x)), y), model.parameters())
        optimizer.step()


@pytest.mark.slow
@pytest.mark.parametrize("name, options, sampler, k", VARIANTS + [("blockwise-scaled", {}, "gaussian", 1),
                                                       ("guided", {}, "gaussian", 1)])
def test_resume_is_bit_identical(name, options, sampler, k):
    def fresh():
        model, *_ = small_problem()
        fg = ForwardGradientEstimator(estimator=name, estimator_options=options, tangents=sampler,
                                      num_directions=k, seed=4)
        return model, fg, torch.optim.Adam(model.parameters(), lr=1e-2)

    model, fg, optimizer = fresh()
    torch.manual_seed(2)
    train(model, fg, optimizer, 6)
    first, fg1, opt1 = fresh()
    torch.manual_seed(2)
    train(first, fg1, opt1, 3)
    saved = {"model": first.state_dict(), "fg": fg1.state_dict(), "opt": opt1.state_dict(),
             "rng": torch.get_rng_state()}  # dropout's position, as a checkpoint keeps it
    saved = torch.load(_roundtrip(saved), weights_only=True)
    resumed, fg2, opt2 = fresh()
    resumed.load_state_dict(saved["model"])
    fg2.load_state_dict(saved["fg"])
    opt2.load_state_dict(saved["opt"])
    torch.set_rng_state(saved["rng"])
    train(resumed, fg2, opt2, 3, start=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def _roundtrip(state):
    import io
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.slow
def test_two_processes_end_with_identical_parameters(tmp_path):
    """Two gloo processes, each with its own data, all-reduce the K derivatives only (the
    per-example estimators: their gradient estimates): both must end with the same
    parameters for every variant (see tests/two_process_directions.py)."""
    from processes import free_port
    from two_process_directions import VARIANTS as TRAINED  # what each process trains

    port = str(free_port())
    runs = [subprocess.Popen([sys.executable, str(HERE / "two_process_directions.py"), str(rank), "2", port],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outputs = []
    for process in runs:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-2000:]
        outputs.append(dict(line.split(" ", 1) for line in out.strip().splitlines()))
    assert outputs[0].keys() == outputs[1].keys() == TRAINED.keys()
    for name in outputs[0]:
        digest0, loss0 = outputs[0][name].split()
        digest1, loss1 = outputs[1][name].split()
        assert digest0 == digest1, f"{name}: the processes' parameters differ"
        assert loss0 != loss1, f"{name}: the processes saw the same data, so the test proves nothing"


@pytest.mark.parametrize("bad, match", [
    (dict(estimator="blockwise", estimator_options={"blocks": "row"}), "blocks must be one of"),
    (dict(estimator="blockwise", estimator_options={"blocks_per_step": 0}), "positive integer"),
    (dict(estimator="guided", estimator_options={"momentum": 1.0}), r"in \[0, 1\)"),
])
def test_bad_options_name_the_fix(bad, match):
    with pytest.raises(ValueError, match=match):
        ForwardGradientEstimator(**bad)


@pytest.mark.slow
def test_guided_with_one_direction_takes_either_part():
    """K = 1: half the steps go along the guess, half off it (each doubled)."""
    _, closure, params, _ = small_problem()
    guided = GuidedWeightPerturbation()
    guided.load_state_dict({"momentum": 0.5, "mean": [torch.randn_like(p) for p in params]})
    guess = flat(guided.mean, params) / flat(guided.mean, params).norm()
    along = 0
    for seed in range(40):
        state = guided.state_dict()
        grad = flat(guided.estimate(closure, params, sampler=fwdgrad_plugins.get("tangent_samplers", "gaussian")(),
                                    num_directions=1, seed=seed).grads, params)
        guided.load_state_dict(state)
        cosine = float(grad @ guess / grad.norm())
        assert abs(abs(cosine) - 1) < 1e-4 or abs(cosine) < 1e-4  # along û, or orthogonal to it
        along += abs(abs(cosine) - 1) < 1e-4
    assert 8 <= along <= 32
