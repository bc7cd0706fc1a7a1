"""Tangent samplers: the second moment E[v vᵀ] is the identity for every registered sampler,
and the Rademacher sampler gives exact, fair, independent signs."""

import pytest
import torch

import fwdgrad_plugins
from fwdgrad_plugins.engine.forward_mode import directional_derivatives
from fwdgrad_plugins.tangents.tangent import RankOne, Workspace

SAMPLERS = fwdgrad_plugins.registered("tangent_samplers")


def flat(tangents):
    """(K, number of parameters): the K tangents, flattened."""
    return torch.cat([(t.dense() if isinstance(t, RankOne) else t).flatten(1) for t in tangents], dim=1)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_second_moment_is_identity(sampler):
    params = [torch.zeros(3, 2), torch.zeros(3)]  # a 2-D weight (rank-one applies) and a bias
    n = 20000
    tangents = fwdgrad_plugins.get("tangent_samplers", sampler)().sample(params, n, seed=3)
    v = flat(tangents).double()  # (N, 9)
    second_moment = v.T @ v / n
    # each entry of v vᵀ has variance E[v_i² v_j²] <= 9 for these samplers (Gaussian: 3)
    assert (second_moment - torch.eye(9, dtype=torch.float64)).abs().max() < 5 * (9 / n) ** 0.5


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_same_tangents_other_seed_others(sampler):
    params = [torch.zeros(300, 1000)]
    draw = fwdgrad_plugins.get("tangent_samplers", sampler)().sample
    first, again, other = (flat(draw(params, 1, seed)) for seed in (5, 5, 6))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_rademacher_signs_are_exact_fair_and_independent():
    # 2**20 + 7 entries: a ragged end
    (tangent,) = fwdgrad_plugins.get("tangent_samplers", "rademacher")().sample(
        [torch.zeros(2**20 + 7)], 1, seed=0)
    signs = tangent.flatten()
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    # every position modulo 64 is fair (a stuck bit of the hash would give +1 there always)
    by_bit = signs[: 2**20].view(-1, 64).mean(0)
    assert by_bit.abs().max() < 5 / (2**20 / 64) ** 0.5
    # neighbours are uncorrelated
    assert (signs[1:] * signs[:-1]).mean().abs() < 5 / 2**10


class AddmmLayer(torch.nn.Module):
    """Like HuggingFace's Conv1D (GPT-2): torch.addmm with a (in, out) weight."""

    def __init__(self, features_in, features_out):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(features_in, features_out))
        self.bias = torch.nn.Parameter(torch.randn(features_out))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight, beta=0.5, alpha=2.0)


@pytest.mark.parametrize("frozen_first_bias", [False, True])
@pytest.mark.parametrize("num_directions", [1, 3])
def test_rank_one_tangents_through_addmm_equal_autograd(num_directions, frozen_first_bias):
    """rank1-gaussian applies u wᵀ on an addmm weight without materialising it."""
    model = torch.nn.Sequential(AddmmLayer(5, 4), torch.nn.Tanh(), AddmmLayer(4, 3))
    model[0].bias.requires_grad_(not frozen_first_bias)  # then the first output's only tangent is u wᵀ's
    x = torch.randn(2, 3, 5)
    closure = lambda: model(x).pow(2).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    tangents = fwdgrad_plugins.get("tangent_samplers", "rank1-gaussian")().sample(params, num_directions, seed=2)
    assert isinstance(tangents[0], RankOne)
    result = directional_derivatives(closure, params, tangents)
    grads = torch.autograd.grad(closure(), params)
    expected = flat(tangents) @ torch.cat([g.flatten() for g in grads])
    torch.testing.assert_close(result.derivatives, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_workspace_gives_the_same_tangents_in_memory_kept_between_draws(sampler):
    params = [torch.zeros(30, 20), torch.zeros(20), torch.zeros(4, 5, 3)]
    draw = fwdgrad_plugins.get("tangent_samplers", sampler)().sample
    workspace = Workspace(min_bytes=0)
    first = draw(params, 3, seed=5, workspace=workspace)
    assert torch.equal(flat(first), flat(draw(params, 3, seed=5)))
    pointer = workspace.take({torch.device("cpu"): 1})[torch.device("cpu")].data_ptr()
    second = flat(draw(params, 3, seed=6, workspace=workspace))
    assert workspace.take({torch.device("cpu"): 1})[torch.device("cpu")].data_ptr() == pointer
    assert torch.equal(second, flat(draw(params, 3, seed=6)))
    assert torch.equal(flat(first), second)  # the first draw's memory now holds the second's values


def test_a_workspace_grows_for_a_larger_draw_and_frees_its_memory_on_clear():
    workspace = Workspace(min_bytes=0)
    cpu = torch.device("cpu")
    small = workspace.take({cpu: 10})[cpu]
    large = workspace.take({cpu: 1000})[cpu]
    assert small.numel() == 10 and large.numel() == 1000 and workspace.nbytes == 4000
    workspace.clear()
    assert workspace.nbytes == 0


def test_a_workspace_serves_only_cpu_draws_above_its_size():
    workspace = Workspace(min_bytes=400)
    cpu = torch.device("cpu")
    assert workspace.take({cpu: 100}) == {} and workspace.nbytes == 0  # 400 bytes: drawn afresh
    assert workspace.take({cpu: 101})[cpu].numel() == 101
    assert workspace.take({torch.device("meta"): 1000}) == {}  # other devices keep their own memory
