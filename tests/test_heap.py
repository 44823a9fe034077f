"""A spawned worker's heap policy (`fxdisagg.runtime.heap`), each case in a fresh process
(the policy is process-wide): a call that repeats the previous one's shape reuses its
pages instead of faulting new ones in, and a release gives them back to the OS."""

import subprocess
import sys
import textwrap

import pytest

from fxdisagg.runtime import heap

pytestmark = pytest.mark.skipif(heap._LIBC is None, reason="the policy is glibc's mallopt")

_CALLS = textwrap.dedent("""
    import resource, sys, torch
    from fxdisagg.runtime import heap
    if sys.argv[1] == "keep":
        assert heap.keep_freed_memory()

    def call():                        # a call's activations: 4 tensors of 8 MiB, then freed
        xs = [torch.ones(2 << 20) for _ in range(4)]
        return float(sum(x[-1] for x in xs))

    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

    for _ in range(3):
        call()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        call()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    held = rss_mib()
    heap.release_freed_memory()
    print(faults, held - rss_mib())
""")


def _repeat_a_call(policy: str) -> tuple[int, float]:
    """Page faults of five equal calls after three more, and the MiB a release then gave back."""
    out = subprocess.run([sys.executable, "-c", _CALLS, policy], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    return int(out[0]), float(out[1])


def test_a_repeated_call_reuses_the_pages_the_last_one_freed():
    faults_default, _ = _repeat_a_call("default")
    faults_kept, released = _repeat_a_call("keep")
    pages = 4 * (8 << 20) // 4096             # of one call
    assert faults_default > 5 * pages // 2    # glibc's default: fresh pages every call
    assert faults_kept < pages                # kept: the earlier calls' pages
    assert released > 16                       # and the release hands the 32 MiB back


def _faults_of_repeated_allocations(worker) -> int:
    """In a worker: page faults of allocating and touching 16 MiB twice, after twice."""
    import resource

    import torch
    for _ in range(2):
        torch.ones(4 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(2):
        torch.ones(4 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_spawned_workers_keep_their_freed_memory():
    import fxdisagg
    from fxdisagg.testing import inputs, tiny_model

    with fxdisagg.compile(tiny_model("llama"), 1, 1, launch="spawn") as dm:
        dm(**inputs("llama", 1, 8))       # starts the workers
        faults = [dm.runtime.call(r, _faults_of_repeated_allocations) for r in range(2)]
    assert max(faults) < (16 << 20) // 4096 // 4, faults     # default glibc: 2 x 4096
