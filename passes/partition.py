"""partition: label every node with the role that runs it, per layer, and check locality.

Requires: the split graph (`split_attention`).
Guarantees: every node has ``meta["fxdisagg.role"]``, one of

- ``prologue``  replicated on every CompNode over the *full* token range: token-indexed
                integer inputs and what is computed from them alone (positions, document ids,
                key validity) - O(B*N) integers, cheap to repeat;
- ``static``    replicated, no token dim (parameters, weight-only arithmetic);
- ``comp``      token-local work of a CompNode on its own tokens;
- ``attn``      the AttnNode side: key shards and partial attentions;
- ``epilogue``  ops after the last attention that pick or pool tokens (BERT's pooler on
                token 0, last-token logits): they run where the outputs are gathered;

and ``meta["fxdisagg.stage"]``: the number of attention merges strictly upstream, i.e. the
CompNode stage that runs the node (the q/k/v of attention l and its partials are in the
stage of their inputs; its merge, the O-projection and the MLP after it one stage later).
``meta["fxdisagg.layer"]`` stays what `split_attention` wrote: the attention a node
belongs to. A ``comp``
node that scans, reduces or mixes over a token dim raises `TokenLocalityError` naming the
node, the op and this pass. Common ops are judged by their dims here; an op those rules do
not clear (an op they do not know, a batched matmul over per-token expert weights) is
judged by DTensor's sharding rules (`fxdisagg.locality`), never by a growing list of op
names. What feeds an attention is one backward sweep: a linted FX graph is in
topological order (`run_passes` lints it after every pass), so no separate DAG is built.
Counts: ``partition.<role>`` per role.
"""

from __future__ import annotations

import fnmatch
import math
import operator

import torch
import torch.fx as fx

from fxdisagg.errors import TokenLocalityError
from fxdisagg.graph import describe_node, has_seq, is_seq, token_dims, val
from fxdisagg.locality import dtensor_verdict
from fxdisagg.pipeline import PassContext

from fxdisagg.ir import OPS, ROLE, STAGE

aten = torch.ops.aten
TAKE_SHARD, PARTIAL, MERGE = OPS.take_shard, OPS.partial_attention, OPS.expsum_merge

_SHAPE_SAFE = {
    aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim,
    aten.squeeze.dims, aten.expand.default, aten.clone.default, aten.contiguous.default,
    aten.alias.default, aten.detach.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
    aten._to_copy.default, aten.t.default, aten.embedding.default, aten.sym_size.int,
    aten.stack.default, aten.type_as.default, operator.getitem,
}
_RESHAPE = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_DIM_ARG = {  # op -> index of its dim argument(s); those dims must not be token dims
    aten.mean.dim: 1, aten.sum.dim_IntList: 1, aten.amax.default: 1, aten.amin.default: 1,
    aten.var.correction: 1, aten.std.correction: 1, aten.softmax.int: 1, aten._softmax.default: 1,
    aten.log_softmax.int: 1, aten._log_softmax.default: 1, aten.cumsum.default: 1,
    aten.argmax.default: 1, aten.select.int: 1, aten.split.Tensor: 2,
    aten.split_with_sizes.default: 2, aten.chunk.default: 2, aten.unbind.int: 1,
    aten.index_select.default: 1, aten.narrow.default: 1, aten.max.dim: 1, aten.min.dim: 1,
}

_DIM_DEFAULT_0 = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
                  aten.unbind.int}  # ops whose omitted dim means dim 0, not "every dim"


def partition(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    feeds_attention = _feeds_attention(gm)
    for node in gm.graph.nodes:
        role = _role(node, ctx, feeds_attention)
        node.meta[ROLE] = role
        stage = max((a.meta[STAGE] for a in node.all_input_nodes), default=0)
        node.meta[STAGE] = stage + (node.target is MERGE)
        ctx.count(f"partition.{role}")
    return gm


def _feeds_attention(gm: fx.GraphModule) -> set[fx.Node]:
    """Every node a partial attention reads, directly or not: users come after their
    inputs, so walking backwards sees each node's users before the node. (With per-layer
    ``ancestors`` queries this was quadratic in the layers: 50 ms of 32.)"""
    feeds: set[fx.Node] = set()
    for n in reversed(gm.graph.nodes):
        if any(u.target is PARTIAL or u in feeds for u in n.users):
            feeds.add(n)
    return feeds


def _role(node: fx.Node, ctx, feeds_attention) -> str:
    ins = node.all_input_nodes
    roles = [a.meta[ROLE] for a in ins]
    if node.op == "placeholder":
        return "prologue"
    if node.op == "get_attr":
        return "static"
    if node.op == "output":
        return "output"
    if node.target in (TAKE_SHARD, PARTIAL) or (node.target in (operator.getitem, aten.stack.default)
                                                and roles and all(r == "attn" for r in roles)):
        return "attn"
    if "epilogue" in roles:
        return "epilogue"
    if all(r == "prologue" or (r == "static" and not _is_float(a)) for r, a in zip(roles, ins)):
        return "prologue"
    if not any(has_seq(a, ctx.seq) for a in ins) and not has_seq(node, ctx.seq) \
            and all(r in ("static", "prologue") for r in roles):
        return "static"
    problem = _locality_problem(node, ctx.seq)
    if problem is not None:            # the dim rules are conservative: DTensor's decide
        verdict = dtensor_verdict(node, ctx.seq)
        problem = None if verdict is None else f"{problem}, and {verdict}"
    if problem is not None and _declared_token_local(node, ctx):
        ctx.count("partition.declared_token_local")
        problem = None
    if problem is None:
        return "comp"
    if node not in feeds_attention:
        return "epilogue"
    raise TokenLocalityError(
        f"partition: {describe_node(node)} (op {node.target}) runs on a CompNode but {problem}; "
        f"a CompNode holds only its own tokens, so this op would need tokens of other "
        f"CompNodes. Only attention may mix tokens; if this op is part of an attention "
        f"spelling fxdisagg does not know, use attn_implementation='sdpa'.")


def _declared_token_local(node: fx.Node, ctx) -> bool:
    """Inside a module the user declared token-local (``token_local=``: a module path, a
    glob over paths, or a class name)?"""
    declared = ctx.config.token_local if ctx.config is not None else ()
    for path, cls in (node.meta.get("nn_module_stack") or {}).values():
        name = cls if isinstance(cls, str) else getattr(cls, "__qualname__", str(cls))
        if any(fnmatch.fnmatchcase(path, d) or name.rsplit(".", 1)[-1] == d for d in declared):
            return True
    return False


def _is_float(n) -> bool:
    v = val(n)
    return isinstance(v, torch.Tensor) and v.dtype.is_floating_point


def _locality_problem(node: fx.Node, seq) -> str | None:
    """None when ``node`` treats every token independently, else what it does wrong."""
    t = node.target
    tensor_ins = [a for a in node.all_input_nodes if isinstance(val(a), torch.Tensor)]
    if t is MERGE or (hasattr(t, "tags") and torch.Tag.pointwise in t.tags) or t in _SHAPE_SAFE:
        return None
    if t is aten.dropout.default:
        return None if not node.args[2] else "it is a training-mode dropout"
    if t in _RESHAPE:
        return _reshape_problem(node, seq)
    if t in _DIM_ARG:
        x = node.args[0]
        dims = node.args[_DIM_ARG[t]] if len(node.args) > _DIM_ARG[t] else node.kwargs.get("dim")
        if dims is None or dims == []:       # no dim: a reduction over every dim, tokens included
            dims = list(range(val(x).dim())) if t not in _DIM_DEFAULT_0 else [0]
        dims = [dims] if isinstance(dims, int) else list(dims)
        bad = [d for d in dims if d % max(val(x).dim(), 1) in token_dims(x, seq)]
        return f"it reduces or indexes over token dim {bad}" if bad else None
    if t in (aten.slice.Tensor,):
        return _slice_problem(node, seq)
    if t is aten.cat.default:
        d = node.args[1] if len(node.args) > 1 else 0
        x = node.args[0][0]
        return "it concatenates along the token dim" if d % val(x).dim() in token_dims(x, seq) else None
    if t in (aten.layer_norm.default, aten.rms_norm.default, aten.native_layer_norm.default):
        k = len(node.args[1])
        x = node.args[0]
        return "it normalises over the token dim" if any(d >= val(x).dim() - k for d in token_dims(x, seq)) else None
    if t in (aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default):
        a, b = node.args[0], node.args[1]
        if val(a).dim() - 1 in token_dims(a, seq):
            return "it contracts over the token dim"
        if has_seq(b, seq):
            return "its second operand is token-indexed (tokens would mix)"
        return None
    if t in (aten.addmm.default,):
        return None if not has_seq(node.args[2], seq) else "its weight is token-indexed"
    if not any(has_seq(a, seq) for a in tensor_ins):
        return None  # factories and ops on replicated values
    return "fxdisagg has no dim rule for this op"


def _reshape_problem(node, seq) -> str | None:
    """A reshape keeps tokens apart when exactly one dim carries tokens on each side (N, or
    merged with leading dims as B*N) and the row size after it is unchanged."""
    x = node.args[0]
    i, o = token_dims(x, seq), token_dims(node, seq)
    if len(i) != 1 or len(o) != 1:
        return "it merges or splits the token dim"
    after_in = math.prod(int(s) for s in val(x).shape[i[0] + 1:])
    after_out = math.prod(int(s) for s in val(node).shape[o[0] + 1:])
    return None if after_in == after_out else "it moves data across the token dim"


def _slice_problem(node, seq) -> str | None:
    x, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
    if dim % val(x).dim() not in token_dims(x, seq):
        return None
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    full_end = end is None or (isinstance(end, int) and end >= 2 ** 62) or \
        (isinstance(end, fx.Node) and is_seq(val(end), seq))
    if start in (None, 0) and step == 1 and full_end:
        return None
    return "it slices the token dim"
