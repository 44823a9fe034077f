"""Heartbeat: under torchrun, which rank's process stopped.

A rank that raises says so itself (`TorchrunRuntime` writes its failure to the store). A
rank that dies cannot: SIGKILL, the OOM killer, a segfault in a kernel or ``os._exit``
leave its peers with a transport error ("connection closed by peer", naming an address,
not a rank), a hang, or the SIGTERM torchrun's agent sends every rank once it sees one
exit. To name the dead rank, every rank publishes a pulse: a thread writes
``"<count>|<layer>"`` to the process group's store (hosted by the agent, which outlives
the ranks) every `PERIOD` seconds. A peer whose pulse has not changed for `STALE` seconds
is dead, and its last value says at which layer.

The pulse is written by a thread of its own, so a rank busy in a long kernel still beats
(torch ops release the GIL); `STALE` is ten periods, far above any scheduling hiccup.
"""

from __future__ import annotations

import threading
import time

PERIOD = 0.2
STALE = 2.0


def _key(rank: int) -> str:
    return f"fxdisagg/pulse/{rank}"


class Heartbeat:
    """This rank's pulse, and what it has seen of its peers'. ``layer()`` gives the layer
    to publish (the transport's current one)."""

    def __init__(self, store, rank: int, world: int, layer=lambda: None):
        self.store, self.rank, self.layer = store, rank, layer
        self.peers = [r for r in range(world) if r != rank]
        self._count = 0
        self._seen: dict[int, tuple[bytes, float]] = {}    # peer -> (value, when it changed)
        self._stop = threading.Event()
        self._beat()                                       # the key exists before any check
        self._thread = threading.Thread(target=self._run, name="fxdisagg-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self._count += 1
        layer = self.layer()
        self.store.set(_key(self.rank), f"{self._count}|{-1 if layer is None else layer}")

    def _run(self) -> None:
        while not self._stop.wait(PERIOD):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - the store went away with the job: stop beating
                return

    def dead(self) -> tuple[int, int] | None:
        """(rank, last layer) of the first peer whose pulse stopped `STALE` seconds ago, or
        None. Peers not yet seen beating are not judged."""
        keys = [_key(r) for r in self.peers]
        if not self.store.check(keys):
            return None
        now = time.monotonic()
        for r, value in zip(self.peers, self.store.multi_get(keys)):
            last = self._seen.get(r)
            if last is None or last[0] != value:
                self._seen[r] = (value, now)
            elif now - last[1] > STALE:
                return r, int(value.decode().split("|")[1])
        return None

    def wait_for_dead(self, within: float = STALE + 1.0) -> tuple[int, int] | None:
        """`dead`, polled until ``within`` seconds pass: after a transport error or a
        SIGTERM, give a dead peer's pulse the time to go stale."""
        deadline = time.monotonic() + within
        while True:
            found = self.dead()
            if found is not None or time.monotonic() > deadline:
                return found
            time.sleep(PERIOD)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)
