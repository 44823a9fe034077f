"""The one door to fxdisagg's IR: op handles, meta keys, typed argument views, node creation.

Every pass reads and writes graphs through this module, so that

- an op is named once (``OPS.partial_attention``, not ``torch.ops.fxdisagg...`` per file);
- a meta key is spelled once (``ROLE``, ``STAGE``...), with its meaning written here;
- arguments are read and rewritten by schema name (``args_of(node)["attn_bias"]``,
  ``set_args(node, mask=None)``), never by position: a schema's order is the op's business;
- a node is created with its ``meta["val"]``, its stage and its provenance in one call
  (`make_node`), so no pass leaves a node that later passes cannot read.

Meta keys (on ``node.meta``):

=========================  ===================================================================
``val``                    FakeTensor / SymInt / tuple: the example value; the token count is a
                           sympy symbol (the capture's N, or a program's local token count)
``fxdisagg.role``          who runs the node: prologue, static, comp, attn, epilogue, output
``fxdisagg.layer``         the attention a node belongs to (attention nodes, their shards and
                           partials, their merge); absent elsewhere
``fxdisagg.stage``         number of attention merges strictly upstream: the CompNode stage
                           that runs the node. q/k/v of attention l are in stage l; its merge,
                           O-projection and the MLP after it are in stage l + 1
``fxdisagg.created_by``    the pass that created the node (absent: captured)
=========================  ===================================================================
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.fx as fx

# importing registers the ops the handles name
from fxdisagg import ops as _ops  # noqa: F401
from fxdisagg import kernels as _kernels  # noqa: F401

aten = torch.ops.aten

VAL = "val"
ROLE = "fxdisagg.role"
LAYER = "fxdisagg.layer"
STAGE = "fxdisagg.stage"
CREATED_BY = "fxdisagg.created_by"

OPS = types.SimpleNamespace(
    attention=torch.ops.fxdisagg.attention.default,
    take_shard=torch.ops.fxdisagg.take_shard.default,
    partial_attention=torch.ops.fxdisagg.partial_attention.default,
    expsum_merge=torch.ops.fxdisagg.expsum_merge.default,
    exchange_start=torch.ops.fxdisagg.exchange_start.default,
    exchange_wait=torch.ops.fxdisagg.exchange_wait.default,
    kv_cache=torch.ops.fxdisagg.kv_cache.default,
    tp_all_reduce=torch.ops.fxdisagg.tp_all_reduce.default,
)
COMM_OPS = (OPS.exchange_start, OPS.exchange_wait)


def _schema(node: fx.Node) -> torch.FunctionSchema:
    target = node.target
    schema = getattr(target, "_schema", None)
    if schema is None:
        raise TypeError(f"ir: node {node.name!r} calls {target}, which has no schema; "
                        f"typed argument views exist for torch ops only")
    return schema


def args_of(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in.

    ``args_of(sdpa)["attn_mask"]``, ``args_of(cudnn_sdpa)["attn_bias"]``: one spelling for
    every op, positional or keyword in the graph.
    """
    out = {}
    for i, a in enumerate(_schema(node).arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


def set_args(node: fx.Node, **changes) -> None:
    """Rewrite named arguments of ``node`` in place (positions follow the schema)."""
    schema = _schema(node)
    names = [a.name for a in schema.arguments]
    unknown = set(changes) - set(names)
    if unknown:
        raise TypeError(f"ir: {node.target} has no arguments {sorted(unknown)}; it takes {names}")
    merged = {**args_of(node), **changes}
    kwarg_only = {a.name for a in schema.arguments if a.kwarg_only}
    node.args = tuple(merged[n] for n in names if n not in kwarg_only)
    node.kwargs = {n: merged[n] for n in names if n in kwarg_only}


def schema_args(target, **named) -> tuple:
    """Positional arguments of ``target`` from its schema names; a required argument left
    out raises (an fxdisagg op built by name never gets a silent None)."""
    args = []
    for a in target._schema.arguments:
        if a.kwarg_only:
            continue
        if a.name in named:
            args.append(named.pop(a.name))
        elif a.has_default_value():
            args.append(a.default_value)
        elif a.type.kind() == "OptionalType":
            args.append(None)
        else:
            raise TypeError(f"ir: {target} needs argument {a.name!r}")
    if named:
        raise TypeError(f"ir: {target} has no arguments {sorted(named)}")
    return tuple(args)


def make_node(graph: fx.Graph, target, args: tuple, kwargs: dict | None = None, *,
              val: Any, created_by: str, name: str | None = None, like: fx.Node | None = None,
              **meta) -> fx.Node:
    """Create a call_function node with its example value and provenance.

    ``like``: a node whose stage, layer, role, stack trace and module stack the new node
    inherits (what a rewrite of ``like`` should look like in dumps and errors); ``meta``:
    more keys by their short names (``layer=2``, ``stage=1``, ``role="comp"``).
    """
    n = graph.call_function(target, tuple(args), kwargs or {})
    if like is not None:
        for key in (ROLE, LAYER, STAGE, "stack_trace", "nn_module_stack"):
            if key in like.meta:
                n.meta[key] = like.meta[key]
    n.meta[VAL] = val
    n.meta[CREATED_BY] = created_by
    for short, v in meta.items():
        if short not in _META_NAMES:
            raise TypeError(f"ir.make_node: unknown meta {short!r}; known: {sorted(_META_NAMES)}")
        n.meta[_META_NAMES[short]] = v
    if name:
        n.name = graph._graph_namespace.create_name(name, None)
    return n


_META_NAMES = {"role": ROLE, "layer": LAYER, "stage": STAGE}


def is_call(node, target) -> bool:
    """``node`` calls ``target`` (an op handle or a tuple of them)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if isinstance(target, (tuple, list, set, frozenset)):
        return node.target in target
    return node.target is target
