"""SharedMemoryTransport: ranks on one host exchange payloads through shared memory.

As NCCL does within a node, the bytes do not cross a socket: each rank packs what it sends
(`Exchange.pack`, the one copy) straight into its own shared segment for the phase, and the
receivers map that segment and read their rows in place (`Exchange.place` makes views, or
its one placing copy). Only a three-int header per (sender, receiver) travels through the
process group: which segment generation, where the receiver's bytes start and how many.
That header exchange is also the synchronisation: the receiver reads after the header
arrived, i.e. after the sender finished packing.

The invariant this rests on: a received view is dead before the next exchange of the same
phase (the tile once the reply is packed; the partials once the merge or, at beta == 1, the
O-projection of the next stage read them); no program returns or keeps one across calls.
Why the segments can be reused without a lock: a rank packs into its segment of a phase
again only after it has received the next phase from every peer that read it (the return
of layer l arrives after the AttnNodes computed on the dispatch of layer l; the dispatch of
layer l+1 arrives after the CompNodes merged the return of layer l).

Segments are files in /dev/shm (``torch.from_file(..., shared=True)``), named by a tag
unique to the runtime, rank, phase and generation; a segment grows by doubling when a
longer sequence needs more (a new generation, announced in the header). The creator removes
its files when it stops; the driver removes any left by a worker that was killed.
"""

from __future__ import annotations

import glob
import os
import tempfile

import torch
import torch.distributed as dist

from fxdisagg.runtime.transport import Transport
from fxdisagg.schedule import Exchange

_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
_MIN_BYTES = 1 << 20


def segment_path(tag: str, rank: int, phase: str, generation: int) -> str:
    return os.path.join(_DIR, f"fxdisagg-{tag}-{rank}-{phase}-{generation}")


def remove_segments(tag: str) -> None:
    """Remove every segment of runtime ``tag`` (the driver's clean-up after workers)."""
    for path in glob.glob(os.path.join(_DIR, f"fxdisagg-{tag}-*")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # its creator removed it first


def _map(path: str, nbytes: int, create: bool) -> torch.Tensor:
    if create:
        with open(path, "wb") as f:
            f.truncate(nbytes)
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


class SharedMemoryTransport(Transport):
    def __init__(self, rank: int, world: int, *, tag: str, group=None, progress=None):
        super().__init__(rank, world, progress)
        self.tag, self.group = tag, group
        self.device = torch.device("cpu")
        self._mine: dict[str, tuple[int, torch.Tensor]] = {}      # phase -> (generation, bytes)
        self._theirs: dict[tuple, torch.Tensor] = {}              # (src, phase, gen) -> bytes

    def _segment(self, phase: str, nbytes: int) -> tuple[int, torch.Tensor]:
        gen, seg = self._mine.get(phase, (-1, None))
        if seg is None or seg.numel() < nbytes:
            size = max(_MIN_BYTES, nbytes, 2 * (seg.numel() if seg is not None else 0))
            if seg is not None:
                os.unlink(segment_path(self.tag, self.rank, phase, gen))  # readers keep their map
            gen += 1
            seg = _map(segment_path(self.tag, self.rank, phase, gen), size, create=True)
            self._mine[phase] = (gen, seg)
        return gen, seg

    def _send_buffer(self, ex: Exchange) -> torch.Tensor:
        total = sum(r.nbytes(ex.send_pieces) for r in ex.sends(self.rank))
        if total == 0:                 # nothing to send in this phase: no segment at all
            return torch.empty(0, dtype=torch.uint8)
        return self._segment(ex.phase, total)[1][:total]

    def _post(self, ex: Exchange, buf, dsts, sizes):
        gen = self._mine.get(ex.phase, (0, None))[0]
        header = torch.zeros(self.world, 3, dtype=torch.int64)
        off = 0
        for d, s in zip(dsts, sizes):
            header[d] = torch.tensor([gen, off, s])
            off += s
        got = torch.empty_like(header)
        return dist.all_to_all_single(got, header, group=self.group, async_op=True), got

    def _collect(self, ex: Exchange, token) -> list:
        work, got = token
        work.wait()
        chunks = []
        for src, nbytes in ex.recv_sizes(self.rank):
            gen, off, size = got[src].tolist()
            if size != nbytes:
                raise RuntimeError(f"rank {self.rank}: rank {src} announced {size} bytes for layer "
                                   f"{ex.layer} {ex.phase}, the schedule says {nbytes}")
            if size == 0:                # an empty route: its sender may have no segment
                chunks.append(torch.empty(0, dtype=torch.uint8))
                continue
            chunks.append(self._their_segment(src, ex.phase, gen, off + size)[off:off + size])
        return chunks

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
        for phase, (gen, _) in self._mine.items():
            try:
                os.unlink(segment_path(self.tag, self.rank, phase, gen))
            except FileNotFoundError:
                pass  # the driver's clean-up was first
        self._mine.clear()
        self._theirs.clear()
