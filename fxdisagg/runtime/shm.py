"""SharedMemoryTransport: ranks on one host exchange payloads through shared memory.

As NCCL does within a node, the bytes do not cross a socket, and here they are not staged
either: each receiver owns a *landing* segment per phase, laid out as the tensors it
receives, and every sender writes each row it sends once, straight to its final place there
(`fxdisagg.landing.deliver`). The receiver's tile (an AttnNode) or stacked partials (a
CompNode) are views of its landing: nothing is placed on arrival. A call of few tokens (a
decode step) packs into the sender's own segment instead (`Exchange.pack`), which the
receivers read in place (`Exchange.place`): its many small copies cost less that way
(`_send`). Nothing travels through a process group; a rank announces an exchange to each
peer with

- a *header* in its own shared board: for exchange ``s`` of this transport's life, slot
  ``s % SLOTS`` holds, per receiver, ``(s, segment generation, offset, bytes)`` (zeros
  but ``s`` and the bytes for a delivery);
- a *doorbell*: a POSIX semaphore per (receiver, sender) pair of peers, posted once per
  exchange after the payload and the header are written.

A receiver acquires the doorbell of every peer once per exchange, checks that peer's header
against the schedule and reads its landing. Posting and acquiring a semaphore are full memory barriers, so the reads
see the writes. This replaced a gloo ``all_to_all`` of the headers: on the 2-core CI machine
a decode step at (1, 2) spent more CPU in gloo's socket threads than in the model
(``benchmarks/decode_cpu.py``, see the README for the figures).

Peers are the ranks of the other role (`RankLayout.peers`): every route runs between a
CompNode and an AttnNode. A rank rings every peer in every exchange, empty routes included,
so a rank's exchange completes only after every peer started it, and the landings rely on
that. A received view is dead once its receiver starts its next exchange (the tile once
the reply is delivered; the partials once the merge or, at beta == 1, the O-projection of
the stage before the next dispatch read them); no program returns or keeps one across
calls. A rank starts its next exchange of a phase only after it completed the exchange
between, which needs every peer's ring of it: so it writes into a peer's landing again only
after that peer is done with what the landing held. The same ordering bounds how far a
sender runs ahead of a reader's header slot to two exchanges (``SLOTS`` is 4; the sequence
number in the header checks it). Ranks of one role never ring each other: at (1, 2) a
CompNode rings 4 AttnNodes and each AttnNode 1 CompNode per exchange, not 20 rings among 5
ranks.

*Compute slots* (`fxdisagg.runtime.slots`): where a role has at least as many workers as
the host has cores, a worker holds a core of its own while it runs, from `begin` to `end`,
and gives it back only while it waits on a peer (`_hear`).

A tensor-parallel CompNode's all-reduce (`Transport.all_reduce`) runs on a channel of its
own between the ranks of the group: its own header board, doorbells (`group_doorbells`)
and two segments used by turns (`_gather` says why two suffice).

Segments are files in /dev/shm (``torch.from_file(..., shared=True)``), named by a tag
unique to the runtime, and by rank, phase and generation. A landing's generation is its
size class: the power of two that fits every exchange of the phase in the call, which the
receiver and its senders compute alike from the same schedule, so whichever of them needs
it first creates the file and the others map it; a receiver that moves to another class
removes the file of the old one (its senders moved with it). An all-reduce segment grows by
doubling (a new generation, announced in the header). A rank removes its files when it
stops; the driver removes any left by a worker that was killed. A receiver that hears
nothing from a peer for ``timeout`` seconds, or whose driver is gone (``alive()`` turns
False), raises instead of waiting forever.
"""

from __future__ import annotations

import glob
import os
import tempfile
import time
import weakref

import torch

from fxdisagg.landing import deliver, landed, landing_bytes
from fxdisagg.runtime.transport import Transport
from fxdisagg.schedule import Exchange

_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
_MIN_BYTES = 1 << 20
SLOTS = 4                 # header slots per sender: it runs at most two exchanges ahead
LARGE_CALL = 256          # tokens from which a call delivers (`_send`) and binds its slot to a core
_POLL = 1.0               # seconds between checks of the deadline and of alive() while waiting


def segment_path(tag: str, rank: int, phase: str, generation: int) -> str:
    return os.path.join(_DIR, f"fxdisagg-{tag}-{rank}-{phase}-{generation}")


def remove_segments(tag: str) -> None:
    """Remove every segment of runtime ``tag`` (the driver's clean-up after workers)."""
    for path in glob.glob(os.path.join(_DIR, f"fxdisagg-{tag}-*")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # its creator removed it first


def doorbells(ctx, layout) -> list[list]:
    """``bells[receiver][sender]``: one semaphore per ordered pair of peers (None for
    others), made by the driver from its multiprocessing context and handed to the workers
    when they start."""
    world = layout.world
    return [[ctx.Semaphore(0) if s in layout.peers(r) else None for s in range(world)]
            for r in range(world)]


def group_doorbells(ctx, layout) -> list[list]:
    """``bells[receiver][sender]`` between the ranks of each tensor-parallel group, for
    their all-reduces (a channel apart from the exchanges', which run between roles)."""
    world = layout.world
    return [[ctx.Semaphore(0) if s != r and s in layout.tp_group(r) else None for s in range(world)]
            for r in range(world)]


def _map(path: str, nbytes: int, create: bool) -> torch.Tensor:
    """``path`` mapped shared, at least ``nbytes`` long (``create``: made or grown first;
    peers may race to it, and every one of them grows it to the same size)."""
    if create:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < nbytes:
                os.ftruncate(fd, nbytes)
        finally:
            os.close(fd)
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass  # the driver's clean-up was first


_NOTHING = torch.empty(0, dtype=torch.uint8)


class SharedMemoryTransport(Transport):
    """``bells``: the driver's `doorbells`; this rank posts ``bells[peer][rank]`` and acquires
    ``bells[rank][peer]`` for each of its peers (the senders that ring it).
    ``timeout``: seconds a receiver waits for one peer. ``slots``: this rank's
    `CoreSlots` (`fxdisagg.runtime.slots.compute_slots`), or None."""

    def __init__(self, rank: int, world: int, *, tag: str, bells, timeout: float = 300.0,
                 alive=lambda: True, progress=None, group_bells=None, slots=None):
        super().__init__(rank, world, progress)
        self.slots = slots
        self._large_call = False           # this call delivers and binds (`_large`)
        self.tag, self.bells, self.timeout, self.alive = tag, bells, timeout, alive
        self.device = torch.device("cpu")
        self._mine: dict[str, tuple[int, torch.Tensor]] = {}      # phase -> (generation, bytes)
        self._landings: dict[tuple, tuple[int, torch.Tensor]] = {}  # (rank, phase) -> (size, bytes)
        self._sized_for, self._needs = None, {}                     # (rank, phase) -> size
        self._needs_of = weakref.WeakKeyDictionary()                # schedule -> its _needs
        self._theirs: dict[tuple, torch.Tensor] = {}              # (src, phase, gen) -> bytes
        self._board = self._board_of(rank, create=True)           # [SLOTS, world, 4] int64
        self._boards: dict = {}                                    # peer -> its board
        self._seq = 0
        self.peers = [r for r, bell in enumerate(bells[rank]) if bell is not None]
        self.group_bells = group_bells
        if group_bells is not None and any(b is not None for b in group_bells[rank]):
            self._group_board = self._board_of(rank, create=True, name="groupboard")

    def _board_of(self, rank: int, create: bool = False, name: str = "board"):
        """int64 ``[SLOTS, world, 4]`` header slots of ``rank``, as a numpy view (a Python
        int in or out of numpy costs a fraction of a torch element access)."""
        nbytes = SLOTS * self.world * 4 * 8
        raw = _map(segment_path(self.tag, rank, name, 0), nbytes, create)
        return raw.view(torch.int64).view(SLOTS, self.world, 4).numpy()

    def begin(self, schedule) -> None:
        super().begin(schedule)
        self._large_call = self._large(schedule)
        if schedule is not self._sized_for:       # landing sizes are the call's (`_landing`)
            self._sized_for, self._needs = schedule, self._needs_of.setdefault(schedule, {})
            for key in [k for k in self._landings if k[0] != self.rank]:
                if self._landings[key][0] != self._size(*key):
                    # Its receiver moves to that size too, and removes the file it leaves:
                    # a mapping kept through calls that did not write to it would outlive it.
                    del self._landings[key]
        self._take_slot()

    def end(self) -> None:
        super().end()
        self._give_slot()

    def _give_slot(self) -> None:
        if self.slots is not None and self.slots.held:
            self.slots.give()

    def _take_slot(self) -> None:
        if self.slots is not None and not self.slots.held:
            self.slots.take(self._wait, bind=self._large_call)

    def _segment(self, phase: str, nbytes: int) -> tuple[int, torch.Tensor]:
        """This rank's own segment of ``phase`` (packed exchanges, all-reduces), grown by
        generation."""
        gen, seg = self._mine.get(phase, (-1, None))
        if seg is None or seg.numel() < nbytes:
            size = max(_MIN_BYTES, nbytes, 2 * (seg.numel() if seg is not None else 0))
            if seg is not None:
                os.unlink(segment_path(self.tag, self.rank, phase, gen))  # readers keep their map
            gen += 1
            seg = _map(segment_path(self.tag, self.rank, phase, gen), size, create=True)
            self._mine[phase] = (gen, seg)
        return gen, seg

    # -- exchanges ---------------------------------------------------------------------------
    # A call of many tokens delivers each row straight into its receiver's landing; a call
    # of few (a decode step) packs into this rank's own segment of the phase, which the
    # receivers read in place (`Exchange.place`: views where one route fills a tensor, else
    # a placing copy of a few rows). A decode step's ~30 small copies per layer cost more
    # as deliveries (a view per copy on both sides) than packed: side by side, (1, 2) steps
    # were ~5% slower delivered. Both sides choose alike, from the call's token count.
    def _large(self, schedule) -> bool:
        """A prefill, not a decode step: it delivers (`_send`) and runs on its slot's core
        (`fxdisagg.runtime.slots`). Read once per call, in `begin`."""
        return getattr(getattr(schedule, "plan", None), "n_tokens", 0) >= LARGE_CALL

    def _send(self, ex: Exchange, tensors: list) -> int:
        self._seq += 1
        header = self._board[self._seq % SLOTS]       # numpy view of the shared slot
        header[:, 1:] = 0
        if self._large_call:
            deliver(ex, self.rank, tensors,
                    {r.dst: self._landing(r.dst, ex.phase) for r in ex.sends(self.rank)})
            for dst, nbytes in zip(*ex.send_sizes(self.rank)):
                header[dst, 3] = nbytes
        else:
            total = ex.send_bytes(self.rank)
            gen, seg = self._segment(ex.phase, total) if total else (0, _NOTHING)
            _, dsts, sizes = ex.pack(self.rank, tensors, out=seg[:total])
            off = 0
            for d, nbytes in zip(dsts, sizes):
                header[d, 1:] = gen, off, nbytes
                off += nbytes
        header[:, 0] = self._seq
        for d in self.peers:
            self.bells[d][self.rank].release()
        return self._seq

    def _receive(self, ex: Exchange, seq: int, device) -> list:
        """Hear every peer's doorbell for exchange ``seq``; what arrived is in this rank's
        landing, or in its senders' segments."""
        self._hear({src: self.bells[self.rank][src] for src in self.peers},
                   f"layer {ex.layer} {ex.phase}")
        chunks, delivered = [], self._large_call
        for src, nbytes in ex.recv_sizes(self.rank):
            if src not in self.peers:
                raise RuntimeError(f"rank {self.rank}: the schedule routes layer {ex.layer} "
                                   f"{ex.phase} from rank {src}, which is not a peer")
            got, gen, off, size = self._board_from(src)[seq % SLOTS, self.rank].tolist()
            if got != seq or size != nbytes:
                raise RuntimeError(
                    f"rank {self.rank}: rank {src}'s header for layer {ex.layer} {ex.phase} reads "
                    f"exchange {got} with {size} bytes; expected exchange {seq} with {nbytes} "
                    f"(the schedule): the ranks ran different exchanges")
            if not delivered:
                chunks.append(self._their_segment(src, ex.phase, gen, off + size)[off:off + size]
                              if size else _NOTHING)
        if delivered:
            return landed(ex, self.rank, self._landing(self.rank, ex.phase))
        return ex.place(self.rank, chunks, device)

    def _landing(self, rank: int, phase: str) -> torch.Tensor:
        """``rank``'s landing of ``phase``, mapped: one file per size class (a power of two
        that fits every exchange of the phase in this call, so the rank and its senders,
        which run the same schedule, pick the same file; whichever comes first creates it).
        A rank removes its own file of the class it leaves."""
        key = (rank, phase)
        size = self._size(rank, phase)
        if size == 0:
            return _NOTHING
        held = self._landings.get(key)
        if held is not None and held[0] == size:
            return held[1]
        landing = _map(self._landing_path(rank, phase, size), size, create=True)
        if held is not None and rank == self.rank:
            _unlink(self._landing_path(rank, phase, held[0]))   # its senders moved on with it
        self._landings[key] = (size, landing)
        return landing

    def _size(self, rank: int, phase: str) -> int:
        """Bytes of ``rank``'s landing of ``phase`` in this call's schedule (0: none)."""
        size = self._needs.get((rank, phase))
        if size is None:
            need = max((landing_bytes(e, rank) for e in self.schedule.exchanges.values()
                        if e.phase == phase), default=0)
            size = self._needs[(rank, phase)] = need and max(_MIN_BYTES, 1 << (need - 1).bit_length())
        return size

    def _landing_path(self, rank: int, phase: str, size: int) -> str:
        return segment_path(self.tag, rank, f"landing-{phase}", size.bit_length() - 1)

    def _hear(self, bells: dict, what: str) -> None:
        """Acquire the doorbell of every peer in ``bells`` (src -> bell); the compute slot
        is given back while any of them is still to ring."""
        quiet = [src for src, bell in bells.items() if not bell.acquire(block=False)]
        if not quiet:
            return
        self._give_slot()
        for src in quiet:
            self._wait(bells[src], f"rank {src} to start {what}")
        self._take_slot()

    def _wait(self, bell, what: str) -> None:
        """Acquire ``bell``, checking the deadline and the driver every `_POLL` seconds;
        ``what``: the wait, for errors ("rank 3 to start layer 2 dispatch")."""
        deadline = time.monotonic() + self.timeout
        while not bell.acquire(timeout=_POLL):
            if not self.alive():
                raise RuntimeError(f"rank {self.rank}: the driver is gone (waiting for {what})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {self.rank}: waited {self.timeout:g} s for {what}")

    # -- tensor-parallel all-reduce: the same headers and segments, a channel of its own ----
    def _gather(self, x):
        """Write ``x`` into this rank's segment of the reduction's parity, announce it to the
        group and read the others' in place. Two segments alternate: a rank writes
        reduction s + 2 only after every peer started s + 1, i.e. finished reading s."""
        seq, nbytes = self._reductions, x.numel() * x.element_size()
        phase = f"all_reduce{seq % 2}"
        gen, seg = self._segment(phase, nbytes)
        seg[:nbytes].copy_(x.reshape(-1).view(torch.uint8))
        header = self._group_board[seq % SLOTS]
        header[:, 1:] = gen, 0, nbytes
        header[:, 0] = seq
        group = [r for r in self.tp_group if r != self.rank]
        for r in group:
            self.group_bells[r][self.rank].release()
        parts = {self.rank: x}
        self._hear({r: self.group_bells[self.rank][r] for r in group}, "the all-reduce")
        for r in group:
            got, gen, _, size = self._board_from(r, "groupboard")[seq % SLOTS, self.rank].tolist()
            if got != seq or size != nbytes:
                raise RuntimeError(f"rank {self.rank}: rank {r}'s all-reduce header reads {got} with "
                                   f"{size} bytes; expected {seq} with {nbytes}: the group's ranks "
                                   f"ran different programs")
            parts[r] = self._their_segment(r, phase, gen, size)[:size].view(x.dtype).view(x.shape)
        return [parts[r] for r in self.tp_group]

    def _board_from(self, src: int, name: str = "board"):
        if (src, name) not in self._boards:
            self._boards[(src, name)] = self._board_of(src, name=name)
        return self._boards[(src, name)]

    def _their_segment(self, src: int, phase: str, gen: int, nbytes: int) -> torch.Tensor:
        key = (src, phase, gen)
        seg = self._theirs.get(key)
        if seg is None or seg.numel() < nbytes:
            for old in [k for k in self._theirs if k[:2] == (src, phase)]:
                del self._theirs[old]          # an older generation: its file is gone already
            path = segment_path(self.tag, src, phase, gen)
            seg = self._theirs[key] = _map(path, os.path.getsize(path), create=False)
        return seg

    def close(self) -> None:
        for phase, (gen, _) in [*self._mine.items(), ("board", (0, None)), ("groupboard", (0, None))]:
            _unlink(segment_path(self.tag, self.rank, phase, gen))
        for (rank, phase), (size, _) in self._landings.items():
            if rank == self.rank:
                _unlink(self._landing_path(rank, phase, size))
        self._mine.clear()
        self._landings.clear()
        self._theirs.clear()
        self._boards.clear()

