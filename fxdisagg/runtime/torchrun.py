"""launch="torchrun": SPMD, this process is one rank of ``alpha + beta**2``.

Every rank runs the same script, builds the same model and calls the DisaggregatedModel
with inputs of the same batch size and settings (each rank picks its capture from its own
call; the programs' digest check refuses mismatches);
each takes its role from its rank (`RankLayout`) and runs the shared `Worker` with a
`CollectiveTransport` (NCCL on CUDA, device LOCAL_RANK; gloo on CPU). Rank 0 is CompNode 0
*and* the driver: its inputs are authoritative and the call returns the outputs on rank 0
and ``None`` elsewhere; a call with a KV cache (generation) returns them on every rank, so
that every rank's GenerationMixin makes the same choices (rank 0's inputs decide what runs;
sample with the same seed on every rank).

Inputs and outputs travel as tensors, never pickled (on NCCL an unpickled tensor would land
on the sender's device): rank 0 broadcasts a small int64 header (dtype, rank and sizes of
every input), then each input into buffers the other ranks preallocate from the header;
CompNodes send their frontier pieces to rank 0, which preallocates them from its own pieces
and the Plan's token counts. At set-up every rank checks that all hold the same programs
(a sha256 all-gathered as bytes) and refuses to run otherwise.

Ranks fail together: a rank whose call raises writes (rank, layer, first line) to the
process group's store under the call's number before raising; every rank waiting in a
collective polls that key (and the call's ``timeout``) and raises a `WorkerError` naming the
failed rank, role and layer, so the whole job exits non-zero within the call's timeout, not
the process group's. A rank that dies without raising is named by its stopped pulse
(`fxdisagg.runtime.heartbeat`): its peers see it while they wait, or after the transport
error or the SIGTERM from torchrun's agent that the death causes (during a call, SIGTERM
becomes that `WorkerError` once the dead rank is known, else ``SystemExit(143)``).
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

from fxdisagg.errors import ConfigError, InputError, WorkerError
from fxdisagg.runtime import heartbeat
from fxdisagg.runtime.driver import gather_frontier
from fxdisagg.runtime.layout import COMP, RankLayout
from fxdisagg.runtime.transport import CollectiveError, CollectiveTransport, wait_watched
from fxdisagg.runtime.worker import Worker, format_error, programs_digest, worker_error
from fxdisagg.schedule import PHASES

_DTYPES = (torch.int64, torch.int32, torch.bool, torch.float32, torch.float16, torch.bfloat16,
           torch.float64, torch.uint8)
_HEADER = 64                                    # int64 slots of the input header


def check_same_digest(digest: bytes, device=None) -> None:
    """Every rank of the default group must hold the same digest (as bytes in a tensor)."""
    mine = torch.frombuffer(bytearray(digest), dtype=torch.uint8).to(device or "cpu")
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    bad = [r for r, d in enumerate(every) if not torch.equal(d, every[0])]
    if bad:
        raise WorkerError(f"ranks {bad} hold different programs than rank 0; every rank must "
                          f"compile the same model with the same alpha, beta, sharding and "
                          f"batch size")


class TorchrunRuntime:
    def __init__(self, config, device=None):
        self.config, self.layout = config, RankLayout(config.alpha, config.beta, config.tp)
        self.owns_group = not dist.is_initialized()
        self.device = torch.device("cpu")
        if torch.device(device or "cpu").type == "cuda":   # the model's device, not the machine's
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        if self.owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(seconds=config.timeout))
        if dist.get_world_size() != self.layout.world:
            raise ConfigError(f"launch='torchrun' with alpha={config.alpha}, beta={config.beta} "
                              f"needs {self.layout.world} ranks (alpha + beta**2), WORLD_SIZE is "
                              f"{dist.get_world_size()}")
        self.rank = dist.get_rank()
        self.store = dist.distributed_c10d._get_default_store()
        self._call, self._deadline, self._seen_layer = 0, None, None
        transport = CollectiveTransport(self.rank, self.layout.world, device=self.device,
                                        watch=self._watch)
        transport.tp_handle = self._tp_groups()
        self.worker = Worker(self.rank, self.layout, transport, strategy=config.sharding,
                             cache_size=config.cache_size)
        self.heartbeat = heartbeat.Heartbeat(self.store, self.rank, self.layout.world,
                                   layer=lambda: transport.layer)
        self._next_pulse_check = 0.0
        self._keys: dict[int, tuple[int, object]] = {}
        self.traffic: dict[int, dict[str, int]] = {}

    def _tp_groups(self):
        """Every rank makes every CompNode's tensor-parallel group (``new_group`` is
        collective) and keeps its own; None without tensor parallelism."""
        if self.layout.tp == 1:
            return None
        mine = None
        for c in range(self.layout.alpha):
            ranks = list(self.layout.tp_group(self.layout.comp_rank(c)))
            group = dist.new_group(ranks)
            if self.rank in ranks:
                mine = group
        return mine

    def run(self, programs, plan, flat: list, step=None) -> list | None:
        """One SPMD call; the length is rank 0's (``plan`` is this rank's own view). Every
        rank passes the same `CacheStep` (SPMD: caches are created in the same order)."""
        key = self._load(programs)
        self._call += 1
        self._deadline, self._seen_layer = time.monotonic() + self.config.timeout, None
        flat = self._broadcast_tensors(flat, "inputs")
        n = flat[0].shape[1]
        with _SigtermDuringCall() as sigterm:
            try:
                pieces = self.worker.run(key, n, flat, step)
                self._sum_traffic(programs)
                plan = self.worker.plan(n, step)
                gathered = self._gather_frontier(plan, programs.frontier, pieces)
            except WorkerError:
                raise                                # a peer's failure, seen by `_watch`
            except _Terminated as e:                 # torchrun's agent stops the job
                self._raise_if_a_peer_died(wait=True)
                raise SystemExit(128 + signal.SIGTERM) from e
            except Exception as e:
                sigterm.disarm()
                self._raise_if_a_peer_died(wait=isinstance(e, (CollectiveError, dist.DistError)))
                layer = self.worker.transport.layer
                self._announce(layer, e)
                raise worker_error(self.layout, self.rank, layer, format_error(e)) from e
        outs = None
        if self.rank == 0:
            with torch.no_grad():
                outs = list(programs.epilogue(*gather_frontier(plan, programs.frontier, gathered)))
        if step is not None:     # generation: every rank's GenerationMixin reads the logits
            return self._broadcast_tensors(outs or [], "outputs")
        return outs

    # -- failing together ------------------------------------------------------------------------
    def _failure_key(self) -> str:
        return f"fxdisagg/failed/{self._call}"

    def _announce(self, layer, e: BaseException) -> None:
        """Tell every peer, through the process group's store, that this rank failed."""
        first = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        try:
            self.store.set(self._failure_key(), f"{self.rank}|{-1 if layer is None else layer}|{first}")
        except Exception:  # noqa: BLE001 - the store may be gone with the job; the local error stands
            pass

    def _raise_if_a_peer_died(self, wait: bool) -> None:
        """Raise a `WorkerError` naming a peer whose pulse stopped; ``wait``: give a peer
        that just died the time for its pulse to go stale (after a transport error)."""
        found = self.heartbeat.wait_for_dead() if wait else self.heartbeat.dead()
        if found is not None:
            rank, pulse_layer = found
            last = "before any layer" if pulse_layer < 0 else f"at layer {pulse_layer}"
            # The layer is this rank's: where the call was when the peer fell silent (its
            # own pulse may be up to a period older).
            raise worker_error(self.layout, rank, self.worker.transport.layer,
                               f"its process stopped without an error report (killed, or it "
                               f"exited): no heartbeat for {heartbeat.STALE:g} s, the last one "
                               f"{last}\n(seen by {self.layout.describe(self.rank)}, which stops too)")

    def _watch(self) -> None:
        """While waiting in a collective: raise when a peer announced its failure or died,
        or when this rank has entered no new layer for ``timeout`` seconds."""
        if self.store.check([self._failure_key()]):
            rank, layer, first = self.store.get(self._failure_key()).decode().split("|", 2)
            raise worker_error(self.layout, int(rank), int(layer),
                               f"{first}\n(seen by {self.layout.describe(self.rank)}, which stops too)")
        if time.monotonic() >= self._next_pulse_check:
            self._next_pulse_check = time.monotonic() + heartbeat.PERIOD
            self._raise_if_a_peer_died(wait=False)
        layer = self.worker.transport.layer
        if layer != self._seen_layer:             # progress: this rank entered a new layer
            self._seen_layer, self._deadline = layer, time.monotonic() + self.config.timeout
        elif time.monotonic() > self._deadline:
            raise WorkerError(f"{self.layout.describe(self.rank)}: no progress for "
                              f"{self.config.timeout:.0f} s (option timeout=) at layer {layer} "
                              f"of call {self._call}")

    # -- set-up --------------------------------------------------------------------------------
    def _load(self, programs) -> int:
        if id(programs) in self._keys:
            return self._keys[id(programs)][0]
        check_same_digest(programs_digest(programs), self.device)
        key = len(self._keys)
        role = self.layout.role(self.rank)[0]
        self.worker.load(key, programs.comp_for(self.rank % self.layout.tp) if role == COMP
                         else programs.attn, programs.layers)
        self._keys[id(programs)] = (key, programs)
        return key

    # -- inputs and outputs as tensors -----------------------------------------------------------
    def _broadcast_tensors(self, flat: list, what: str) -> list:
        """Rank 0's ``flat`` tensors on every rank: a header of dtypes and shapes, then each
        tensor into a buffer preallocated from it."""
        header = torch.zeros(_HEADER, dtype=torch.int64)
        problem = None
        if self.rank == 0:
            fields = [len(flat)]
            for t in flat:
                if t.dtype not in _DTYPES:
                    problem = f"{what} of dtype {t.dtype} (fxdisagg sends {_DTYPES})"
                fields += [_DTYPES.index(t.dtype) if t.dtype in _DTYPES else 0, t.dim(), *t.shape]
            if len(fields) > _HEADER:
                problem = f"{len(flat)} {what} of {len(fields)} header fields (at most {_HEADER})"
            header[:min(len(fields), _HEADER)] = torch.tensor(fields[:_HEADER])
            header[0] = -1 if problem else header[0]     # every rank must learn of it: no hang
        header = header.to(self.device)
        dist.broadcast(header, src=0)
        if int(header[0]) < 0:
            raise InputError(f"rank 0 was called with {problem or 'inputs it cannot send'}; "
                             f"no rank ran the call")
        fields, k, out = header.tolist(), 1, []
        for idx in range(fields[0]):
            dtype, ndim = _DTYPES[fields[k]], fields[k + 1]
            shape = fields[k + 2:k + 2 + ndim]
            k += 2 + ndim
            t = flat[idx].to(self.device).contiguous() if self.rank == 0 else \
                torch.empty(shape, dtype=dtype, device=self.device)
            dist.broadcast(t, src=0)
            out.append(t)
        return out

    def _sum_traffic(self, programs) -> None:
        layers, phases = [lp.layer for lp in programs.layers], (*PHASES, "all_reduce")
        sent = torch.zeros(len(layers), len(phases), dtype=torch.int64)
        for (layer, phase), nb in self.worker.transport.sent.items():
            sent[layers.index(layer), phases.index(phase)] += nb
        sent = sent.to(self.device)
        wait_watched(dist.all_reduce(sent, async_op=True), self._watch)
        kept = phases if self.layout.tp > 1 else PHASES
        self.traffic = {l: dict(zip(kept, row)) for l, row in zip(layers, sent.tolist())}

    def _gather_frontier(self, plan, frontier, pieces) -> dict[int, tuple]:
        """Rank 0 receives every active CompNode's token-local pieces into buffers sized
        from its own pieces and the Plan; replicated values are rank 0's own."""
        active = plan.active_comp_nodes()
        token_local = [k for k, fv in enumerate(frontier) if fv.dim is not None]
        if self.rank != 0:
            if self.layout.role(self.rank)[0] == COMP and self.worker.index in active \
                    and self.rank == self.layout.comp_rank(self.worker.index):    # TP rank 0
                for k in token_local:
                    wait_watched(dist.isend(pieces[k].contiguous(), dst=0), self._watch)
            return {}
        got = {0: pieces}
        for c in active[1:]:
            mine = list(pieces)
            for k in token_local:
                shape = list(pieces[k].shape)
                shape[frontier[k].dim] = len(plan.comp_tokens[c])
                mine[k] = pieces[k].new_empty(shape)
                wait_watched(dist.irecv(mine[k], src=self.layout.comp_rank(c)), self._watch)
            got[c] = tuple(mine)
        return got

    def memory(self) -> dict[int, dict[str, int]]:
        """This rank's bytes (`Worker.memory`); SPMD: each rank reports its own."""
        return {self.rank: self.worker.memory()}

    def close(self) -> None:
        self.heartbeat.stop()
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


class _Terminated(BaseException):
    """SIGTERM arrived during a call (a BaseException: no ``except Exception`` swallows it)."""


class _SigtermDuringCall:
    """During a call on the main thread, the first SIGTERM raises `_Terminated` instead of
    ending the process at once, so that the rank can still say which peer's death caused
    it; once that analysis begins (`disarm`, or the first SIGTERM) more SIGTERMs are
    ignored until the call is over. Elsewhere SIGTERM keeps its handler."""

    def __enter__(self):
        self.armed, self.previous = True, None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.armed:
            self.armed = False
            raise _Terminated()

    def disarm(self) -> None:
        self.armed = False

    def __exit__(self, *exc):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL if self.previous is None else self.previous)
        return False
