"""Streamed tangents: each parameter's slice of the stream, drawn alone, is the whole draw's."""

import pytest
import torch

import fwdgrad_plugins
from fwdgrad_plugins import directional_derivatives
from fwdgrad_plugins.estimators.core import ForwardGradientEstimator, trainable_parameters
from fwdgrad_plugins.tangents.streaming import (
    LazyDirection,
    WholeTangents,
    combination,
    is_streamed,
    tangent_stream,
)
from fwdgrad_plugins.tangents.samplers import GaussianSampler
from fwdgrad_plugins.tangents.tangent import RankOne, combine

from toy_models import MODELS

BUILT_IN = ["gaussian", "rademacher", "rank1-gaussian"]


def sampler(name):
    return fwdgrad_plugins.get("tangent_samplers", name)()


def as_dense(t):
    return t.dense() if isinstance(t, RankOne) else t


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("num_directions", [1, 3])
def test_each_slice_is_the_whole_draws(name, num_directions):
    params = [torch.zeros(30, 40), torch.zeros(5), torch.zeros(2, 3, 4), torch.zeros(7, 9, dtype=torch.float64)]
    whole = sampler(name).sample(params, num_directions, seed=11)
    stream = tangent_stream(sampler(name), params, num_directions, seed=11)
    assert is_streamed(stream)
    for i, expected in reversed(list(enumerate(whole))):  # any order
        torch.testing.assert_close(as_dense(stream.draw_all(i)), as_dense(expected), rtol=0, atol=1e-6)
        for k in range(num_directions):
            one = stream.draw(i, k)
            one = torch.outer(*one) if isinstance(one, tuple) else one
            assert one.dtype == params[i].dtype
            torch.testing.assert_close(one, as_dense(expected)[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("num_directions", [1, 4])
def test_combination_of_a_stream_draws_one_direction_at_a_time(name, num_directions, monkeypatch):
    params = [torch.zeros(30, 40), torch.zeros(5)]
    coefficients = torch.tensor([0.5, -2.0, 1.5, 3.0])[:num_directions]
    whole = sampler(name).sample(params, num_directions, seed=5)
    stream = tangent_stream(sampler(name), params, num_directions, seed=5)
    if num_directions > 1:  # all K at once would be K copies of the parameter
        monkeypatch.setattr(stream, "draw_all", None)
    for i, tangents in enumerate(whole):
        torch.testing.assert_close(combination(stream, i, coefficients), combine(tangents, coefficients),
                                   rtol=1e-5, atol=1e-5)
        assert combination(WholeTangents(params, whole), i, coefficients).shape == params[i].shape


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_streamed_derivatives_equal_the_whole_draws(model_name, name):
    model, closure = MODELS[model_name]()
    model.eval()  # the same function twice (no dropout mask, no running statistics)
    params = trainable_parameters(model.parameters())
    whole = directional_derivatives(closure, params, sampler(name).sample(params, 1, seed=3))
    streamed = directional_derivatives(closure, params, tangent_stream(sampler(name), params, 1, seed=3))
    torch.testing.assert_close(streamed.derivatives, whole.derivatives, rtol=1e-5, atol=1e-6)
    assert streamed.used == whole.used and streamed.frozen_rows == whole.frozen_rows


def test_a_pass_draws_each_tangent_where_it_is_used_and_keeps_few():
    layers = [torch.nn.Linear(8, 8) for _ in range(6)]
    model = torch.nn.Sequential(*layers)
    x = torch.randn(4, 8)
    params = list(model.parameters())
    directions = tangent_stream(GaussianSampler(), params, 1, seed=0).direction_mapping(0)
    kept = []

    def closure():
        out = x
        for layer in layers:
            out = torch.tanh(layer(out))
            kept.append(len(directions._recent))
        return out.sum()

    from fwdgrad_plugins.engine.forward_mode import _single_direction

    with torch.no_grad():
        _single_direction(closure, params, directions)
    assert directions.draws == len(params)  # each weight and bias drawn once
    assert max(kept) <= directions.keep  # never more than a layer's tangents held


def test_a_sampler_without_stream_takes_the_whole_draw():
    calls = []

    class WholeOnly:
        def sample(self, params, num_directions, seed):
            calls.append(seed)
            return GaussianSampler().sample(params, num_directions, seed)

    params = [torch.zeros(3, 2)]
    stream = tangent_stream(WholeOnly(), params, 2, seed=4)
    assert isinstance(stream, WholeTangents) and not is_streamed(stream) and calls == [4]
    torch.testing.assert_close(stream.draw(0, 1), GaussianSampler().sample(params, 2, seed=4)[0][1])


@pytest.mark.parametrize("name", BUILT_IN)
def test_one_direction_estimate_is_the_whole_draws(name):
    """K = 1 streams; the estimate is d·v with v the sampler's whole draw for (seed, step)."""
    model, closure = MODELS["tiny_gpt2"]()
    model.eval()
    params = trainable_parameters(model.parameters())
    fg = ForwardGradientEstimator(tangents=name, seed=9)
    estimate = fg.backward(closure, params)
    from fwdgrad_plugins.tangents.counter_rng import derive_seed

    whole = sampler(name).sample(params, 1, derive_seed(9, 0))
    for grad, tangent, used in zip(estimate.grads, whole, [g is not None for g in estimate.grads]):
        if used:
            expected = as_dense(tangent)[0] * estimate.directional_derivatives[0]
            torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-7)


def test_lazy_direction_is_a_mapping_of_the_parameters():
    params = [torch.zeros(2), torch.zeros(3)]
    directions = LazyDirection(tangent_stream(GaussianSampler(), params, 1, seed=0), 0)
    assert id(params[1]) in directions and id(object()) not in directions and len(directions) == 2
    assert directions.get(id(object())) is None and directions.draws == 0
    assert directions[id(params[1])].shape == (3,) and directions.draws == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("model_name", ["cnn_batchnorm_dropout", "dropout_mlp", "tiny_gpt2"])
def test_streamed_directions_equal_one_vmap_pass(model_name, name):
    """K > 1 streamed: K passes from one RNG state (one dropout mask), running statistics
    updated once, the derivatives of the one-pass path."""
    model, closure = MODELS[model_name]()
    model.train()
    params = trainable_parameters(model.parameters())
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    torch.manual_seed(7)
    whole = directional_derivatives(closure, params, sampler(name).sample(params, 3, seed=3))
    after_whole = {k: v.clone() for k, v in model.named_buffers()}
    model.load_state_dict(buffers, strict=False)
    torch.manual_seed(7)
    streamed = directional_derivatives(closure, params, tangent_stream(sampler(name), params, 3, seed=3))
    torch.testing.assert_close(streamed.derivatives, whole.derivatives, rtol=1e-4, atol=1e-5)
    for key, value in model.named_buffers():
        torch.testing.assert_close(value, after_whole[key])


@pytest.mark.parametrize("num_directions", [1, 3])
def test_by_default_one_direction_streams_only_above_the_size_threshold(num_directions):
    """Streaming draws each tangent twice; below ``STREAM_MIN_BYTES`` of parameters one
    direction is drawn whole (it becomes the gradient), above it streamed; K > 1 is drawn
    whole for one vmap pass either way, and ``streamed=True`` streams any size and K."""
    from fwdgrad_plugins.estimators.weight import WeightPerturbation

    params = [torch.zeros(64, 64), torch.zeros(64)]
    small, large, forced = WeightPerturbation(), WeightPerturbation(), WeightPerturbation(streamed=True)
    large.STREAM_MIN_BYTES = 1024  # these parameters' 16.6 kB are then "large"
    draw = lambda estimator: estimator.tangents(sampler("gaussian"), params, num_directions, seed=0)
    assert not is_streamed(draw(small))
    assert is_streamed(draw(large)) == (num_directions == 1)
    assert is_streamed(draw(forced))
