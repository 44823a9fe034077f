"""split_attention: ``fxdisagg::attention`` -> beta partial attentions + one expsum-merge.

Requires: attentions with classified masks (`classify_masks`): ``mask is None``.
Guarantees: each attention became, in a graph that still runs in one process::

    k_j   = fxdisagg.take_shard(k, 2, j, beta, strategy)      # and v, k_pos, k_doc, k_valid
    o_j, lse_j = fxdisagg.partial_attention(q, k_j, v_j, q_pos, k_pos_j, ...)   j < beta
    o, lse = fxdisagg.expsum_merge(stack(o_*), stack(lse_*))

with explicit positions: an attention whose positions are the token index gets
``arange(N)``, computed once from a token-indexed input (a replicated prologue value, so a
CompNode localises it to its own tokens). Nodes carry ``meta["fxdisagg.layer"]``.
Note: ``meta["val"]`` of a shard node keeps the unsharded shape (shard sizes depend on N).
Counts: ``split_attention.layers``, ``split_attention.partials``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxdisagg import ops as _ops  # noqa: F401
from fxdisagg import kernels as _kernels  # noqa: F401  (registers fxdisagg::partial_attention)
from fxdisagg.errors import PassError
from fxdisagg.graph import describe_node, val
from fxdisagg.pipeline import PassContext

aten = torch.ops.aten
ATTENTION = torch.ops.fxdisagg.attention.default
TAKE_SHARD = torch.ops.fxdisagg.take_shard.default
PARTIAL = torch.ops.fxdisagg.partial_attention.default
MERGE = torch.ops.fxdisagg.expsum_merge.default


def split_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    token_index = None
    for layer, node in enumerate(gm.graph.find_nodes(op="call_function", target=ATTENTION)):
        q, k, v, mask, q_pos, k_pos, q_doc, k_doc, k_valid, scale, causal, window = node.args
        if mask is not None:
            raise PassError(f"split_attention: {describe_node(node)} still has a dense mask; "
                            f"run classify_masks first")
        if q_pos is None:
            token_index = token_index or _token_index(gm, ctx)
            q_pos = k_pos = token_index
        with gm.graph.inserting_before(node):
            merged = _split_one(gm.graph, ctx, layer, q, k, v, q_pos, k_pos, q_doc, k_doc,
                                k_valid, scale, causal, window)
        node.replace_all_uses_with(merged)
        gm.graph.erase_node(node)
        ctx.count("split_attention.layers")
    return gm


def _token_index(gm: fx.GraphModule, ctx: PassContext) -> fx.Node:
    """``arange(N)`` from the first token-indexed input, placed after the placeholders."""
    phs = list(gm.graph.find_nodes(op="placeholder"))
    src = phs[0]
    with gm.graph.inserting_after(phs[-1]):
        n = gm.graph.call_function(aten.sym_size.int, (src, 1))
        n.meta["val"] = val(src).shape[1]
    with gm.graph.inserting_after(n):
        idx = gm.graph.call_function(aten.arange.default, (n,), {"device": val(src).device})
        idx.meta["val"] = val(src).new_empty((val(src).shape[1],), dtype=torch.int64)
    for x in (n, idx):
        x.meta["fxdisagg.created_by"] = "split_attention"
    idx.name = "token_index"
    return idx


def _split_one(g: fx.Graph, ctx, layer, q, k, v, q_pos, k_pos, q_doc, k_doc, k_valid,
               scale, causal, window) -> fx.Node:
    def call(target, args, like, name=None):
        n = g.call_function(target, args)
        n.meta["val"] = like
        n.meta["fxdisagg.layer"] = layer
        n.meta["fxdisagg.created_by"] = "split_attention"
        return n

    def shard(x, j):
        if x is None:
            return None
        dim = 2 if val(x).dim() == 4 else val(x).dim() - 1
        return call(TAKE_SHARD, (x, dim, j, ctx.beta, ctx.strategy), val(x))

    qv = val(q)
    out_like = qv.new_empty(qv.shape[:-1] + (val(v).shape[-1],))
    lse_like = qv.new_empty(qv.shape[:-1], dtype=torch.float32)
    outs, lses = [], []
    for j in range(ctx.beta):
        args = (q, shard(k, j), shard(v, j), q_pos, shard(k_pos, j), q_doc, shard(k_doc, j),
                shard(k_valid, j), float(scale), bool(causal), window, ctx.kernel)
        p = call(PARTIAL, args, (out_like, lse_like))
        outs.append(call(operator.getitem, (p, 0), out_like))
        lses.append(call(operator.getitem, (p, 1), lse_like))
        ctx.count("split_attention.partials")
    stacked_o = call(aten.stack.default, (outs, 0), out_like.new_empty((ctx.beta, *out_like.shape)))
    stacked_l = call(aten.stack.default, (lses, 0), lse_like.new_empty((ctx.beta, *lse_like.shape)))
    merged = call(MERGE, (stacked_o, stacked_l, ctx.kernel), (out_like, lse_like))
    return call(operator.getitem, (merged, 0), out_like)
