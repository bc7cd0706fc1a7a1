"""Per-example weight perturbation (``weight-per-example``): its tangents are weight tangents
V_b = a_b c_bᵀ, one per example (exact against jvp and per-example autograd), its estimate
is unbiased, it has less error than one tangent shared by the batch, and it never runs
backward."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad_plugins
import toy_models
from fwdgrad_plugins import ForwardGradient, ForwardGradientEstimator
from fwdgrad_plugins.estimators.per_example import PerExampleWeightPerturbation, per_example_factors
from fwdgrad_plugins.estimators.blockwise import BlockwiseWeightPerturbation
from fwdgrad_plugins.estimators.weight import WeightPerturbation

GAUSSIAN = fwdgrad_plugins.get("tangent_samplers", "gaussian")()

pytestmark = pytest.mark.usefixtures("one_thread")


def estimate(closure, params, seed=0, num_directions=1, estimator=None):
    return (estimator or PerExampleWeightPerturbation()).estimate(
        closure, list(params), sampler=GAUSSIAN, num_directions=num_directions, seed=seed)


def mlp(batch=6):
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(batch, 5), torch.randint(0, 3, (batch,))
    return model, x, y


def cnn(batch=3):
    model = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), nn.Tanh(), nn.Flatten(),
                          nn.Linear(36, 3))
    x, y = torch.randn(batch, 4, 6, 6), torch.randint(0, 3, (batch,))
    return model, x, y


def dense_tangents(params, batch, seed, k=0):
    """Example b's tangent of every parameter, V_b = a_b c_bᵀ (e_b for a bias), as drawn."""
    tangents = []
    for index, p in enumerate(params):
        factors = per_example_factors(GAUSSIAN, p, index, batch, 1, seed)
        if len(factors) == 2:
            a, c = factors[0][k], factors[1][k]
            tangents.append((a.unsqueeze(2) * c.unsqueeze(1)).reshape(batch, *p.shape))
        else:
            tangents.append(factors[0][k])
    return tangents  # each (B, *p.shape)


def test_registered_and_reachable_by_name():
    assert {"weight-per-example", "weight-per-example-blockwise", "weight-per-example-span",
            "weight-per-example-span-blockwise"} <= set(fwdgrad_plugins.registered("estimators"))
    fg = ForwardGradientEstimator(estimator="weight-per-example")
    assert isinstance(fg.estimator, PerExampleWeightPerturbation) and fg.estimator.reduces_gradients
    assert not fg.estimator.input_span
    assert ForwardGradientEstimator(estimator="weight-per-example-blockwise").estimator.blocks == "layer"
    span = ForwardGradientEstimator(estimator="weight-per-example-span-blockwise").estimator
    assert span.input_span and span.blocks == "layer"
    assert ForwardGradientEstimator(estimator="weight-per-example-span").estimator.blocks is None
    with pytest.raises(ValueError, match="blocks must be one of"):
        ForwardGradientEstimator(estimator="weight-per-example", estimator_options={"blocks": "row"})


@pytest.mark.parametrize("make", [mlp, cnn])
def test_one_example_derivative_is_jvp_along_its_weight_tangent(make):
    model, x, y = make(batch=1)
    params = list(model.parameters())
    result = estimate(lambda: F.cross_entropy(model(x), y), params, seed=3)
    tangents = [t[0] for t in dense_tangents(params, 1, seed=3)]
    names = [n for n, _ in model.named_parameters()]
    _, expected = torch.func.jvp(
        lambda *values: F.cross_entropy(torch.func.functional_call(model, dict(zip(names, values)), (x,)), y),
        tuple(p.detach() for p in params), tuple(tangents))
    torch.testing.assert_close(result.directional_derivatives[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make", [mlp, cnn])
def test_estimate_is_each_examples_gradient_along_its_own_tangent(make):
    # ĝ = Σ_b (∇ℓ_b · V_b) V_b with ℓ_b = CE_b / B: per-example autograd, for the same V_b
    model, x, y = make(batch=3)
    params = list(model.parameters())
    result = estimate(lambda: F.cross_entropy(model(x), y), params, seed=5)
    tangents = dense_tangents(params, 3, seed=5)
    expected = [torch.zeros_like(p) for p in params]
    for b in range(3):
        grads = torch.autograd.grad(F.cross_entropy(model(x[b:b + 1]), y[b:b + 1]) / 3, params)
        d = sum((g * t[b]).sum() for g, t in zip(grads, tangents))
        for e, t in zip(expected, tangents):
            e += d * t[b]
    for got, want in zip(result.grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


class TokenModel(nn.Module):
    """A linear layer over 2 tokens of 6 features (fewer inputs per example than its fan-in),
    then a head over the flattened tokens."""

    def __init__(self):
        super().__init__()
        self.tokens, self.head = nn.Linear(6, 5), nn.Linear(10, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.tokens(x)).flatten(1))


def token_model(batch=4):
    model = TokenModel()
    x, y = torch.randn(batch, 2, 6), torch.randint(0, 3, (batch,))
    return model, x, y


def test_input_span_estimate_uses_each_tangent_projected_onto_its_examples_inputs():
    # ĝ_W = Σ_b (∇ℓ_b · V_b) a_b (P_b c_b)ᵀ, P_b = X_b⁺ X_b the projector onto the rows of
    # example b's inputs to W (computed here by pseudo-inverse, there by QR); biases as before
    model, x, y = token_model(batch=3)
    params = list(model.parameters())
    result = estimate(lambda: F.cross_entropy(model(x), y), params, seed=5,
                      estimator=PerExampleWeightPerturbation(input_span=True))
    inputs = [x, torch.tanh(model.tokens(x)).flatten(1).unsqueeze(1)]  # (B, rows, fan-in) per weight
    expected = [torch.zeros_like(p) for p in params]
    tangents = dense_tangents(params, 3, seed=5)
    for b in range(3):
        grads = torch.autograd.grad(F.cross_entropy(model(x[b:b + 1]), y[b:b + 1]) / 3, params)
        d = sum((g * t[b]).sum() for g, t in zip(grads, tangents))
        for i, p in enumerate(params):
            factors = per_example_factors(GAUSSIAN, p, i, 3, 1, 5)
            if len(factors) == 1:
                expected[i] += d * factors[0][0, b]
                continue
            rows = inputs[i // 2][b].detach()
            projected = torch.linalg.pinv(rows) @ rows @ factors[1][0, b]
            expected[i] += d * torch.outer(factors[0][0, b], projected)
    assert _has_projected(expected[0], tangents[0])
    for got, want in zip(result.grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def _has_projected(estimate, tangents):
    """The projection changed something: the estimate is not a combination of the drawn V_b."""
    basis = tangents.reshape(tangents.shape[0], -1).T  # (numel, B)
    residual = estimate.flatten() - basis @ torch.linalg.lstsq(basis, estimate.flatten()).solution
    return residual.norm() > 1e-3 * estimate.norm()


def test_per_example_weight_tangents_take_neither_groups_nor_orthogonal():
    from fwdgrad_plugins.estimators.activity import activity_perturbation

    model, x, y = mlp()
    tangents = PerExampleWeightPerturbation(input_span=True)._tangents(GAUSSIAN, 1, 0)
    with pytest.raises(ValueError, match="neither groups nor orthogonal"):
        activity_perturbation(lambda: F.cross_entropy(model(x), y), list(model.parameters()),
                              sampler=GAUSSIAN, num_directions=1, seed=0, orthogonal=True,
                              weight_tangents=tangents)


def layer_norm_mlp():
    """Linear layers (per-example weight tangents) and a LayerNorm (shared-tangent fallback)."""
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    return model, lambda: F.cross_entropy(model(x), y)


def small_cnn():
    model, x, y = cnn(batch=4)
    return model, lambda: F.cross_entropy(model(x), y)


def embedding_mlp():
    """An embedding (no F.linear: shared weight perturbation, a block of its own per layer)."""
    model = nn.Sequential(nn.Embedding(7, 5), nn.Flatten(), nn.Linear(15, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randint(0, 7, (6, 3)), torch.randint(0, 3, (6,))
    return model, lambda: F.cross_entropy(model(x), y)


def tokens():
    model, x, y = token_model()
    return model, lambda: F.cross_entropy(model(x), y)


class TiedEmbedding(nn.Module):
    """An embedding whose weight is also the output layer's (F.embedding and F.linear)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(7, 5)

    def forward(self, ids):
        return F.linear(torch.tanh(self.embedding(ids).mean(1)), self.embedding.weight)


def tied_embedding():
    model = TiedEmbedding()
    ids, y = torch.randint(0, 7, (6, 3)), torch.randint(0, 7, (6,))
    return model, lambda: F.cross_entropy(model(ids), y)


def strided_cnn():
    """A conv2d with one output position per group: 2 input rows per example, fan-in 18."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(4, 4, 4, 4), torch.randint(0, 3, (4,))
    return model, lambda: F.cross_entropy(model(x), y)


@pytest.mark.slow
@pytest.mark.parametrize("make, blocks, input_span", [
    (layer_norm_mlp, None, False), (small_cnn, None, False), (toy_models.tied, None, False),
    (layer_norm_mlp, "layer", False), (embedding_mlp, "layer", False),
    (tokens, None, True), (strided_cnn, None, True), (toy_models.tied, None, True),
    (tied_embedding, None, True),
    (embedding_mlp, "layer", True),
])
def test_mean_over_draws_is_the_task_loss_gradient(make, blocks, input_span):
    model, closure = make()
    params = list(model.parameters())
    draws = 400 if blocks is None else 200  # per block: one pass per layer
    estimator = PerExampleWeightPerturbation(blocks=blocks, input_span=input_span)
    estimates = [estimate(closure, params, seed=s, num_directions=2, estimator=estimator).grads
                 for s in range(draws)]
    expected = torch.autograd.grad(closure(), params)
    for i, want in enumerate(expected):
        samples = torch.stack([e[i] for e in estimates])
        standard_error = samples.std(0) / draws ** 0.5
        z = (samples.mean(0) - want).abs() / (standard_error + 1e-9)
        assert ((samples.mean(0) - want).abs() <= 5 * standard_error + 1e-6).all(), (i, z.max())


@pytest.mark.slow
def test_less_error_than_one_tangent_shared_by_the_batch():
    # A regression the untrained model gets wrong in the same way for every example: the
    # examples' gradients agree, which is when independent per-example tangents pay.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(32, 10)
    closure = lambda: F.mse_loss(model(x), 2 * x[:, :4])  # noqa: E731
    params = list(model.parameters())
    true = torch.cat([g.flatten() for g in torch.autograd.grad(closure(), params)])

    def mean_squared_error(estimator, sampler=GAUSSIAN):
        errors = [(torch.cat([g.flatten() for g in estimator.estimate(
            closure, params, sampler=sampler, num_directions=2, seed=s).grads]) - true).pow(2).sum()
            for s in range(100)]
        return float(torch.stack(errors).mean())

    shared = mean_squared_error(WeightPerturbation())
    shared_rank1 = mean_squared_error(WeightPerturbation(), fwdgrad_plugins.get("tangent_samplers", "rank1-gaussian")())
    per_example = mean_squared_error(PerExampleWeightPerturbation())
    assert per_example < 0.6 * min(shared, shared_rank1), (per_example, shared, shared_rank1)
    # and per block (two layers: one pass each), against FG-W block-wise with as many passes
    blockwise = mean_squared_error(BlockwiseWeightPerturbation())
    per_example_blockwise = mean_squared_error(PerExampleWeightPerturbation(blocks="layer"))
    assert per_example_blockwise < 0.6 * blockwise
    # the input span (one input vector per example) removes the fan-in's factor from the error
    assert mean_squared_error(PerExampleWeightPerturbation(input_span=True)) < 0.5 * per_example
    span_blockwise = mean_squared_error(PerExampleWeightPerturbation(blocks="layer", input_span=True))
    assert span_blockwise < 0.5 * per_example_blockwise


@pytest.mark.slow
def test_input_span_lowers_the_error_where_examples_disagree():
    # independent labels: the examples' gradients disagree, where per-example tangents alone
    # gain little; restricting c_b to the example's input still removes the fan-in's noise
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    params = list(model.parameters())
    true = torch.cat([g.flatten() for g in torch.autograd.grad(closure(), params)])

    def mean_squared_error(estimator):
        return float(torch.stack([(torch.cat([g.flatten() for g in estimator.estimate(
            closure, params, sampler=GAUSSIAN, num_directions=1, seed=s).grads]) - true).pow(2).sum()
            for s in range(100)]).mean())

    assert (mean_squared_error(PerExampleWeightPerturbation(input_span=True))
            < 0.3 * mean_squared_error(PerExampleWeightPerturbation()))


NAMES = ["weight-per-example", "weight-per-example-blockwise", "weight-per-example-span",
         "weight-per-example-span-blockwise"]


@pytest.mark.parametrize("name", NAMES)
def test_no_backward_pass(no_backward, name):
    model, closure = small_cnn()
    no_backward(model)
    fg = ForwardGradientEstimator(estimator=name, num_directions=2, seed=0)
    fg.backward(closure, model.parameters())
    assert all(p.grad is not None and p.grad.grad_fn is None and p.grad.abs().sum() > 0
               for p in model.parameters())


def train(name, steps, start=0, state=None):
    """Trains through ``ForwardGradient`` (with dropout) from ``state``; returns the parameters
    and the state after ``steps`` steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    opt = ForwardGradient(torch.optim.Adam(model.parameters(), lr=1e-2), estimator=name, num_directions=2, seed=7)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])
    generator = torch.Generator().manual_seed(1)
    data = [torch.randn(32, 4, generator=generator) for _ in range(start + steps)]
    losses = []
    for x in data[start:]:
        y = (x[:, :3] * torch.tensor([1.0, -1.0, 0.5])).argmax(1)
        opt.zero_grad()
        losses.append(opt.step(lambda: F.cross_entropy(model(x), y)).item())
    return model, losses, {"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_trains_and_resumes_bit_identically(name):
    model, losses, _ = train(name, 60)
    assert sum(losses[-10:]) < 0.85 * sum(losses[:10])  # it descends
    first, _, state = train(name, 30)
    resumed, _, _ = train(name, 30, start=30, state=state)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


@pytest.mark.parametrize("layer, x", [
    (nn.Linear(6, 5), torch.randn(4, 2, 3, 6)),
    (nn.Conv2d(4, 4, 3, stride=2, groups=2), torch.randn(3, 4, 4, 4)),
    (nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2), torch.randn(3, 4, 6, 6)),
    (nn.Conv2d(3, 8, (3, 2), dilation=2, padding="same"), torch.randn(2, 3, 7, 7)),
])
def test_the_input_row_count_read_off_the_shapes_is_the_rows_formed(layer, x):
    # the input span skips forming (unfolding) the rows where their count reaches the fan-in
    from fwdgrad_plugins.estimators.per_example import _input_row_count, _input_rows
    from fwdgrad_plugins.estimators.activity import _Layer

    func = F.linear if isinstance(layer, nn.Linear) else F.conv2d
    options = {} if func is F.linear else dict(stride=layer.stride, padding=layer.padding,
                                               dilation=layer.dilation, groups=layer.groups)
    call = _Layer(func, layer.weight, layer.bias, x, layer(x).detach(), options)
    assert _input_row_count(call) == _input_rows(call).shape[1]
