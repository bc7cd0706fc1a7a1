"""The core's correctness on a GPU: forward-mode directional derivatives equal autograd's ∇f·v
for the paper's MLP and CNN, in float32 and bfloat16, for each tangent sampler and K = 1, 3;
and the counter-based generator draws the same tangents on the GPU as on the CPU.

The error is measured relative to ‖∇f‖ (the size of ∇f·v for a unit-variance tangent); the
reference is autograd in float32 on the same (rounded) weights and inputs, and backprop in the
same dtype is measured the same way for scale. Exits with status 1 when a case is off.

    python benchmarks/cuda_check.py --json cuda_check.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import fwdgrad_plugins
from fwdgrad_plugins.tangents import counter_rng
from fwdgrad_plugins.engine.forward_mode import directional_derivatives
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # paper_models, mnist_data
from paper_models import paper_cnn, paper_mlp  # noqa: E402
from fwdgrad_plugins.tangents.tangent import RankOne

# error / ‖∇f‖ allowed; or up to twice the error of backprop in the same dtype
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}


def check(build_model, dtype, sampler: str, num_directions: int, device) -> dict:
    torch.manual_seed(0)
    model = build_model().to(device).to(dtype)  # the weights, rounded to dtype
    x = torch.randn(16, 1, 28, 28, device=device).to(dtype)
    y = torch.randint(0, 10, (16,), device=device)
    reference = copy.deepcopy(model).float()  # the same rounded weights, computed in float32
    loss = F.cross_entropy(reference(x.float()), y)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    params = list(model.parameters())
    tangents = fwdgrad_plugins.get("tangent_samplers", sampler)().sample(params, num_directions, seed=1)
    result = directional_derivatives(lambda: F.cross_entropy(model(x).float(), y), params, tangents)
    dense = [t.dense() if isinstance(t, RankOne) else t for t in tangents]
    expected = torch.stack([sum((g * t[k].float()).sum() for g, t in zip(grads, dense))
                            for k in range(num_directions)])
    same_dtype_grads = torch.autograd.grad(F.cross_entropy(model(x).float(), y), params)  # backprop in dtype
    backprop = torch.stack([sum((g.float() * t[k].float()).sum() for g, t in zip(same_dtype_grads, dense))
                            for k in range(num_directions)])
    scale = torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
    error = float((result.derivatives.float() - expected).abs().max() / scale)
    backprop_error = float((backprop - expected).abs().max() / scale)
    return {"model": build_model.__name__, "dtype": str(dtype).removeprefix("torch."), "sampler": sampler,
            "K": num_directions, "relative_error": error, "backprop_relative_error": backprop_error,
            "ok": error <= max(TOLERANCE[dtype], 2 * backprop_error)}


def same_draws_as_cpu(device, count: int = 1_000_003) -> dict:
    """Largest difference between this device's draws and the CPU's, same seed and range."""
    differences = {}
    for draw in (counter_rng.normal, counter_rng.signs):
        here, cpu = draw(3, 5, count, device).cpu(), draw(3, 5, count)
        differences[draw.__name__] = float((here - cpu).abs().max())
    return {"max_abs_difference": differences, "ok": max(differences.values()) <= 1e-5}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = [check(model, dtype, sampler, k, device)
            for model in (paper_mlp, paper_cnn)
            for dtype in (torch.float32, torch.bfloat16)
            for sampler in fwdgrad_plugins.registered("tangent_samplers")
            for k in (1, 3)]
    for row in rows:
        print(f"{row['model']:10s} {row['dtype']:9s} {row['sampler']:15s} K={row['K']}  "
              f"error/‖∇f‖ = {row['relative_error']:.2e} (backprop in {row['dtype']}: "
              f"{row['backprop_relative_error']:.2e})  {'ok' if row['ok'] else 'FAILED'}")
    draws = same_draws_as_cpu(device)
    print(f"counter-based draws, {device} vs cpu: max |difference| {draws['max_abs_difference']}  "
          f"{'ok' if draws['ok'] else 'FAILED'}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                       "torch": torch.__version__, "rows": rows, "counter_rng": draws}, out, indent=1)
    return 0 if all(row["ok"] for row in rows) and draws["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
