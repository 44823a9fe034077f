"""The driver side of the persistent workers: post commands, await answers, assemble outputs.

`Driver` is what the in-process and the spawn runtimes share; they differ in how workers
start, which channels carry commands, and how a dead worker is seen (`_dead`). A call:

1. ``load`` the capture's programs once per capture (workers keep them by key);
2. ``run`` on every rank with the sequence length (each rank builds the same Plan and
   schedule from it, bounded LRU caches on both sides), CompNodes also get the inputs;
3. await every rank: an error report, a dead worker or ``timeout`` seconds without progress
   (no rank entered a new layer) raise `WorkerError` naming rank, role, layer and the
   worker's own message, and the workers are stopped (the model starts fresh ones on the
   next call);
4. gather the CompNodes' frontier pieces into full tensors and run the epilogue.
"""

from __future__ import annotations

import abc
import queue
import threading
import time

import torch

from fxdisagg.errors import WorkerError
from fxdisagg.plan import Plan
from fxdisagg.runtime.layout import COMP, RankLayout
from fxdisagg.runtime.worker import worker_error


class Driver(abc.ABC):
    START_TIMEOUT = 180.0

    def __init__(self, config):
        self.config = config
        self.layout = RankLayout(config.alpha, config.beta, config.tp)
        self.timeout = float(config.timeout)
        self.progress = torch.full((self.layout.world,), -1, dtype=torch.int64)
        self.traffic: dict[int, dict[str, int]] = {}
        self.failed = False
        self._keys: dict[int, tuple[int, object]] = {}
        self._lock = threading.RLock()

    # -- what subclasses provide ---------------------------------------------------------------
    @abc.abstractmethod
    def _post(self, rank: int, msg) -> None:
        """Send command ``msg`` to worker ``rank``."""

    @abc.abstractmethod
    def _answers(self) -> queue.Queue:
        """The queue every worker answers on."""

    @abc.abstractmethod
    def _dead(self) -> WorkerError | None:
        """An error for the first worker found dead, else None."""

    def _blob(self, program):
        return program

    @abc.abstractmethod
    def _stop(self) -> None:
        """Stop every worker; safe to call twice."""

    # -- calls ---------------------------------------------------------------------------------
    def run(self, programs, plan: Plan, flat: list, step=None) -> list:
        """One call: ``plan`` is the model's (cached there); workers build their own from
        its length (and the `CacheStep`, if the call uses a KV cache), in their own bounded
        caches."""
        with self._lock:                 # one call at a time on the workers
            return self._run(programs, plan, flat, step)

    def _run(self, programs, plan: Plan, flat: list, step) -> list:
        if self.failed:
            raise WorkerError("the workers of this model failed earlier and were stopped")
        key = self._load(programs)
        self.progress.fill_(-1)
        for r in range(self.layout.world):
            comp = self.layout.role(r)[0] == COMP
            self._post(r, ("run", key, plan.n_tokens, flat if comp else None, step))
        try:
            done = self._await(range(self.layout.world), self.timeout)
        except BaseException:
            # interrupted (Ctrl-C) or failed: messages in flight belong to this call, so
            # these workers can never serve another one; the model starts fresh ones
            self.failed = True
            raise
        self.traffic = {}
        for msg in done.values():
            for (layer, phase), nb in msg[3].items():
                per_layer = self.traffic.setdefault(layer, {"dispatch": 0, "return": 0})
                per_layer[phase] = per_layer.get(phase, 0) + nb
        pieces = {c: done[self.layout.comp_rank(c)][2] for c in plan.active_comp_nodes()}
        frontier = gather_frontier(plan, programs.frontier, pieces)
        with torch.no_grad():
            return list(programs.epilogue(*frontier))

    def memory(self) -> dict[int, dict[str, int]]:
        """Per rank: the bytes its worker holds (`Worker.memory`), measured there."""
        return {r: self.call(r, _worker_memory) for r in range(self.layout.world)}

    def call(self, rank: int, fn, *args):
        """Run ``fn(worker, *args)`` inside worker ``rank`` and return its result (``fn``
        must be importable by the worker: a module-level function)."""
        with self._lock:
            self._post(rank, ("call", fn, args))
            return self._await([rank], self.START_TIMEOUT)[rank][2]

    def _load(self, programs) -> int:
        if id(programs) in self._keys:
            return self._keys[id(programs)][0]
        key = len(self._keys)
        comp = [self._blob(programs.comp_for(t)) for t in range(self.layout.tp)]
        attn = self._blob(programs.attn)
        for r in range(self.layout.world):
            blob = comp[r % self.layout.tp] if self.layout.role(r)[0] == COMP else attn
            self._post(r, ("load", key, blob, programs.layers))
        self._await(range(self.layout.world), self.START_TIMEOUT)
        self._keys[id(programs)] = (key, programs)    # keeps programs alive: ids stay unique
        return key

    # -- waiting -------------------------------------------------------------------------------
    def _await(self, ranks, timeout: float) -> dict[int, tuple]:
        pending, got = set(ranks), {}
        seen, deadline = self.progress.clone(), time.monotonic() + timeout
        answers = self._answers()
        while pending:
            try:
                msg = answers.get(timeout=0.05)
            except queue.Empty:
                dead = self._dead()
                if dead is not None:
                    self._fail(dead)
                if not torch.equal(seen, self.progress):
                    seen, deadline = self.progress.clone(), time.monotonic() + timeout
                elif time.monotonic() > deadline:
                    self._fail(WorkerError(self._stall_message(pending, timeout)))
                continue
            if msg[0] == "error":
                self._fail(self._root_cause() or worker_error(self.layout, msg[1], msg[2], msg[3]))
            got[msg[1]] = msg
            pending.discard(msg[1])
        return got

    def _root_cause(self) -> WorkerError | None:
        """A peer's death shows up as a transport error in the survivors: report the death."""
        return None

    def _stall_message(self, pending, timeout) -> str:
        who = ", ".join(self.layout.describe(r) for r in sorted(pending))
        layers = sorted({int(x) for x in self.progress})
        return (f"no progress for {timeout:.0f} s (option timeout=); still waiting for {who}; "
                f"workers were at layers {layers}")

    def _fail(self, err: WorkerError):
        self.failed = True
        self._stop()
        raise err

    def close(self) -> None:
        self._stop()


def _worker_memory(worker) -> dict[str, int]:
    return worker.memory()


def gather_frontier(plan: Plan, frontier, pieces: dict[int, tuple]) -> list:
    """Full-length frontier values from the active CompNodes' local pieces."""
    active = plan.active_comp_nodes()
    values = []
    for k, fv in enumerate(frontier):
        first = pieces[active[0]][k]
        if fv.dim is None or not isinstance(first, torch.Tensor):
            values.append(first)
            continue
        if len(active) == 1:
            values.append(first)
            continue
        shape = list(first.shape)
        shape[fv.dim] = plan.n_tokens
        full = first.new_empty(shape)
        for c in active:
            full.index_copy_(fv.dim, plan.comp_tokens[c].to(full.device), pieces[c][k])
        values.append(full)
    return values
