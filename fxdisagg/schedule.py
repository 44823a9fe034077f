"""The exchange schedule: who sends which rows of which tensors to whom, as data.

Every routing fact lives here and nowhere else (which is why this module passes 400
lines: the `Exchange` that transports execute and the builders that make its routes from
a Plan must agree, and they are read together). The lowering (`passes/lower.py`) records,
per attention layer, the pieces the layer sends (`fxdisagg.pieces.LayerPieces`: dtype and
shape of q, k, v and their per-token features, with the token dim explicit) and writes them
into the comm ops of the role programs; the runtime builds, per sequence length, one `Exchange` per
(layer, phase) from the Plan, the rank layout and those pieces; every transport only
executes an `Exchange` (`pack` on the sender, `place` on the receiver) and the traffic
prediction is `Exchange.bytes()`. An Exchange keeps, per rank, what does not change from
call to call: its packing layout and the views of the buffers it last packed into and
placed from (`kept`).

Phases of one layer (DESIGN.md, "lower"):

- ``dispatch``: CompNode c -> AttnNode (i, j): c's query-side rows of shard i and key-side
  rows of shard j. The AttnNode places each source's rows at their place in the tile, rows
  in ascending token order (R-sharded causal tiles stay triangles).
- ``return``: AttnNode (i, j) -> CompNode c: the rows of its partial (out, lse) that belong
  to c's queries; c places them at its local rows of shard i, in slot j of the stacked
  partials ``[beta, B, H, n, Dv]`` the expsum-merge reads (merge arity beta).

Steps that extend a KV cache (decode, chunked prefill; `fxdisagg.plan.ExtendPlan`) are
other exchanges of the same type, split-KV:

- ``dispatch``: CompNode c -> every AttnNode: the query-side rows of all c's new tokens;
  key-side rows only to the AttnNode that caches the token (`fxdisagg.plan.cache_owner`).
- ``return``: every AttnNode -> CompNode c: the partials of c's queries over its cache, in
  slot ``i*beta + j`` of ``[beta**2, B, H, n, Dv]`` (merge arity beta**2).

Tensor-parallel CompNodes (``tp > 1``, `fxdisagg.tensor_parallel`) change only who the
routes run between: CompNode c is ``tp`` ranks, rank t holding heads ``[t*h, (t+1)*h)`` of
every piece with a head dim (``h`` its local head count). Each route from or to rank t is
``part`` t: it carries that rank's heads, which the AttnNode places at (dispatch) or takes
from (return) ``t*h`` along the head dim of its full-head tensors. Per-token pieces
without a head dim (positions, document ids, validity) are the same on every rank of the
group and travel once, from part 0. An AttnNode thus runs one partial attention over all
heads, and each TP rank sends and receives only its own heads: 1/tp of the bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Sequence

import torch
from torch import Tensor

from fxdisagg.pieces import LayerPieces, PieceSpec

DISPATCH, RETURN = "dispatch", "return"
PHASES = (DISPATCH, RETURN)


@dataclasses.dataclass(frozen=True, eq=False)
class Route:
    """One message of an exchange.

    rows[side]: the sender's local rows of that side it sends (sorted), or None for all of
    them in order (no gather). dst_rows[side]: where they land along the receiver's token
    dim, or None when this route alone fills the receiver's tensor in order (the received
    bytes are used in place). slot: the leading index of a stacked receive (the key shard
    j of a returned partial), else None. part: the TP rank t whose heads the route
    carries (None without tensor parallelism; see the module docstring).
    """

    src: int
    dst: int
    n_rows: tuple[int, ...]
    rows: tuple[Tensor | None, ...]
    dst_rows: tuple[Tensor | None, ...]
    slot: int | None = None
    part: int | None = None

    def carries(self, spec: PieceSpec) -> bool:
        """Pieces without heads travel from part 0 only (every TP rank holds them alike)."""
        return spec.head_dim is not None or not self.part

    def nbytes(self, pieces: Sequence[PieceSpec]) -> int:
        return sum(piece_bytes(p, self.n_rows[p.side]) for p in pieces if self.carries(p))


ALIGN = 8


def piece_bytes(spec: PieceSpec, rows: int) -> int:
    """Bytes ``rows`` rows of ``spec`` take in a message: padded to 8 so that every piece
    of a packed buffer starts aligned for its dtype (views, no copies, on both sides)."""
    return -(-rows * spec.row_bytes() // ALIGN) * ALIGN


def per_rank(method):
    """Memoise ``method(exchange, rank)`` (a method of `Exchange` or a function of one,
    `fxdisagg.landing`) on the exchange: a rank's view of an exchange's routes is asked for
    on every exchange of every call (a decode step is little else) and never changes; the
    memo goes with the Exchange when the schedule caches drop it."""
    @functools.wraps(method)
    def memoised(self, rank: int):
        key = (method.__name__, rank)
        return self._memo[key] if key in self._memo else self._memo.setdefault(key, method(self, rank))
    return memoised


@dataclasses.dataclass(frozen=True, eq=False)
class Exchange:
    """One (layer, phase): the routes, the pieces each route carries and how receivers lay
    them out. ``send_pieces``: what senders pass to `pack`; ``recv_pieces``: what
    receivers get from `place` (the stacked partials on a CompNode's return)."""

    layer: int
    phase: str
    send_pieces: tuple[PieceSpec, ...]
    recv_pieces: tuple[PieceSpec, ...]
    routes: tuple[Route, ...]
    recv_rows: dict                      # rank -> rows per side of its received tensors
    merge_arity: int
    _memo: dict = dataclasses.field(default_factory=dict, init=False, repr=False)  # `per_rank`

    def bytes(self) -> int:
        """Bytes this exchange moves, all ranks together."""
        return sum(r.nbytes(self.send_pieces) for r in self.routes)

    @per_rank
    def sends(self, rank: int) -> tuple[Route, ...]:
        return tuple(sorted((r for r in self.routes if r.src == rank), key=lambda r: r.dst))

    @per_rank
    def receives(self, rank: int) -> tuple[Route, ...]:
        return tuple(sorted((r for r in self.routes if r.dst == rank), key=lambda r: r.src))

    @per_rank
    def send_bytes(self, rank: int) -> int:
        """Bytes ``rank`` packs in this exchange."""
        return sum(r.nbytes(self.send_pieces) for r in self.sends(rank))

    # -- the sender: one packing copy -------------------------------------------------------
    @per_rank
    def _send_layout(self, rank: int) -> tuple["_Copy", ...]:
        """Every copy ``rank`` makes when it packs. Shapes are static: the token counts
        are the exchange's, the other dims the specs'."""
        copies, off = [], 0
        for r in self.sends(rank):
            for k, spec in enumerate(self.send_pieces):
                n = r.n_rows[spec.side]
                if n == 0 or not r.carries(spec):   # nothing to copy (decode: the keys of
                    continue                        # a token go to its owner only)
                copies.append(_Copy(k, off, n * spec.row_bytes(), spec.sized(n), r.rows[spec.side],
                                    r.part, spec))
                off += piece_bytes(spec, n)
        return tuple(copies)

    def kept(self, key, buffers: Sequence[Tensor], make):
        """``make()``, kept until ``buffers`` change: a transport packs into and receives
        from the same bytes call after call, and a kept view holds its storage, so an
        equal data pointer is the same memory."""
        ptrs = tuple((b.data_ptr(), b.numel(), b.device) for b in buffers)
        held = self._memo.get(key)
        if held is None or held[0] != ptrs:
            held = self._memo[key] = (ptrs, make())
        return held[1]

    def pack(self, rank: int, tensors: Sequence[Tensor], out: Tensor | None = None
             ) -> tuple[Tensor, list[int], list[int]]:
        """Every route from ``rank`` as one flat uint8 buffer (routes in rank order, pieces
        in spec order), the destination ranks and the byte count of each. Each byte is copied once,
        straight into the buffer (``index_select(out=)`` or ``copy_``)."""
        dsts, sizes = self.send_sizes(rank)
        buf = out if out is not None else torch.empty(
            sum(sizes), dtype=torch.uint8, device=tensors[0].device if tensors else "cpu")
        layout = self._send_layout(rank)
        views = self.kept(("send views", rank), (buf,), lambda: [
            buf[c.offset:c.offset + c.nbytes].view(c.spec.dtype).view(c.shape) for c in layout])
        for c, dst in zip(layout, views):
            t = heads_of(tensors[c.tensor], c.spec.head_dim, c.part, c.spec)
            if c.rows is not None:
                torch.index_select(t, c.spec.token_dim, c.rows.to(t.device), out=dst)
            elif t.shape == c.shape:
                dst.copy_(t)
            else:
                raise ValueError(f"layer {self.layer} {self.phase}: piece {c.spec.name} is "
                                 f"{tuple(t.shape)}, the schedule packs {c.shape}")
        return buf, dsts, sizes

    @per_rank
    def send_sizes(self, rank: int) -> tuple[list[int], list[int]]:
        """The destination ranks of ``rank``'s routes and the bytes of each, in rank order."""
        routes = self.sends(rank)
        return [r.dst for r in routes], [r.nbytes(self.send_pieces) for r in routes]

    @per_rank
    def recv_sizes(self, rank: int) -> tuple[tuple[int, int], ...]:
        """(source rank, bytes) of every route into ``rank``, in source order."""
        return tuple((r.src, r.nbytes(self.send_pieces)) for r in self.receives(rank))

    # -- the receiver: views where the bytes are already in place, else one placing copy -----
    def place(self, rank: int, chunks: Sequence[Tensor], device=None) -> list[Tensor]:
        """The received tensors of ``rank`` from the per-route uint8 ``chunks`` (source
        order): each piece a view of the received bytes when one route fills it in order,
        else the routes' rows copied to their places."""
        routes = self.receives(rank)
        if rank not in self.recv_rows:          # a rank that only sends in this phase
            return []
        views, whole = self._recv_views(rank, chunks)
        rows, out = self.recv_rows[rank], []
        for k, spec in enumerate(self.recv_pieces):
            if whole[k] is not None:             # one route fills it in order: no copy
                out.append(whole[k])
                continue
            d, n = spec.token_dim, rows[spec.side]
            full = torch.empty(spec.sized(n), dtype=spec.dtype, device=device)  # routes cover every row
            for r, v in zip(routes, views):
                if not r.carries(spec):
                    continue
                target = full[r.slot] if r.slot is not None else full
                dd = d - 1 if r.slot is not None else d
                hd = None if spec.head_dim is None else spec.head_dim - (r.slot is not None)
                target = heads_of(target, hd, r.part, v[k])
                where = r.dst_rows[spec.side]
                if where is None:
                    target.copy_(v[k])
                else:
                    target.index_copy_(dd, where.to(target.device), v[k])
            out.append(full)
        return out

    def _recv_views(self, rank: int, chunks: Sequence[Tensor]) -> tuple[list, list]:
        """Every route's pieces as views of its chunk (`_unpack`), and per received piece
        the view that is the whole tensor when one route fills it in order (with the slot
        dim of a stacked partial), else None; kept while the chunks are (`kept`)."""
        def make():
            routes = self.receives(rank)
            views = [self._unpack(r, c) for r, c in zip(routes, chunks)]
            whole = [None] * len(self.recv_pieces)
            for k, spec in enumerate(self.recv_pieces):
                if len(routes) == 1 and routes[0].dst_rows[spec.side] is None:
                    whole[k] = views[0][k] if routes[0].slot is None else views[0][k].unsqueeze(0)
            return views, whole
        return self.kept(("recv views", rank), chunks, make)

    def _unpack(self, route: Route, chunk: Tensor) -> list[Tensor | None]:
        pieces, off = [], 0
        for spec in self.send_pieces:
            if not route.carries(spec):
                pieces.append(None)
                continue
            n = route.n_rows[spec.side]
            piece = chunk[off:off + n * spec.row_bytes()]
            pieces.append(piece.view(spec.dtype).view(spec.sized(n)))
            off += piece_bytes(spec, n)
        return pieces


class _Copy(typing.NamedTuple):
    """One piece of one route, as its sender packs it: ``tensors[tensor]`` (its ``rows``,
    or all of them in order when None; TP ``part``'s heads) into ``nbytes`` at ``offset``."""

    tensor: int
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    rows: Tensor | None
    part: int | None
    spec: PieceSpec


def heads_of(t: Tensor, hd: int | None, part: int | None, like) -> Tensor:
    """TP rank ``part``'s heads of ``t`` along dim ``hd`` when ``t`` holds more heads than
    ``like`` (a piece's spec or tensor), else ``t``: a sender with all heads (an AttnNode's
    reply) sends each rank its slice; a receiver with all heads places each rank's slice."""
    if part is None or hd is None:
        return t
    h = like.shape[hd]
    return t if t.shape[hd] == h else t.narrow(hd, part * h, h)


# -- building exchanges from a Plan --------------------------------------------------------------
def _all_or(rows: Tensor, n: int) -> Tensor | None:
    """None when ``rows`` is every row of an n-row tensor in order (send it whole)."""
    return None if len(rows) == n and bool((rows == torch.arange(n)).all()) else rows


def build_exchanges(plan, layout, layer: LayerPieces) -> dict[str, Exchange]:
    """The two exchanges of ``layer`` for ``plan`` (a prefill `Plan` or a cache-extending
    `ExtendPlan`) on ``layout`` (a `RankLayout`)."""
    from fxdisagg.plan import ExtendPlan
    if isinstance(plan, ExtendPlan):
        return {DISPATCH: _extend_dispatch(plan, layout, layer),
                RETURN: _extend_return(plan, layout, layer)}
    return {DISPATCH: _dispatch(plan, layout, layer), RETURN: _return(plan, layout, layer)}


def _dispatch(plan, layout, layer: LayerPieces) -> Exchange:
    beta, routes, recv_rows = plan.beta, [], {}
    sizes = [len(t) for t in plan.shard_tokens]
    for i in range(beta):
        for j in range(beta):
            dst = layout.attn_rank(i, j)
            recv_rows[dst] = (sizes[i], sizes[j])
    for c, t, part in _comp_ranks(plan, layout):
        n_c = len(plan.comp_tokens[c])
        for i in range(beta):
            for j in range(beta):
                rq, rk = plan.local_rows(c, i), plan.local_rows(c, j)
                routes.append(Route(layout.comp_rank(c, t), layout.attn_rank(i, j), (len(rq), len(rk)),
                                    (_all_or(rq, n_c), _all_or(rk, n_c)),
                                    (_arrival(plan, c, i), _arrival(plan, c, j)), part=part))
    return Exchange(layer.layer, DISPATCH, layer.dispatch, layer.all_heads(layout.tp).dispatch,
                    tuple(routes), recv_rows, 1)


def _comp_ranks(plan, layout):
    """(CompNode, TP rank, route part) of every active CompNode rank; part is None
    without tensor parallelism."""
    for c in plan.active_comp_nodes():
        for t in range(layout.tp):
            yield c, t, (t if layout.tp > 1 else None)


def _arrival(plan, c: int, shard: int) -> Tensor | None:
    """Where CompNode c's rows of ``shard`` land in the sorted shard: None when c alone
    fills it in order."""
    pos = plan.reply_rows(shard, c)
    return _all_or(pos, len(plan.shard_tokens[shard]))


def _return(plan, layout, layer: LayerPieces) -> Exchange:
    beta, routes, recv_rows = plan.beta, [], {}
    if layer.arity != beta:
        raise ValueError(f"layer {layer.layer} merges {layer.arity} partials but the Plan has "
                         f"beta={beta} key shards; the programs and the Plan disagree")
    for c, t, part in _comp_ranks(plan, layout):
        n_c = len(plan.comp_tokens[c])
        recv_rows[layout.comp_rank(c, t)] = (n_c, n_c)
        for i in range(beta):
            rows = plan.reply_rows(i, c)
            where = _all_or(plan.local_rows(c, i), n_c) if beta > 1 else None
            for j in range(beta):
                routes.append(Route(layout.attn_rank(i, j), layout.comp_rank(c, t), (len(rows), 0),
                                    (_all_or(rows, len(plan.shard_tokens[i])), None),
                                    (where, None), slot=j, part=part))
    return Exchange(layer.layer, RETURN, layer.reply, layer.stacked, tuple(routes), recv_rows, beta)


def _extend_dispatch(plan, layout, layer: LayerPieces) -> Exchange:
    """Split-KV: CompNode c sends the q-side rows of all its new tokens to every AttnNode
    and the k-side rows of each token to the one AttnNode that caches it."""
    n, routes, recv_rows = plan.n_tokens, [], {}
    nodes = [divmod(a, plan.beta) for a in range(plan.beta ** 2)]
    for a, (i, j) in enumerate(nodes):
        recv_rows[layout.attn_rank(i, j)] = (n, len(plan.owned(a)))
    for c, t, part in _comp_ranks(plan, layout):
        toks = plan.comp_tokens[c]
        for a, (i, j) in enumerate(nodes):
            mine = torch.nonzero(plan.owners[toks] == a).flatten()
            owned = plan.owned(a)
            routes.append(Route(layout.comp_rank(c, t), layout.attn_rank(i, j), (len(toks), len(mine)),
                                (None, _all_or(mine, len(toks))),
                                (_all_or(toks, n),
                                 _all_or(torch.searchsorted(owned, toks[mine]), len(owned))),
                                part=part))
    return Exchange(layer.layer, DISPATCH, layer.dispatch, layer.all_heads(layout.tp).dispatch,
                    tuple(routes), recv_rows, 1)


def _extend_return(plan, layout, layer: LayerPieces) -> Exchange:
    """Every AttnNode returns each CompNode the partials of its queries, in slot ``a``:
    the CompNode merges beta**2 partials (the stacked arity differs from prefill's beta)."""
    n, routes, recv_rows = plan.n_tokens, [], {}
    stacked = dataclasses.replace(layer, arity=plan.merge_arity).stacked
    for c, t, part in _comp_ranks(plan, layout):
        toks = plan.comp_tokens[c]
        recv_rows[layout.comp_rank(c, t)] = (len(toks), len(toks))
        for a in range(plan.beta ** 2):
            routes.append(Route(layout.attn_rank(*divmod(a, plan.beta)), layout.comp_rank(c, t),
                                (len(toks), 0), (_all_or(toks, n), None), (None, None), slot=a,
                                part=part))
    return Exchange(layer.layer, RETURN, layer.reply, stacked, tuple(routes), recv_rows,
                    plan.merge_arity)


def reduction_bytes(plan, layout, reductions) -> dict[int, int]:
    """Bytes the tensor-parallel all-reduces of one call move per layer, every rank
    together: each rank of a group sends its rows to the tp - 1 others (`Transport.
    all_reduce`). ``reductions``: (layer, bytes per token) of each all-reduce site."""
    tp, out = layout.tp, {}
    tokens = sum(len(plan.comp_tokens[c]) for c in plan.active_comp_nodes())
    for layer, per_token in reductions:
        out[layer] = out.get(layer, 0) + tp * (tp - 1) * tokens * per_token
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
    """Every exchange of one call: ``exchanges[(layer, phase)]``, for one Plan."""

    plan: object
    exchanges: dict

    @staticmethod
    def build(plan, layout, layers: Sequence[LayerPieces]) -> "Schedule":
        ex = {}
        for lp in layers:
            for phase, e in build_exchanges(plan, layout, lp).items():
                ex[(lp.layer, phase)] = e
        return Schedule(plan, ex)

    def traffic(self) -> dict[int, dict[str, int]]:
        """``{layer: {"dispatch": bytes, "return": bytes}}``: what `dm.traffic` measures."""
        out: dict[int, dict[str, int]] = {}
        for (layer, phase), e in sorted(self.exchanges.items()):
            out.setdefault(layer, {})[phase] = e.bytes()
        return out
