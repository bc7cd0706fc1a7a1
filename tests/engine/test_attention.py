"""The blocked forward-mode attention rule equals torch.func.jvp of the math kernel (float64),
and models whose attention takes it give autograd's directional derivatives."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fwdgrad_plugins import directional_derivatives
from fwdgrad_plugins.engine import attention
from fwdgrad_plugins.engine.attention import attention_jvp
from fwdgrad_plugins.estimators.core import trainable_parameters

from model_families import FAMILIES, autograd_derivatives


def math_jvp(q, k, v, tangents, **options):
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.func.jvp(lambda *x: F.scaled_dot_product_attention(*x, **options), (q, k, v), tangents)


def padding_mask(batch, length, keys):
    keep = torch.ones(batch, 1, length, keys, dtype=torch.bool)
    keep[0, ..., keys - 3:] = False  # the first sequence's last three keys are padding
    return keep


CASES = {  # name -> (query length, key length, key/value heads, options)
    "plain": (9, 9, 2, {}),
    "causal": (9, 9, 2, {"is_causal": True}),
    "causal, fewer queries": (4, 11, 2, {"is_causal": True}),
    "boolean padding mask": (9, 9, 2, {"attn_mask": padding_mask(2, 9, 9)}),
    "additive mask": (9, 10, 2, {"attn_mask": torch.randn(9, 10, dtype=torch.float64)}),
    "additive padding mask": (7, 7, 2, {"attn_mask": torch.zeros(2, 1, 1, 7, dtype=torch.float64)
                                        .index_fill_(-1, torch.tensor([5, 6]), -torch.inf)}),
    "scale": (9, 9, 2, {"scale": 0.3}),
    "grouped-query": (9, 9, 1, {"enable_gqa": True, "is_causal": True}),
}


@pytest.mark.parametrize("missing", [None, "q", "k", "v"])
@pytest.mark.parametrize("block_size", [1, 4, 64])
@pytest.mark.parametrize("case", list(CASES))
def test_blocked_rule_equals_the_math_kernels_jvp(case, block_size, missing):
    length, keys, kv_heads, options = CASES[case]
    q = torch.randn(2, 2, length, 5, dtype=torch.float64)
    k, v = torch.randn(2, kv_heads, keys, 5, dtype=torch.float64), torch.randn(2, kv_heads, keys, 3, dtype=torch.float64)
    tangents = [torch.randn_like(t) for t in (q, k, v)]
    if missing is not None:
        tangents["qkv".index(missing)] = torch.zeros_like(tangents["qkv".index(missing)])
    expected_out, expected_t = math_jvp(q, k, v, tuple(tangents), **options)
    ours = [None if missing == name else t for name, t in zip("qkv", tangents)]
    out, out_t = attention_jvp(q, k, v, *ours, block_size=block_size, **options)
    torch.testing.assert_close(out, expected_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out_t, expected_t, rtol=1e-10, atol=1e-12)


def test_a_row_with_every_key_masked_gives_zero_like_the_math_kernel():
    q, k, v = (torch.randn(1, 1, 3, 4, dtype=torch.float64) for _ in range(3))
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, True]])
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    expected = math_jvp(q, k, v, tangents, attn_mask=mask)
    for ours, theirs in zip(attention_jvp(q, k, v, *tangents, attn_mask=mask, block_size=2), expected):
        torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("num_directions", [1, 2])
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "hf_vit_sdpa", "lora_llama"])
def test_models_on_the_blocked_rule_equal_autograd(family, num_directions, monkeypatch, one_thread):
    """Every sdpa call of these models takes the rule, in blocks of 4 queries."""
    calls = []
    rule = attention.attention_jvp
    monkeypatch.setattr(attention, "BLOCK_SIZE", 4)
    monkeypatch.setattr(attention, "attention_jvp", lambda *a, **k: calls.append(1) or rule(*a, **k))
    torch.manual_seed(0)
    model, closure, reference = FAMILIES[family]()
    params = trainable_parameters(model.parameters())
    tangents = [torch.randn(num_directions, *p.shape) for p in params]
    result = directional_derivatives(closure, params, tangents)
    assert calls, "no attention took the blocked rule"
    torch.testing.assert_close(result.derivatives, autograd_derivatives(reference, params, tangents),
                               rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("case", ["plain", "causal", "boolean padding mask"])
def test_dropout_in_one_block_draws_the_math_kernels_mask(case):
    """On a CPU torch's dropout draws its mask with bernoulli_ on the (..., L, S) weights;
    one block of the rule draws the same, so from one seed the two jvps agree."""
    length, keys, kv_heads, options = CASES[case]
    q, k, v = (torch.randn(2, 2, n, 5, dtype=torch.float64) for n in (length, keys, keys))
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    torch.manual_seed(3)
    expected = math_jvp(q, k, v, tangents, dropout_p=0.4, **options)
    torch.manual_seed(3)
    ours = attention_jvp(q, k, v, *tangents, block_size=length, dropout_p=0.4, **options)
    for mine, theirs in zip(ours, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


def test_dropout_over_many_blocks_is_the_derivative_of_its_own_masks():
    """Each block draws its own mask; with the generator reset, the same masks come again, so
    the tangent is the central difference of the rule's own outputs (float64)."""
    q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64) for _ in range(3))
    tangents = [torch.randn_like(t) for t in (q, k, v)]

    def attention(step):
        torch.manual_seed(5)
        shifted = [t + step * t_dot for t, t_dot in zip((q, k, v), tangents)]
        return attention_jvp(*shifted, *tangents, is_causal=True, block_size=4, dropout_p=0.3)

    out, out_t = attention(0.0)
    difference = (attention(1e-6)[0] - attention(-1e-6)[0]) / 2e-6
    torch.testing.assert_close(out_t, difference, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(out, attention_jvp(q, k, v, None, None, None, is_causal=True)[0])  # dropout acted


def test_a_gpt2_with_attention_dropout_takes_the_rule(monkeypatch):
    calls = []
    rule = attention.attention_jvp
    monkeypatch.setattr(attention, "attention_jvp", lambda *a, **k: calls.append(a[-1]) or rule(*a, **k))
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                       attn_pdrop=0.5, attn_implementation="sdpa")).train()
    ids = torch.randint(0, 32, (2, 8))
    params = trainable_parameters(model.parameters())
    result = directional_derivatives(lambda: model(input_ids=ids, labels=ids).loss, params,
                                     [torch.randn(1, *p.shape) for p in params])
    assert calls == [0.5] and torch.isfinite(result.derivatives).all()


@pytest.mark.slow
def test_the_benchmark_command_writes_its_table_plot_and_json(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import REPO

    files = {kind: tmp_path / f"attention.{kind}" for kind in ("json", "png", "md")}
    done = subprocess.run(
        [sys.executable, "benchmarks/attention.py", "--length", "48", "--block-size", "16", "--width", "16",
         "--layers", "1", "--repeats", "2", "--threads", "1", "--json", str(files["json"]),
         "--plot", str(files["png"]), "--markdown", str(files["md"])],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(files["json"].read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"math", "blocked"} and rows["math"]["memory_vs_math"] == 1.0
    assert all(r["median_ms"] > 0 and r["peak_above_resting_bytes"] >= 0 for r in rows.values())
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| blocked |" in files["md"].read_text() and "| blocked |" in done.stdout


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_attention_accumulates_in_float32(dtype, monkeypatch):
    """Through the dual-tensor entry point, bf16/fp16 inputs: as close to the float64 jvp as
    the math kernel's own half-precision jvp is."""
    import torch.autograd.forward_ad as fwAD

    monkeypatch.setattr(attention, "BLOCK_SIZE", 4)
    q, k, v = (torch.randn(2, 2, 12, 8, dtype=torch.float64) for _ in range(3))
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    exact = math_jvp(q, k, v, tangents, is_causal=True)
    half = [t.to(dtype) for t in (q, k, v)]
    theirs = math_jvp(*half, tuple(t.to(dtype) for t in tangents), is_causal=True)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(p, t.to(dtype)) for p, t in zip(half, tangents)]
        ours = fwAD.unpack_dual(attention.scaled_dot_product_attention(*duals, is_causal=True, single_direction=True))
    for mine, math_kernel, want in zip(ours, theirs, exact):
        assert mine.dtype == dtype
        assert (mine.double() - want).abs().max() <= (math_kernel.double() - want).abs().max() * 1.5 + 1e-3
