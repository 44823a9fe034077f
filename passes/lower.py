"""lower: cut the partitioned graph into role programs joined by split-phase collectives.

Requires: a partitioned graph (`partition`): every node has ``meta["fxdisagg.role"]`` and
``meta["fxdisagg.stage"]``; attentions are split (`split_attention`).
Guarantees: `RolePrograms`, each program a GraphModule readable with ``print_readable``
whose every node carries ``meta["val"]`` re-propagated with the program's own token
symbols (`fxdisagg.stages.propagate`):

- **CompNode program** ``(*inputs, tokens) -> frontier``, staged: submodules ``stage_0 ..
  stage_L`` hold the compute (stage s runs after s attention merges), and between them the
  top-level graph holds, per layer, the four collectives of the exchange schedule::

      h = fxdisagg.exchange_start([q, q_pos, ..., k, v, k_pos, ...], l, "dispatch")
      fxdisagg.exchange_wait(h, [], l, "dispatch", "")
      h = fxdisagg.exchange_start([], l, "return")
      outs, lses = fxdisagg.exchange_wait(h, [tokens], l, "return", "<stacked partials>")

  Stage 0 runs the replicated prologue over all N tokens and localises every
  token-indexed prologue value to the CompNode's ``tokens`` (``index_select``), so the
  sequence length symbol becomes the local token count ``tokens.size(0)``.
- **AttnNode program** ``(q_tokens, k_tokens) -> ()``, parameter-free, staged the same
  way: per layer ``exchange_wait`` (the tile: q-side rows of its query shard, k-side rows
  of its key shard, sized by the placeholders) -> ``kv_cache`` (the keys to attend: the
  tile, or in a decode step this AttnNode's KV cache with the tile appended) ->
  ``stage_l`` (``partial_attention``) -> ``exchange_start`` of the reply. The same program
  runs on every AttnNode, for prefill and decode alike; only the schedule differs.
- Prefill, chunked prefill and decode run the same CompNode program: a decode step passes
  the full-length inputs (kept by the CompNode) and the global indices of the new tokens
  as ``tokens``; its return delivers beta**2 partials instead of beta (the merge reads any
  arity; the stacked size in the op's text is prefill's, used only by fake propagation).
- **epilogue program** ``(*frontier gathered over all tokens) -> flat outputs``.

``RolePrograms.layers`` holds one `fxdisagg.pieces.LayerPieces` per attention: the routing
facts the runtime's `fxdisagg.schedule.Schedule` is built from; the comm ops carry the same
specs as text. Counts: ``lower.exchanges`` (layers), ``lower.stages``.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from fxdisagg import ir
from fxdisagg.errors import TokenLocalityError
from fxdisagg.graph import (describe_node, is_seq, lazy_graph_module, mentions_seq, seq_dims,
                            token_dims, val)
from fxdisagg.ir import OPS, ROLE, STAGE, args_of, make_node, schema_args
from fxdisagg.pipeline import PassContext, gc_paused
from fxdisagg.pieces import KEY, QUERY, LayerPieces, PieceSpec, encode_pieces
from fxdisagg.schedule import DISPATCH, RETURN
from fxdisagg.stages import propagate, split_stages

aten = torch.ops.aten
QUERY_NAMES = ("q", "q_pos", "q_doc")
KEY_NAMES = ("k", "v", "k_pos", "k_doc", "k_valid")
HEADED = ("q", "k", "v")          # [B, H, N, D]: tensor parallelism splits dim 1


@dataclasses.dataclass(frozen=True)
class FrontierValue:
    """A value the CompNode program returns: token-local (gathered along ``dim``) or
    replicated (every CompNode holds the same; taken from the first)."""

    name: str
    dim: int | None


@dataclasses.dataclass
class RolePrograms:
    comp: fx.GraphModule
    attn: fx.GraphModule
    epilogue: fx.GraphModule
    layers: tuple[LayerPieces, ...]
    frontier: tuple[FrontierValue, ...]
    comp_by_rank: tuple = ()       # tp > 1: the CompNode program of each TP rank (its weights)
    reductions: tuple = ()         # tp > 1: (layer, bytes per token) of each all-reduce

    def comp_for(self, t: int) -> fx.GraphModule:
        """The CompNode program of TP rank ``t`` (``comp`` without tensor parallelism)."""
        return self.comp_by_rank[t] if self.comp_by_rank else self.comp


@gc_paused()
def lower(gm: fx.GraphModule, ctx: PassContext) -> RolePrograms:
    partials = _partials_by_layer(gm)
    layers = tuple(_layer_pieces(ctx, l, ps) for l, ps in sorted(partials.items()))
    frontier_nodes = _frontier(gm)
    flat = _comp_program(gm, ctx, frontier_nodes, partials, {lp.layer: lp for lp in layers})
    comp = split_stages(flat, gm, class_name="CompNodeProgram")
    attn = _attn_program(partials, tuple(lp.all_heads(ctx.config.tp) for lp in layers))
    epilogue = _epilogue_program(gm, frontier_nodes)
    frontier = tuple(FrontierValue(n.name, _token_dim(n, ctx) if n.meta[ROLE] == "comp" else None)
                     for n in frontier_nodes)
    propagate(comp, gm)
    propagate(attn, gm)
    ctx.count("lower.exchanges", len(layers))
    ctx.count("lower.stages", len(list(comp.children())))
    return RolePrograms(comp, attn, epilogue, layers, frontier, reductions=_reductions(gm, ctx))


def _reductions(gm, ctx) -> tuple[tuple[int, int], ...]:
    """(layer, bytes per token) of every tensor-parallel all-reduce: one in stage s runs
    after layer s - 1's merge, the layer a transport counts its bytes under."""
    out = []
    for n in gm.graph.find_nodes(op="call_function", target=OPS.tp_all_reduce):
        v, (d,) = val(n), seq_dims(n, ctx.seq)
        per_token = v.numel() // v.shape[d] * v.element_size()
        out.append((n.meta[STAGE] - 1, int(per_token)))
    return tuple(out)


# -- analysis -----------------------------------------------------------------------------------
def _partials_by_layer(gm) -> dict[int, list[fx.Node]]:
    out: dict[int, list[fx.Node]] = {}
    for n in gm.graph.find_nodes(op="call_function", target=OPS.partial_attention):
        out.setdefault(n.meta[ir.LAYER], []).append(n)
    return out


def _unshard(x):
    return x.args[0] if ir.is_call(x, OPS.take_shard) else x


def _sides(p: fx.Node) -> tuple[dict, dict]:
    """(query side, key side) inputs of one layer's attention by name, before sharding."""
    a = args_of(p)
    q_side = {k: a[k] for k in QUERY_NAMES if a[k] is not None}
    k_side = {k: _unshard(a[k]) for k in KEY_NAMES if a[k] is not None}
    return q_side, k_side


def _layer_pieces(ctx, layer: int, partials: list[fx.Node]) -> LayerPieces:
    q_side, k_side = _sides(partials[0])

    def spec(name, node, side):
        dims = seq_dims(node, ctx.seq)
        if len(dims) != 1:
            raise TokenLocalityError(f"lower: {describe_node(node)} ({name} of attention {layer}) "
                                     f"has token dims {dims}; an exchanged tensor has exactly one")
        return PieceSpec.of(name, val(node), dims[0], side, 1 if name in HEADED else None)

    query = tuple(spec(k, n, QUERY) for k, n in q_side.items())
    key = tuple(spec(k, n, KEY) for k, n in k_side.items())
    q, v = val(q_side["q"]), val(k_side["v"])
    b, hq = int(q.shape[0]), int(q.shape[1])
    reply = (PieceSpec("out", q.dtype, (b, hq, None, int(v.shape[-1])), QUERY, 0, 1),
             PieceSpec("lse", torch.float32, (b, hq, None), QUERY, 0, 1))
    return LayerPieces(layer, query, key, reply, arity=len(partials))


def _frontier(gm) -> list[fx.Node]:
    """Non-epilogue values that the epilogue or the outputs read, in graph order."""
    needed = {}
    for n in gm.graph.nodes:
        if n.meta.get(ROLE) in ("epilogue", "output"):
            for a in n.all_input_nodes:
                if a.meta[ROLE] != "epilogue" and a.op != "get_attr":
                    needed[a] = None
    return [n for n in gm.graph.nodes if n in needed]


def _token_dim(n: fx.Node, ctx) -> int:
    dims = seq_dims(n, ctx.seq)
    if len(dims) != 1:
        raise TokenLocalityError(f"lower: output {describe_node(n)} has token dims {dims}; "
                                 f"fxdisagg gathers outputs along exactly one token dim")
    return dims[0]


# -- CompNode program (flat; `split_stages` cuts it) ---------------------------------------------
def _comp_program(gm, ctx: PassContext, frontier_nodes, partials, layers) -> fx.Graph:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    local: dict[fx.Node, fx.Node] = {}
    merged: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
    for ph in gm.graph.find_nodes(op="placeholder"):
        env[ph] = g.node_copy(ph)
    tokens = g.placeholder("tokens")
    n_local = make_node(g, aten.sym_size.int, (tokens, 0), val=None, created_by="lower",
                        name="n_local", stage=0)

    def localised(a: fx.Node) -> fx.Node:
        if isinstance(val(a), torch.SymInt):
            if is_seq(val(a), ctx.seq):
                return n_local
            if not mentions_seq(val(a), ctx.seq):
                return env[a]
            if a not in local:   # a size derived from the length (B*N*k): from the local one
                local[a] = g.node_copy(a, localised)
            return local[a]
        dims = seq_dims(a, ctx.seq)
        if not dims:
            if token_dims(a, ctx.seq):       # batch and tokens flattened into one dim
                if a not in local:
                    local[a] = _localised_rows(g, a, env[a], tokens, ctx)
                return local[a]
            return env[a]
        if len(dims) != 1:
            raise TokenLocalityError(f"lower: {describe_node(a)} has several token dims and is "
                                     f"read by a CompNode")
        if a not in local:
            local[a] = make_node(g, aten.index_select.default, (env[a], dims[0], tokens),
                                 val=None, created_by="lower", name=f"local_{a.name}", stage=0)
        return local[a]

    def remap(a: fx.Node) -> fx.Node:
        return localised(a) if a.meta[ROLE] == "prologue" else env[a]

    for node in gm.graph.nodes:
        role = node.meta.get(ROLE)
        if node.op == "placeholder" or role in ("attn", "epilogue", "output"):
            continue
        if node.target is OPS.expsum_merge:
            layer = node.meta[ir.LAYER]
            merged[node] = _exchange(g, node, partials[layer], layers[layer], remap, tokens)
        elif node.target is operator.getitem and node.args[0] in merged:
            env[node] = merged[node.args[0]][node.args[1]]    # (out, lse) of the merge
        elif role == "comp":
            env[node] = g.node_copy(node, remap)
        else:  # prologue, static: replicated as captured
            env[node] = g.node_copy(node, lambda a: env[a])
    g.output(tuple(remap(n) if n.meta[ROLE] == "comp" else env[n] for n in frontier_nodes))
    g.eliminate_dead_code()
    return g


def _localised_rows(g: fx.Graph, a: fx.Node, full: fx.Node, tokens: fx.Node, ctx) -> fx.Node:
    """A replicated ``[.., B*N, ..]`` value (batch and tokens flattened into one dim, as
    XGLM flattens its position ids to look up its positional table) cut to this CompNode's
    tokens: viewed as ``[.., B, N, ..]``, selected on N, flattened again. Only where the
    graph shows the flattening (a view of ``[.., B, N, ..]``): a ``[.., N, B, ..]``
    flattened has the same size and other rows."""
    dims, shape = token_dims(a, ctx.seq), val(a).shape
    d = dims[0]
    per_token = shape[d].node.expr / ctx.seq
    others = [s for k, s in enumerate(shape) if k != d]
    src = a.args[0] if a.target in (aten.view.default, aten.reshape.default,
                                    aten._unsafe_view.default) else None
    flattened = src is not None and seq_dims(src, ctx.seq) == [d + 1] \
        and val(src).dim() == len(shape) + 1 and val(src).shape[d] == per_token
    if len(dims) != 1 or not per_token.is_Integer or not flattened \
            or not all(isinstance(s, int) for s in others):
        raise TokenLocalityError(f"lower: {describe_node(a)} is read by a CompNode and has a "
                                 f"token dim fxdisagg cannot cut to the CompNode's tokens")
    made = dict(val=None, created_by="lower", stage=0)
    split = make_node(g, aten.view.default, (full, [*shape[:d], int(per_token), -1, *shape[d + 1:]]),
                      name=f"rows_{a.name}", **made)
    mine = make_node(g, aten.index_select.default, (split, d + 1, tokens), **made)
    return make_node(g, aten.reshape.default, (mine, [*shape[:d], -1, *shape[d + 1:]]),
                     name=f"local_{a.name}", **made)


def _exchange(g: fx.Graph, merge: fx.Node, partials, lp: LayerPieces, remap, tokens
              ) -> tuple[fx.Node, fx.Node]:
    """The four collectives of one layer on a CompNode, then the merge of its partials:
    (out, lse). A merge of one partial (beta == 1) is that partial: read in place, no copy."""
    l, stage = lp.layer, merge.meta[STAGE]
    q_side, k_side = _sides(partials[0])
    send = [remap(x) for x in (*q_side.values(), *k_side.values())]
    comm = dict(val=None, created_by="lower", layer=l, role="comm")
    h = make_node(g, OPS.exchange_start, (send, l, DISPATCH), name=f"dispatch_start_{l}", **comm)
    make_node(g, OPS.exchange_wait, (h, [], l, DISPATCH, ""), name=f"dispatch_wait_{l}", **comm)
    h = make_node(g, OPS.exchange_start, ([], l, RETURN), name=f"return_start_{l}", **comm)
    got = make_node(g, OPS.exchange_wait, (h, [tokens], l, RETURN, encode_pieces(lp.stacked)),
                    name=f"return_wait_{l}", **comm)
    outs = make_node(g, operator.getitem, (got, 0), name=f"partial_outs_{l}", **comm)
    lses = make_node(g, operator.getitem, (got, 1), name=f"partial_lses_{l}", **comm)
    if lp.arity == 1:
        pair = tuple(make_node(g, aten.select.int, (x, 0, 0), val=None, created_by="lower",
                               like=merge, name=f"{what}_{l}")
                     for x, what in ((outs, "attention_out"), (lses, "attention_lse")))
    else:
        merged = make_node(g, OPS.expsum_merge, (outs, lses, args_of(merge)["backend"]), val=None,
                           created_by="lower", like=merge, name=f"expsum_merge_{l}")
        pair = tuple(make_node(g, operator.getitem, (merged, k), val=None, created_by="lower",
                               like=merge, name=f"{what}_{l}")
                     for k, what in ((0, "attention_out"), (1, "attention_lse")))
    for n in pair:
        n.meta[STAGE] = stage
    return pair


# -- AttnNode program ---------------------------------------------------------------------------
def _attn_program(partials, layers: tuple[LayerPieces, ...]) -> fx.GraphModule:
    """Collectives at the top level, the partial attention of layer l in ``stage_l``: the
    same shape as the CompNode program (and every layer's stage propagates once)."""
    g = fx.Graph()
    q_tokens, k_tokens = g.placeholder("q_tokens"), g.placeholder("k_tokens")
    for lp in layers:
        l, a = lp.layer, args_of(partials[lp.layer][0])
        comm = dict(val=None, created_by="lower", layer=l, role="comm")
        work = dict(val=None, created_by="lower", layer=l, role="attn", stage=l)
        h = make_node(g, OPS.exchange_start, ([], l, DISPATCH), name=f"dispatch_start_{l}", **comm)
        tile = make_node(g, OPS.exchange_wait, (h, [q_tokens, k_tokens], l, DISPATCH,
                                                encode_pieces(lp.dispatch)),
                         name=f"tile_{l}", **comm)
        t = {p.name: make_node(g, operator.getitem, (tile, k), name=f"{p.name}_{l}", **comm)
             for k, p in enumerate(lp.dispatch)}
        t.update(_cached_keys(g, t, lp, a["window"], comm))
        args = schema_args(OPS.partial_attention, **{k: t[k] for k in t},
                           **{k: a[k] for k in ("scale", "causal", "window", "window_ahead",
                                                "softcap", "alibi", "backend")})
        p = make_node(g, OPS.partial_attention, args, name=f"partial_attention_{l}", **work)
        out = make_node(g, operator.getitem, (p, 0), name=f"out_{l}", **work)
        lse = make_node(g, operator.getitem, (p, 1), name=f"lse_{l}", **work)
        h = make_node(g, OPS.exchange_start, ([out, lse], l, RETURN), name=f"return_start_{l}", **comm)
        make_node(g, OPS.exchange_wait, (h, [], l, RETURN, ""), name=f"return_wait_{l}", **comm)
    g.output(())
    return split_stages(g, torch.nn.Module(), class_name="AttnNodeProgram")


def _cached_keys(g: fx.Graph, tile: dict, lp: LayerPieces, window, comm: dict) -> dict:
    """The keys layer l's partial attention reads: ``fxdisagg::kv_cache`` of the tile's key
    side (the tile itself, or this AttnNode's KV cache in a decode step)."""
    l = lp.layer
    cached = make_node(g, OPS.kv_cache, ([tile[p.name] for p in lp.key], tile["q_pos"], l,
                                         window, encode_pieces(lp.key)),
                       name=f"cached_keys_{l}", **comm)
    return {p.name: make_node(g, operator.getitem, (cached, k), name=f"cached_{p.name}_{l}", **comm)
            for k, p in enumerate(lp.key)}


# -- epilogue ------------------------------------------------------------------------------------
def _epilogue_program(gm, frontier_nodes) -> fx.GraphModule:
    g = fx.Graph()
    env = {n: g.placeholder(n.name) for n in frontier_nodes}
    for node in gm.graph.nodes:
        if node.meta.get(ROLE) == "epilogue":
            env[node] = g.node_copy(node, lambda a: env[a])
        elif node.op == "get_attr" and any(u.meta.get(ROLE) == "epilogue" for u in node.users):
            env[node] = g.node_copy(node)
    out = gm.graph.output_node()
    g.output(fx.node.map_arg(out.args[0], lambda a: env[a]))
    return lazy_graph_module(gm, g, class_name="EpilogueProgram")
