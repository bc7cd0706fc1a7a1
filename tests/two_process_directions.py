"""One of two gloo processes for tests/estimators/test_blockwise.py: trains a small model with each
new estimator on its own data, all-reducing the K directional derivatives only (the gradient
estimates for the per-example estimators), and prints
"<variant> <parameter digest> <first loss>" per variant.

    python tests/two_process_directions.py RANK WORLD_SIZE PORT
"""

import hashlib
import sys

import torch
import torch.distributed as dist
from torch import nn

from fwdgrad_plugins import ForwardGradientEstimator

VARIANTS = {  # name: (estimator, options, sampler, K)
    "orthogonal": ("weight", {}, "orthogonal-gaussian", 3),
    "blockwise": ("blockwise", {}, "gaussian", 2),
    "blockwise-sampled": ("blockwise", {"blocks": "parameter", "blocks_per_step": 2}, "gaussian", 1),
    "blockwise-scaled": ("blockwise-scaled", {}, "rank1-gaussian", 1),
    "guided": ("guided", {}, "gaussian", 3),
    # the per-example estimators all-reduce their gradient estimates (reduces_gradients)
    "weight-per-example": ("weight-per-example", {}, "gaussian", 2),
    "weight-per-example-blockwise": ("weight-per-example-blockwise", {}, "gaussian", 1),
    "weight-per-example-span-blockwise": ("weight-per-example-span-blockwise", {}, "gaussian", 1),
}


def mean_over_processes(derivatives):
    derivatives = derivatives.clone()
    dist.all_reduce(derivatives)
    return derivatives / dist.get_world_size()


def main(rank: int, world: int, port: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    for variant, (name, options, sampler, k) in VARIANTS.items():
        torch.manual_seed(0)  # the same initial weights on every process
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        fg = ForwardGradientEstimator(estimator=name, estimator_options=options, tangents=sampler,
                                      num_directions=k, seed=7)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        generator = torch.Generator().manual_seed(100 + rank)  # each process its own data
        first = None
        for _ in range(4):
            x, y = torch.randn(8, 5, generator=generator), torch.randint(0, 3, (8,), generator=generator)
            optimizer.zero_grad()
            estimate = fg.backward(lambda: nn.functional.cross_entropy(model(x), y), model.parameters(),
                                   reduce=mean_over_processes)
            first = estimate.loss.item() if first is None else first
            optimizer.step()
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
        print(variant, digest, repr(first), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    from processes import exit_without_teardown

    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    exit_without_teardown()
