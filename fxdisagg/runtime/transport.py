"""Transports: execute the exchange schedule, nothing more.

A role program's ``fxdisagg::exchange_start`` / ``exchange_wait`` call the transport bound to
the worker (`fxdisagg.comm`). Every transport gets the call's `Schedule` in `begin` and
executes its exchanges; routing is never decided here. Two ways to move the rows:

- a `PackingTransport` packs what this rank sends with `Exchange.pack` (one copy straight
  into the send buffer), moves the bytes, and lays out what it received with
  `Exchange.place` (views of the received bytes where one route fills a tensor in order,
  else one placing copy):
  - `CollectiveTransport`: one ``all_to_all_single`` per (layer, phase) over a
    torch.distributed group (gloo on CPU, NCCL on CUDA), issued asynchronously by
    ``start`` and waited on by ``wait`` (split phase: work can go between them);
  - `QueueTransport`: in-process mailboxes, for the threads of ``launch="inprocess"``;
- `fxdisagg.runtime.shm.SharedMemoryTransport` writes each row once, straight into the
  receiver's tensors (`fxdisagg.landing`), and receives views: nothing to place.

Both count the bytes this rank sent per (layer, phase) (``sent``) and publish the layer
they are in (``layer``, and ``progress[rank]`` when given) for error reports and the
driver's stall detection.

Tensor-parallel CompNodes also sum tensors over their group (``all_reduce``): every rank
of the group sends its tensor to the others (`_gather`, per transport) and each adds the
group's tensors in rank order, so the ranks hold bitwise equal sums. At tp = 2 that moves
what a ring all-reduce moves, ``2 (tp - 1) / tp`` of the tensor per rank.
"""

from __future__ import annotations

import abc
import queue
import threading
import time

import torch
import torch.distributed as dist

from fxdisagg.schedule import Exchange, Schedule


class Transport(abc.ABC):
    """Bookkeeping shared by every transport; subclasses move the rows (`_send`,
    `_receive`) and the all-reduce's tensors (`_gather`)."""

    def __init__(self, rank: int, world: int, progress: torch.Tensor | None = None):
        self.rank, self.world, self.progress = rank, world, progress
        self.schedule: Schedule | None = None
        self.layer: int | None = None
        self.sent: dict[tuple[int, str], int] = {}
        self._pending: dict[int, tuple[Exchange, object]] = {}
        self._next = 0
        self.tp_group: tuple[int, ...] = (rank,)    # this rank's TP group, in rank order
        self._reductions = 0

    def begin(self, schedule: Schedule) -> None:
        self.schedule, self.layer, self.sent = schedule, None, {}
        self._pending.clear()

    def end(self) -> None:
        """The call is over, returned or raised (`Worker.run`)."""

    def start(self, layer: int, phase: str, tensors: list) -> int:
        ex = self.schedule.exchanges[(layer, phase)]
        self.layer = layer
        if self.progress is not None:
            self.progress[self.rank] = layer
        self.sent[(layer, phase)] = ex.send_bytes(self.rank)
        token = self._send(ex, tensors)
        self._next += 1
        self._pending[self._next] = (ex, token)
        return self._next

    def wait(self, handle: int, rows: list) -> list:
        ex, token = self._pending.pop(handle)
        return self._receive(ex, token, rows[0].device if rows else None)

    @abc.abstractmethod
    def _send(self, ex: Exchange, tensors: list):
        """Send what this rank sends in ``ex`` (``tensors``: its `send_pieces`); returns
        the token `_receive` takes."""

    @abc.abstractmethod
    def _receive(self, ex: Exchange, token, device) -> list:
        """The tensors this rank receives in ``ex`` (its `recv_pieces`), laid out."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over `tp_group`, added in rank order."""
        self._reductions += 1
        x = x.contiguous()
        key = (self.layer, "all_reduce")
        self.sent[key] = self.sent.get(key, 0) + x.numel() * x.element_size() * (len(self.tp_group) - 1)
        parts = self._gather(x)
        out = parts[0] + parts[1] if len(parts) > 1 else parts[0].clone()
        for p in parts[2:]:
            out += p
        return out

    @abc.abstractmethod
    def _gather(self, x: torch.Tensor) -> list:
        """Every `tp_group` rank's ``x`` (this rank's included), in group order."""

    def idle(self) -> None:
        """A rank with nothing to do this call (a CompNode without tokens) still takes part
        in every exchange, with nothing to send or receive."""
        for (layer, phase) in self.schedule.exchanges:
            self.wait(self.start(layer, phase, []), [])



class PackingTransport(Transport):
    """Sends one packed buffer per exchange (`Exchange.pack`) and places what arrives
    (`Exchange.place`); subclasses move the bytes (`_post`, `_collect`)."""

    def _send(self, ex: Exchange, tensors: list):
        return self._post(ex, *ex.pack(self.rank, tensors))

    def _receive(self, ex: Exchange, token, device) -> list:
        return ex.place(self.rank, self._collect(ex, token), device)

    @abc.abstractmethod
    def _post(self, ex: Exchange, buf, dsts, sizes):
        """Move the packed ``buf`` (``sizes[k]`` bytes for rank ``dsts[k]``); returns a token."""

    @abc.abstractmethod
    def _collect(self, ex: Exchange, token) -> list:
        """The uint8 chunks this rank received for ``token``, one per route, in source order."""


class CollectiveTransport(PackingTransport):
    """One asynchronous ``all_to_all_single`` per (layer, phase) on ``group``.

    ``watch``: called while a collective is pending (every 50 ms); it raises to abandon the
    wait, e.g. when a peer announced that it failed (torchrun: the ranks fail together)."""

    def __init__(self, rank: int, world: int, *, group=None, device=None, progress=None,
                 watch=None):
        super().__init__(rank, world, progress)
        self.group, self.device, self.watch = group, torch.device(device or "cpu"), watch
        self.tp_handle = None       # the torch.distributed group of `tp_group`

    def _gather(self, x):
        parts = [torch.empty_like(x) for _ in self.tp_group]
        wait_watched(dist.all_gather(parts, x, group=self.tp_handle, async_op=True), self.watch)
        return parts

    def _post(self, ex: Exchange, buf, dsts, sizes):
        in_sizes = [0] * self.world
        for d, s in zip(dsts, sizes):
            in_sizes[d] = s
        out_sizes = [0] * self.world
        srcs = []
        for src, s in ex.recv_sizes(self.rank):
            out_sizes[src] = s
            srcs.append(src)
        out = torch.empty(sum(out_sizes), dtype=torch.uint8, device=self.device)
        if buf.device != self.device:
            buf = buf.to(self.device)
        work = dist.all_to_all_single(out, buf, out_sizes, in_sizes, group=self.group, async_op=True)
        return work, out, out_sizes, srcs

    def _collect(self, ex: Exchange, token) -> list:
        work, out, out_sizes, srcs = token
        wait_watched(work, self.watch)
        parts = out.split(out_sizes)
        return [parts[s] for s in srcs]


class CollectiveError(RuntimeError):
    """A collective failed on the wire (gloo: "connection reset by peer"): a peer is gone,
    and the error names its address, not its rank."""


def wait_watched(work, watch=None, every: float = 0.05) -> None:
    """``work.wait()``, calling ``watch()`` every ``every`` seconds while it is pending
    (polled at 0.5 ms: what a watched collective may add to its latency). The collective's
    own failure is raised as `CollectiveError`; what ``watch`` raises passes unchanged."""
    if watch is not None:
        next_check = time.monotonic() + every
        while not _completed(work):
            time.sleep(0.0005)
            if time.monotonic() >= next_check:
                watch()
                next_check = time.monotonic() + every
    _wait(work)


def _completed(work) -> bool:
    try:
        return work.is_completed()
    except RuntimeError as e:
        raise CollectiveError(str(e)) from e


def _wait(work) -> None:
    try:
        work.wait()
    except RuntimeError as e:
        raise CollectiveError(str(e)) from e


class Aborted(Exception):
    """Raised in an in-process worker after another worker failed: it stops quietly and the
    caller reports the first failure."""


class Mailboxes:
    """The in-process network: one queue per rank, and an abort switch for failures."""

    def __init__(self, world: int, timeout: float):
        self.boxes = [queue.Queue() for _ in range(world)]
        self.abort = threading.Event()
        self.timeout = timeout

    def get(self, rank: int):
        deadline = time.monotonic() + self.timeout
        while True:
            if self.abort.is_set():
                raise Aborted()
            try:
                return self.boxes[rank].get(timeout=0.05)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank {rank} got no message within {self.timeout} s") from None


class QueueTransport(PackingTransport):
    """In-process transport over `Mailboxes`; messages are (layer, phase, src, bytes)."""

    def __init__(self, rank: int, world: int, boxes: Mailboxes):
        super().__init__(rank, world)
        self.boxes = boxes
        self._early: dict[tuple, torch.Tensor] = {}

    def _post(self, ex: Exchange, buf, dsts, sizes):
        for d, chunk in zip(dsts, buf.split(sizes)):
            self.boxes.boxes[d].put((ex.layer, ex.phase, self.rank, chunk))
        return None

    def _collect(self, ex: Exchange, token) -> list:
        want = [src for src, _ in ex.recv_sizes(self.rank)]
        return [self._message(ex.layer, ex.phase, src) for src in want]

    def _message(self, layer, phase, src):
        key = (layer, phase, src)
        while key not in self._early:
            layer_, phase_, s, chunk = self.boxes.get(self.rank)
            self._early[(layer_, phase_, s)] = chunk
        return self._early.pop(key)

    def _gather(self, x):
        tag = ("all_reduce", self._reductions)
        for r in self.tp_group:
            if r != self.rank:
                self.boxes.boxes[r].put((tag, "all_reduce", self.rank, x))
        return [x if r == self.rank else self._message(tag, "all_reduce", r) for r in self.tp_group]
