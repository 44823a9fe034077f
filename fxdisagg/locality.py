"""Token locality from DTensor's sharding rules: does an op keep tokens apart?

A CompNode holds only its own tokens, so every op it runs must compute each token's output
from that token's inputs alone. `partition` knows the common ops by their dims (a reduction
over a non-token dim, a reshape that keeps the token dim whole). For any other op it asks
the one well-kept source of such facts PyTorch has: DTensor's sharding propagation. The op
runs once on meta DTensors over a two-rank mesh that has no process group, each token-
indexed input sharded on its token dim (``Shard(d)``), everything else replicated:

- the op is **token-local** when it runs without communicating (a collective would need
  the process group the mesh does not have) and each output comes back sharded on one of
  its own token dims: ``topk`` over experts, ``gather``/``index`` by per-token ids,
  ``index_add`` into the same tokens, ``repeat_interleave`` over heads;
- otherwise it mixes tokens or DTensor has no rule for it (``cumsum`` or ``sort`` over
  tokens need a collective; a mean over tokens comes back ``Partial``), and the caller
  refuses it.

Shapes are the capture's example sizes (the symbols' hints); nothing touches real data.
"""

from __future__ import annotations

import functools
import traceback

import torch
import torch.fx as fx

from fxdisagg.graph import token_dims, val


def dtensor_verdict(node: fx.Node, seq) -> str | None:
    """None when DTensor's rules show ``node`` keeps tokens apart, else why not."""
    try:
        args, kwargs = _sharded_args(node, seq)
    except _NotShardable as e:
        return str(e)
    try:
        with torch.no_grad():
            out = node.target(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure: the rules do not prove locality
        if "redistribute" in "".join(traceback.format_tb(e.__traceback__)):
            return "by DTensor's sharding rules it needs tokens held by other shards"
        return f"DTensor's sharding rules do not show it keeps tokens apart ({type(e).__name__})"
    return _check_outputs(node, out, seq)


class _NotShardable(Exception):
    """Internal: an input DTensor cannot express (several token dims); the reason."""


@functools.cache
def _mesh():
    from torch.distributed.device_mesh import DeviceMesh
    return DeviceMesh("cpu", torch.arange(2), _init_backend=False, _rank=0)


def _sharded_args(node: fx.Node, seq):
    def convert(a):
        if isinstance(a, fx.Node):
            return _dtensor(a, seq) if isinstance(val(a), torch.Tensor) else size_hint(val(a))
        if isinstance(a, (list, tuple)):
            return type(a)(convert(x) for x in a)
        return a
    return convert(node.args), {k: convert(v) for k, v in node.kwargs.items()}


def _dtensor(a: fx.Node, seq):
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
    from torch.distributed.tensor.placement_types import Replicate, Shard
    v = val(a)
    shape = tuple(size_hint(s) for s in v.shape)
    dims = token_dims(a, seq)
    if len(dims) > 1:
        raise _NotShardable(f"its input {a.name} has several token dims {dims}")
    full = torch.empty(shape, dtype=v.dtype, device="meta")
    if dims:
        d = dims[0]
        local = full.narrow(d, 0, -(-shape[d] // 2)).contiguous()
        placements = (Shard(d),)
    else:
        local, placements = full, (Replicate(),)
    spec = DTensorSpec(_mesh(), placements, TensorMeta(full.shape, full.stride(), full.dtype))
    return DTensor(local, spec, requires_grad=False)


def size_hint(s):
    """The example value of a size (a SymInt's hint); plain ints as they are."""
    if isinstance(s, torch.SymInt):
        return s.node.hint if s.node.hint is not None else s.node.shape_env.size_hint(s.node.expr)
    return s


def _check_outputs(node: fx.Node, out, seq) -> str | None:
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Shard
    outs = out if isinstance(out, (tuple, list)) else (out,)
    vals = val(node)
    vals = vals if isinstance(vals, (tuple, list)) else (vals,)
    for o, v in zip(outs, vals):
        if not isinstance(o, DTensor):
            continue
        wanted = [d for d, s in enumerate(v.shape) if _mentions(s, seq)]
        p = o.placements[0]
        if not (isinstance(p, Shard) and p.dim in wanted):
            return f"DTensor's sharding rules give its output placement {p}, not its tokens"
    return None


def _mentions(size, seq) -> bool:
    return isinstance(size, torch.SymInt) and seq in size.node.expr.free_symbols
