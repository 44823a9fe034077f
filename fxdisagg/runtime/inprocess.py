"""launch="inprocess": every CompNode and AttnNode program runs in the caller's process,
one thread each, moving tensors between them exactly as the Plan says.

It exists to prove the programs and the Plan exact without processes, and to debug them:
the same programs run unchanged on the distributed runtime, only the transport differs.
Messages go through one queue per worker; a worker that raises aborts the others, and the
caller gets `WorkerError` naming the worker, its role and the layer.
"""

from __future__ import annotations

import queue
import threading
import time

import torch

from fxdisagg import comm
from fxdisagg.errors import WorkerError
from fxdisagg.exchange import (active_comp_nodes, assemble_partials, assemble_tile,
                               split_dispatch, split_reply)
from fxdisagg.plan import Plan
from fxdisagg.runtime.common import gather_frontier


class _Aborted(Exception):
    """Raised in a worker thread after another worker failed: it stops quietly, the
    caller reports the first failure."""


class _Hub:
    """Mailboxes of all workers of one call."""

    def __init__(self, plan: Plan, timeout: float):
        self.plan, self.timeout = plan, timeout
        self.abort = threading.Event()
        self.boxes: dict = {}

    def box(self, key) -> queue.Queue:
        return self.boxes.setdefault(key, queue.Queue())

    def get(self, key, layer: int):
        deadline = time.monotonic() + self.timeout
        box = self.box(key)
        while True:
            if self.abort.is_set():
                raise _Aborted()
            try:
                msg = box.get(timeout=0.05)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no message for layer {layer} within {self.timeout} s")
                continue
            assert msg[0] == layer, f"message of layer {msg[0]} while waiting for layer {layer}"
            return msg


class _Endpoint:
    def __init__(self, hub: _Hub, layers):
        self.hub, self.plan, self.layers = hub, hub.plan, layers
        self.layer = None


class CompEndpoint(_Endpoint):
    def __init__(self, hub, layers, c: int):
        super().__init__(hub, layers)
        self.c = c

    def dispatch(self, layer, q_side, k_side):
        self.layer = layer
        for (i, j), pieces in split_dispatch(self.plan, self.c, q_side, k_side).items():
            self.hub.box(("attn", i, j)).put((layer, self.c, pieces))

    def combine(self, layer):
        beta = self.plan.beta
        replies = {}
        for _ in range(beta * beta):
            _, tile, out, lse = self.hub.get(("comp", self.c), layer)
            replies[tile] = (out, lse)
        return assemble_partials(self.plan, self.c, replies)


class AttnEndpoint(_Endpoint):
    def __init__(self, hub, layers, i: int, j: int):
        super().__init__(hub, layers)
        self.i, self.j = i, j

    def receive(self, layer):
        self.layer = layer
        msgs = [self.hub.get(("attn", self.i, self.j), layer) for _ in active_comp_nodes(self.plan)]
        msgs.sort(key=lambda m: m[1])
        return assemble_tile(self.plan, self.i, self.j, [m[2] for m in msgs],
                             self.layers[layer].n_query_side)

    def reply(self, layer, out, lse):
        for c, (o, l) in split_reply(self.plan, self.i, out, lse).items():
            self.hub.box(("comp", c)).put((layer, (self.i, self.j), o, l))


def run(programs, plan: Plan, flat_inputs: list, *, timeout: float = 300.0) -> list:
    """Run one forward: returns the flat outputs of the epilogue program."""
    hub = _Hub(plan, timeout)
    results: dict = {}
    errors: list = []

    def work(name, endpoint, fn):
        try:
            with comm.bound(endpoint), torch.no_grad():
                results[name] = fn()
        except _Aborted:
            return
        except BaseException as e:  # noqa: BLE001 - reported to the caller below
            errors.append((name, endpoint.layer, e))
            hub.abort.set()

    threads = []
    for c in active_comp_nodes(plan):
        ep = CompEndpoint(hub, programs.layers, c)
        tokens = plan.comp_tokens[c].to(flat_inputs[0].device)
        threads.append(threading.Thread(target=work, args=(("comp", c), ep,
                                        lambda ep=ep, t=tokens: programs.comp(*flat_inputs, t))))
    for i in range(plan.beta):
        for j in range(plan.beta):
            ep = AttnEndpoint(hub, programs.layers, i, j)
            threads.append(threading.Thread(target=work, args=(("attn", i, j), ep, programs.attn)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        name, layer, e = errors[0]
        role = "CompNode" if name[0] == "comp" else "AttnNode"
        where = f"{role} {name[1:] if role == 'AttnNode' else name[1]}"
        raise WorkerError(f"{where} (in-process) failed at layer {layer}: {type(e).__name__}: {e}") from e
    pieces = {c: results[("comp", c)] for c in active_comp_nodes(plan)}
    frontier = gather_frontier(plan, programs.frontier, pieces)
    with torch.no_grad():
        return list(programs.epilogue(*frontier))
