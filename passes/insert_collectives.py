"""insert_collectives: cut the labelled graph into role programs joined by collectives.

Requires: a partitioned graph (`partition`): every node has ``meta["fxdisagg.role"]``.
Produces `RolePrograms`, one GraphModule per role, readable with ``print_readable``:

- **CompNode program** ``(*inputs, tokens) -> frontier``. Runs the replicated prologue over
  all N tokens, localises every token-indexed prologue value it uses to its own ``tokens``
  (``index_select``; the sequence length symbol becomes ``n_local = tokens.size(0)``), runs
  its token-local work and, per layer, exactly one ``fxdisagg.dispatch`` (q, k, v and mask
  features out) and one ``fxdisagg.combine`` (beta partials of its own queries back),
  followed by the merge. It returns the frontier: the values the outputs need.
- **AttnNode program** ``() -> tickets``: per layer ``fxdisagg.receive`` ->
  ``fxdisagg.partial_attention`` -> ``fxdisagg.reply``. Parameter-free; the same program
  runs on every AttnNode: which tile it is comes from the transport.
- **epilogue program** ``(*frontier gathered over all tokens) -> flat outputs``: the ops
  after the last attention that pick or pool tokens, run where outputs are gathered.

The same programs and Plan serve the in-process and the distributed runtime.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from fxdisagg import ops as _ops  # noqa: F401
from fxdisagg.errors import TokenLocalityError
from fxdisagg.graph import describe_node, is_seq, seq_dims, val
from fxdisagg.pipeline import PassContext

aten = torch.ops.aten
TAKE_SHARD = torch.ops.fxdisagg.take_shard.default
PARTIAL = torch.ops.fxdisagg.partial_attention.default
MERGE = torch.ops.fxdisagg.expsum_merge.default
DISPATCH = torch.ops.fxdisagg.dispatch.default
COMBINE = torch.ops.fxdisagg.combine.default
RECEIVE = torch.ops.fxdisagg.receive.default
REPLY = torch.ops.fxdisagg.reply.default
ROLE = "fxdisagg.role"


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One attention layer as the AttnNode sees it."""

    layer: int
    has_doc: bool
    has_valid: bool
    scale: float
    causal: bool
    window: int | None
    backend: str
    q_heads: int
    kv_heads: int
    head_dim: int

    @property
    def n_query_side(self) -> int:
        return 2 + self.has_doc                  # q, q_pos, (q_doc)


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
    layers: list[LayerSpec]
    frontier: list[FrontierValue]


def insert_collectives(gm: fx.GraphModule, ctx: PassContext) -> RolePrograms:
    layers = _layer_specs(gm)
    frontier_nodes = _frontier(gm)
    comp = _comp_program(gm, ctx, frontier_nodes)
    attn = _attn_program(layers)
    epilogue = _epilogue_program(gm, frontier_nodes)
    frontier = [FrontierValue(n.name, _token_dim(n, ctx) if n.meta[ROLE] == "comp" else None)
                for n in frontier_nodes]
    ctx.count("insert_collectives.dispatch", len(layers))
    ctx.count("insert_collectives.combine", len(layers))
    return RolePrograms(comp, attn, epilogue, layers, frontier)


# -- analysis -----------------------------------------------------------------------------------
def _partials_by_layer(gm) -> dict[int, list[fx.Node]]:
    out: dict[int, list[fx.Node]] = {}
    for n in gm.graph.find_nodes(op="call_function", target=PARTIAL):
        out.setdefault(n.meta["fxdisagg.layer"], []).append(n)
    return out


def _unshard(x):
    return x.args[0] if isinstance(x, fx.Node) and x.target is TAKE_SHARD else x


def _sides(p: fx.Node):
    """(query side, key side) inputs of one layer's attention, before sharding."""
    q, k, v, q_pos, k_pos, q_doc, k_doc, k_valid = p.args[:8]
    q_side = [q, q_pos] + ([q_doc] if q_doc is not None else [])
    k_side = [_unshard(x) for x in (k, v, k_pos, k_doc, k_valid) if x is not None]
    return q_side, k_side


def _layer_specs(gm) -> list[LayerSpec]:
    specs = []
    for layer, ps in sorted(_partials_by_layer(gm).items()):
        p = ps[0]
        q, k = val(p.args[0]), val(p.args[1])
        specs.append(LayerSpec(layer, p.args[5] is not None, p.args[7] is not None, p.args[8],
                               p.args[9], p.args[10], p.args[11], int(q.shape[1]),
                               int(k.shape[1]), int(q.shape[3])))
    return specs


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
        raise TokenLocalityError(f"insert_collectives: output {describe_node(n)} has token dims "
                                 f"{dims}; fxdisagg gathers outputs along exactly one token dim")
    return dims[0]


# -- CompNode program ---------------------------------------------------------------------------
def _comp_program(gm, ctx: PassContext, frontier_nodes) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    local: dict[fx.Node, fx.Node] = {}
    for ph in gm.graph.find_nodes(op="placeholder"):
        env[ph] = g.node_copy(ph)
    tokens = g.placeholder("tokens")
    n_local = g.call_function(aten.sym_size.int, (tokens, 0))
    n_local.name = "n_local"

    def localised(a: fx.Node) -> fx.Node:
        if isinstance(val(a), torch.SymInt):
            if not is_seq(val(a), ctx.seq):
                raise TokenLocalityError(f"insert_collectives: {describe_node(a)} is a size derived "
                                         f"from the sequence length used by token-local work")
            return n_local
        dims = seq_dims(a, ctx.seq)
        if not dims:
            return env[a]
        if len(dims) != 1:
            raise TokenLocalityError(f"insert_collectives: {describe_node(a)} has several token dims "
                                     f"and is read by a CompNode")
        if a not in local:
            local[a] = g.call_function(aten.index_select.default, (env[a], dims[0], tokens))
            local[a].name = f"local_{a.name}"
            local[a].meta["val"] = val(a)  # in a CompNode program the symbol counts local tokens
        return local[a]

    def remap(a: fx.Node) -> fx.Node:
        return localised(a) if a.meta[ROLE] == "prologue" else env[a]

    partials = _partials_by_layer(gm)
    for node in gm.graph.nodes:
        role = node.meta.get(ROLE)
        if node.op == "placeholder" or role in ("attn", "epilogue", "output"):
            continue
        if node.target is MERGE:
            env[node] = _exchange(g, node, partials[node.meta["fxdisagg.layer"]], remap)
        elif role == "comp":
            env[node] = g.node_copy(node, remap)
        else:  # prologue, static: replicated as captured
            env[node] = g.node_copy(node, lambda a: env[a])
    g.output(tuple(remap(n) if n.meta[ROLE] == "comp" else env[n] for n in frontier_nodes))
    g.eliminate_dead_code()
    return fx.GraphModule(gm, g, class_name="CompNodeProgram")


def _exchange(g: fx.Graph, merge: fx.Node, partials: list[fx.Node], remap) -> fx.Node:
    layer = merge.meta["fxdisagg.layer"]
    q_side, k_side = _sides(partials[0])
    q_side, k_side = [remap(x) for x in q_side], [remap(x) for x in k_side]
    ticket = g.call_function(DISPATCH, (q_side, k_side, layer))
    ticket.name = f"dispatch_layer{layer}"
    comb = g.call_function(COMBINE, (ticket, q_side[0], k_side[1], len(partials), layer))
    comb.name = f"combine_layer{layer}"
    outs = g.call_function(operator.getitem, (comb, 0))
    lses = g.call_function(operator.getitem, (comb, 1))
    outs.name, lses.name = f"partial_outs_layer{layer}", f"partial_lses_layer{layer}"
    merged = g.call_function(MERGE, (outs, lses, merge.args[2]))
    merged.meta.update({k: v for k, v in merge.meta.items() if k != "val"})
    merged.name = f"expsum_merge_layer{layer}"
    return merged


# -- AttnNode program ---------------------------------------------------------------------------
def _attn_program(layers: list[LayerSpec]) -> fx.GraphModule:
    g = fx.Graph()
    tickets = []
    for s in layers:
        recv = g.call_function(RECEIVE, (s.layer,))
        recv.name = f"receive_layer{s.layer}"
        names = ["q", "q_pos"] + (["q_doc"] if s.has_doc else []) + ["k", "v", "k_pos"] \
            + (["k_doc"] if s.has_doc else []) + (["k_valid"] if s.has_valid else [])
        t = {}
        for i, name in enumerate(names):
            t[name] = g.call_function(operator.getitem, (recv, i))
            t[name].name = f"{name}_layer{s.layer}"
        p = g.call_function(PARTIAL, (t["q"], t["k"], t["v"], t["q_pos"], t["k_pos"], t.get("q_doc"),
                                      t.get("k_doc"), t.get("k_valid"), s.scale, s.causal, s.window,
                                      s.backend))
        p.name = f"partial_attention_layer{s.layer}"
        out = g.call_function(operator.getitem, (p, 0))
        lse = g.call_function(operator.getitem, (p, 1))
        r = g.call_function(REPLY, (out, lse, s.layer))
        r.name = f"reply_layer{s.layer}"
        tickets.append(r)
    g.output(tuple(tickets))
    return fx.GraphModule(torch.nn.Module(), g, class_name="AttnNodeProgram")


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
    return fx.GraphModule(gm, g, class_name="EpilogueProgram")
