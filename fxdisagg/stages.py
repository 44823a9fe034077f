"""Staged programs: a CompNode program cut at its collectives, and meta["val"] made true.

`split_stages` turns a flat role program (CompNode or AttnNode) into a top-level graph that holds only the
placeholders, the collectives (nodes whose ``meta["fxdisagg.role"]`` is ``comm``) and one
``call_module`` per stage; stage s (``stage_s``, a GraphModule of its own) holds every
compute node with ``meta["fxdisagg.stage"] == s``. Between two stages is exactly where a
scheduler can interleave two micro-batches: while the AttnNodes work on one, the CompNode
runs the next stage of the other. The cut is deterministic (graph order), copies ``meta``,
and the block DAG (stages and collectives) is checked for cycles with networkx.

`propagate` re-runs fake-tensor propagation over a role program, descending into its
stages, with the program's own symbols: the CompNode's local token count (``tokens``), the
AttnNode's tile sizes (``q_tokens``, ``k_tokens``), the full length N for the prologue. It
overwrites every node's ``meta["val"]`` (what dumps print and later passes read) and is the
check that every stage of every role program re-traces. The exchanged pieces' specs are
read before it, off the partitioned graph's values, where the token dim is the symbol N.
"""

from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import (DimDynamic, ShapeEnv,
                                                   StatelessSymbolicContext)

from fxdisagg.errors import PassError
from fxdisagg.graph import lazy_graph_module
from fxdisagg.ir import OPS, ROLE, STAGE, VAL

TOP = "top"


def _block(n: fx.Node):
    """Where ``n`` goes: TOP (placeholders, collectives, output) or its stage number."""
    if n.op in ("placeholder", "output") or n.meta.get(ROLE) == "comm":
        return TOP
    if n.op == "get_attr":
        return None                           # copied into every stage that reads it
    return n.meta.get(STAGE, 0)


def split_stages(flat: fx.Graph, root: torch.nn.Module, class_name: str) -> fx.GraphModule:
    """The staged program (see the module docstring) of the flat CompNode graph ``flat``,
    whose ``get_attr`` nodes read ``root``; ``flat`` is left unchanged."""
    nodes = list(flat.nodes)
    block = {n: _block(n) for n in nodes}
    members: dict[int, list[fx.Node]] = {}
    for n in nodes:
        if isinstance(block[n], int):
            members.setdefault(block[n], []).append(n)
    live_in, live_out = _liveness(nodes, block, members)
    order = _block_order(nodes, block, members)

    stages, built = torch.nn.Module(), {}
    top = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for b in order:
        if isinstance(b, fx.Node):
            env[b] = top.node_copy(b, lambda a: env[a])
            continue
        name = f"stage_{b}"
        setattr(stages, name, torch.nn.Module())    # the real stage is attached below
        built[name] = _stage_module(root, b, members[b], live_in[b], live_out[b])
        call = top.call_module(name, tuple(env[a] for a in live_in[b]))
        call.meta[STAGE] = b
        for k, out in enumerate(live_out[b]):
            env[out] = top.call_function(operator.getitem, (call, k))
            env[out].name = top._graph_namespace.create_name(out.name, None)
            env[out].meta.update(out.meta)
    program = lazy_graph_module(stages, top, class_name=class_name)
    for name, stage in built.items():    # after: building the top would compile them again
        setattr(program, name, stage)
    return program


def _liveness(nodes, block, members):
    """Per stage: values it reads from outside (graph order) and values read outside it."""
    live_in: dict[int, dict] = {s: {} for s in members}
    live_out: dict[int, dict] = {s: {} for s in members}
    for n in nodes:
        for a in n.all_input_nodes:
            if block[a] is None or block[a] == block[n]:
                continue
            if isinstance(block[n], int):
                live_in[block[n]][a] = None
            if isinstance(block[a], int):
                live_out[block[a]][a] = None
    return ({s: list(v) for s, v in live_in.items()}, {s: list(v) for s, v in live_out.items()})


def _block_order(nodes, block, members) -> list:
    """Top-level nodes and stages in a dependency order that keeps graph order where it can."""
    dag, first = nx.DiGraph(), {}
    key = {n: (block[n] if isinstance(block[n], int) else n) for n in nodes if block[n] is not None}
    for k, n in enumerate(nodes):
        if n in key:
            first.setdefault(key[n], k)
            dag.add_node(key[n])
            for a in n.all_input_nodes:
                if a in key and key[a] != key[n]:
                    dag.add_edge(key[a], key[n])
    if not nx.is_directed_acyclic_graph(dag):
        cycle = nx.find_cycle(dag)
        raise PassError(f"split_stages: the stages and collectives form a cycle {cycle}; "
                        f"a stage would need a value computed after its own exchange")
    return list(nx.lexicographical_topological_sort(dag, key=lambda b: first[b]))


def _stage_module(root, s: int, members, inputs, outputs) -> fx.GraphModule:
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for a in inputs:
        env[a] = g.placeholder(a.name)
        env[a].meta.update(a.meta)

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:                      # a get_attr: each stage reads its own
            env[a] = g.node_copy(a)
        return env[a]

    for n in members:
        env[n] = g.node_copy(n, arg)
    g.output(tuple(env[o] for o in outputs))
    return lazy_graph_module(root, g, class_name=f"Stage{s}")


# -- meta["val"] with the program's own symbols -------------------------------------------------
class _Propagator(fx.Interpreter):
    """Fake-tensor propagation that records meta["val"] and descends into stages.

    Memoised per stage: a stage whose graph has the same structure as one already
    propagated (same ops, same wiring, same weight shapes) and that gets inputs of the same
    metadata has the same values, so they are shared instead of recomputed. A stage whose
    sizes depend on data (unbacked symbols: nonzero, MoE routing) is always propagated.
    The middle stages of a transformer are all alike: a 32-layer model propagates 3
    distinct stages, not 33 (fake propagation with symbolic shapes costs ~0.5 ms a node)."""

    def __init__(self, module, mode: FakeTensorMode, memo: dict | None = None):
        super().__init__(module)
        self.mode = mode
        self.memo = {} if memo is None else memo
        self.shared: dict = {}          # comm ops' values (`call_function`)

    def call_function(self, target, args, kwargs):
        """Comm ops share their values (``shared``): a role program's exchanges and
        caches receive the same pieces layer after layer, and their fakes (symbolic
        shapes: ~0.5 ms a tensor; the handle ~0.8 ms a call, for hashing what it sends)
        were ~500 of a 32-layer lowering's tensors (benchmarks/passes.py). Values are
        metadata here, so nodes with equal received or cached pieces share theirs; the
        ops' own fakes stay fresh for tracers that track tensors by identity."""
        key = None if kwargs else _comm_key(target, args)
        if key is None:
            return super().call_function(target, args, kwargs)
        if key not in self.shared:
            self.shared[key] = super().call_function(target, args, kwargs)
        out = self.shared[key]
        return list(out) if isinstance(out, list) else out

    def run_node(self, n):
        result = super().run_node(n)
        if n.op == "get_attr" and isinstance(result, torch.Tensor):
            result = self.mode.from_tensor(result, static_shapes=True)  # a weight: metadata only
        n.meta[VAL] = result
        return result

    def call_module(self, target, args, kwargs):
        sub = self.fetch_attr(target)
        key = (_structure(sub), tuple(_metadata(a) for a in args))
        if key in self.memo:
            twin = self.memo[key]
            for n, t in zip(sub.graph.nodes, twin.graph.nodes):
                if "val" in t.meta:
                    n.meta[VAL] = t.meta[VAL]
            return twin.graph.output_node().meta["fxdisagg.outputs"]
        env = self.mode.shape_env
        unbacked = env.unbacked_symint_counter
        out = _Propagator(sub, self.mode, self.memo).run(*args, **kwargs)
        if env.unbacked_symint_counter == unbacked:   # data-dependent sizes are never shared
            sub.graph.output_node().meta["fxdisagg.outputs"] = out
            self.memo[key] = sub
        return out


def _comm_key(target, args):
    """What a comm op's value depends on (the handle: nothing; a received tile: its pieces
    and row counts; a KV cache: its pieces, window and keys), or None for other ops."""
    if target is OPS.exchange_start:
        return ("handle",)
    if target is OPS.exchange_wait:
        _, rows, _, _, pieces = args
        return ("wait", pieces, tuple(_size(r.shape[0]) for r in rows))
    if target is OPS.kv_cache:
        keys, _, _, window, pieces = args
        return ("kv", pieces, window, tuple(_metadata(k) for k in keys))
    return None


def _structure(gm: fx.GraphModule) -> tuple:
    """The wiring of a graph with weights reduced to their shapes."""
    index = {n: k for k, n in enumerate(gm.graph.nodes)}
    tensors = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    out = []
    for n in gm.graph.nodes:
        what = n.target
        if n.op == "get_attr":
            t = tensors.get(n.target)
            what = ("attr", (tuple(t.shape), t.dtype) if t is not None else n.target)
        elif n.op == "placeholder":
            what = "input"
        args = fx.node.map_arg((n.args, n.kwargs), lambda a: ("node", index[a]))
        out.append((n.op, what, repr(args)))
    return tuple(out)


def _metadata(v) -> object:
    if isinstance(v, torch.Tensor):
        return ("t", tuple(map(_size, v.shape)), tuple(map(_size, v.stride())), v.dtype)
    return ("v", _size(v))


def _size(s):
    """A size as a hashable value: the sympy expression of a SymInt (no printing)."""
    return s.node.expr if isinstance(s, torch.SymInt) else s


def _symbolic(mode: FakeTensorMode, t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    ctx = StatelessSymbolicContext(dynamic_sizes=[
        DimDynamic.DYNAMIC if d in dims else DimDynamic.STATIC for d in range(t.dim())])
    return mode.from_tensor(t, symbolic_context=ctx)


def program_inputs(program: fx.GraphModule, captured: fx.GraphModule | None,
                   mode: FakeTensorMode) -> list[torch.Tensor]:
    """Fake inputs of a role program: captured inputs with a symbolic N (dim 1), and
    ``tokens`` / ``q_tokens`` / ``k_tokens`` with their own symbolic length."""
    shapes = {}
    if captured is not None:
        for ph in captured.graph.find_nodes(op="placeholder"):
            v = ph.meta[VAL]
            shapes[ph.target] = (v.dtype, [7 if isinstance(s, torch.SymInt) else int(s) for s in v.shape])
    out = []
    for k, ph in enumerate(program.graph.find_nodes(op="placeholder")):
        if ph.target in shapes:
            dtype, shape = shapes[ph.target]
            out.append(_symbolic(mode, torch.zeros(shape, dtype=dtype), (1,)))
        else:                                 # a token index set: its own length symbol
            out.append(_symbolic(mode, torch.arange(3 + k, dtype=torch.int64), (0,)))
    return out


def propagate(program: fx.GraphModule, captured: fx.GraphModule | None = None) -> fx.GraphModule:
    """Overwrite meta["val"] of every node of ``program`` and its stages (see module doc)."""
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    args = program_inputs(program, captured, mode)       # real examples -> symbolic fakes
    with mode:
        _Propagator(program, mode).run(*args)
    return program
