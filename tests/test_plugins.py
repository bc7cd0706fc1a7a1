"""The pluggy registry: every hook works, for built-in and third-party plugins alike."""

import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fwdgrad_plugins
from fwdgrad_plugins import ForwardGradient, hookimpl, hookspecs
from fwdgrad_plugins.estimators.weight import WeightPerturbation
from fwdgrad_plugins.plugins import DuplicateNameError, plugin_manager


class UniformSampler:
    """A third-party sampler: uniform on [-√3, √3] has zero mean and unit variance."""

    def sample(self, params, num_directions, seed):
        generator = torch.Generator().manual_seed(seed)
        return [torch.empty(num_directions, *p.shape).uniform_(-3**0.5, 3**0.5, generator=generator).to(p)
                for p in params]


class HalvedWeightPerturbation(WeightPerturbation):
    """A third-party estimator: half the paper's estimate."""

    def estimate(self, closure, params, **options):
        estimate = super().estimate(closure, params, **options)
        estimate.grads = [None if g is None else g / 2 for g in estimate.grads]
        return estimate


class ThirdPartyPlugin:
    @hookimpl
    def register_tangent_samplers(self, register):
        register("uniform", UniformSampler)

    @hookimpl
    def register_estimators(self, register):
        register("halved-weight", HalvedWeightPerturbation)

    @hookimpl
    def register_integrations(self, register):
        register("json-dumps", "json:dumps")


@pytest.fixture
def third_party():
    plugin = ThirdPartyPlugin()
    plugin_manager().register(plugin, name="third-party")
    try:
        yield plugin
    finally:
        plugin_manager().unregister(plugin)
    assert "uniform" not in fwdgrad_plugins.registered("tangent_samplers")


@pytest.mark.slow
def test_hook_register_tangent_samplers(third_party):
    assert {"gaussian", "rademacher", "rank1-gaussian", "uniform"} <= set(
        fwdgrad_plugins.registered("tangent_samplers"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    opt = ForwardGradient(torch.optim.SGD(model.parameters(), lr=2e-3), tangents="uniform", num_directions=8)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        losses.append(opt.step(lambda: F.mse_loss(model(x), y)).item())
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0], losses[::10]


def test_hook_register_estimators(third_party):
    model = nn.Linear(3, 1)
    closure = lambda: model(torch.ones(2, 3)).sum()
    grads = {}
    for name in ("weight", "halved-weight"):
        model.zero_grad()
        ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.0), estimator=name, seed=1, keep_grads=True).step(closure)
        grads[name] = model.weight.grad.clone()
    torch.testing.assert_close(grads["halved-weight"], grads["weight"] / 2)


def test_hook_register_integrations(third_party):
    assert fwdgrad_plugins.get("integrations", "torch-optimizer") is ForwardGradient
    assert fwdgrad_plugins.get("integrations", "json-dumps") is json.dumps


def test_every_hook_is_documented_and_tested():
    hooks = [name for name, f in inspect.getmembers(hookspecs, inspect.isfunction)]
    assert len(hooks) == 3
    tests = set(globals())
    for name in hooks:
        assert getattr(hookspecs, name).__doc__, f"hook {name} has no docstring"
        assert f"test_hook_{name}" in tests, f"hook {name} has no test_hook_{name}"


@pytest.mark.slow
def test_entry_point_plugins_are_loaded_and_listed(tmp_path):
    """A package advertising the entry-point group shows up in `python -m fwdgrad_plugins list`."""
    (tmp_path / "my_fwdgrad_plugin.py").write_text(textwrap.dedent("""
        from fwdgrad_plugins import hookimpl

        @hookimpl
        def register_tangent_samplers(register):
            register("from-entry-point", object)
    """))
    dist = tmp_path / "my_fwdgrad_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-fwdgrad-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fwdgrad_plugins]\nmine = my_fwdgrad_plugin\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    listing = subprocess.run([sys.executable, "-m", "fwdgrad_plugins", "list"], env=env,
                             capture_output=True, text=True, check=True).stdout
    assert "  from-entry-point" in listing and "  gaussian" in listing and "  weight" in listing
    assert "  torch-optimizer" in listing and "mine" in listing
    env["FWDGRAD_LOAD_PLUGINS"] = "0"
    listing = subprocess.run([sys.executable, "-m", "fwdgrad_plugins", "list"], env=env,
                             capture_output=True, text=True, check=True).stdout
    assert "from-entry-point" not in listing and "  gaussian" in listing


class CollidingPlugin:
    @hookimpl
    def register_tangent_samplers(self, register):
        register("gaussian", UniformSampler)  # a name the built-in sampler holds


def test_a_taken_name_is_an_error_naming_both_plugins():
    plugin = CollidingPlugin()
    plugin_manager().register(plugin, name="colliding")
    try:
        with pytest.raises(DuplicateNameError, match=r"'gaussian'.*'fwdgrad_plugins.tangents.samplers'.*'colliding'"):
            fwdgrad_plugins.get("tangent_samplers", "gaussian")
        with pytest.raises(DuplicateNameError):
            fwdgrad_plugins.registered("tangent_samplers")
    finally:
        plugin_manager().unregister(plugin)
    assert fwdgrad_plugins.get("tangent_samplers", "gaussian") is not UniformSampler
