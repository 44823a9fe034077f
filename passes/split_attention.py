"""split_attention: ``fxdisagg::attention`` -> beta partial attentions + one expsum-merge.

Requires: attentions with classified masks (`classify_masks`): ``mask is None``.
Guarantees: each attention became, in a graph that still runs in one process::

    k_j   = fxdisagg.take_shard(k, 2, j, beta, strategy)      # and v, k_pos, k_doc, k_valid
    o_j, lse_j = fxdisagg.partial_attention(q, k_j, v_j, q_pos, k_pos_j, ...)   j < beta
    o, lse = fxdisagg.expsum_merge(stack(o_*), stack(lse_*))

with explicit positions: an attention whose positions are the token index gets
``arange(N)``, computed once from a token-indexed input (a replicated prologue value, so a
CompNode localises it to its own tokens). The nodes of attention l (shards, partials,
stacks, merge) carry ``ir.LAYER = l``; every created node carries ``ir.CREATED_BY``.
fxdisagg ops are built by schema name; their arguments are positional, in schema order.
Note: ``meta["val"]`` of a shard node keeps the unsharded shape (shard sizes depend on N).
Counts: ``split_attention.layers``, ``split_attention.partials``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxdisagg.errors import PassError
from fxdisagg.graph import describe_node, empty_val, val
from fxdisagg.ir import OPS, args_of, make_node, set_args
from fxdisagg.pipeline import PassContext

aten = torch.ops.aten


def split_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    token_index = None
    for layer, node in enumerate(gm.graph.find_nodes(op="call_function", target=OPS.attention)):
        a = args_of(node)
        if a["mask"] is not None:
            raise PassError(f"split_attention: {describe_node(node)} still has a dense mask; "
                            f"run classify_masks first")
        if a["q_pos"] is None:
            token_index = token_index or _token_index(gm, ctx)
            a["q_pos"] = a["k_pos"] = token_index
        with gm.graph.inserting_before(node):
            merged = _Builder(gm.graph, ctx, layer).split(a)
        node.replace_all_uses_with(merged)
        gm.graph.erase_node(node)
        ctx.count("split_attention.layers")
    return gm


def _token_index(gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    """``arange(N)`` from the first token-indexed input, placed after the placeholders."""
    g = gm.graph
    phs = list(g.find_nodes(op="placeholder"))
    src = phs[0]
    with g.inserting_after(phs[-1]):
        n = make_node(g, aten.sym_size.int, (src, 1), val=val(src).shape[1],
                      created_by="split_attention")
    with g.inserting_after(n):
        return make_node(g, aten.arange.default, (n,), {"device": val(src).device},
                         val=empty_val(val(src), (val(src).shape[1],), torch.int64),
                         created_by="split_attention", name="token_index")


class _Builder:
    """Creates the nodes of one layer's split, each with its val, layer and provenance."""

    def __init__(self, g: fx.Graph, ctx: PassContext, layer: int):
        self.g, self.ctx, self.layer = g, ctx, layer

    def call(self, target, args, value) -> fx.Node:
        return make_node(self.g, target, args, val=value, created_by="split_attention",
                         layer=self.layer)

    def op(self, target, value, /, **named) -> fx.Node:
        """An fxdisagg op by schema name (its positional arguments in schema order)."""
        n = self.call(target, (), value)
        set_args(n, **named)
        return n

    def shard(self, x, j):
        if x is None:
            return None
        dim = 2 if val(x).dim() == 4 else val(x).dim() - 1
        return self.op(OPS.take_shard, val(x), x=x, dim=dim, shard=j,
                       nshards=self.ctx.beta, strategy=self.ctx.strategy)

    def partial(self, a: dict, j: int, value) -> fx.Node:
        return self.op(OPS.partial_attention, value, q=a["q"], k=self.shard(a["k"], j),
                       v=self.shard(a["v"], j), q_pos=a["q_pos"], k_pos=self.shard(a["k_pos"], j),
                       q_doc=a["q_doc"], k_doc=self.shard(a["k_doc"], j),
                       k_valid=self.shard(a["k_valid"], j), scale=float(a["scale"]),
                       causal=bool(a["causal"]), window=a["window"],
                       window_ahead=a["window_ahead"], softcap=a["softcap"], alibi=a["alibi"],
                       backend=self.ctx.kernel)

    def split(self, a: dict) -> fx.Node:
        """beta partials over key shards, stacked and merged: the attention's output."""
        qv, beta = val(a["q"]), self.ctx.beta
        out_like = empty_val(qv, qv.shape[:-1] + (val(a["v"]).shape[-1],))
        lse_like = empty_val(qv, qv.shape[:-1], torch.float32)
        outs, lses = [], []
        for j in range(beta):
            p = self.partial(a, j, (out_like, lse_like))
            outs.append(self.call(operator.getitem, (p, 0), out_like))
            lses.append(self.call(operator.getitem, (p, 1), lse_like))
            self.ctx.count("split_attention.partials")
        stacked_o = self.call(aten.stack.default, (outs, 0),
                              empty_val(out_like, (beta, *out_like.shape)))  # [beta, B, H, M, D]
        stacked_l = self.call(aten.stack.default, (lses, 0),
                              empty_val(lse_like, (beta, *lse_like.shape)))  # [beta, B, H, M]
        merged = self.op(OPS.expsum_merge, (out_like, lse_like), outs=stacked_o, lses=stacked_l,
                         backend=self.ctx.kernel)
        return self.call(operator.getitem, (merged, 0), out_like)
