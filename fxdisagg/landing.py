"""Delivery: a sender writes its rows straight into the tensors the receiver reads.

`Exchange.pack` and `Exchange.place` move a row twice whenever a received tensor is filled
by more than one route: once into the sender's packed buffer, and once more from there to
the row's place in the receiver's tensor (an AttnNode's tile at alpha >= 2, its query and
key rows coming from several CompNodes; a CompNode's stacked partials at beta >= 2, from
beta AttnNodes). At (2, 2) that second copy was ~1.5 ms of every AttnNode tile and ~1.2 ms
of every CompNode's layer, on the critical path.

A transport that can write into a receiver's memory (`fxdisagg.runtime.shm`: the ranks of
one host map each other's shared segments) does neither. Each receiver owns a *landing*
buffer per phase, laid out as the tensors it receives (`landing_bytes`, `landed`); every
sender copies each row it sends once, straight to its final place there (`deliver`); the
receiver's tensors are views of its landing. One copy per row in all, none on arrival: what
issue 7 asks of an exchange, on the transport every single-host run uses.

A route's rows are copied as strided runs (`Run`: a strided view on both sides, one
``copy_``, no index tensors): an R-sharded route is one run, a zigzag or contiguous one a
few. A route that breaks into more than `MAX_RUNS` runs (a chunked extend whose new tokens
spread over cache owners: `fxdisagg.plan.cache_owner`) is gathered and scattered with index
ops instead, a second copy of those rows.

When a sender may write is the transport's business; the shared-memory transport's
ordering (a rank writes a phase's landing of a peer again only after that peer started a
later exchange) is stated in its module docstring.
"""

from __future__ import annotations

import math
import typing
from typing import Mapping, Sequence

import torch
from torch import Tensor

from fxdisagg.pieces import PieceSpec
from fxdisagg.schedule import Exchange, heads_of, per_rank

ALIGN = 64               # each received tensor starts on a cache line of the landing
MAX_RUNS = 16            # more runs than this: index ops (see the module docstring)


@per_rank
def landing_layout(ex: Exchange, rank: int) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
    """(offset, bytes, shape) of each tensor ``rank`` receives in ``ex``, in `recv_pieces`
    order; empty when ``rank`` receives nothing in this phase."""
    if rank not in ex.recv_rows:
        return ()
    rows, layout, off = ex.recv_rows[rank], [], 0
    for spec in ex.recv_pieces:
        shape = spec.sized(rows[spec.side])
        nbytes = spec.dtype.itemsize * math.prod(shape)
        layout.append((off, nbytes, shape))
        off += -(-nbytes // ALIGN) * ALIGN
    return tuple(layout)


def landing_bytes(ex: Exchange, rank: int) -> int:
    """Bytes of ``rank``'s landing for ``ex`` (0 if it receives nothing)."""
    layout = landing_layout(ex, rank)
    return layout[-1][0] + layout[-1][1] if layout else 0


def landed(ex: Exchange, rank: int, landing: Tensor) -> list[Tensor]:
    """The tensors ``rank`` receives in ``ex``, as views of its uint8 ``landing``."""
    return ex.kept(("landed", rank), (landing,), lambda: [
        landing[off:off + n].view(spec.dtype).view(shape)
        for (off, n, shape), spec in zip(landing_layout(ex, rank), ex.recv_pieces)])


class _Put(typing.NamedTuple):
    """One piece of one route as its sender delivers it: ``tensors[piece]`` (TP ``part``'s
    heads) into the receiver's tensor ``piece`` (its ``slot``, ``part``'s heads), by
    ``runs`` (`Run`), or by index ``rows`` -> ``where`` when ``runs`` is None."""

    piece: int
    dst: int
    spec: PieceSpec
    slot: int | None
    part: int | None
    runs: tuple["Run", ...] | None
    rows: Tensor | None
    where: Tensor | None
    whole: bool          # one run that takes all of the sender's tensor: no view to make


class Run(typing.NamedTuple):
    """``count`` rows taken from ``src``, ``src + src_step``, ... and put at ``dst``,
    ``dst + dst_step``, ...: a strided view on both sides, one ``copy_``."""

    src: int
    src_step: int
    dst: int
    dst_step: int
    count: int

    def taken(self, t: Tensor, d: int) -> Tensor:
        return _strided(t, d, self.src, self.src_step, self.count)

    def put(self, t: Tensor, d: int) -> Tensor:
        return _strided(t, d, self.dst, self.dst_step, self.count)


def _strided(t: Tensor, d: int, first: int, step: int, count: int) -> Tensor:
    span = t.narrow(d, first, (count - 1) * step + 1)
    return span if step == 1 else span[(slice(None),) * d + (slice(None, None, step),)]


@per_rank
def _puts(ex: Exchange, rank: int) -> tuple[_Put, ...]:
    puts = []
    for r in ex.sends(rank):
        for k, spec in enumerate(ex.send_pieces):
            n = r.n_rows[spec.side]
            if n == 0 or not r.carries(spec):
                continue
            rows, where = r.rows[spec.side], r.dst_rows[spec.side]
            found = runs(rows, where, n)
            whole = rows is None and found is not None and len(found) == 1
            puts.append(_Put(k, r.dst, spec, r.slot, r.part, found, rows, where, whole))
    return tuple(puts)


def runs(rows: Tensor | None, where: Tensor | None, n: int) -> tuple[Run, ...] | None:
    """``n`` rows taken at ``rows`` (None: 0..n-1) and put at ``where`` (likewise) as
    strided `Run` s, or None past `MAX_RUNS` of them.

    R-sharding gives one run per route: CompNode c holds chunks of beta tokens dealt
    round-robin, so its rows of shard i are every alpha-th of its local rows and land on
    every alpha-th row of the sorted shard."""
    src = torch.arange(n) if rows is None else rows.cpu()
    dst = torch.arange(n) if where is None else where.cpu()
    if n == 1:
        return (Run(int(src[0]), 1, int(dst[0]), 1, 1),)
    ds, dd = src.diff(), dst.diff()
    change = ((ds[1:] != ds[:-1]) | (dd[1:] != dd[:-1])).nonzero().flatten() + 1
    if len(change) >= 2 * MAX_RUNS:
        return None
    bounds = [0, *change.tolist(), n - 1]     # the diffs of [k0, k1) are equal: rows k0..k1
    out, first = [], 0                        # first: the first row no run has yet
    for k0, k1 in zip(bounds, bounds[1:]):
        a, step_s, step_d = max(k0, first), int(ds[k0]), int(dd[k0])
        if step_s > 0 and step_d > 0:
            out.append(Run(int(src[a]), step_s, int(dst[a]), step_d, k1 - a + 1))
        else:                                  # not a progression: a run per row
            out.extend(Run(int(src[e]), 1, int(dst[e]), 1, 1) for e in range(a, k1 + 1))
        first = k1 + 1
        if len(out) > MAX_RUNS:
            return None
    return tuple(out)


def deliver(ex: Exchange, rank: int, tensors: Sequence[Tensor], landings: Mapping[int, Tensor]) -> None:
    """Copy every row ``rank`` sends in ``ex`` to its place in its receiver's landing
    (``landings[dst]``, uint8): one copy per row. The receivers' side of every copy is a
    view kept while the landings are (a decode step is ~30 small copies per layer, so what
    each costs beside its ``copy_`` counts)."""
    puts = _puts(ex, rank)
    dsts = sorted({p.dst for p in puts})
    targets = ex.kept(("deliver", rank), [landings[d] for d in dsts], lambda: [
        _targets(ex, p, landings[p.dst]) for p in puts])
    for p, target in zip(puts, targets):
        src = heads_of(tensors[p.piece], p.spec.head_dim, p.part, p.spec)
        if p.whole:
            if src.shape != target[0].shape:
                _refuse(ex, p.spec, src)
            target[0].copy_(src)
            continue
        if src.dim() != len(p.spec.shape) or any(
                s is not None and s != n for s, n in zip(p.spec.shape, src.shape)):
            _refuse(ex, p.spec, src)
        d = p.spec.token_dim
        if p.runs is None:
            _scatter(src, d, p.rows, target[0], d, p.where)
            continue
        for run, view in zip(p.runs, target):
            view.copy_(run.taken(src, d))


def _targets(ex: Exchange, p: _Put, landing: Tensor) -> list[Tensor]:
    """Where a put writes in the receiver's tensor (its slot of a stacked partial, its TP
    part's heads of an AttnNode's all-head tensor): a view per run, or the whole tensor for
    index ops."""
    full = landed(ex, p.dst, landing)[p.piece]
    target = heads_of(full[p.slot] if p.slot is not None else full, p.spec.head_dim, p.part, p.spec)
    if p.runs is None:
        return [target]
    return [run.put(target, p.spec.token_dim) for run in p.runs]


def _scatter(src: Tensor, d: int, rows: Tensor | None, target: Tensor, dd: int, where: Tensor | None) -> None:
    taken = src if rows is None else src.index_select(d, rows.to(src.device))
    if where is None:
        target.copy_(taken)
    else:
        target.index_copy_(dd, where.to(target.device), taken)


def _refuse(ex: Exchange, spec: PieceSpec, t: Tensor):
    """A sent tensor has the piece's shape (all of its rows, for a route that sends them all)."""
    raise ValueError(f"layer {ex.layer} {ex.phase}: piece {spec.name} is {tuple(t.shape)}, "
                     f"the schedule sends {spec.encode()}")
