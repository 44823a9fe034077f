"""The exchange schedule on its own: routing as data, the bytes it predicts, and the copies
its transports make (one packing copy on the send side, none on the receive side where the
bytes already lie in the kernel's layout)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fxdisagg.plan import Plan
from fxdisagg.runtime.layout import RankLayout
from fxdisagg.pieces import KEY, QUERY, LayerPieces, PieceSpec, decode_pieces, encode_pieces
from fxdisagg.schedule import DISPATCH, RETURN, build_exchanges

B, HQ, HKV, D, DV = 2, 4, 2, 16, 8
aten = torch.ops.aten


def _layer(dv=DV) -> LayerPieces:
    query = (PieceSpec("q", torch.float32, (B, HQ, None, D), QUERY, 0),
             PieceSpec("q_pos", torch.int64, (None,), QUERY))
    key = (PieceSpec("k", torch.float32, (B, HKV, None, D), KEY, 0),
           PieceSpec("v", torch.float32, (B, HKV, None, dv), KEY, 0),
           PieceSpec("k_pos", torch.int64, (None,), KEY),
           PieceSpec("k_valid", torch.bool, (B, None), KEY, 0))
    reply = (PieceSpec("out", torch.float32, (B, HQ, None, dv), QUERY, 0),
             PieceSpec("lse", torch.float32, (B, HQ, None), QUERY, 0))
    return LayerPieces(0, query, key, reply, arity=0)


def _comp_tensors(plan, c, dv=DV):
    """CompNode c's local tensors: every value encodes its token, so placement is checkable."""
    t = plan.comp_tokens[c].double()
    n = len(t)
    q = t.view(1, 1, n, 1).expand(B, HQ, n, D).float().contiguous()
    k = (t + 0.5).view(1, 1, n, 1).expand(B, HKV, n, D).float().contiguous()
    v = (t + 0.25).view(1, 1, n, 1).expand(B, HKV, n, dv).float().contiguous()
    valid = (plan.comp_tokens[c] % 3 != 0).expand(B, n).contiguous()
    return [q, plan.comp_tokens[c].clone(), k, v, plan.comp_tokens[c].clone(), valid]


def _exchange(plan, layout, phase, sent_by_rank):
    ex = build_exchanges(plan, layout, _with_arity(plan))[phase]
    chunks_to = {}
    for rank, tensors in sent_by_rank.items():
        buf, dsts, sizes = ex.pack(rank, tensors)
        for d, chunk in zip(dsts, buf.split(sizes)):
            chunks_to.setdefault(d, {})[rank] = chunk
    return ex, {r: ex.place(r, [got[s] for s in sorted(got)]) for r, got in chunks_to.items()}


def _with_arity(plan):
    import dataclasses
    return dataclasses.replace(_layer(), arity=plan.beta)


def test_piece_specs_round_trip_through_their_text():
    specs = _layer().dispatch
    assert decode_pieces(encode_pieces(specs)) == specs
    assert specs[0].encode() == "q:float32[b2,4,*,16]@query"


@pytest.mark.parametrize("n, alpha, beta", [(29, 3, 2), (7, 1, 1), (2, 2, 4), (16, 2, 2)])
def test_dispatch_builds_sorted_tiles_and_return_stacks_partials(n, alpha, beta):
    plan, layout = Plan.build(n, alpha, beta), RankLayout(alpha, beta)
    active = [c for c in range(alpha) if len(plan.comp_tokens[c])]
    ex, tiles = _exchange(plan, layout, DISPATCH,
                          {layout.comp_rank(c): _comp_tensors(plan, c) for c in active})
    for i in range(beta):
        for j in range(beta):
            q, q_pos, k, v, k_pos, valid = tiles[layout.attn_rank(i, j)]
            assert torch.equal(q_pos, plan.shard_tokens[i]) and torch.equal(k_pos, plan.shard_tokens[j])
            assert torch.equal(q[0, 0, :, 0], plan.shard_tokens[i].float())
            assert torch.equal(v[1, 1, :, -1], plan.shard_tokens[j].float() + 0.25)
            assert v.shape == (B, HKV, len(plan.shard_tokens[j]), DV)
            assert torch.equal(valid[1], plan.shard_tokens[j] % 3 != 0)
    # return: AttnNode (i, j) sends out/lse of its query rows; CompNode c stacks slot j
    replies = {}
    for i in range(beta):
        for j in range(beta):
            toks = plan.shard_tokens[i].float()
            m = len(toks)
            out = (toks * 10 + j).view(1, 1, m, 1).expand(B, HQ, m, DV).contiguous()
            replies[layout.attn_rank(i, j)] = [out, (toks + 100 * j).view(1, 1, m).expand(B, HQ, m).contiguous()]
    ret, got = _exchange(plan, layout, RETURN, replies)
    assert ret.merge_arity == beta
    for c in active:
        outs, lses = got[layout.comp_rank(c)]
        toks = plan.comp_tokens[c].float()
        assert outs.shape == (beta, B, HQ, len(toks), DV) and lses.shape == (beta, B, HQ, len(toks))
        for j in range(beta):
            assert torch.equal(outs[j, 1, 2, :, 0], toks * 10 + j)
            assert torch.equal(lses[j, 0, 3], toks + 100 * j)


def test_reply_buffers_take_the_head_dim_from_v():
    """Dv != D: the return carries Dv columns (it used to take D from q)."""
    plan, layout = Plan.build(9, 1, 2), RankLayout(1, 2)
    ret = build_exchanges(plan, layout, _with_arity(plan))[RETURN]
    assert ret.recv_pieces[0].shape == (2, B, HQ, None, DV)
    assert ret.bytes() == 2 * 9 * B * HQ * (DV * 4 + 4)


def test_bytes_are_what_the_transport_packs():
    plan, layout = Plan.build(29, 3, 2), RankLayout(3, 2)
    ex = build_exchanges(plan, layout, _with_arity(plan))[DISPATCH]
    packed = sum(ex.pack(layout.comp_rank(c), _comp_tensors(plan, c))[0].numel() for c in range(3))
    assert packed == ex.bytes()
    # every q row goes to beta AttnNodes, every k/v row too; bool pieces are padded to 8 bytes
    exact = 2 * 29 * (B * HQ * D * 4 + 8 + B * HKV * (D + DV) * 4 + 8 + B)
    assert exact < ex.bytes() <= exact + 8 * len(ex.routes)


class _CopyCounter(TorchDispatchMode):
    """Bytes written by data-moving ops (views and allocations are free)."""

    MOVES = {aten.index_select.default, aten.index_select.out, aten.copy_.default, aten.cat.default,
             aten.clone.default, aten.index_copy_.default, aten.index.Tensor, aten._to_copy.default}

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.MOVES:
            t = args[3] if func is aten.index_copy_.default else out   # in place: the source
            t = t if isinstance(t, torch.Tensor) else t[0]
            self.bytes += t.numel() * t.element_size()
        return out


@pytest.mark.parametrize("alpha", [1, 2])
def test_one_packing_copy_and_no_receive_copy_beyond_the_tile(alpha):
    """Per layer and direction: each sent byte copied once, into the send buffer; received
    pieces are views of the receive buffer when one CompNode fills the tile (alpha == 1),
    else placed once into the sorted tile the kernel reads."""
    plan, layout = Plan.build(64, alpha, 2), RankLayout(alpha, 2)
    ex = build_exchanges(plan, layout, _with_arity(plan))[DISPATCH]
    sent = {layout.comp_rank(c): _comp_tensors(plan, c) for c in range(alpha)}
    with _CopyCounter() as send_side:
        packed = {r: ex.pack(r, t) for r, t in sent.items()}
    payload = sum(r.n_rows[p.side] * p.row_bytes() for r in ex.routes for p in ex.send_pieces)
    assert send_side.bytes == payload
    rank = layout.attn_rank(1, 0)
    chunks = []
    for src in sorted(packed):
        buf, dsts, sizes = packed[src]
        chunks.append(buf.split(sizes)[dsts.index(rank)])
    with _CopyCounter() as recv_side:
        tile = ex.place(rank, chunks)
    tile_bytes = sum(t.numel() * t.element_size() for t in tile)
    assert recv_side.bytes == (0 if alpha == 1 else tile_bytes)


def test_kept_views_follow_the_bytes_call_after_call():
    """An exchange keeps the views it packs into and places from (a transport reuses its
    buffers every call): new contents in the same buffer are read, and a new buffer (a
    grown segment, a fresh receive) gets new views, never stale ones."""
    plan, layout = Plan.build(40, 1, 2), RankLayout(1, 2)
    ex = build_exchanges(plan, layout, _with_arity(plan))[DISPATCH]
    comp, attn = layout.comp_rank(0), layout.attn_rank(0, 1)
    send = torch.empty(ex.send_bytes(comp), dtype=torch.uint8)
    for call, shift in enumerate((0, 1000, 2000)):
        tensors = [t + shift if t.dtype != torch.bool else t for t in _comp_tensors(plan, 0)]
        if call == 2:
            send = torch.empty(ex.send_bytes(comp), dtype=torch.uint8)   # a grown segment
        buf, dsts, sizes = ex.pack(comp, tensors, out=send)
        assert buf.data_ptr() == send.data_ptr()
        chunk = buf.split(sizes)[dsts.index(attn)]
        q, q_pos, k, v, k_pos, valid = ex.place(attn, [chunk])
        assert q.data_ptr() == chunk.data_ptr()                        # in place: a view
        shard = plan.shard_tokens[0]
        assert torch.equal(q_pos, shard + shift)
        assert torch.equal(q[0, 0, :, 0], (shard + shift).float())
        assert torch.equal(k[1, 1, :, 0], (plan.shard_tokens[1] + shift + 0.5).float())
