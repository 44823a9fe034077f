"""Compute slots: as many workers of a role compute at a time as there are cores, each on a
core of its own.

When a role has at least as many workers as the host has cores (4 AttnNodes on 2 cores at
beta = 2; two CompNodes on 2 cores), its workers share a `CoreSlots`: one slot per core. A
worker holds a slot while it runs (`SharedMemoryTransport.begin` to ``end``) and gives it
back only while it waits on a peer (`fxdisagg.runtime.shm`). So as many tiles compute at a
time as there are cores, each to its end, instead of all of them time-sliced (each switch
evicting the other's tile from the core's cache) and all finishing late; timed in the
workers at (2, 2), N=2048 on 2 cores, an AttnNode phase went from ~55 to ~48 ms per layer.

A slot is a core: the worker that takes slot k runs on core k until it gives the slot back
(the affinity of its thread), and may run on any core while it waits. Counting alone let
two slot holders share one core while the other idled: Linux puts a woken task on its
previous core or its waker's when both are busy, and an idle core pulls a queued task only
if its idle periods average more than the migration cost (0.5 ms), which a core of this
runtime, always busy, never does. Traced at (2, 2), N=2048, tiles spent ~17 ms per call
descheduled that way; side by side in one run, binding took (2, 2) from 1.13-1.18x eager
to 1.06-1.10x. A call of few tokens (a decode step: `shm.LARGE_CALL`) takes slots without
binding: its exchanges come every fraction of a millisecond, and moving the thread twice
per exchange made a (1, 2) decode step ~8% slower. A slot holder never waits for anything but
a peer, and gives its slot back first, so the slots cannot deadlock the exchanges.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from fxdisagg.runtime.layout import ATTN, COMP


class CoreSlots:
    """One slot per core of ``cpus``, shared by a role's workers (made by the driver from
    its multiprocessing context, copied into each worker, where `take` and `give` keep
    that worker's own slot)."""

    def __init__(self, ctx, cpus: Sequence[int]):
        self.cpus = tuple(cpus)
        self._free = ctx.Semaphore(len(self.cpus))
        self._taken = ctx.Array("b", len(self.cpus), lock=False)
        self._lock = ctx.Lock()
        self._held: int | None = None       # this worker's slot
        self._last: int | None = None       # the one it held before: its cache is warm there
        self._bound = False                 # runs on its slot's core only

    @property
    def held(self) -> bool:
        return self._held is not None

    def take(self, wait: Callable, bind: bool = True) -> None:
        """Take a free slot, the last one if it is free, and (``bind``) run on its core.
        ``wait(sem, what)`` acquires the semaphore of free slots (the transport's, which
        checks its deadline and its driver while it waits)."""
        wait(self._free, "a compute slot")
        with self._lock:
            free = [k for k in range(len(self.cpus)) if not self._taken[k]]
            k = self._last if self._last in free else free[0]
            self._taken[k] = 1
        self._held = self._last = k
        if bind:
            _run_on({self.cpus[k]})
            self._bound = True

    def give(self) -> None:
        if self._bound:
            _run_on(set(self.cpus))         # waiting: any core may wake it
            self._bound = False
        with self._lock:
            self._taken[self._held] = 0
        self._held = None
        self._free.release()

    def free(self) -> int:
        """Slots no worker holds now (for tests and reports)."""
        with self._lock:
            return sum(1 for k in range(len(self.cpus)) if not self._taken[k])


def _run_on(cpus: set[int]) -> None:
    """Run the calling thread on ``cpus`` (no-op where Linux affinity is unavailable)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def host_cpus() -> list[int]:
    """The cores this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def compute_slots(ctx, layout, cpus: Sequence[int]) -> list:
    """Per rank, the `CoreSlots` its role shares, or None where the role has fewer workers
    than ``cpus`` (each then runs several threads: see `spawn._threads`)."""
    pools = {role: CoreSlots(ctx, cpus) if layout.workers(role) >= len(cpus) > 1 else None
             for role in (COMP, ATTN)}
    return [pools[layout.role(r)[0]] for r in range(layout.world)]

