"""launch="spawn" and launch="torchrun": the role programs over real processes.

The programs are the ones the in-process runtime runs; only the transport differs. Each
worker binds a `GlooTransport` (the name says CPU; it is backend-agnostic and runs on NCCL
when the tensors live on CUDA) that turns every ``fxdisagg::dispatch``/``receive`` pair and
every ``reply``/``combine`` pair into exactly ONE ``all_to_all_single`` over the workers'
process group: each rank packs, per destination, all its pieces (q float, positions int64,
padding bool...) into one flat uint8 buffer. No header is sent: every receiver computes
the size of every piece from the Plan (row counts ``len(plan.local_rows(c, i))``) and the
schedule's piece signatures (dtype and shape of each dispatched tensor, token dim left
open), read from the CompNode program's graph at compile time. Ranks without tokens
(CompNodes when N < alpha*beta) still take part in every collective, with empty buffers.

Ranks of the worker group: CompNode c is rank c (c < alpha), AttnNode (i, j) is rank
``alpha + i*beta + j``; the world has ``alpha + beta**2`` ranks.

**spawn** (default outside torchrun): the caller's process is the driver and is NOT part of
the process group. It starts the workers with the ``spawn`` start method (scripts must be
guarded by ``if __name__ == "__main__":``), talks to them over torch.multiprocessing queues
(the driver channel: programs, per-call inputs, frontier pieces, errors) and polls their
liveness while it waits. CompNode programs travel once per capture with their weights in
shared memory (``share_memory_``: one copy in RAM, not one per worker); AttnNodes receive
only the parameter-free attention program. Workers persist for the DisaggregatedModel's
lifetime (one process group); ``close()``, the context manager, garbage collection and
interpreter exit stop them. CPU only: CUDA models use torchrun.

**torchrun** (chosen when RANK/WORLD_SIZE are set): every rank runs the same script, builds
the same model and calls the DisaggregatedModel with the same-shaped inputs (SPMD). WORLD_SIZE
must be ``alpha + beta**2``. Rank 0 is CompNode 0 *and* the driver: its inputs are
broadcast to all ranks, it gathers the frontier and runs the epilogue; the call returns the
outputs on rank 0 and ``None`` on every other rank. Backend: NCCL when CUDA is available
(device = LOCAL_RANK), else gloo.

Failure is loud and bounded: a worker that raises reports rank, role, layer and its
traceback; the driver kills every worker and raises `WorkerError`. A worker that dies
(e.g. SIGKILL) is seen by the driver's liveness poll; a worker that stalls for ``timeout``
seconds (the process group's timeout as well) ends the call the same way. At set-up every
rank checks that all ranks hold the same schedule (sha256 of the programs' code, the layer
specs and the piece signatures) and refuses to run otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import logging
import os
import queue
import signal
import socket
import time
import traceback
import types
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fxdisagg import comm
from fxdisagg.errors import ConfigError, WorkerError
from fxdisagg.exchange import (active_comp_nodes, assemble_partials, assemble_tile,
                               split_dispatch, split_reply, token_dim)
from fxdisagg.plan import Plan
from fxdisagg.runtime.common import gather_frontier

log = logging.getLogger(__name__)

COMP, ATTN = "CompNode", "AttnNode"
DISPATCH, RETURN = "dispatch", "return"
START_TIMEOUT = 180.0          # seconds for workers to start / receive programs


# -- layout and schedule ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """Which rank plays which role."""

    alpha: int
    beta: int

    @property
    def world(self) -> int:
        return self.alpha + self.beta ** 2

    def attn_rank(self, i: int, j: int) -> int:
        return self.alpha + i * self.beta + j

    def role(self, rank: int) -> tuple[str, object]:
        if rank < self.alpha:
            return COMP, rank
        return ATTN, divmod(rank - self.alpha, self.beta)

    def describe(self, rank: int) -> str:
        role, idx = self.role(rank)
        return f"{role} {idx} (rank {rank})"


def piece_signatures(comp_gm) -> dict[int, list[tuple[torch.dtype, tuple]]]:
    """Per layer, dtype and shape of every dispatched piece (token dim as None), read from
    the CompNode program: what lets a receiver size its buffers without a header."""
    target = torch.ops.fxdisagg.dispatch.default
    sigs = {}
    for node in comp_gm.graph.find_nodes(op="call_function", target=target):
        sigs[node.args[2]] = [_signature(a) for a in [*node.args[0], *node.args[1]]]
    return sigs


def _signature(node) -> tuple[torch.dtype, tuple]:
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        raise ConfigError(f"distributed runtime: dispatched value {node.name} has no tensor "
                          f"metadata; cannot size the exchange buffers")
    d = token_dim(v)
    shape = tuple(None if k == d else int(s) for k, s in enumerate(v.shape))
    return v.dtype, shape


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The Plan-independent part every rank must agree on."""

    digest: str
    layers: tuple
    sigs: dict
    comp_code: str
    attn_code: str

    @staticmethod
    def of(programs) -> "Schedule":
        sigs = piece_signatures(programs.comp)
        comp, attn = programs.comp.code, programs.attn.code
        return Schedule(schedule_digest(comp, attn, programs.layers, sigs), tuple(programs.layers),
                        sigs, comp, attn)


def schedule_digest(comp_code: str, attn_code: str, layers, sigs) -> str:
    h = hashlib.sha256()
    for part in (comp_code, attn_code, repr(list(layers)), repr(sorted(sigs.items()))):
        h.update(part.encode())
    return h.hexdigest()


def _check_same_schedule(digest: str, group=None) -> None:
    digests = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, digest, group=group)
    if len(set(digests)) != 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise WorkerError(f"ranks {bad} hold a different schedule than rank 0 (programs, layer "
                          f"specs or piece signatures differ); every rank must compile the same "
                          f"model with the same alpha, beta, sharding and batch size")


# -- programs over the driver channel ---------------------------------------------------------------
class ProgramBlob:
    """A GraphModule as picklable source + attributes.

    GraphModule's own pickling re-traces the code in the receiver, which would *run* the
    parameter-free AttnNode program (its comm ops execute outside a worker) and renames
    nodes; shipping the generated code and compiling it as-is keeps it byte-identical.
    Tensors in the attributes travel by shared-memory handle through torch.multiprocessing.
    """

    def __init__(self, gm):
        _, (body, import_block) = gm.__reduce__()
        self.body, self.import_block, self.code = body, import_block, gm.code

    def load(self) -> torch.nn.Module:
        from torch.fx.graph_module import _forward_from_src

        forward = _forward_from_src(self.import_block + self.code, {})
        module = _LoadedProgram(self.body)
        module.forward = types.MethodType(forward, module)
        module.code = self.code
        return module


class _LoadedProgram(torch.nn.Module):
    def __init__(self, body: dict) -> None:
        super().__init__()
        self.__dict__ = body


# -- transport -------------------------------------------------------------------------------------
def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def _fill(shape, rows: int) -> tuple:
    return tuple(rows if s is None else s for s in shape)


def _unpack(buf: torch.Tensor, specs) -> list[torch.Tensor]:
    """Slices of one rank's uint8 buffer back into tensors of ``specs = [(dtype, shape)]``."""
    out, off = [], 0
    for dtype, shape in specs:
        nb = _nbytes(dtype, shape)
        piece = buf[off:off + nb]
        if piece.storage_offset() % dtype.itemsize:
            piece = piece.clone()            # view(dtype) needs an aligned offset
        out.append(piece.view(dtype).view(shape))
        off += nb
    return out


class GlooTransport:
    """One worker's side of the per-layer exchange: one all_to_all per direction per layer."""

    def __init__(self, layout: Layout, rank: int, schedule: Schedule, *, group=None,
                 device=None, progress: torch.Tensor | None = None):
        self.layout, self.rank, self.group = layout, rank, group
        self.role, self.index = layout.role(rank)
        self.specs = {s.layer: s for s in schedule.layers}
        self.sigs = schedule.sigs
        self.device = torch.device(device or "cpu")
        self.progress = progress
        self.plan: Plan | None = None
        self.layer = None
        self.sent: dict[tuple[int, str], int] = {}
        self.fault_layer = None              # test hook: fail when entering this layer
        self.fault_kill = False              # ... by raising, or by SIGKILL of this process

    def start(self, plan: Plan) -> None:
        self.plan, self.layer, self.sent = plan, None, {}

    # -- one collective ----------------------------------------------------------------------
    def _exchange(self, layer: int, direction: str, send: dict[int, list], recv: dict[int, int]):
        self.layer = layer
        if self.progress is not None:
            self.progress[self.rank] = layer
        if self.fault_layer == layer:
            if self.fault_kill:
                os.kill(os.getpid(), signal.SIGKILL)   # dies mid-call, peers in a collective
            raise RuntimeError(f"injected fault at layer {layer} ({direction})")
        world = self.layout.world
        parts = [[_as_bytes(t) for t in send.get(r, [])] for r in range(world)]
        in_sizes = [sum(p.numel() for p in ps) for ps in parts]
        flat = [p for ps in parts for p in ps]
        buf = torch.cat(flat) if flat else torch.empty(0, dtype=torch.uint8, device=self.device)
        out_sizes = [recv.get(r, 0) for r in range(world)]
        out = torch.empty(sum(out_sizes), dtype=torch.uint8, device=self.device)
        dist.all_to_all_single(out, buf, out_sizes, in_sizes, group=self.group)
        self.sent[(layer, direction)] = buf.numel()
        return dict(zip(range(world), out.split(out_sizes)))

    # -- CompNode --------------------------------------------------------------------------------
    def dispatch(self, layer, q_side, k_side):
        pieces = split_dispatch(self.plan, self.index, q_side, k_side)
        self._exchange(layer, DISPATCH, {self.layout.attn_rank(i, j): p for (i, j), p in pieces.items()}, {})

    def combine(self, layer):
        c, beta = self.index, self.plan.beta
        specs = {(i, j): self._reply_specs(layer, len(self.plan.local_rows(c, i)))
                 for i in range(beta) for j in range(beta)}
        bufs = self._exchange(layer, RETURN, {}, {self.layout.attn_rank(i, j): sum(_nbytes(*s) for s in sp)
                                                  for (i, j), sp in specs.items()})
        replies = {t: tuple(_unpack(bufs[self.layout.attn_rank(*t)], sp)) for t, sp in specs.items()}
        return assemble_partials(self.plan, c, replies)

    def idle(self, layer):
        """A CompNode without tokens: take part in both collectives of ``layer`` with nothing."""
        self._exchange(layer, DISPATCH, {}, {})
        self._exchange(layer, RETURN, {}, {})

    def _reply_specs(self, layer, rows):
        dtype, shape = self.sigs[layer][0]                  # q: [B, Hq, None, D]
        b, hq, _, d = shape
        return [(dtype, (b, hq, rows, d)), (torch.float32, (b, hq, rows))]

    # -- AttnNode --------------------------------------------------------------------------------
    def receive(self, layer):
        i, j = self.index
        n_q = self.specs[layer].n_query_side
        specs = {}
        for c in active_comp_nodes(self.plan):
            rows_q, rows_k = len(self.plan.local_rows(c, i)), len(self.plan.local_rows(c, j))
            specs[c] = [(dt, _fill(sh, rows_q if p < n_q else rows_k))
                        for p, (dt, sh) in enumerate(self.sigs[layer])]
        bufs = self._exchange(layer, DISPATCH, {}, {c: sum(_nbytes(*s) for s in sp) for c, sp in specs.items()})
        pieces = [_unpack(bufs[c], specs[c]) for c in sorted(specs)]
        return assemble_tile(self.plan, i, j, pieces, n_q)

    def reply(self, layer, out, lse):
        i, _ = self.index
        expect = self._reply_specs(layer, out.shape[2])
        if (out.dtype, tuple(out.shape)) != expect[0] or (lse.dtype, tuple(lse.shape)) != expect[1]:
            raise WorkerError(f"layer {layer}: partial attention returned out {out.dtype}{tuple(out.shape)}, "
                              f"lse {lse.dtype}{tuple(lse.shape)}; the exchange expects {expect}")
        parts = split_reply(self.plan, i, out, lse)
        self._exchange(layer, RETURN, {c: list(ol) for c, ol in parts.items()}, {})


def run_role(transport: GlooTransport, schedule: Schedule, program, plan: Plan, flat) -> tuple | None:
    """Run this rank's program for one call; CompNodes return their frontier pieces."""
    transport.start(plan)
    with comm.bound(transport), torch.no_grad():
        if transport.role == ATTN:
            program()
            return None
        tokens = plan.comp_tokens[transport.index]
        if len(tokens) == 0:
            for spec in schedule.layers:
                transport.idle(spec.layer)
            return None
        return tuple(program(*flat, tokens.to(flat[0].device)))


def _worker_error(layout: Layout, rank: int, layer, text: str) -> WorkerError:
    role, idx = layout.role(rank)
    where = "before the first layer" if layer is None or layer < 0 else f"at layer {layer}"
    e = WorkerError(f"{role} {idx} (rank {rank}) failed {where}:\n{text}")
    e.rank, e.role, e.layer, e.remote_traceback = rank, role, layer, text
    return e


# -- spawn: worker side ----------------------------------------------------------------------------
def _worker_main(rank, layout, port, timeout, strategy, cmd_q, res_q, progress, parent_pid):
    """Entry point of a spawned worker."""
    import fxdisagg  # noqa: F401  (registers the custom ops the programs call)

    transport, plans, programs = None, {}, {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=layout.world, timeout=datetime.timedelta(seconds=timeout))
        res_q.put(("ready", rank))
        while True:
            try:
                msg = cmd_q.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent_pid:   # the driver is gone: do not linger
                    return
                continue
            if msg[0] == "close":
                break
            if msg[0] == "fault":
                for t in programs.values():
                    t[1].fault_layer, t[1].fault_kill = msg[1], msg[2]
                continue
            if msg[0] == "setup":
                _, key, schedule, blob = msg
                program = blob.load()
                _verify_program(layout, rank, schedule, program)
                _check_same_schedule(schedule.digest)
                programs[key] = (schedule, GlooTransport(layout, rank, schedule, progress=progress), program)
                res_q.put(("ok", rank))
            elif msg[0] == "run":
                _, key, n, flat = msg
                schedule, transport, program = programs[key]
                plan = plans.get(n) or plans.setdefault(n, Plan.build(n, layout.alpha, layout.beta, strategy))
                pieces = run_role(transport, schedule, program, plan, flat)
                res_q.put(("done", rank, pieces, dict(transport.sent)))
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the driver, which raises WorkerError
        layer = transport.layer if transport is not None else None
        res_q.put(("error", rank, layer, traceback.format_exc()))
        res_q.close()
        res_q.join_thread()


def _verify_program(layout, rank, schedule: Schedule, program) -> None:
    """The unpickled program must regenerate the code the schedule was hashed from."""
    role, _ = layout.role(rank)
    expected = schedule.comp_code if role == COMP else schedule.attn_code
    digest = schedule_digest(schedule.comp_code, schedule.attn_code, schedule.layers, schedule.sigs)
    if program.code != expected or digest != schedule.digest:
        raise WorkerError(f"{layout.describe(rank)}: the received program does not match the "
                          f"schedule it was sent with; refusing to run")


# -- spawn: driver side ----------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs, cmd_qs, grace: float) -> None:
    """Ask workers to leave, then kill whoever is still there. Safe to call twice."""
    for p, q in zip(procs, cmd_qs):
        if p.is_alive():
            try:
                q.put(("close",))
            except (OSError, ValueError):
                pass  # queue already closed: the join/kill below still stops the worker
    deadline = time.monotonic() + grace
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5.0)


@contextlib.contextmanager
def _worker_environment():
    """Environment the spawned workers inherit. Workers take turns (a CompNode waits while
    AttnNodes compute and back): with OpenMP's default active wait, an idle worker's threads
    spin and steal the cores of the busy one (measured: (2, 2) at N=2048 on 2 cores went from
    3.2x to 1.6x the eager time with passive waiting). A user's own setting wins."""
    saved = os.environ.get("OMP_WAIT_POLICY")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("OMP_WAIT_POLICY", None)


class SpawnRuntime:
    """Driver of alpha + beta**2 spawned workers (see the module docstring)."""

    def __init__(self, alpha: int, beta: int, strategy: str, timeout: float):
        self.layout, self.strategy, self.timeout = Layout(alpha, beta), strategy, float(timeout)
        ctx = mp.get_context("spawn")
        world = self.layout.world
        self.progress = torch.full((world,), -1, dtype=torch.int64).share_memory_()
        self.res_q = ctx.Queue()
        self.cmd_qs = [ctx.Queue() for _ in range(world)]
        port = _free_port()
        self.procs = [ctx.Process(target=_worker_main, name=f"fxdisagg-{self.layout.describe(r)}",
                                  args=(r, self.layout, port, self.timeout, strategy, self.cmd_qs[r],
                                        self.res_q, self.progress, os.getpid()), daemon=True)
                      for r in range(world)]
        self._finalizer = weakref.finalize(self, _stop, self.procs, self.cmd_qs, 5.0)
        self._keys: dict[int, tuple[int, object]] = {}
        self.traffic: dict[int, dict[str, int]] = {}   # layer -> direction -> bytes, last call
        self.failed = False
        with _worker_environment():
            for p in self.procs:
                p.start()
        log.info("started %d workers on port %d", world, port)
        self._await(range(world), START_TIMEOUT)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    # -- calls -------------------------------------------------------------------------------
    def run(self, programs, plan: Plan, flat: list) -> list:
        if self.failed:
            raise WorkerError("the workers of this model failed earlier and were stopped")
        if any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in flat):
            raise ConfigError("launch='spawn' runs on CPU; run CUDA models under torchrun")
        key = self._setup(programs)
        self.progress.fill_(-1)
        for r in range(self.layout.world):
            comp = self.layout.role(r)[0] == COMP
            self.cmd_qs[r].put(("run", key, plan.n_tokens, flat if comp else None))
        try:
            done = self._await(range(self.layout.world), self.timeout)
        except BaseException:
            # interrupted (Ctrl-C) or failed: replies still in flight belong to this call, so
            # these workers can never serve another one; the model restarts fresh workers
            self.failed = True
            raise
        self.traffic = {}
        for msg in done.values():
            for (layer, direction), nb in msg[3].items():
                self.traffic.setdefault(layer, {DISPATCH: 0, RETURN: 0})[direction] += nb
        pieces = {c: done[c][2] for c in active_comp_nodes(plan)}
        frontier = gather_frontier(plan, programs.frontier, pieces)
        with torch.no_grad():
            return list(programs.epilogue(*frontier))

    def _setup(self, programs) -> int:
        if id(programs) in self._keys:
            return self._keys[id(programs)][0]
        key = len(self._keys)
        schedule = Schedule.of(programs)
        programs.comp.share_memory()             # weights travel by handle, not by copy
        blobs = {COMP: ProgramBlob(programs.comp), ATTN: ProgramBlob(programs.attn)}
        for r in range(self.layout.world):
            self.cmd_qs[r].put(("setup", key, schedule, blobs[self.layout.role(r)[0]]))
        self._await(range(self.layout.world), START_TIMEOUT)
        self._keys[id(programs)] = (key, programs)
        return key

    def _inject_fault(self, rank: int, layer: int, *, kill: bool = False) -> None:
        """Test hook: make ``rank`` raise (or SIGKILL itself, ``kill``) when it reaches
        ``layer`` on later calls."""
        self.cmd_qs[rank].put(("fault", layer, kill))

    # -- waiting -------------------------------------------------------------------------------
    def _await(self, ranks, timeout: float) -> dict[int, tuple]:
        """Messages from every rank in ``ranks``; raises WorkerError on an error report, a
        dead worker or ``timeout`` seconds without progress."""
        pending, got = set(ranks), {}
        seen, deadline = self.progress.clone(), time.monotonic() + timeout
        while pending:
            try:
                msg = self.res_q.get(timeout=0.05)
            except queue.Empty:
                self._check_alive()
                if not torch.equal(seen, self.progress):
                    seen, deadline = self.progress.clone(), time.monotonic() + timeout
                elif time.monotonic() > deadline:
                    self._fail(WorkerError(self._stall_message(pending, timeout)))
                continue
            if msg[0] == "error":
                self._killed_first()             # a peer's death shows up as a gloo error here
                self._fail(_worker_error(self.layout, msg[1], msg[2], msg[3]))
            got[msg[1]] = msg
            pending.discard(msg[1])
        return got

    def _check_alive(self) -> None:
        dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
        if not dead:
            return
        self._killed_first()
        try:                                     # a worker that raised reports before exiting
            msg = self.res_q.get(timeout=1.0)
            if msg[0] == "error":
                self._fail(_worker_error(self.layout, msg[1], msg[2], msg[3]))
        except queue.Empty:
            pass  # no report: it died without raising (killed), reported as a death below
        self._fail(self._death(dead[0]))

    def _killed_first(self, grace: float = 0.2) -> None:
        """If a worker was killed by a signal, that is the root cause: report it."""
        deadline = time.monotonic() + grace
        while True:
            killed = [r for r, p in enumerate(self.procs) if not p.is_alive() and (p.exitcode or 0) < 0]
            if killed:
                self._fail(self._death(killed[0]))
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)

    def _death(self, r: int) -> WorkerError:
        code = self.procs[r].exitcode
        how = (f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0
               else f"exited with code {code}")
        return _worker_error(self.layout, r, int(self.progress[r]),
                             f"the worker process (pid {self.procs[r].pid}) {how}")

    def _stall_message(self, pending, timeout) -> str:
        who = ", ".join(self.layout.describe(r) for r in sorted(pending))
        layers = sorted({int(x) for x in self.progress})
        return (f"no progress for {timeout:.0f} s (option timeout=); still waiting for {who}; "
                f"workers were at layers {layers}")

    def _fail(self, err: WorkerError):
        self.failed = True
        _stop(self.procs, self.cmd_qs, 0.0)
        raise err

    def close(self) -> None:
        self._finalizer()


# -- torchrun --------------------------------------------------------------------------------------
class TorchrunRuntime:
    """SPMD: this process is one rank of ``alpha + beta**2`` (see the module docstring)."""

    def __init__(self, alpha: int, beta: int, strategy: str, timeout: float, device=None):
        self.layout, self.strategy, self.timeout = Layout(alpha, beta), strategy, float(timeout)
        self.owns_group = not dist.is_initialized()
        self.device = torch.device("cpu")
        if torch.device(device or "cpu").type == "cuda":   # the model's device, not the machine's
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        if self.owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=self.timeout))
        if dist.get_world_size() != self.layout.world:
            raise ConfigError(f"launch='torchrun' with alpha={alpha}, beta={beta} needs "
                              f"{self.layout.world} ranks (alpha + beta**2), WORLD_SIZE is "
                              f"{dist.get_world_size()}")
        self.rank = dist.get_rank()
        self._setups: dict[int, tuple] = {}
        self.traffic: dict[int, dict[str, int]] = {}

    def run(self, programs, plan: Plan, flat: list) -> list | None:
        schedule, transport = self._setup(programs)
        box = [flat if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        flat = [x.to(self.device) if isinstance(x, torch.Tensor) else x for x in box[0]]
        program = programs.comp if transport.role == COMP else programs.attn
        try:
            pieces = run_role(transport, schedule, program, plan, flat)
        except Exception as e:
            raise _worker_error(self.layout, self.rank, transport.layer, traceback.format_exc()) from e
        gathered = [None] * self.layout.world if self.rank == 0 else None
        dist.gather_object((pieces, dict(transport.sent)), gathered, dst=0)
        if self.rank != 0:
            return None
        self.traffic = {}
        for _, sent in gathered:
            for (layer, direction), nb in sent.items():
                self.traffic.setdefault(layer, {DISPATCH: 0, RETURN: 0})[direction] += nb
        frontier = gather_frontier(plan, programs.frontier,
                                   {c: gathered[c][0] for c in active_comp_nodes(plan)})
        with torch.no_grad():
            return list(programs.epilogue(*frontier))

    def _setup(self, programs):
        if id(programs) not in self._setups:
            schedule = Schedule.of(programs)
            _check_same_schedule(schedule.digest)
            self._setups[id(programs)] = (schedule, GlooTransport(self.layout, self.rank, schedule,
                                                                  device=self.device), programs)
        return self._setups[id(programs)][:2]

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def make_runtime(launch: str, alpha: int, beta: int, strategy: str, timeout: float, device=None):
    """``device``: where the model lives; under torchrun a CUDA model gets NCCL on LOCAL_RANK."""
    if launch == "spawn":
        return SpawnRuntime(alpha, beta, strategy, timeout)
    if launch == "torchrun":
        return TorchrunRuntime(alpha, beta, strategy, timeout, device)
    raise ConfigError(f"launch={launch!r} has no distributed runtime")
