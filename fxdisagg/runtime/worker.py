"""The worker: one rank's persistent loop, shared by every runtime.

A `Worker` owns its rank's role, its transport, the programs it was given (one per
capture, by key), bounded caches of per-length Plans and schedules, and ``state``: what
persists across calls, per cache id (an AttnNode's KV caches, a CompNode's input
histories: `fxdisagg.runtime.kvcache`). Its commands:

    ("load", key, ProgramBlob, layers)          -> ("ok", rank)
    ("run", key, n_tokens, flat inputs | None, CacheStep | None)
                                                -> ("done", rank, frontier pieces | None, bytes sent)
    ("call", fn, args)                          -> ("result", rank, fn(worker, *args))
    ("close",)

`serve` runs the loop over two channels (thread queues in-process, one pipe per worker
for spawned processes); under torchrun every rank calls `Worker.run` itself (SPMD). A
command that raises is answered with ``("error", rank, layer, traceback text)``; a failed
run also ends the loop, and the driver stops and replaces the workers after any error.
"""

from __future__ import annotations

import collections
import hashlib
import traceback
import types

import torch

from fxdisagg import comm
from fxdisagg.errors import WorkerError
from fxdisagg.plan import ExtendPlan, Plan, plan_for_call
from fxdisagg.runtime.heap import release_freed_memory
from fxdisagg.runtime.kvcache import EXTEND, FILL, CacheAction, CacheStep, InputHistory
from fxdisagg.runtime.layout import ATTN, RankLayout
from fxdisagg.schedule import Schedule


class LRU(collections.OrderedDict):
    """A dict of at most ``size`` entries; the least recently used one goes first."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        while len(self) > self.size:
            self.popitem(last=False)
        return value


class Worker:
    def __init__(self, rank: int, layout: RankLayout, transport, *, strategy: str,
                 cache_size: int, threads=None):
        self.rank, self.layout, self.transport, self.strategy = rank, layout, transport, strategy
        self.threads = threads      # CompNode: called with each call's rows (`spawn.CallThreads`)
        transport.tp_group = layout.tp_group(rank)
        self.role, self.index = layout.role(rank)
        self.programs: dict[int, tuple] = {}
        self.plans = LRU(cache_size)
        self.schedules = LRU(cache_size)
        self.state: dict = {}

    # -- commands ------------------------------------------------------------------------------
    def load(self, key: int, program, layers) -> None:
        self.programs[key] = (program, tuple(layers))

    def plan(self, n: int, step: CacheStep | None = None) -> Plan | ExtendPlan:
        """The Plan of a call of n tokens: a prefill's, or the step's that extends a cache."""
        a = self.layout
        past = step.past if step is not None and step.mode == EXTEND else None
        return plan_for_call(self.plans, n, a.alpha, a.beta, self.strategy, past)

    def schedule(self, key: int, plan) -> Schedule:
        layers = self.programs[key][1]
        return self.schedules.get_or((key, plan), lambda: Schedule.build(plan, self.layout, layers))

    def run(self, key: int, n: int, flat, step: CacheStep | None = None) -> tuple | None:
        """One call of this rank's program; a CompNode returns its frontier pieces. With a
        `CacheStep` an AttnNode fills or extends its KV cache and a CompNode computes the
        new tokens from its input history."""
        program = self.programs[key][0]
        if step is not None:
            self.drop(step.drop)
        plan = self.plan(n, step)
        schedule = self.schedule(key, plan)
        self.transport.begin(schedule)
        try:
            if self.role == ATTN:
                return self._run_attn(program, plan, step)
            return self._run_comp(program, plan, flat, step)
        finally:
            self.transport.end()

    def _run_comp(self, program, plan, flat, step: CacheStep | None) -> tuple | None:
        tokens = plan.comp_tokens[self.index]
        if step is not None:
            flat = self._history(step, flat)
            tokens = tokens + (step.past if step.mode == EXTEND else 0)
        if self.threads is not None:
            self.threads(len(tokens) * (flat[0].shape[0] if flat and flat[0].dim() > 1 else 1))
        with comm.bound(self.transport), torch.no_grad():
            if len(tokens) == 0:
                self.transport.idle()
                return None
            return tuple(program(*flat, tokens.to(flat[0].device)))

    def _run_attn(self, program, plan, step: CacheStep | None) -> None:
        i, j = self.index
        action = None
        if step is not None:
            caches = self.state.setdefault("kv", {})
            if step.mode == FILL:
                caches[step.cache_id] = {}
            elif step.cache_id not in caches:
                raise WorkerError(f"{self.layout.describe(self.rank)} holds no KV cache "
                                  f"{step.cache_id}: a cache is extended after its fill")
            action = CacheAction(caches[step.cache_id], step.mode, i, self.layout.beta)
        dev = getattr(self.transport, "device", None) or torch.device("cpu")
        q_rows, k_rows = plan.tile_tokens(i, j)
        with comm.bound(self.transport, action), torch.no_grad():
            program(q_rows.to(dev), k_rows.to(dev))

    def _history(self, step: CacheStep, flat: list) -> list:
        histories = self.state.setdefault("inputs", {})
        if step.mode == FILL:
            histories[step.cache_id] = InputHistory(flat)
            return flat
        if step.cache_id not in histories:
            raise WorkerError(f"{self.layout.describe(self.rank)} holds no inputs of cache "
                              f"{step.cache_id}: a cache is extended after its fill")
        return histories[step.cache_id].extend(flat)

    def drop(self, cache_ids) -> None:
        """Free the KV caches and input histories of released caches."""
        for cid in cache_ids:
            for store in self.state.values():
                store.pop(cid, None)

    def memory(self) -> dict[str, int]:
        """Bytes this rank holds: its programs' parameters and buffers, and its KV caches."""
        seen, params = set(), 0
        for program, _ in self.programs.values():
            for t in (*program.parameters(), *program.buffers()):
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    params += t.numel() * t.element_size()
        kv = sum(c.nbytes() for layers in self.state.get("kv", {}).values() for c in layers.values())
        return {"params": params, "kv_cache": kv}

    def handle(self, msg):
        kind = msg[0]
        if kind == "load":
            _, key, blob, layers = msg
            self.load(key, blob.load() if isinstance(blob, ProgramBlob) else blob, layers)
            return ("ok", self.rank)
        if kind == "run":
            _, key, n, flat, step = msg
            pieces = self.run(key, n, flat, step)
            return ("done", self.rank, pieces, dict(self.transport.sent))
        if kind == "call":
            _, fn, args = msg
            return ("result", self.rank, fn(self, *args))
        raise WorkerError(f"{self.layout.describe(self.rank)}: unknown command {kind!r}")


def serve(worker: Worker, inbox, outbox, alive=lambda: True) -> None:
    """The loop: answer commands from ``inbox`` on ``outbox`` until ("close",) or until
    ``alive()`` turns False (the driver is gone). A failed run ends the loop."""
    import queue
    shapes = None                        # (program, tokens) of the last run
    while True:
        try:
            msg = inbox.get(timeout=1.0)
        except queue.Empty:
            if not alive():
                return
            continue
        if msg[0] == "close":
            return
        try:
            outbox.put(worker.handle(msg))
            if msg[0] == "run" and msg[1:3] != shapes:
                # After the answer, off the call's critical path; not after a run shaped like
                # the one before (decode steps): it reuses what that one freed.
                release_freed_memory()
                shapes = msg[1:3]
        except BaseException as e:  # noqa: BLE001 - reported to the driver, which raises
            outbox.put(("error", worker.rank, worker.transport.layer, format_error(e)))
            if msg[0] == "run" or not isinstance(e, Exception):
                return


def format_error(e: BaseException) -> str:
    """The exception's own first line, then the traceback (first line first: it is what the
    caller reads in the WorkerError)."""
    first = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return first + "\n" + traceback.format_exc()


def worker_error(layout: RankLayout, rank: int, layer, text: str) -> WorkerError:
    role, idx = layout.role(rank)
    where = "before the first layer" if layer is None or layer < 0 else f"at layer {layer}"
    first = text.splitlines()[0] if text else ""
    e = WorkerError(f"{role} {idx} (rank {rank}) failed {where}: {first}\n{text}")
    e.rank, e.role, e.layer, e.remote_traceback = rank, role, layer, text
    return e


def programs_digest(programs) -> bytes:
    """sha256 of what every rank must agree on: the programs' code (stages included) and
    the layers' pieces."""
    h = hashlib.sha256()
    for gm in (programs.comp, programs.attn):
        h.update(gm.code.encode())
        for _, sub in sorted(gm.named_children()):
            h.update(sub.code.encode())
    h.update(repr(programs.layers).encode())
    return h.digest()


# -- programs over a process boundary ----------------------------------------------------------
class ProgramBlob:
    """A GraphModule (and its stage submodules) as picklable generated source + attributes.

    GraphModule's own pickling re-traces the code in the receiver, which would *run* comm
    ops that have no tensor inputs (outside a worker) and may rename nodes; shipping the
    generated code and compiling it as-is keeps it byte-identical. Tensors in the attributes
    travel by shared-memory handle through torch.multiprocessing.
    """

    def __init__(self, gm):
        _, (body, import_block) = gm.__reduce__()
        body = dict(body)
        body["_modules"] = {k: ProgramBlob(m) if isinstance(m, torch.fx.GraphModule) else m
                            for k, m in body.get("_modules", {}).items()}
        self.body, self.import_block, self.code = body, import_block, gm.code

    def load(self) -> torch.nn.Module:
        from torch.fx.graph_module import _forward_from_src

        forward = _forward_from_src(self.import_block + self.code, {})
        body = dict(self.body)
        body["_modules"] = {k: m.load() if isinstance(m, ProgramBlob) else m
                            for k, m in body["_modules"].items()}
        module = _LoadedProgram(body)
        module.forward = types.MethodType(forward, module)
        module.code = self.code
        return module


class _LoadedProgram(torch.nn.Module):
    def __init__(self, body: dict) -> None:
        super().__init__()
        self.__dict__ = body
