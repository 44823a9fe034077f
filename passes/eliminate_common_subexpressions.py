"""eliminate_common_subexpressions: a pure op applied twice to the same inputs runs once.

Requires: a functional ATen graph (as captured, or after any pass).
Guarantees: no two pure nodes with the same target and the same arguments; the first
in graph order stays, with its meta, and takes the other's users. Pure means an ATen or
prims op whose schema mutates nothing and that draws no random numbers, or
``operator.getitem``; fxdisagg's own ops, placeholders and ``get_attr`` are never merged.
Counts: ``eliminate_common_subexpressions.merged`` (one per node removed).

Why: HF recomputes what every layer shares inside every layer. A Llama applies
``cos.unsqueeze(1)`` and ``sin.unsqueeze(1)`` per layer; they depend only on the prologue,
so they land in the CompNode's first stage, where each is re-propagated with symbolic
shapes (~1 ms a node, `lower`) and run on every call: 62 of that stage's 195 nodes on a
32-layer Llama, merged into 2. (The per-layer squeezes of one mask feature, 62 more with
their localising copies, `classify_masks` now makes once.)

Scalars are keyed with their type: ``mul(x, 1)`` and ``mul(x, 1.0)`` are different nodes
(Python's ``1 == 1.0 == True`` would merge them and change the result dtype).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxdisagg.pipeline import PassContext

_PURE_NAMESPACES = ("aten", "prims")


def eliminate_common_subexpressions(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    first: dict[tuple, fx.Node] = {}
    for node in list(gm.graph.nodes):
        if not _pure(node):
            continue
        key = _key(node)
        if key is None:
            continue
        if key not in first:
            first[key] = node
            continue
        node.replace_all_uses_with(first[key])   # later nodes now key on the survivor
        gm.graph.erase_node(node)
        ctx.count("eliminate_common_subexpressions.merged")
    return gm


def _pure(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    t = node.target
    if t is operator.getitem:
        return True
    return (isinstance(t, torch._ops.OpOverload) and t.namespace in _PURE_NAMESPACES
            and not t._schema.is_mutable and torch.Tag.nondeterministic_seeded not in t.tags)


def _key(node: fx.Node) -> tuple | None:
    """(target, args, kwargs) as a hashable value, or None where an argument is not."""
    key = (node.target, _hashable(node.args), _hashable(node.kwargs))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _hashable(v):
    if isinstance(v, fx.Node):
        return v
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, *map(_hashable, v))
    if isinstance(v, dict):
        return ("dict", *((k, _hashable(x)) for k, x in v.items()))
    return (type(v), v)
