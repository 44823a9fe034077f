"""fold_repeat_kv: GQA/MQA travel as kv heads only.

Requires: ``fxdisagg::attention`` nodes (`find_attention`).
Guarantees: an attention whose k or v is HF's ``repeat_kv`` expansion
``reshape(expand(x[:, :, None], [B, Hkv, G, N, D]), [B, Hkv*G, N, D])`` reads ``x``
directly; the attention ops map query head h to kv head h // G, so only Hkv heads are sent.
Counts: ``fold_repeat_kv.folded`` (one per k or v).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxdisagg.graph import val
from fxdisagg.ir import OPS, args_of, set_args
from fxdisagg.pipeline import PassContext

aten = torch.ops.aten
RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def fold_repeat_kv(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for node in gm.graph.find_nodes(op="call_function", target=OPS.attention):
        for name in ("k", "v"):
            src = _repeat_kv_source(args_of(node)[name])
            if src is not None:
                set_args(node, **{name: src})
                ctx.count("fold_repeat_kv.folded")
    gm.graph.eliminate_dead_code()
    return gm


def _repeat_kv_source(n: fx.Node):
    if not (isinstance(n, fx.Node) and n.target in RESHAPES):
        return None
    ex = n.args[0]
    if not (isinstance(ex, fx.Node) and ex.target is aten.expand.default):
        return None
    un = ex.args[0]
    if not (isinstance(un, fx.Node) and un.target is aten.unsqueeze.default and un.args[1] == 2):
        return None
    x = un.args[0]
    b, hkv, m, d = val(x).shape
    out = val(n).shape
    group = val(ex).shape[2]
    if len(out) == 4 and out[1] == hkv * group and val(ex).shape[3] == m:
        return x
    return None
