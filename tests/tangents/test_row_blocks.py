"""Large streamed tangents (an embedding, an LM head) are drawn a block of rows at a time:
by the embedding lookup (only the blocks holding a looked-up row), by a linear layer (its
x W_tᵀ term a block of outputs at a time), by ``narrow`` along rows, and by ``ForwardSGD``'s
update. The values are the whole draw's; no such tangent is ever drawn whole."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import fwdgrad_plugins.tangents.streaming as streaming
from fwdgrad_plugins import ForwardSGD, directional_derivatives
from fwdgrad_plugins.engine.lm_loss import blocked_causal_lm_loss
from fwdgrad_plugins.tangents.samplers import GaussianSampler
from fwdgrad_plugins.tangents.streaming import CounterStream, tangent_stream

VOCAB = 300


def llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16))


def gpt2_tied_padded():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=16,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.transformer.wte.padding_idx = 0  # a padding row, which no estimate may move
    return model


@pytest.fixture
def small_blocks(monkeypatch):
    """Tangents of over 4 000 values drawn in blocks of about 1 000 (the 300 × 32 tables)."""
    monkeypatch.setattr(streaming, "ROWS_ALONE_MIN", 4000)
    monkeypatch.setattr(streaming, "ROW_BLOCK", 1000)


@pytest.fixture
def whole_draws(monkeypatch):
    """The indices of the parameters whose tangent some call drew whole."""
    drawn, draw = [], CounterStream.draw

    def recording(self, index, k):
        drawn.append(index)
        return draw(self, index, k)

    monkeypatch.setattr(CounterStream, "draw", recording)
    return drawn


def blocked_indices(stream):
    return {i for i in range(len(stream.params)) if stream.row_blocks(i) is not None}


def test_row_blocks_cover_the_rows_and_draw_the_whole_draws_values(small_blocks):
    params = [torch.zeros(VOCAB, 32), torch.zeros(10, 10), torch.zeros(VOCAB, 32, dtype=torch.float64)]
    stream = tangent_stream(GaussianSampler(), params, 2, seed=4)
    assert stream.row_blocks(1) is None  # small: drawn whole
    for i in (0, 2):
        blocks = stream.row_blocks(i)
        assert blocks[0][0] == 0 and blocks[-1][1] == VOCAB and len(blocks) > 1
        assert all(a[1] == b[0] and (a[1] - a[0]) % 128 == 0 for a, b in zip(blocks, blocks[1:]))
        for k in range(2):
            rows = torch.cat([stream.draw_rows(i, k, start, stop) for start, stop in blocks])
            assert rows.dtype == params[i].dtype and torch.equal(rows, stream.draw(i, k))


@pytest.mark.parametrize("make", [llama, gpt2_tied_padded])
@pytest.mark.parametrize("loss", ["model", "blocked"])
def test_derivatives_equal_the_whole_draws_and_autograd_with_no_whole_draw(make, loss, small_blocks, whole_draws):
    torch.manual_seed(0)
    model = make().eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    ids[0, :3] = 0  # padding tokens
    closure = {"model": lambda: model(input_ids=ids, labels=ids).loss,
               "blocked": lambda: blocked_causal_lm_loss(model, ids, block_vocab=100)}[loss]
    params = [p for p in model.parameters() if p.requires_grad]
    stream = tangent_stream(GaussianSampler(), params, 1, seed=3)
    blocked = blocked_indices(stream)
    assert blocked  # the embedding and the head (or the tied table) are drawn by rows
    streamed = directional_derivatives(closure, params, stream)
    assert not blocked & set(whole_draws), (blocked, whole_draws)
    whole = [t[0] for t in GaussianSampler().sample(params, 1, seed=3)]
    expected = directional_derivatives(closure, params, [t[None] for t in whole])
    torch.testing.assert_close(streamed.derivatives, expected.derivatives, rtol=1e-5, atol=1e-6)
    assert streamed.frozen_rows == expected.frozen_rows
    with torch.enable_grad():
        grads = torch.autograd.grad(closure(), params)
    exact = sum((g * t).sum() for g, t in zip(grads, whole))
    torch.testing.assert_close(streamed.derivatives[0], exact, rtol=1e-4, atol=1e-5)


def test_forward_sgd_steps_by_rows_as_with_whole_tangents(monkeypatch, whole_draws):
    """The same steps, bit for bit, with tangents drawn by rows and drawn whole."""
    torch.manual_seed(0)
    start = llama().eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    results = []
    for minimum in (4000, 10**9):  # by rows, then whole
        monkeypatch.setattr(streaming, "ROWS_ALONE_MIN", minimum)
        monkeypatch.setattr(streaming, "ROW_BLOCK", 1000)
        model = llama().eval()
        model.load_state_dict(start.state_dict())
        opt = ForwardSGD(model.parameters(), lr=1e-2, seed=1, estimator_options={"streamed": True})
        for _ in range(3):
            opt.step(lambda: blocked_causal_lm_loss(model, ids))
        results.append([p.detach().clone() for p in model.parameters()])
        if minimum == 4000:
            stream = tangent_stream(GaussianSampler(), list(model.parameters()), 1, seed=1)
            assert not blocked_indices(stream) & set(whole_draws)
    for by_rows, whole in zip(*results):
        assert torch.equal(by_rows, whole)


def test_narrow_along_other_dimensions_uses_the_whole_tangent(small_blocks):
    weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
    x = torch.randn(4, 8)
    stream = tangent_stream(GaussianSampler(), [weight], 1, seed=2)
    closure = lambda: (x @ weight.narrow(1, 8, 8).t()).square().sum() + weight.narrow(0, 290, 10).sum()
    streamed = directional_derivatives(closure, [weight], stream).derivatives
    tangent = stream.draw(0, 0)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(closure(), [weight])
    torch.testing.assert_close(streamed[0], (grad * tangent).sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [llama, gpt2_tied_padded])
@pytest.mark.parametrize("loss", ["model", "blocked"])
def test_spsa_shifts_large_parameters_by_rows_with_the_same_derivatives(make, loss, monkeypatch, whole_draws):
    """SPSA's ±εz of an embedding or a head, block by block: the derivatives of whole draws,
    within the float rounding of θ + εz summed in another order, and no whole draw."""
    from fwdgrad_plugins.estimators.spsa import SimultaneousPerturbation

    torch.manual_seed(0)
    model = make().eval()
    ids = torch.randint(0, VOCAB, (2, 16))
    ids[0, :3] = 0
    closure = {"model": lambda: model(input_ids=ids, labels=ids).loss,
               "blocked": lambda: blocked_causal_lm_loss(model, ids, block_vocab=100)}[loss]
    params = [p for p in model.parameters() if p.requires_grad]
    spsa = SimultaneousPerturbation(epsilon=1e-2)
    results = []
    for minimum in (4000, 10**9):  # by rows, then whole
        monkeypatch.setattr(streaming, "ROWS_ALONE_MIN", minimum)
        monkeypatch.setattr(streaming, "ROW_BLOCK", 1000)
        stream = tangent_stream(GaussianSampler(), params, 2, seed=5)
        if minimum == 4000:
            blocked = blocked_indices(stream)
            assert blocked
        results.append(spsa.derivatives(closure, params, stream))
        if minimum == 4000:
            assert not blocked & set(whole_draws)
    by_rows, whole = results
    torch.testing.assert_close(by_rows.derivatives, whole.derivatives, rtol=1e-3, atol=2e-3)
    assert by_rows.used == whole.used and by_rows.frozen_rows == whole.frozen_rows
