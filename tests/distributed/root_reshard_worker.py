"""tests/fsdp_worker.py's parity cases with the root sharded by
``fully_shard(model, reshard_after_forward=True)``: a forward-gradient step then reshards the
root while the blocks run and gathers it again for the final norm and the tied head.
Besides each case's report, each rank prints which FSDP2 units held the root's parameters
gathered when a block started (``root_gathered_in_blocks``: every answer should be False).

    python tests/distributed/root_reshard_worker.py RANK WORLD PORT CASE...
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fsdp_worker  # noqa: E402
from processes import exit_without_teardown  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

seen = []  # per block start in a sharded run: was the root's first parameter gathered?


def shard(model, param_dtype=None):
    policy = MixedPrecisionPolicy(param_dtype=param_dtype) if param_dtype else MixedPrecisionPolicy()
    blocks = [m for m in model.modules() if type(m).__name__ in ("GPT2Block", "LlamaDecoderLayer")]
    root_param = next(p for name, p in model.named_parameters() if "layers." not in name and ".h." not in name)
    root_owner = next(m for m in model.modules() if any(p is root_param for p in m.parameters(recurse=False)))
    for block in blocks:
        fully_shard(block, mp_policy=policy)
        block.register_forward_pre_hook(
            lambda module, args: seen.append(not isinstance(next(root_owner.parameters(recurse=False)), DTensor)))
    fully_shard(model, mp_policy=policy, reshard_after_forward=True)
    return model


fsdp_worker.shard = shard

if __name__ == "__main__":
    rank = int(sys.argv[1])
    fsdp_worker.main(rank, int(sys.argv[2]), sys.argv[3], sys.argv[4:])
    print(json.dumps({"case": "root-check", "rank": rank, "root_gathered_in_blocks": seen}), flush=True)
    exit_without_teardown()
