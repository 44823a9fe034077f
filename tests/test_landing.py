"""Delivery straight into the receivers' tensors (`fxdisagg.landing`): it lays out exactly
what packing and placing lay out, for every kind of exchange (prefill and cache-extending
Plans, every sharding, tensor-parallel CompNodes), with one copy per sent row and none on
arrival."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fxdisagg.landing import MAX_RUNS, deliver, landed, landing_bytes, runs
from fxdisagg.pieces import KEY, QUERY, LayerPieces, PieceSpec
from fxdisagg.plan import ExtendPlan, Plan
from fxdisagg.runtime.layout import ATTN, RankLayout
from fxdisagg.schedule import DISPATCH, PHASES, build_exchanges

B, HQ, HKV, D, DV = 2, 4, 2, 16, 8
aten = torch.ops.aten


def _layer(arity: int, tp: int) -> LayerPieces:
    """One layer's pieces as one TP rank of ``tp`` holds them (heads on dim 1)."""
    hq, hkv = HQ // tp, HKV // tp
    query = (PieceSpec("q", torch.float32, (B, hq, None, D), QUERY, 0, 1),
             PieceSpec("q_pos", torch.int64, (None,), QUERY))
    key = (PieceSpec("k", torch.float32, (B, hkv, None, D), KEY, 0, 1),
           PieceSpec("v", torch.float32, (B, hkv, None, DV), KEY, 0, 1),
           PieceSpec("k_pos", torch.int64, (None,), KEY),
           PieceSpec("k_valid", torch.bool, (B, None), KEY, 0))
    reply = (PieceSpec("out", torch.float32, (B, hq, None, DV), QUERY, 0, 1),
             PieceSpec("lse", torch.float32, (B, hq, None), QUERY, 0, 1))
    return LayerPieces(0, query, key, reply, arity=arity)


def _exchanges(plan, layout):
    arity = plan.merge_arity if isinstance(plan, ExtendPlan) else plan.beta
    return build_exchanges(plan, layout, _layer(arity, layout.tp))


def _sent(exs, plan, layout, phase) -> dict[int, list[torch.Tensor]]:
    """Random tensors every sender of ``phase`` holds: a CompNode rank its tokens' rows and
    heads; an AttnNode its tile's query rows and all heads."""
    g = torch.Generator().manual_seed(len(exs[phase].routes))
    out = {}
    for rank in sorted({r.src for r in exs[phase].routes}):
        role, idx = layout.role(rank)
        if role == ATTN:
            n, specs = exs[DISPATCH].recv_rows[rank][QUERY], [
                p.with_heads(layout.tp) for p in exs[phase].send_pieces]
        else:
            n, specs = len(plan.comp_tokens[idx]), exs[phase].send_pieces
        out[rank] = [_random(p.sized(n), p.dtype, g) for p in specs]
    return out


def _random(shape, dtype, g):
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype == torch.int64:
        return torch.randint(0, 1 << 40, shape, generator=g)
    return torch.randn(shape, generator=g, dtype=dtype)


def _delivered(ex, sent) -> dict[int, list[torch.Tensor]]:
    """Every receiver's tensors after every sender delivered; landings start as 0xFF so a
    row nobody wrote shows."""
    landings = {r: torch.full((landing_bytes(ex, r),), 255, dtype=torch.uint8) for r in ex.recv_rows}
    for rank, tensors in sent.items():
        deliver(ex, rank, tensors, landings)
    return {r: landed(ex, r, landings[r]) for r in ex.recv_rows}


def _placed(ex, sent) -> dict[int, list[torch.Tensor]]:
    chunks = {}
    for rank, tensors in sent.items():
        buf, dsts, sizes = ex.pack(rank, tensors)
        for d, chunk in zip(dsts, buf.split(sizes)):
            chunks.setdefault(d, {})[rank] = chunk
    return {r: ex.place(r, [got[s] for s in sorted(got)]) for r, got in chunks.items()}


CASES = [(Plan.build(29, 3, 2), RankLayout(3, 2)), (Plan.build(64, 2, 2), RankLayout(2, 2)),
         (Plan.build(7, 1, 1), RankLayout(1, 1)), (Plan.build(2, 2, 4), RankLayout(2, 4)),
         (Plan.build(40, 2, 2, "zigzag"), RankLayout(2, 2)),
         (Plan.build(33, 3, 2, "contiguous"), RankLayout(3, 2)),
         (Plan.build(24, 2, 2), RankLayout(2, 2, tp=2)),
         (ExtendPlan.build(5, 1, 2, 2), RankLayout(2, 2)),
         (ExtendPlan.build(9, 70, 2, 2), RankLayout(2, 2)),
         (ExtendPlan.build(3, 6, 1, 2), RankLayout(1, 2, tp=2))]


@pytest.mark.parametrize("plan, layout", CASES, ids=lambda x: repr(getattr(x, "_key", lambda: x)()))
@pytest.mark.parametrize("phase", PHASES)
def test_delivery_lays_out_what_packing_and_placing_do(plan, layout, phase):
    exs = _exchanges(plan, layout)
    sent = _sent(exs, plan, layout, phase)
    placed, delivered = _placed(exs[phase], sent), _delivered(exs[phase], sent)
    assert sorted(delivered) == sorted(placed)
    for rank, tensors in placed.items():
        assert len(delivered[rank]) == len(tensors)
        for want, got in zip(tensors, delivered[rank]):
            assert got.shape == want.shape and torch.equal(got, want), (rank, got.shape)


class _Moves(TorchDispatchMode):
    """Bytes written by data-moving ops (views are free)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (aten.copy_.default, aten.index_copy_.default, aten.index_select.default):
            t = out[0] if isinstance(out, (tuple, list)) else out
            self.bytes += (args[3] if func is aten.index_copy_.default else t).nbytes
        return out


@pytest.mark.parametrize("plan, layout", CASES[:7], ids=lambda x: repr(getattr(x, "_key", lambda: x)()))
def test_one_copy_per_sent_row_and_none_on_arrival(plan, layout):
    """A prefill route is a few strided runs: each row is written once, from the sender's
    tensor to its place in the receiver's; the receiver's tensors are views."""
    for phase in PHASES:
        ex = _exchanges(plan, layout)[phase]
        sent = _sent(_exchanges(plan, layout), plan, layout, phase)
        landings = {r: torch.empty(landing_bytes(ex, r), dtype=torch.uint8) for r in ex.recv_rows}
        with _Moves() as moved:
            for rank, tensors in sent.items():
                deliver(ex, rank, tensors, landings)
        payload = sum(r.n_rows[p.side] * p.row_bytes() for r in ex.routes
                      for p in ex.send_pieces if r.carries(p))
        assert moved.bytes == payload
        with _Moves() as moved:
            views = [landed(ex, r, landings[r]) for r in ex.recv_rows]
        assert moved.bytes == 0 and all(t.untyped_storage().data_ptr() == landings[r].data_ptr()
                                        for r, ts in zip(ex.recv_rows, views) for t in ts)


def test_r_sharded_routes_are_one_strided_run_each():
    plan, layout = Plan.build(2048, 2, 2), RankLayout(2, 2)
    for ex in _exchanges(plan, layout).values():
        for r in ex.routes:
            for p in ex.send_pieces:
                if r.carries(p) and r.n_rows[p.side]:
                    assert len(runs(r.rows[p.side], r.dst_rows[p.side], r.n_rows[p.side])) == 1


@pytest.mark.parametrize("seed", range(20))
def test_runs_move_every_row_to_its_place(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 40, (1,), generator=g))
    pick = [lambda: None, lambda: torch.randperm(60, generator=g)[:n].sort().values,
            lambda: torch.randperm(n, generator=g), lambda: torch.arange(n) * 3 + 1]
    rows, where = (pick[int(torch.randint(0, 4, (1,), generator=g))]() for _ in range(2))
    found = runs(rows, where, n)
    src = torch.arange(100.0)
    want = torch.full((200,), -1.0).index_copy_(0, torch.arange(n) if where is None else where,
                                                src[:n] if rows is None else src[rows])
    if found is None:
        return
    assert len(found) <= MAX_RUNS
    got = torch.full((200,), -1.0)
    for run in found:
        run.put(got, 0).copy_(run.taken(src, 0))
    assert torch.equal(got, want)
    assert sum(run.count for run in found) == n            # every row once


def test_a_piece_of_the_wrong_shape_is_refused():
    plan, layout = Plan.build(8, 1, 2), RankLayout(1, 2)
    exs = _exchanges(plan, layout)
    sent = _sent(exs, plan, layout, DISPATCH)[0]
    sent[0] = sent[0][:, :, :, :3]
    landings = {r: torch.empty(landing_bytes(exs[DISPATCH], r), dtype=torch.uint8)
                for r in exs[DISPATCH].recv_rows}
    with pytest.raises(ValueError, match=r"layer 0 dispatch: piece q is \(2, 4, 8, 3\)"):
        deliver(exs[DISPATCH], 0, sent, landings)


def test_routes_past_max_runs_are_gathered_and_scattered(monkeypatch):
    """No route of the suite's plans has that many runs, so the index-op path is forced."""
    import fxdisagg.landing as landing
    monkeypatch.setattr(landing, "MAX_RUNS", 0)
    plan, layout = Plan.build(29, 3, 2), RankLayout(3, 2)
    assert all(landing._puts(ex, r.src)[0].runs is None
               for ex in _exchanges(plan, layout).values() for r in ex.routes if ex.sends(r.src))
    for phase in PHASES:
        exs = _exchanges(plan, layout)
        sent = _sent(exs, plan, layout, phase)
        placed, delivered = _placed(exs[phase], sent), _delivered(exs[phase], sent)
        for rank, tensors in placed.items():
            assert all(torch.equal(a, b) for a, b in zip(tensors, delivered[rank]))
