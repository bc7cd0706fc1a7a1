"""The error of each FG-W variant's estimate on real MNIST batches, against autograd's gradient:
E‖ĝ − g‖² / ‖g‖² over draws, for the paper MLP at its initial weights and after some steps of
backprop training (Adam lr 1e-3), each on the same batch of 64.

    FWDGRAD_DATA_DIR=../shared/data python benchmarks/variance_error.py --draws 20 \
        --trained-steps 400 --json docs/variance/error.json

One Gaussian direction per estimate (rank-one for the -rank1 variants), one thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import fwdgrad_plugins

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from fgw_variants import VARIANTS  # noqa: E402  (the recipe's variants)
import mnist_data  # noqa: E402
from paper_models import paper_mlp  # noqa: E402

MEASURED = ("weight", "blockwise-rank1", "per-example", "per-example-blockwise", "per-example-span",
            "per-example-span-blockwise", "activity")


def relative_errors(model, x, y, variant: str, draws: int) -> list[float]:
    params = list(model.parameters())
    closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    true = torch.cat([g.flatten() for g in torch.autograd.grad(closure(), params)])
    name, tangents, k = VARIANTS[variant]
    estimator = fwdgrad_plugins.get("estimators", name)()
    sampler = fwdgrad_plugins.get("tangent_samplers", tangents)()
    errors = []
    for seed in range(draws):
        grads = estimator.estimate(closure, params, sampler=sampler, num_directions=k, seed=seed).grads
        estimate = torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)])
        errors.append(float((estimate - true).pow(2).sum() / true.pow(2).sum()))
    return errors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--trained-steps", type=int, default=400)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images, labels = mnist_data.mnist(None, train=True, limit=64 * (args.trained_steps + 1)).tensors
    model = paper_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = images[:64], labels[:64]  # the measured batch
    rows = {}
    for stage in ("initial weights", f"after {args.trained_steps} backprop steps"):
        if stage != "initial weights":
            for step in range(1, args.trained_steps + 1):
                optimizer.zero_grad()
                F.cross_entropy(model(images[64 * step:64 * step + 64]), labels[64 * step:64 * step + 64]).backward()
                optimizer.step()
        rows[stage] = {v: statistics.mean(relative_errors(model, x, y, v, args.draws)) for v in MEASURED}
    print("| variant | " + " | ".join(f"E‖ĝ − g‖² / ‖g‖², {stage}" for stage in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for v in MEASURED:
        print(f"| {v} | " + " | ".join(f"{rows[stage][v]:.3g}" for stage in rows) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "draws": args.draws,
                                               "relative_error": rows}, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
