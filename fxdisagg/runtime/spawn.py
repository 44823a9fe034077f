"""launch="spawn": the caller's process drives ``alpha + beta**2`` worker processes.

Workers start from fxdisagg's own entry point (`_worker_main`), never by re-importing the
user's script: while they start, the caller's ``__main__`` is hidden from multiprocessing
(a module with no file and no spec is not re-imported by the spawn start method), as
torchrun starts its ranks from a module of its own. Scripts without an
``if __name__ == "__main__":`` guard and notebooks therefore work.

Each worker runs the shared `Worker` loop with a `SharedMemoryTransport` (payloads and
headers through shared memory, a semaphore per CompNode/AttnNode pair as doorbell, and
a core of its own while it computes where a role has as many workers as cores or more:
`fxdisagg.runtime.slots`; no process group, no sockets) and persists for the
DisaggregatedModel's lifetime. The driver makes the doorbells and talks to each worker
over a pipe of its own (`Channel`: programs, inputs, frontier pieces, errors; small
tensors inline, see `_Inline`) and polls their liveness while it waits. CompNode weights travel
once per capture in shared memory (``share_memory_``: one copy in RAM). CPU only: CUDA
models use torchrun. A worker keeps the memory a call frees for the next call of the same
shape (`fxdisagg.runtime.heap`). ``close()``, the context manager, garbage collection and
interpreter exit stop the workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import signal
import sys
import time
import types
import weakref
from multiprocessing.connection import wait as wait_for_any

import torch
import torch.multiprocessing as mp

from fxdisagg.errors import ConfigError, WorkerError
from fxdisagg.runtime.driver import Driver
from fxdisagg.runtime.heap import keep_freed_memory
from fxdisagg.runtime.layout import COMP, RankLayout
from fxdisagg.runtime.shm import SharedMemoryTransport, doorbells, group_doorbells, remove_segments
from fxdisagg.runtime.slots import compute_slots, host_cpus
from fxdisagg.runtime.worker import ProgramBlob, Worker, format_error, serve, worker_error

log = logging.getLogger(__name__)


def _tag() -> str:
    """Names one runtime's shared-memory segments (`fxdisagg.runtime.shm`)."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _threads(layout: RankLayout, rank: int) -> int:
    """Intra-op threads of a worker: the cores shared by the workers of its role, which run
    at the same time (CompNodes together, then AttnNodes together); more would oversubscribe
    the cores while the peers compute (measured at (2, 2) on 2 cores: 1.74x -> see the
    runtime benchmark)."""
    return max(1, len(host_cpus()) // layout.workers(layout.role(rank)[0]))


class CallThreads:
    """A CompNode's intra-op threads per call: all of its share of the cores (`_threads`)
    for a call of many rows, one for a call of few (a decode step, a short chunk).

    Workers wait passively between parallel regions (see `_workers_start_from_fxdisagg`),
    so every region wakes a sleeping thread, and the matmuls of a few rows are too small to
    repay it: a decode stage of a hidden-512 Llama (4 rows) took 1.57 ms on two threads and
    1.04 ms on one; the two break even near 256 rows (1024 rows: 23 vs 39 ms).
    ``full``: the threads of a large call."""

    SMALL_ROWS = 256

    def __init__(self, full: int):
        self.full = self.now = full

    def __call__(self, rows: int) -> None:
        want = 1 if rows < self.SMALL_ROWS else self.full
        if want != self.now:
            torch.set_num_threads(want)
            self.now = want


def _batch_policy() -> None:
    """Workers run under Linux's SCHED_BATCH, which only changes wake-ups: a woken batch
    task does not preempt the task running on its core. A worker rings every peer of an
    exchange in turn; under the normal policy the first peers it woke took its core before
    it rang the rest, so the last ones started late: a CompNode ringing 4 AttnNodes took
    1.2-2.4 ms instead of ~0.4 ms (timed in the workers at (1, 2) on 2 cores,
    benchmarks/decode_cpu.py), and an AttnNode ringing 2 CompNodes at (2, 2) was held
    ~3 ms between the two rings. Nothing else changes: a batch task gets its fair share."""
    if hasattr(os, "SCHED_BATCH"):
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError:
            pass  # not permitted here (a container's seccomp): the default policy works too


_INLINE_BYTES = 1 << 16


class _Inline:
    """A small CPU tensor that pickles as its bytes and unpickles as a tensor again.

    torch.multiprocessing sends every CPU tensor through a pipe as a shared-memory file
    descriptor, one socket round trip to the sender's resource sharer each: a fixed cost
    that dominated the messages of a decode step (inputs of one token per row, the new
    hidden state back). Tensors under `_INLINE_BYTES` travel inside the pickle instead."""

    def __init__(self, t: torch.Tensor):
        self.t = t

    def __reduce__(self):
        t = self.t.contiguous()
        return _tensor_from_bytes, (t.view(torch.uint8).numpy().tobytes(), t.dtype, tuple(t.shape))


def _tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype).reshape(shape)


def _inline(obj):
    """``obj`` (a message: tuples and lists of values) with its small CPU tensors as `_Inline`."""
    if isinstance(obj, torch.Tensor):
        small = obj.device.type == "cpu" and obj.numel() * obj.element_size() <= _INLINE_BYTES
        return _Inline(obj) if small and obj.dim() > 0 else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_inline(x) for x in obj)
    return obj


class Channel:
    """One end of the duplex pipe between the driver and a worker, used like a queue.

    A pipe rather than a ``multiprocessing.Queue``: a queue pickles and writes in a feeder
    thread of its own, so the driver's messages of one call left in whatever order the
    feeder threads got the GIL (the CompNode's, which every AttnNode waits for, often
    last), and those threads' CPU competed with the workers on a machine with few cores.
    Here ``put`` pickles and writes in the caller, so messages leave in the order they are
    put. Messages are small (tensors over `_INLINE_BYTES` travel as shared-memory handles),
    so a write never waits long on its reader. ``inline``: small tensors of outgoing
    messages travel inside the pickle (`_Inline`)."""

    def __init__(self, conn, inline: bool = True):
        self.conn, self.inline = conn, inline

    def put(self, msg) -> None:
        self.conn.send(_inline(msg) if self.inline else msg)

    def get(self, timeout: float):
        """The next message; `queue.Empty` after ``timeout`` seconds without one, or once
        the other end is closed (its process is gone: the caller's liveness checks say so)."""
        if not self.conn.poll(timeout):
            raise queue.Empty
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            raise queue.Empty from None

    def close(self) -> None:
        self.conn.close()


class _Answers:
    """The answers of every worker, first come first served, with a queue's ``get``."""

    def __init__(self, channels: list[Channel]):
        self.open = [c.conn for c in channels]     # the pipes of workers not known gone
        self.ready: list = []

    def get(self, timeout: float):
        if not self.ready:
            self.ready = wait_for_any(self.open, timeout)
            if not self.ready:
                raise queue.Empty
        conn = self.ready.pop()
        try:
            return conn.recv()
        except (EOFError, OSError):      # a worker is gone; `Driver._await` finds out which
            self.open.remove(conn)
            raise queue.Empty from None


def _worker_main(rank, config, tag, bells, group_bells, slots, conn, progress, parent_pid):
    """Entry point of a spawned worker; ``conn``: its end of the pipe to the driver."""
    import fxdisagg  # noqa: F401  (registers the ops the programs call)

    layout = RankLayout(config.alpha, config.beta, config.tp)
    channel = Channel(conn)
    _batch_policy()
    keep_freed_memory()
    threads = None
    if "OMP_NUM_THREADS" not in os.environ:      # a user's own setting wins
        torch.set_num_threads(_threads(layout, rank))
        threads = CallThreads(_threads(layout, rank)) if layout.role(rank)[0] == COMP else None
    try:
        def alive():
            return os.getppid() == parent_pid

        transport = SharedMemoryTransport(rank, layout.world, tag=tag, bells=bells,
                                          timeout=config.timeout, alive=alive, progress=progress,
                                          group_bells=group_bells, slots=slots)
        worker = Worker(rank, layout, transport, strategy=config.sharding, cache_size=config.cache_size,
                        threads=threads)
        channel.put(("ready", rank))
        try:
            serve(worker, channel, channel, alive=alive)
        finally:
            transport.close()
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which raises WorkerError
        channel.put(("error", rank, None, format_error(e)))
    finally:
        channel.close()


@contextlib.contextmanager
def _workers_start_from_fxdisagg():
    """Hide the caller's ``__main__`` from the spawn start method (see module docstring),
    and let idle workers wait passively: workers take turns (a CompNode waits while the
    AttnNodes compute), and with OpenMP's default active wait an idle worker's threads spin
    on the cores of the busy one (measured: (2, 2) at N=2048 on 2 cores went from 3.2x to
    1.6x the eager time). A user's own OMP_WAIT_POLICY wins."""
    main = sys.modules["__main__"]
    saved = os.environ.get("OMP_WAIT_POLICY")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main
        if saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)


def _stop(procs, channels, grace: float, tag: str | None = None) -> None:
    """Ask workers to leave, then kill whoever is still there, and remove what shared
    memory a killed worker left. Safe to call twice."""
    for p, c in zip(procs, channels):
        if p.is_alive():
            try:
                c.put(("close",))
            except (OSError, ValueError):
                pass  # pipe already closed: the join/kill below still stops the worker
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5.0)
    if tag is not None:
        remove_segments(tag)


class SpawnRuntime(Driver):
    def __init__(self, config):
        super().__init__(config)
        ctx = mp.get_context("spawn")
        world = self.layout.world
        self.progress.share_memory_()
        pipes = [ctx.Pipe() for _ in range(world)]
        self.channels = [Channel(mine, inline=False) for mine, _ in pipes]
        self.answers = _Answers(self.channels)
        self.tag = _tag()
        bells, group_bells = doorbells(ctx, self.layout), group_doorbells(ctx, self.layout)
        slots = compute_slots(ctx, self.layout, host_cpus())
        self.procs = [ctx.Process(target=_worker_main, name=f"fxdisagg-{self.layout.describe(r)}",
                                  args=(r, config, self.tag, bells, group_bells, slots[r],
                                        theirs, self.progress, os.getpid()), daemon=True)
                      for r, (_, theirs) in enumerate(pipes)]
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.channels, 5.0, self.tag)
        with _workers_start_from_fxdisagg():
            for p in self.procs:
                p.start()
        for _, theirs in pipes:
            theirs.close()          # the workers hold them: a worker's exit closes its pipe
        log.info("started %d workers (shared memory tag %s)", world, self.tag)
        self._await(range(world), self.START_TIMEOUT)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def run(self, programs, plan, flat, step=None):
        if any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in flat):
            raise ConfigError("launch='spawn' runs on CPU; run CUDA models under torchrun")
        return super().run(programs, plan, flat, step)

    def _blob(self, program):
        program.share_memory()                   # weights travel by handle, not by copy
        return ProgramBlob(program)

    def _post(self, rank, msg):
        self.channels[rank].put(_inline(msg) if msg[0] == "run" else msg)

    def _answers(self):
        return self.answers

    def _dead(self) -> WorkerError | None:
        dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
        if not dead:
            return None
        killed = self._root_cause()
        if killed is not None:
            return killed
        try:                                     # a worker that raised reports before exiting
            msg = self.answers.get(timeout=1.0)
            if msg[0] == "error":
                return worker_error(self.layout, msg[1], msg[2], msg[3])
        except queue.Empty:
            pass  # no report: it died without raising, reported as a death below
        return self._death(dead[0])

    def _root_cause(self, grace: float = 0.2) -> WorkerError | None:
        """If a worker was killed by a signal, that is the root cause of its peers' errors."""
        deadline = time.monotonic() + grace
        while True:
            killed = [r for r, p in enumerate(self.procs) if not p.is_alive() and (p.exitcode or 0) < 0]
            if killed:
                return self._death(killed[0])
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)

    def _death(self, r: int) -> WorkerError:
        code = self.procs[r].exitcode
        how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exited with code {code}")
        return worker_error(self.layout, r, int(self.progress[r]),
                            f"the worker process (pid {self.procs[r].pid}) {how}")

    def _stop(self):
        _stop(self.procs, self.channels, 0.0, self.tag)

    def close(self) -> None:
        self._finalizer()
