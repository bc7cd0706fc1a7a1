"""The core: forward-mode directional derivatives equal autograd's ∇f·v."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._C import _functorch as functorch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import fwdgrad_plugins
from fwdgrad_plugins import directional_derivatives
from fwdgrad_plugins.engine import forward_mode
from fwdgrad_plugins.estimators.core import trainable_parameters
from fwdgrad_plugins.tangents.tangent import RankOne, Workspace

from toy_models import MODELS

SAMPLERS = fwdgrad_plugins.registered("tangent_samplers")


def dense(tangent):
    return tangent.dense() if isinstance(tangent, RankOne) else tangent


def autograd_reference(model, closure, params, tangents, seed):
    """∇f·v_k by backprop, with the RNG in the state the forward-mode pass saw and the
    attention kernel it used."""
    torch.manual_seed(seed)
    with sdpa_kernel([SDPBackend.MATH]):
        loss = closure()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    k = dense(tangents[0]).shape[0]
    return loss.detach(), torch.stack([
        sum((g * dense(t)[i]).sum() for g, t in zip(grads, tangents) if g is not None)
        for i in range(k)
    ])


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("num_directions", [1, 3])
# The HF models are slow here; tests/engine/test_model_families.py checks smaller ones in the fast tests.
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name.startswith("tiny_") else name
                                  for name in MODELS])
def test_directional_derivatives_equal_autograd(name, num_directions, sampler):
    model, closure = MODELS[name]()
    model.train()
    params = trainable_parameters(model.parameters())
    tangents = fwdgrad_plugins.get("tangent_samplers", sampler)().sample(params, num_directions, seed=1)
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    torch.manual_seed(7)
    result = directional_derivatives(closure, params, tangents)
    after_one_step = {k: v.clone() for k, v in model.named_buffers()}
    model.load_state_dict(buffers, strict=False)
    loss, expected = autograd_reference(model, closure, params, tangents, seed=7)
    torch.testing.assert_close(result.loss, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(result.derivatives, expected, rtol=1e-4, atol=1e-5)
    # BatchNorm running statistics moved exactly as one plain forward pass moves them.
    for key, value in model.named_buffers():
        torch.testing.assert_close(after_one_step[key], value)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("name", ["mlp", "dropout_mlp", "tied", "matmul_weight", "tiny_bert", "tiny_gpt2"])
def test_many_directions_run_as_one_vmapped_pass(name, sampler, monkeypatch):
    """The K-pass fallback is for models torch.func refuses (BatchNorm updating its running
    statistics); it gives the same numbers, so only this test sees a model taking it."""

    def no_fallback(*args, **kwargs):
        raise AssertionError("fell back to one forward pass per direction")

    monkeypatch.setattr(forward_mode, "_sequential_directions", no_fallback)
    monkeypatch.setattr(forward_mode, "_NOT_VMAPPABLE", set())
    model, closure = MODELS[name]()
    params = trainable_parameters(model.parameters())
    tangents = fwdgrad_plugins.get("tangent_samplers", sampler)().sample(params, 3, seed=1)
    assert directional_derivatives(closure, params, tangents).derivatives.shape == (3,)


def primal_is_batched(tensor) -> bool:
    """Whether the primal under torch.func's jvp wrappers carries a vmap batch dimension."""
    while functorch.is_functorch_wrapped_tensor(tensor) or functorch.is_batchedtensor(tensor):
        if functorch.is_batchedtensor(tensor):
            return True
        tensor = functorch.get_unwrapped(tensor)
    return False


@pytest.mark.parametrize("name", ["mlp", "matmul_weight", "tiny_bert", "tiny_gpt2"])
def test_rank_one_directions_share_one_unbatched_primal(name, monkeypatch):
    """Under vmap only the tangents may carry the directions' batch dimension: a batched
    primal would be computed once per direction. (An activation rule computes its output's
    tangent, batched, in the hook that makes the dual, inside the mode: not a primal.)"""
    batched = []
    original = forward_mode._PerturbParameters.__torch_function__
    tangent_ops = {"gelu_backward"}

    def spy(self, func, types, args=(), kwargs=None):
        out = original(self, func, types, args, kwargs)
        if isinstance(out, torch.Tensor) and primal_is_batched(out) and getattr(func, "__name__", "") not in tangent_ops:
            batched.append(getattr(func, "__name__", str(func)))
        return out

    monkeypatch.setattr(forward_mode._PerturbParameters, "__torch_function__", spy)
    monkeypatch.setattr(forward_mode, "_NOT_VMAPPABLE", set())
    model, closure = MODELS[name]()
    model.eval()
    params = trainable_parameters(model.parameters())
    tangents = fwdgrad_plugins.get("tangent_samplers", "rank1-gaussian")().sample(params, 2, seed=8)
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        forward_mode._vmapped_directions(closure, params, tangents)
    assert not batched, f"ops whose primal was computed once per direction: {batched}"


class PaddedEmbeddingBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(20, 6, padding_idx=1)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(self.embedding(ids).tanh().mean(1))


@pytest.mark.parametrize("num_directions", [1, 3])
@pytest.mark.parametrize("name", ["padded_embedding", "tiny_bert"])
def test_rank_one_embedding_tangents_are_never_materialised(name, num_directions, monkeypatch):
    """u wᵀ on an embedding (a vocabulary-sized matrix) is applied as the rows u[i] w."""
    materialize = forward_mode._PerturbParameters._materialize

    def refuse_rank_one(self, param, tangent):
        if isinstance(tangent, tuple):  # (u, w); dense tangents (LayerNorm's) pass
            raise AssertionError(f"materialised u wᵀ for a {tuple(param.shape)} parameter")
        return materialize(self, param, tangent)

    monkeypatch.setattr(forward_mode._PerturbParameters, "_materialize", refuse_rank_one)
    if name == "padded_embedding":
        torch.manual_seed(0)
        model = PaddedEmbeddingBag()
        ids, y = torch.tensor([[1, 3, 1, 7], [5, 1, 1, 2]]), torch.tensor([0, 2])  # 1: padding
        closure = lambda: F.cross_entropy(model(ids), y)
    else:
        model, closure = MODELS[name]()
        model.eval()
    params = trainable_parameters(model.parameters())
    tangents = fwdgrad_plugins.get("tangent_samplers", "rank1-gaussian")().sample(params, num_directions, seed=6)
    result = directional_derivatives(closure, params, tangents)
    _, expected = autograd_reference(model, closure, params, tangents, seed=0)
    torch.testing.assert_close(result.derivatives, expected, rtol=1e-4, atol=1e-5)
    if name == "padded_embedding":
        assert result.frozen_rows[0] == [1]  # the estimate leaves the padding row alone


def test_shared_parameter_is_perturbed_once():
    model, closure = MODELS["tied"]()
    params = trainable_parameters(list(model.parameters()) + [model.shared.weight])
    assert len(params) == len(list(model.parameters()))


def test_frozen_parameters_are_not_perturbed():
    model, closure = MODELS["mlp"]()
    model[0].requires_grad_(False)
    params = trainable_parameters(model.parameters())
    assert all(p is not model[0].weight and p is not model[0].bias for p in params)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("num_directions", [1, 3])
@pytest.mark.parametrize("input_shape", [(1, 5), (4, 5), (2, 3, 5)])
@pytest.mark.parametrize("trained", ["weight", "bias", "both"])
def test_linear_rule_sums_every_combination_of_tangent_terms(trained, input_shape, num_directions, sampler):
    """The linear rule's tangent b_t + x_t Wᵀ + x W_tᵀ with any term absent (the first layer's
    input has no tangent; frozen weights or biases give none), for one row, many rows and
    leading dimensions; the tangents it reads, which become the gradient, stay unchanged."""
    torch.manual_seed(0)
    check_two_layers(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), input_shape, trained,
                     num_directions, sampler)


def check_two_layers(model, input_shape, trained, num_directions, sampler):
    """Layers 0 and 2 of ``model`` with only their weights, biases or both trained: the
    derivatives equal autograd's, and the tangents, which become the gradient, stay unchanged."""
    for layer in (model[0], model[2]):
        layer.weight.requires_grad_(trained != "bias")
        if layer.bias is not None:
            layer.bias.requires_grad_(trained != "weight")
    x = torch.randn(*input_shape)
    closure = lambda: model(x).pow(2).mean()
    params = trainable_parameters(model.parameters())
    tangents = fwdgrad_plugins.get("tangent_samplers", sampler)().sample(params, num_directions, seed=2)
    before = [dense(t).clone() for t in tangents]
    result = directional_derivatives(closure, params, tangents)
    _, expected = autograd_reference(model, closure, params, tangents, seed=0)
    torch.testing.assert_close(result.derivatives, expected, rtol=1e-4, atol=1e-5)
    for old, new in zip(before, tangents):
        torch.testing.assert_close(dense(new), old, rtol=0, atol=0)


CONVOLUTIONS = {
    "conv1d_strided_dilated": (lambda: nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, dilation=2), nn.Tanh(),
                                                     nn.Conv1d(4, 3, 2)), (3, 2, 11)),
    "conv2d_grouped_reflect": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),
                                                     nn.Tanh(), nn.Conv2d(4, 6, 3, groups=2)), (2, 2, 6, 5)),
    "conv3d_no_bias": (lambda: nn.Sequential(nn.Conv3d(1, 2, 2, bias=False), nn.Tanh(),
                                             nn.Conv3d(2, 2, 2)), (2, 1, 4, 4, 3)),
}


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("num_directions", [1, 3])
@pytest.mark.parametrize("trained", ["weight", "bias", "both"])
@pytest.mark.parametrize("name", list(CONVOLUTIONS))
def test_convolution_rule_sums_every_combination_of_tangent_terms(name, trained, num_directions, sampler):
    """The convolution rule's tangent conv(x_t, W) + conv(x, W_t) + b_t with any term absent
    (the first layer's input has no tangent; frozen weights or biases give none), for 1-, 2-
    and 3-D convolutions with strides, dilation, groups, a padding mode and no bias."""
    torch.manual_seed(0)
    build, input_shape = CONVOLUTIONS[name]
    check_two_layers(build(), input_shape, trained, num_directions, sampler)


class RecordOps(TorchDispatchMode):
    """The aten ops run below torch.func's transforms, with their plain tensor arguments."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, [a for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


class AddmmLayers(nn.Module):
    """Two layers written as ``torch.addmm(b, x, W)`` with W of shape (in, out), as
    HuggingFace's Conv1D does; ``alpha`` and ``beta`` other than 1 take torch's own rule."""

    def __init__(self, alpha=1.0, beta=1.0):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(4))
        self.w2, self.b2 = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))
        self.alpha, self.beta = alpha, beta

    def forward(self, x):
        h = torch.addmm(self.b1, x, self.w1, beta=self.beta, alpha=self.alpha).tanh()
        return torch.addmm(self.b2, h, self.w2, beta=self.beta, alpha=self.alpha)


@pytest.mark.parametrize("num_directions", [1, 3])
@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (2.0, 0.5)])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_addmm_weights_equal_autograd(sampler, alpha, beta, num_directions):
    torch.manual_seed(0)
    model, x = AddmmLayers(alpha, beta), torch.randn(6, 5)
    closure = lambda: model(x).pow(2).mean()
    params = list(model.parameters())
    tangents = fwdgrad_plugins.get("tangent_samplers", sampler)().sample(params, num_directions, seed=2)
    result = directional_derivatives(closure, params, tangents)
    _, expected = autograd_reference(model, closure, params, tangents, seed=0)
    torch.testing.assert_close(result.derivatives, expected, rtol=1e-4, atol=1e-5)


def linear_layers(trained):
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    for layer in (model[0], model[2]):
        layer.weight.requires_grad_(trained != "bias")
    return model


def conv_layers(trained):
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Tanh(), nn.Conv1d(2, 2, 3))
    for layer in (model[0], model[2]):
        layer.weight.requires_grad_(trained != "bias")
    return model


@pytest.mark.parametrize("sampler, build, input_shape", [
    ("rank1-gaussian", lambda: linear_layers("both"), (6, 5)),
    ("gaussian", lambda: linear_layers("both"), (6, 5)),
    ("gaussian", lambda: linear_layers("bias"), (6, 5)),
    ("rank1-gaussian", AddmmLayers, (6, 5)),
    ("gaussian", AddmmLayers, (6, 5)),
    ("gaussian", lambda: conv_layers("both"), (6, 1, 9)),
    ("gaussian", lambda: conv_layers("bias"), (6, 1, 9)),
])
def test_vmapped_layers_multiply_no_absent_tangent(sampler, build, input_shape):
    """Under vmap, a weight without a dense tangent (rank-one or frozen) and the first layer's
    input, which has none, get no matrix product or convolution with a zero tangent: torch's
    own rules would materialise those zeros and multiply them, a primal-sized product each."""
    torch.manual_seed(0)
    model = build()
    x = torch.randn(*input_shape)
    params = trainable_parameters(model.parameters())
    tangents = fwdgrad_plugins.get("tangent_samplers", sampler)().sample(params, 3, seed=2)
    with RecordOps() as recorded:
        result = directional_derivatives(lambda: model(x).pow(2).mean(), params, tangents)
    products = [(func, args) for func, args in recorded.calls
                if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                            torch.ops.aten.convolution.default)]
    assert products, "no matrix product recorded"
    for func, args in products:
        assert all(a.any() for a in args if a.dim() >= 2), f"{func} multiplied a zero matrix"
    _, expected = autograd_reference(model, lambda: model(x).pow(2).mean(), params, tangents, seed=0)
    torch.testing.assert_close(result.derivatives, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("workspace", [None, Workspace(min_bytes=0)])
def test_vmapped_pass_does_not_copy_the_tangents(workspace):
    """The sampler's tangents are views into one buffer (a fresh draw, or a workspace kept
    between draws); forward AD copies such a tangent when it makes a dual unless it sits on
    a storage of its own."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    params = list(model.parameters())
    tangents = fwdgrad_plugins.get("tangent_samplers", "gaussian")().sample(params, 3, seed=2, workspace=workspace)
    assert tangents[1].storage_offset() > 0  # views into one draw
    x = torch.randn(6, 5)
    with RecordOps() as recorded:
        directional_derivatives(lambda: model(x).pow(2).mean(), params, tangents)
    sizes = {t.shape for t in tangents}
    copies = [args[0].shape for func, args in recorded.calls
              if func is torch.ops.aten.copy_.default and args[0].shape in sizes]
    assert not copies, f"tangents copied: {copies}"


def test_own_storage_shares_the_tangent_memory():
    buffer = torch.arange(12.0)
    view = buffer[4:10].view(2, 3)
    own = forward_mode._own_storage(view)
    assert own.storage_offset() == 0 and own.untyped_storage().nbytes() == view.nbytes
    assert torch.equal(own, view)
    buffer[5] = -1.0  # the same memory, not a copy
    assert own[0, 1] == -1.0
    whole = torch.ones(2, 3)
    assert forward_mode._own_storage(whole) is whole


@pytest.mark.parametrize("num_directions", [1, 3])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_bfloat16_parameters(sampler, num_directions):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    x = torch.randn(5, 6, dtype=torch.bfloat16)
    closure = lambda: model(x).float().pow(2).mean()
    params = list(model.parameters())
    tangents = fwdgrad_plugins.get("tangent_samplers", sampler)().sample(params, num_directions, seed=0)
    assert dense(tangents[0]).dtype == torch.bfloat16
    result = directional_derivatives(closure, params, tangents)
    _, expected = autograd_reference(model, closure, params, tangents, seed=0)
    torch.testing.assert_close(result.derivatives, expected.float(), rtol=3e-2, atol=3e-2)


def test_model_and_parameters_are_left_untouched():
    model, closure = MODELS["mlp"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = list(model.parameters())
    tangents = fwdgrad_plugins.get("tangent_samplers", "gaussian")().sample(params, 1, seed=0)
    directional_derivatives(closure, params, tangents)
    assert all(type(p) is nn.Parameter and p.grad is None for p in params)
    for key, value in model.state_dict().items():
        assert torch.equal(before[key], value)
    # backprop still works on the same parameters afterwards
    closure().backward()
    assert all(p.grad is not None for p in params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda(dtype):
    model, closure = MODELS["cnn_batchnorm_dropout"]()
    model = model.cuda().to(dtype)
    x, y = torch.randn(5, 1, 8, 8, device="cuda", dtype=dtype), torch.randint(0, 3, (5,), device="cuda")
    closure = lambda: torch.nn.functional.cross_entropy(model(x).float(), y)
    params = list(model.parameters())
    tangents = fwdgrad_plugins.get("tangent_samplers", "gaussian")().sample(params, 2, seed=0)
    torch.manual_seed(3)
    result = directional_derivatives(closure, params, tangents)
    _, expected = autograd_reference(model, closure, params, tangents, seed=3)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(result.derivatives, expected.float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("num_directions", [1, 2])
@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_bfloat16_autocast(sampler, name, num_directions):
    if name == "conv":
        torch.manual_seed(0)
        model = CONVOLUTIONS["conv2d_grouped_reflect"][0]()
        x = torch.randn(*CONVOLUTIONS["conv2d_grouped_reflect"][1])
        closure = lambda: model(x).float().pow(2).mean()
    else:
        model, closure = MODELS["mlp"]()
    params = list(model.parameters())
    tangents = fwdgrad_plugins.get("tangent_samplers", sampler)().sample(params, num_directions, seed=0)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    with autocast():
        result = directional_derivatives(closure, params, tangents)
    with autocast():
        _, expected = autograd_reference(model, closure, params, tangents, seed=0)
    torch.testing.assert_close(result.derivatives, expected.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("num_directions", [1, 3])
def test_weight_perturbation_runs_no_backward_pass(no_backward, num_directions):
    model, closure = MODELS["cnn_batchnorm_dropout"]()
    no_backward(model)
    fwdgrad_plugins.ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1),
                                    num_directions=num_directions, keep_grads=True).step(closure)
    assert all(p.grad is not None for p in model.parameters())


def test_products_with_python_numbers_keep_torch_s_values_without_a_copy():
    """``x * 0.5``, ``0.5 * x``, ``x / 3``, ``x * c`` (c without tangent), ``x * y`` on duals:
    primal and tangent apart, the values of torch's own rule, and no full-size copy of the
    tangent (torch's rule makes one)."""
    x = torch.randn(8, 64, dtype=torch.float64)
    scale = torch.rand(64, dtype=torch.float64) + 0.5
    w = torch.randn(64, 64, dtype=torch.float64)
    v = torch.randn(1, 64, 64, dtype=torch.float64)

    def loss_of(weight):
        h = F.linear(x, weight)
        h = 0.5 * h * (1.0 + torch.tanh(0.79788456 * (h + 0.044715 * h.pow(3))))  # GPT-2's tanh GELU
        h = torch.mul(h, 2) / 3.0 + h.div(7.0) + torch.mul(0.25, h)
        h = h * scale + scale * h / scale.exp()  # constant tensors (a rotary embedding's cos)
        return (h * h.mean()).sum()

    result = directional_derivatives(lambda: loss_of(w), [w], [v])
    loss, expected = torch.func.jvp(loss_of, (w,), (v[0],))
    torch.testing.assert_close(result.loss, loss)
    torch.testing.assert_close(result.derivatives[0], expected.to(result.derivatives.dtype))

    class Copies(TorchDispatchMode):
        seen = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Copies.seen += func is torch.ops.aten._to_copy.default and out.numel() > 1
            return out

    with Copies():
        directional_derivatives(lambda: (F.linear(x, w) * 0.5 * scale).sum(), [w], [v])
    assert Copies.seen == 0
