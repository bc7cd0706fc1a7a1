"""cpu_memory: glibc keeps freed blocks, so a step's buffers stop faulting in anew.

The settings act on a whole process, so each check runs in a fresh Python process.
"""

import json
import subprocess
import sys

import pytest

from fwdgrad_plugins import cpu_memory

glibc_only = pytest.mark.skipif(cpu_memory._glibc() is None, reason="tunes glibc's malloc")

BLOCK = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB)

PROBE = f"""
import json, resource, sys
import torch
from fwdgrad_plugins import cpu_memory

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))

kept = cpu_memory.keep_freed_memory() if sys.argv[1] == "keep" else None
steps = []
for step in range(30):  # a training loop: the same buffer allocated, written and freed each step
    before = faults()
    torch.empty({BLOCK} // 4).fill_(1.0)
    steps.append(faults() - before)
resting = rss()
emptied = cpu_memory.empty_cache()
print(json.dumps(dict(kept=kept, faults=sum(steps[-10:]), released=resting - rss(), emptied=emptied)))
"""


def probe(mode):
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@glibc_only
def test_a_freed_block_is_reused_without_page_faults_and_emptied_on_request():
    """Faults over the last 10 of 30 steps. With kept memory the first few steps may still
    grow the heap (glibc's aligned allocations leave the freed block a little short of the
    next request until freed neighbours merge with it); from then on nothing faults."""
    pages = BLOCK // 4096
    default = probe("default")
    assert default["faults"] > 10 * pages // 2  # the control: mapped afresh, every page faults
    kept = probe("keep")
    assert kept["kept"] is True
    assert kept["faults"] < pages // 50
    assert kept["released"] > BLOCK // 2  # kept resident until empty_cache() gives it back
    assert kept["emptied"] is True


def test_without_glibc_it_warns_and_changes_nothing(monkeypatch):
    monkeypatch.setattr(cpu_memory, "_glibc", lambda: None)
    with pytest.warns(RuntimeWarning, match="not glibc.*jemalloc or tcmalloc"):
        assert cpu_memory.keep_freed_memory() is False
    assert cpu_memory.empty_cache() is False
