"""Blocked cross-entropy: torch's value and jvp, for every option, and the engine applies it to
every way a model computes the loss (F.cross_entropy, nn.CrossEntropyLoss, HF's loss_function)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fwdgrad_plugins import ForwardSGD, directional_derivatives
from fwdgrad_plugins.engine import cross_entropy
from fwdgrad_plugins.engine.cross_entropy import blocked_arguments, blocked_cross_entropy
from fwdgrad_plugins.tangents.samplers import GaussianSampler

CLASSES = cross_entropy.MIN_CLASSES


def value_and_jvp(loss_fn, logits, tangent, target, **options):
    return torch.func.jvp(lambda x: loss_fn(x, target, **options), (logits,), (tangent,))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("block_rows", [1, 4, 64])
def test_value_and_jvp_are_torch_s(reduction, weighted, label_smoothing, block_rows):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(13, 50, generator=generator, dtype=torch.float64)
    tangent = torch.randn(13, 50, generator=generator, dtype=torch.float64)
    target = torch.randint(0, 50, (13,), generator=generator)
    target[2:7] = -100  # a block of ignored rows (with block_rows=4, one block is all ignored)
    options = dict(reduction=reduction, label_smoothing=label_smoothing,
                   weight=torch.rand(50, generator=generator, dtype=torch.float64) if weighted else None)
    expected = value_and_jvp(F.cross_entropy, logits, tangent, target, **options)
    blocked = lambda x, t, **o: blocked_cross_entropy(x, t, block_rows=block_rows, **o)
    for got, want in zip(value_and_jvp(blocked, logits, tangent, target, **options), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_an_ignore_index_of_its_own_and_every_row_ignored():
    logits, tangent = torch.randn(6, 9, dtype=torch.float64), torch.randn(6, 9, dtype=torch.float64)
    target = torch.tensor([0, 11, 3, 11, 8, 2])
    weight = torch.rand(9, dtype=torch.float64)
    for options in (dict(ignore_index=11), dict(ignore_index=11, weight=weight)):
        expected = value_and_jvp(F.cross_entropy, logits, tangent, target, **options)
        got = value_and_jvp(lambda x, t, **o: blocked_cross_entropy(x, t, block_rows=4, **o), logits, tangent,
                            target, **options)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    all_ignored = torch.full((6,), -100)
    assert blocked_cross_entropy(logits, all_ignored, block_rows=4).isnan()  # torch's 0 / 0
    assert F.cross_entropy(logits, all_ignored).isnan()


def test_calls_the_rule_does_not_cover_take_torch_s():
    logits = torch.randn(4, CLASSES)
    assert blocked_arguments((logits, torch.zeros(4, dtype=torch.long)), {}) is not None
    assert blocked_arguments((logits[:, :10], torch.zeros(4, dtype=torch.long)), {}) is None  # few classes
    assert blocked_arguments((logits, logits.softmax(1)), {}) is None  # class probabilities
    assert blocked_arguments((logits.view(2, 2, CLASSES), torch.zeros(2, 2, dtype=torch.long)), {}) is None
    assert blocked_arguments((logits, torch.zeros(4, dtype=torch.long)), {"size_average": False}) is None
    assert blocked_arguments((logits,), {}) is None  # a wrong call: torch's own error


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=CLASSES, n_embd=8, n_layer=1, n_head=2, n_positions=12,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def closures():
    torch.manual_seed(0)
    model = Classifier()
    x, y = torch.randn(40, 6), torch.randint(0, CLASSES, (40,))
    y[:5] = -100
    yield "F.cross_entropy", model, lambda: F.cross_entropy(model(x), y, label_smoothing=0.05)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    yield "nn.CrossEntropyLoss", model, lambda: criterion(model(x), y)
    lm = gpt2()
    ids = torch.randint(0, CLASSES, (2, 12))
    yield "HF loss_function", lm, lambda: lm(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("num_directions", [1, 3])
def test_the_engine_blocks_every_form_of_the_loss_and_matches_autograd(monkeypatch, num_directions):
    calls = []
    rule = cross_entropy.blocked_cross_entropy
    monkeypatch.setattr(cross_entropy, "blocked_cross_entropy", lambda *a, **k: calls.append(1) or rule(*a, **k))
    monkeypatch.setattr(cross_entropy, "BLOCK_ELEMENTS", 8 * CLASSES)  # 8 rows a block: several blocks
    for name, model, closure in closures():
        params = [p for p in model.parameters() if p.requires_grad]
        tangents = GaussianSampler().sample(params, num_directions, seed=1)
        calls.clear()
        got = directional_derivatives(closure, params, tangents)
        assert calls, f"{name}: the blocked rule did not run"
        loss = closure()  # autograd's gradient, dotted with each tangent
        grads = torch.autograd.grad(loss, params)
        expected = torch.stack([sum((g * t[k]).sum() for g, t in zip(grads, tangents))
                                for k in range(num_directions)])
        torch.testing.assert_close(got.loss, loss.detach(), rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(got.derivatives, expected, rtol=1e-4, atol=1e-5, msg=name)


def test_a_forward_sgd_step_on_a_plain_closure_blocks_the_loss(monkeypatch):
    calls = []
    rule = cross_entropy.blocked_cross_entropy
    monkeypatch.setattr(cross_entropy, "blocked_cross_entropy", lambda *a, **k: calls.append(1) or rule(*a, **k))
    model = gpt2().train()
    ids = torch.randint(0, CLASSES, (2, 12))
    ForwardSGD(model.parameters(), lr=1e-3, seed=0).step(lambda: model(input_ids=ids, labels=ids).loss)
    assert calls
