"""The counter-based generator: every value is a pure function of (seed, index), the compiled
and eager kernels agree, and the values have the distribution they claim."""

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

from fwdgrad_plugins.tangents import counter_rng

DRAWS = [counter_rng.normal, counter_rng.signs]


@pytest.mark.parametrize("draw", DRAWS)
def test_any_slice_equals_the_same_slice_of_a_longer_draw(draw, monkeypatch):
    monkeypatch.setattr(counter_rng, "BLOCK", 1)  # one unit per key: the draws below cross keys
    whole = draw(11, 0, 1000)
    for start, count in [(0, 1), (1, 1), (3, 250), (63, 2), (127, 129), (128, 3), (999, 1)]:
        # exact integers; log, sqrt, sin and cos may differ in the last bit between kernels
        torch.testing.assert_close(draw(11, start, count), whole[start : start + count],
                                   rtol=1e-6, atol=1e-6, msg=f"slice {start}:{start + count}")
    assert (draw(12, 0, 1000) != whole).float().mean() > 0.4


@pytest.mark.parametrize("draw", DRAWS)
@pytest.mark.parametrize("compiled", [True, False])
def test_drawing_into_a_buffer_gives_the_values_of_a_fresh_draw(draw, compiled, monkeypatch):
    monkeypatch.setattr(counter_rng, "OUT_PIECE", 1000)  # pieces that split units and keys
    monkeypatch.setattr(counter_rng, "BLOCK", 7)
    buffer = torch.full((5000,), float("nan"))
    with counter_rng.use_compiled_kernel(compiled):
        out = draw(9, 37, 4321, out=buffer[:4321])
    assert out.data_ptr() == buffer.data_ptr() and buffer[4321:].isnan().all()
    torch.testing.assert_close(out, draw(9, 37, 4321), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("out", [torch.empty(10, dtype=torch.float64), torch.empty(11), torch.empty(20)[::2]])
def test_an_unusable_out_buffer_is_refused_with_the_fix(out):
    with pytest.raises(ValueError, match="contiguous float32 tensor of shape"):
        counter_rng.normal(0, 0, 10, out=out)


@pytest.mark.parametrize("draw", DRAWS)
def test_compiled_and_eager_kernels_agree(draw):
    compiled = draw(5, 3, 100_001)
    with counter_rng.use_compiled_kernel(False):
        eager = draw(5, 3, 100_001)
    # the integer hashing is exact; log, sqrt, sin and cos may differ in the last bit
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_draws_inside_vmap_run_eagerly_without_a_warning():
    expected = counter_rng.normal(2, 0, 50_000)[:3]
    compile_failed = counter_rng._compile_failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = torch.func.vmap(lambda x: x + counter_rng.normal(2, 0, 50_000)[:3])(torch.zeros(2, 3))
    torch.testing.assert_close(out, expected.expand(2, 3), rtol=1e-6, atol=1e-6)
    assert counter_rng._compile_failed == compile_failed  # vmap is not taken for a failed build


def test_a_kernel_that_cannot_compile_warns_once_and_draws_the_same_values(monkeypatch):
    expected = counter_rng.normal(9, 0, 1000)

    def no_compiler(kernel):
        def fail(*args):
            raise RuntimeError("no C++ compiler found")
        return fail

    monkeypatch.setattr(counter_rng, "_build", no_compiler)
    monkeypatch.setattr(counter_rng, "_compile_failed", False)
    with pytest.warns(RuntimeWarning, match="eager torch ops.*C\\+\\+ compiler"):
        first = counter_rng.normal(9, 0, 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        counter_rng.normal(9, 0, 1000)
    torch.testing.assert_close(first, expected, rtol=1e-6, atol=1e-6)


def test_an_internal_that_a_torch_release_renamed_falls_back_to_eager_draws(monkeypatch):
    """The compiled path's torch internals may change: the draw stays right, only slower."""
    expected = counter_rng.normal(4, 0, 5000)
    monkeypatch.delattr(torch._C._functorch, "maybe_current_level")
    monkeypatch.setattr(counter_rng, "_compile_failed", False)
    with pytest.warns(RuntimeWarning, match="eager torch ops"):
        drawn = counter_rng.normal(4, 0, 5000)
    torch.testing.assert_close(drawn, expected, rtol=1e-6, atol=1e-6)


def test_build_kernels_reports_the_one_off_build_and_zero_when_eager():
    assert counter_rng.build_kernels() >= 0.0
    with counter_rng.use_compiled_kernel(False):
        assert counter_rng.build_kernels() == 0.0


def test_the_default_path_touches_torch_internals_in_one_function_only():
    """Every private torch name in counter_rng sits in _compiled_draw or the _build it calls."""
    import ast
    import inspect

    module = inspect.getsource(counter_rng)
    for node in ast.parse(module).body:
        source = ast.get_source_segment(module, node) or ""
        if "torch._" in source:
            assert isinstance(node, ast.FunctionDef) and node.name in {"_compiled_draw", "_build"}, source[:200]


def _normal_cdf(x):
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def test_normals_have_the_standard_normal_distribution():
    n = 1 << 21
    z = counter_rng.normal(3, 0, n).double()
    # moments, each within 5 standard errors: E z = 0, E z² = 1 (var 2), E z⁴ = 3 (var 96)
    assert abs(z.mean()) < 5 / n**0.5
    assert abs(z.pow(2).mean() - 1) < 5 * (2 / n) ** 0.5
    assert abs(z.pow(4).mean() - 3) < 5 * (96 / n) ** 0.5
    # Kolmogorov-Smirnov distance to N(0, 1), far below the 0.1 % critical value 1.95 / √n
    # for a sub-sample (the full sample's 24-bit inputs are finer than the test needs)
    sample = z[: 1 << 16].sort().values
    empirical = torch.arange(1, sample.numel() + 1, dtype=torch.float64) / sample.numel()
    assert (empirical - _normal_cdf(sample)).abs().max() < 1.95 / sample.numel() ** 0.5
    # neighbours (the cos and sin of one Box-Muller pair among them) are uncorrelated
    assert abs((z[1:] * z[:-1]).mean()) < 5 / n**0.5


def test_streams_of_other_seeds_and_blocks_are_uncorrelated(monkeypatch):
    n = 1 << 18
    a, b = counter_rng.normal(1, 0, n).double(), counter_rng.normal(2, 0, n).double()
    assert abs((a * b).mean()) < 5 / n**0.5
    # two blocks (of units of LANES normal pairs), keyed independently
    monkeypatch.setattr(counter_rng, "BLOCK", n // 2 // (2 * counter_rng.LANES))
    z = counter_rng.normal(1, 0, n).double()
    assert abs((z[: n // 2] * z[n // 2 :]).mean()) < 5 / (n // 2) ** 0.5


def test_signs_are_fair_and_uncorrelated():
    n = 1 << 20
    s = counter_rng.signs(4, 0, n)
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    assert abs(s.mean()) < 5 / n**0.5
    assert abs((s[1:] * s[:-1]).mean()) < 5 / n**0.5


@pytest.mark.slow
def test_torch_compile_disabled_draws_the_same_values_eagerly_without_a_warning(tmp_path):
    code = ("import sys, torch; from fwdgrad_plugins.tangents import counter_rng; "
            "torch.save(counter_rng.normal(9, 0, 100_000), sys.argv[1])")
    path = tmp_path / "draw.pt"
    done = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", code, str(path)],
                          env={**os.environ, "TORCH_COMPILE_DISABLE": "1"},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    eager = torch.load(path)
    torch.testing.assert_close(eager, counter_rng.normal(9, 0, 100_000), rtol=1e-6, atol=1e-6)
