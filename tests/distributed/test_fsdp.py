"""Forward gradients on FSDP2-sharded parameters: the same user code as unsharded, each rank's
shard equal to the replicated run's parameters (bit for bit for Gaussian K = 1), no gradient
collectives, and a clear refusal, before anything changes, for what is not supported.

The parity cases run once, on two gloo processes (tests/fsdp_worker.py, tangents
drawn with eager ops: TORCH_COMPILE_DISABLE=1 spares each process the kernel build); the
refusals run in this process on a one-process gloo group.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from fwdgrad_plugins import ForwardGradient, ForwardGradientEstimator, ForwardSGD, directional_derivatives
from fwdgrad_plugins.errors import UnsupportedShardingError
from processes import free_port

from fsdp_worker import CASES

WORKER = Path(__file__).resolve().parents[1] / "fsdp_worker.py"
ROOT_WORKER = Path(__file__).resolve().parent / "root_reshard_worker.py"

EXACT = {"mlp-sgd", "mlp-forward-sgd", "mlp-spsa", "gpt2-sgd", "gpt2-forward-sgd", "gpt2-lora-adam", "llama-sgd",
         "mlp-forward-sgd-rank1-k2"}


def run_ranks(world: int, *cases: str, timeout: int = 240, worker: Path = WORKER, **env) -> list[dict]:
    port = str(free_port())
    env = {**os.environ, "TORCH_COMPILE_DISABLE": "1", "PYTHONWARNINGS": "ignore", **env}
    procs = [subprocess.Popen([sys.executable, str(worker), str(rank), str(world), port, *cases],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in range(world)]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(line) for out, _ in outputs for line in out.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def two_ranks():
    results = run_ranks(2, *CASES)
    return {case: [r for r in results if r["case"] == case] for case in CASES}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_matches_replicated(two_ranks, case):
    assert len(two_ranks[case]) == 2
    check_parity(case, two_ranks[case])


@pytest.mark.slow
def test_four_ranks_match_replicated_with_an_empty_shard():
    """Four ranks: the MLP's 3-row layer leaves rank 3 no rows at all."""
    cases = ["mlp-sgd", "mlp-forward-sgd-rank1-k2"]
    results = run_ranks(4, *cases)
    for case in cases:
        ranks = [r for r in results if r["case"] == case]
        assert len(ranks) == 4
        check_parity(case, ranks)


@pytest.mark.slow
def test_a_root_resharded_after_forward_is_gathered_again_for_its_head_and_matches_replicated():
    """fully_shard(model, reshard_after_forward=True): the root is resharded while the blocks
    run and gathered again for the final norm and the tied head: one more all-gather of the
    root per step, and the same parameters as the replicated run."""
    cases = ["gpt2-forward-sgd", "gpt2-sgd", "llama-sgd", "gpt2-lora-adam"]
    results = run_ranks(2, *cases, worker=ROOT_WORKER)
    for case in cases:
        ranks = [r for r in results if r["case"] == case]
        assert len(ranks) == 2
        check_parity(case, ranks)
        if case != "gpt2-lora-adam":  # (LoRA: the root holds frozen parameters only, and is left alone)
            # a step: two blocks, and the root twice (at the start, and for the final norm and
            # the head); and once, before the first step, each of the 3 units to find its
            # gathered parameters
            assert all(r["calls"]["all_gather_single"] == 4 * r["steps"] + 3 for r in ranks), ranks
    for r in (r for r in results if r["case"] == "root-check"):
        # the replicated runs, and LoRA's, hold the root gathered; the trained sharded runs do not
        gathered = r["root_gathered_in_blocks"]
        assert gathered.count(False) == 3 * 2 * 3, gathered  # 3 cases x 2 blocks x 3 steps


def check_parity(case, ranks):
    for r in ranks:
        if case in EXACT:
            assert r["equal"], f"{case} rank {r['rank']}: shards differ by {r['max_diff']}"
            assert r["losses"] == r["replicated_losses"]
        elif case == "gpt2-bf16":  # bf16 forward passes: the update within a few percent
            assert r["max_diff"] < 0.1 * r["moved"], r
        else:  # K > 1: the order of the K-term sums differs
            assert r["max_diff"] < 1e-6, r
        trained = r["changed"]
        assert any(trained) and (case == "gpt2-lora-adam") != all(trained)  # LoRA: the base stays frozen
        assert r["resharded"], "a module stayed gathered after the step"
        assert r["grads_are_shards"]
        # no gradient traffic: FSDP2's all-gathers in each closure pass, and K floats per step
        calls = r["calls"]
        assert not any("reduce_scatter" in name for name in calls), calls
        passes = r["num_directions"] * (2 if "spsa" in case else 1)  # closure passes per step
        assert calls.get("all_reduce", 0) == r["steps"]
        assert r["sent"].get("all_reduce", 0) == r["steps"] * 4 * r["num_directions"]
        assert calls["all_gather_single"] >= r["steps"] * passes


RESUMED = ["mlp-adam-k3", "mlp-forward-sgd", "gpt2-lora-adam"]


@pytest.mark.slow
def test_a_resumed_sharded_run_ends_bit_identical(tmp_path):
    """Model, optimizer and estimator state through torch.distributed.checkpoint (TrainingState)."""
    results = run_ranks(2, *(f"resume:{case}" for case in RESUMED), FWDGRAD_CHECKPOINT_DIR=str(tmp_path))
    assert len(results) == 2 * len(RESUMED)
    assert all(r["equal"] for r in results), results


@pytest.fixture
def one_rank():
    """A one-process gloo group (FSDP2 and DTensors need one), destroyed after the test."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def sharded_mlp(**shard_options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    fully_shard(model[0], **shard_options)
    fully_shard(model, **shard_options)
    return model


def assert_refused(model, make_optimizer, match, **step_options):
    """The step raises UnsupportedShardingError matching ``match``; nothing changed."""
    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    opt = make_optimizer(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UnsupportedShardingError, match=match):
        opt.step(lambda: nn.functional.cross_entropy(model(x), y), **step_options)
    after = [p.detach().clone() for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is None for p in model.parameters())
    assert not opt.state or all(not s for s in opt.state.values())
    return opt


def forward_gradient(model, **options):
    return ForwardGradient(torch.optim.SGD(model.parameters(), lr=0.1), **options)


@pytest.mark.parametrize("estimator", ["blockwise", "weight-per-example", "guided"])
def test_estimators_that_need_more_than_derivatives_are_refused_by_name(one_rank, estimator):
    opt = assert_refused(sharded_mlp(), lambda m: forward_gradient(m, estimator=estimator), repr(estimator))
    assert opt.estimator.step == 0


def test_a_sampler_without_a_stream_is_refused(one_rank):
    assert_refused(sharded_mlp(), lambda m: forward_gradient(m, tangents="orthogonal-gaussian", num_directions=2),
                   "draws whole tangents")


def test_sharding_along_another_dimension_is_refused(one_rank):
    from torch.distributed.tensor import Shard

    model = sharded_mlp(shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
    assert_refused(model, lambda m: ForwardSGD(m.parameters(), lr=0.1), r"Shard\(dim=1\)")


def test_cpu_offload_is_refused(one_rank):
    from torch.distributed.fsdp import CPUOffloadPolicy

    assert_refused(sharded_mlp(offload_policy=CPUOffloadPolicy(pin_memory=False)), forward_gradient, "offload")


def test_tensor_parallel_dtensors_are_refused(one_rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    model = nn.Sequential(nn.Linear(4, 2))
    mesh = init_device_mesh("cpu", (1,))
    model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Replicate()]))
    assert_refused(model, lambda m: ForwardSGD([m[0].weight], lr=0.1), "tensor parallelism")


def test_fsdp1_is_refused(one_rank):
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(nn.Sequential(nn.Linear(4, 2)), use_orig_params=True, device_id=torch.device("cpu"))
    assert_refused(model, forward_gradient, "FSDP1")


def test_deepspeed_zero3_parameters_are_refused():
    model = nn.Sequential(nn.Linear(4, 2))
    for i, p in enumerate(model.parameters()):
        p.ds_id = i  # what ZeRO-3 sets on the parameters it partitions
    assert_refused(model, lambda m: ForwardSGD(m.parameters(), lr=0.1), "ZeRO-3")


def test_shards_given_to_the_engine_are_refused_not_a_silent_zero(one_rank):
    """The engine and SPSA run the closure with the tensors they are given; FSDP2 computes
    with gathered ones, so shards handed to them would get a zero derivative."""
    from fwdgrad_plugins.estimators.spsa import SimultaneousPerturbation
    from fwdgrad_plugins.tangents import GaussianSampler
    from fwdgrad_plugins.tangents.streaming import tangent_stream

    model = sharded_mlp()
    model(torch.randn(2, 4))  # a warm-up forward, as in the functorch route that returns 0.0
    params = list(model.parameters())
    closure = lambda: model(torch.randn(2, 4)).sum()
    tangents = tangent_stream(GaussianSampler(), params, 1, 0)
    with pytest.raises(UnsupportedShardingError, match="ForwardGradient, ForwardSGD"):
        directional_derivatives(closure, params, tangents)
    with pytest.raises(UnsupportedShardingError, match="ForwardGradient, ForwardSGD"):
        SimultaneousPerturbation().derivatives(closure, params, tangents)


def test_a_changed_fsdp2_internal_is_refused_with_the_torch_version(one_rank, monkeypatch):
    import torch.distributed._composable_state as composable_state

    model = sharded_mlp()
    monkeypatch.delattr(composable_state, "_module_state_mapping")
    assert_refused(model, forward_gradient, re.escape(f"torch {torch.__version__} changed FSDP2's internal"))


def test_one_rank_matches_unsharded_and_writes_dtensor_shards(one_rank):
    """On one rank the shard is the whole parameter: the step equals the unsharded one."""
    from torch.distributed.tensor import DTensor

    x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    model = sharded_mlp()
    for m in (plain, model):
        fg = ForwardGradientEstimator(num_directions=1, seed=3)
        fg.backward(lambda: nn.functional.cross_entropy(m(x), y), m.parameters())
    for p, q in zip(model.parameters(), plain.parameters()):
        assert isinstance(p.grad, DTensor) and torch.equal(p.grad.full_tensor(), q.grad)
