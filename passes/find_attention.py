"""find_attention: every attention, whatever its spelling, becomes one ``fxdisagg::attention``.

Requires: a captured ATen graph (`fxdisagg.capture`).
Guarantees: no ``scaled_dot_product_attention`` (or fused variant) and no eager attention
chain is left; each was replaced by ``fxdisagg.attention(q, k, v, mask, ..., scale, causal,
window=None)`` with the raw mask (bool or additive) still attached, for `classify_masks`.

Spellings matched:
- ``aten.scaled_dot_product_attention`` and the fused CPU/CUDA variants (output 0 only),
  their arguments read by schema name (`sdpa_args`): the mask is ``attn_mask`` in some
  schemas and ``attn_bias`` in others, and sits at different positions;
- the eager chain of the seed figure, as HF builds it with ``attn_implementation="eager"``:
  MatMul(q, k^T) -> Scale (mul / div by a constant, optional) -> Mask (optional): a
  ``where(c, scores, fill)`` with fill at most fp16's min (GPT-Neo reads a causal buffer
  so) and / or an added mask -> SoftMax(-1) -> casts / Dropout(p, train=False)
  (optional) -> MatMul(., v); a ``where`` joins the mask as ``where(c, 0, fill)``;
- the same chain with the heads folded into the batch dim (Bloom, and the BART family
  such as XGLM): 3-D ``[B*H, N, D]`` operands, the scores ``bmm(q, k^T)`` or
  ``baddbmm(bias, q, k^T, beta, alpha)`` (a score bias such as ALiBi, fused) viewed as
  ``[B, H, N, N]``, masked there (and clamped at finfo.min, a no-op for the weights),
  maybe viewed back to ``[B*H, N, N]`` for the softmax, and ``bmm(probs, v)``. q, k, v
  become 4-D again (their ``[B, H, N, D]`` sources where the graph has them) and the
  bias joins the mask as an additive term, for `classify_masks` to prove separable.
A softmax over a sequence dim that is not part of an exact match is an error naming the
node: an attention-like pattern is never passed through silently.

Counts: ``find_attention.sdpa``, ``find_attention.fused_sdpa``, ``find_attention.eager``.

(Just over 400 lines: every spelling shares the readers of the score chain, scale,
soft-cap, mask, fill, and a spelling is easiest to check against its neighbours.)
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from fxdisagg.errors import PatternError
from fxdisagg.graph import (attr_value, describe_node, empty_val, is_tensor, seq_dims,
                            single_user, val)
from fxdisagg.ir import OPS, args_of, is_call, make_node, set_args
from fxdisagg.pipeline import PassContext

aten = torch.ops.aten

SDPA = aten.scaled_dot_product_attention.default
FUSED_SDPA = {
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.clone.default,
         aten.contiguous.default}
DROPOUT = {aten.dropout.default}


def find_attention(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for node in list(gm.graph.nodes):
        if is_call(node, SDPA):
            _replace_sdpa(gm, node, ctx)
        elif is_call(node, FUSED_SDPA):
            _replace_fused(gm, node, ctx)
    for node in list(gm.graph.nodes):
        if is_call(node, SOFTMAX):
            _replace_eager(gm, node, ctx)
    gm.graph.eliminate_dead_code()
    return gm


def sdpa_args(node: fx.Node) -> dict:
    """``q, k, v, mask, dropout_p, causal, scale`` of an SDPA or fused SDPA node, by schema
    name: ``mask`` is its ``attn_mask`` or ``attn_bias`` (None where the schema has neither),
    ``scale`` is None when the op's default applies."""
    a = args_of(node)
    mask = a["attn_mask"] if "attn_mask" in a else a.get("attn_bias")
    return {"q": a["query"], "k": a["key"], "v": a["value"], "mask": mask,
            "dropout_p": a["dropout_p"], "causal": a["is_causal"], "scale": a["scale"]}


def _default_scale(q: fx.Node) -> float:
    return 1.0 / math.sqrt(val(q).shape[-1])


def _emit(gm, at: fx.Node, q, k, v, mask, scale, causal, softcap=None) -> fx.Node:
    """``fxdisagg.attention`` before ``at``, with its stack trace; no features yet."""
    out = empty_val(val(q), val(q).shape[:-1] + (val(v).shape[-1],))
    with gm.graph.inserting_before(at):
        new = make_node(gm.graph, OPS.attention, (), val=out, created_by="find_attention", like=at)
    set_args(new, q=q, k=k, v=v, mask=mask, scale=float(scale), causal=bool(causal),
             softcap=softcap)
    return new


def _emit_sdpa(gm, node: fx.Node, a: dict) -> fx.Node:
    scale = a["scale"] if a["scale"] is not None else _default_scale(a["q"])
    return _emit(gm, node, a["q"], a["k"], a["v"], a["mask"], scale, a["causal"])


def _replace_sdpa(gm, node, ctx) -> None:
    a = sdpa_args(node)
    _check_dropout(node, a["dropout_p"])
    new = _emit_sdpa(gm, node, a)
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    ctx.count("find_attention.sdpa")


def _replace_fused(gm, node, ctx) -> None:
    """Fused variants return tuples; only output 0 (the attention) may be used."""
    a = sdpa_args(node)
    _check_dropout(node, a["dropout_p"])
    users = list(node.users)
    if any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
        raise PatternError(f"find_attention: {describe_node(node)} has users of outputs other "
                           f"than the attention output; fxdisagg can not rewrite it")
    new = _emit_sdpa(gm, node, a)
    for u in users:
        u.replace_all_uses_with(new)
        gm.graph.erase_node(u)
    gm.graph.erase_node(node)
    ctx.count("find_attention.fused_sdpa")


def _check_dropout(node, p) -> None:
    if p not in (0, 0.0):
        raise PatternError(f"find_attention: {describe_node(node)} has dropout_p={p}; "
                           f"fxdisagg runs inference only: call model.eval()")


def _replace_eager(gm, softmax: fx.Node, ctx) -> None:
    """Match backwards and forwards from a softmax over the last (key) dim."""
    a = args_of(softmax)
    x, dim = a["self"], a["dim"]
    if not is_tensor(x) or dim % val(x).dim() not in seq_dims(x, ctx.seq):
        return  # not over tokens (a vocabulary, a router's experts): token-local, not attention
    if dim % val(x).dim() != val(x).dim() - 1:
        raise PatternError(f"find_attention: {describe_node(softmax)} is a softmax over tokens "
                           f"but not over the last (key) dim; this attention spelling is not "
                           f"supported")
    scores, mask = _split_mask(_unwrapped(x), ctx)
    if _folded_heads(scores) is not None:
        return _replace_folded(gm, softmax, scores, mask, ctx)
    capped, softcap = _split_softcap(scores)
    qk, scale = _split_scale(capped)
    if qk.target not in (aten.matmul.default, aten.bmm.default) or single_user(qk) is None:
        _fail(softmax, "expected MatMul(q, k^T) before Scale and SoftMax", qk)
    q, kt = qk.args
    k = _untranspose(kt)
    if k is None:
        _fail(softmax, "expected the second MatMul operand to be k.transpose(-1, -2)", kt)
    chain = _follow_to_matmul(softmax)
    if chain is None:
        _fail(softmax, "expected SoftMax -> (cast/dropout) -> MatMul(probs, v)", softmax)
    pv = chain[-1]
    new = _emit(gm, pv, q, k, pv.args[1], mask, scale * 1.0, False, softcap)
    pv.replace_all_uses_with(new)
    # erase the matched chain explicitly: DCE keeps dropout (a seeded-random op)
    for n in reversed(list(dict.fromkeys([qk, capped, scores, x, softmax, *chain]))):
        if not n.users:
            gm.graph.erase_node(n)
    ctx.count("find_attention.eager")


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
BADDBMM = aten.baddbmm.default


def _folded_heads(scores: fx.Node):
    """``(B, H)`` if scores are ``view(s3, [B, H, Nq, Nk])`` of 3-D ``[B*H, Nq, Nk]``
    scores (heads folded into the batch dim), else None."""
    if not is_call(scores, _VIEWS) or not isinstance(scores.args[0], fx.Node):
        return None
    src, shape = scores.args[0], scores.args[1]
    if val(src).dim() != 3 or len(shape) != 4 or not all(isinstance(d, int) for d in shape[:2]):
        return None
    return shape[0], shape[1]


def _replace_folded(gm, softmax: fx.Node, scores: fx.Node, mask, ctx) -> None:
    """Bloom's spelling: ``[B*H, N, D]`` operands, ``baddbmm`` scores with a fused bias;
    and the BART family's (XGLM): ``bmm`` scores viewed as ``[B, H, N, N]`` for the mask
    and back for the softmax."""
    x = args_of(softmax)["self"]
    b, h = _folded_heads(scores)
    s3 = scores.args[0]
    if is_call(s3, BADDBMM):
        a = args_of(s3)
        bias, q3, kt3, scale = a["self"], a["batch1"], a["batch2"], float(a["alpha"])
        bias = _bias_4d(gm, bias, b, h, float(a["beta"]), softmax)
    else:
        qk, scale = _split_scale(s3)
        bias = None
        if not is_call(qk, aten.bmm.default):
            _fail(softmax, "expected bmm(q, k^T) or baddbmm(bias, q, k^T) before SoftMax", qk)
        q3, kt3 = qk.args
    k3 = _untranspose(kt3)
    if k3 is None:
        _fail(softmax, "expected the second bmm operand to be k.transpose(-1, -2)", kt3)
    chain = _follow_to_matmul(softmax, views=True)
    if chain is None:
        _fail(softmax, "expected SoftMax -> (cast/dropout/view) -> bmm(probs, v)", softmax)
    pv = chain[-1]
    q, k, v = (_unfold(gm, t, b, h, pv) for t in (q3, k3, pv.args[1]))
    if bias is not None:
        mask = bias if mask is None else _added(gm, bias, mask, softmax)
    new = _emit(gm, pv, q, k, v, mask, scale, False)
    with gm.graph.inserting_before(pv):                   # back to [B*H, N, Dv] for its users
        out3 = make_node(gm.graph, aten.reshape.default, (new, [b * h, -1, val(new).shape[-1]]),
                         val=val(pv), created_by="find_attention", like=pv)
    pv.replace_all_uses_with(out3)
    for n in reversed(list(dict.fromkeys([s3, scores, x, softmax, *chain]))):
        if not n.users:
            gm.graph.erase_node(n)
    ctx.count("find_attention.eager")


def _unfold(gm, t3: fx.Node, b: int, h: int, at: fx.Node) -> fx.Node:
    """``[B*H, N, D]`` -> ``[B, H, N, D]``: the 4-D tensor it was reshaped from, if the
    graph has it, else a new reshape."""
    src = t3
    while is_call(src, _VIEWS | CASTS) and val(src).dim() == 3:
        src = src.args[0]
    if val(src).dim() == 4 and tuple(val(src).shape[:2]) == (b, h) \
            and val(src).shape[-1] == val(t3).shape[-1]:
        return src
    with gm.graph.inserting_before(at):
        return make_node(gm.graph, aten.reshape.default, (t3, [b, h, -1, val(t3).shape[-1]]),
                         val=val(t3).reshape(b, h, -1, val(t3).shape[-1]),
                         created_by="find_attention", like=at)


def _bias_4d(gm, bias: fx.Node, b: int, h: int, beta: float, at: fx.Node) -> fx.Node:
    """A fused score bias ``[B*H, 1|Nq, Nk]`` as ``[B, H, 1|Nq, Nk]`` times beta: its
    ``[B, H, Nk]`` source unsqueezed where the graph has one (`classify_masks` reads
    through unsqueezes, not through reshapes that fold dims), else a reshape."""
    if val(bias).dim() != 3:
        raise PatternError(f"find_attention: {describe_node(bias)} is added to folded-head "
                           f"attention scores but is not [B*H, Nq, Nk]")
    src = bias
    while is_call(src, _VIEWS | CASTS) and val(src).dim() == 3:
        src = src.args[0]
    g = gm.graph
    with g.inserting_before(at):
        if val(src).dim() == 3 and tuple(val(src).shape[:2]) == (b, h) and val(bias).shape[1] == 1:
            out = make_node(g, aten.unsqueeze.default, (src, 2), val=val(src).unsqueeze(2),
                            created_by="find_attention", like=at)      # [B, H, Nk] -> [B, H, 1, Nk]
        else:
            shape = [b, h, val(bias).shape[1], -1]
            out = make_node(g, aten.reshape.default, (bias, shape), val=val(bias).reshape(shape),
                            created_by="find_attention", like=at)
        if beta != 1.0:
            out = make_node(g, aten.mul.Tensor, (out, beta), val=val(out) * beta,
                            created_by="find_attention", like=at)
    return out


def _added(gm, a: fx.Node, b: fx.Node, at: fx.Node) -> fx.Node:
    with gm.graph.inserting_before(at):
        return make_node(gm.graph, aten.add.Tensor, (a, b), val=val(a) + val(b),
                         created_by="find_attention", like=at)


def _unwrapped(x: fx.Node) -> fx.Node:
    """The scores a softmax reads, without what leaves its weights alone: a view of 4-D
    scores to ``[B*H, N, N]`` (the BART family masks ``[B, H, N, N]`` scores, then folds
    the heads again for the softmax), and a clamp from below at a fill
    (``max(s, finfo.min)``, which only keeps -inf out of rows with no visible key)."""
    if is_call(x, _VIEWS) and val(x).dim() == 3 and val(x.args[0]).dim() == 4:
        x = x.args[0]
    if is_call(x, {aten.max.other, aten.maximum.default}):
        fill = _fill_value(x.args[1])
        if fill is not None and fill <= _FILL_AT_MOST:
            x = x.args[0]
    return x


def _split_mask(x: fx.Node, ctx):
    """scores + mask -> (scores, mask); the mask is the operand not derived from MatMul.
    Scores filled where a condition is false (`_unfill`) give the condition to the mask."""
    scores, mask = x, None
    if x.target is aten.add.Tensor and all(isinstance(a, fx.Node) for a in x.args):
        a, b = x.args
        if _reaches_matmul(a):
            scores, mask = a, b
        elif _reaches_matmul(b):
            scores, mask = b, a
    return _unfill(scores, mask, before=x)


#: ``where(c, s, fill)`` with fill at most this masks s where c is false (HF fills with
#: finfo(dtype).min: -3.4e38 in fp32 and bf16, -65504 in fp16)
_FILL_AT_MOST = torch.finfo(torch.float16).min


def _unfill(scores: fx.Node, mask, before: fx.Node):
    """``where(c, s, fill)`` -> (s, ``where(c, 0, fill)`` + mask): the older HF spelling
    of a causal mask (GPT-Neo: a ``[max, max]`` lower-triangular buffer sliced to N, then
    the padding mask added). The same attention: a key the condition hides gets weight
    exp(fill + s - max) = 0 either way, and `classify_masks` turns the condition into
    features, so no fill is ever added."""
    if not (is_call(scores, aten.where.self) and _reaches_matmul(scores.args[1])):
        return scores, mask
    cond, s, fill = scores.args
    value = _fill_value(fill)
    if value is None or value > _FILL_AT_MOST:
        return scores, mask
    g = before.graph
    with g.inserting_before(before):
        out = make_node(g, aten.where.Scalar, (cond, 0.0, value),
                        val=torch.where(val(cond), 0.0, value).to(val(s).dtype),
                        created_by="find_attention", like=scores)
        if mask is not None:
            out = make_node(g, aten.add.Tensor, (out, mask), val=val(out) + val(mask),
                            created_by="find_attention", like=scores)
    return s, out


def _fill_value(n) -> float | None:
    """A constant 0-d fill: a number, ``full([], x)``, or a lifted 0-d tensor constant of
    the model (``detach_(lift_fresh_copy(c))``, as export spells ``torch.tensor(x)``)."""
    c = _constant(n)
    if c is not None or not isinstance(n, fx.Node):
        return c
    while is_call(n, {aten.detach_.default, aten.detach.default, aten.lift_fresh_copy.default,
                      *CASTS}):
        n = n.args[0]
    if n.op != "get_attr":
        return None
    t = attr_value(n)
    return float(t) if isinstance(t, torch.Tensor) and t.numel() == 1 else None


def _reaches_matmul(n: fx.Node) -> bool:
    while n.op == "call_function" and n.target in (aten.mul.Tensor, aten.div.Tensor, aten.tanh.default,
                                                   *CASTS, *_VIEWS):
        n = n.args[0]
    if is_call(n, aten.where.self) and isinstance(n.args[1], fx.Node):
        return _reaches_matmul(n.args[1])       # filled scores (`_unfill`)
    if is_call(n, BADDBMM):
        return True
    return n.op == "call_function" and n.target in (aten.matmul.default, aten.bmm.default)


def _split_softcap(x: fx.Node):
    """tanh(s / c) * c -> (s, c): logit soft-capping (Gemma 2), the same constant c twice;
    anything else -> (x, None)."""
    if x.target is not aten.mul.Tensor or not isinstance(x.args[0], fx.Node) \
            or x.args[0].target is not aten.tanh.default:
        return x, None
    inner = x.args[0].args[0]
    c = _constant(x.args[1])
    if inner.target is not aten.div.Tensor or c is None or _constant(inner.args[1]) != c \
            or c <= 0:
        raise PatternError(f"find_attention: {describe_node(x)} bends the attention scores with "
                           f"tanh, but not as soft-capping tanh(s / c) * c with one constant c > 0")
    return inner.args[0], c


def _split_scale(x: fx.Node):
    """MatMul * c or MatMul / c (c a Python number or a constant 0-d full()) -> (matmul, scale)."""
    if x.target in (aten.mul.Tensor, aten.div.Tensor):
        c = _constant(x.args[1])
        if c is None:
            raise PatternError(f"find_attention: {describe_node(x)} scales attention scores by a "
                               f"non-constant; this spelling is not supported")
        return x.args[0], (c if x.target is aten.mul.Tensor else 1.0 / c)
    return x, 1.0


def _constant(a):
    if isinstance(a, (int, float)):
        return float(a)
    if isinstance(a, fx.Node) and a.target is aten.full.default and a.args[0] == []:
        return float(a.args[1])
    return None


def _untranspose(kt: fx.Node):
    if kt.op == "call_function" and kt.target is aten.transpose.int:
        d0, d1 = sorted(d % val(kt).dim() for d in kt.args[1:3])
        if (d0, d1) == (val(kt).dim() - 2, val(kt).dim() - 1):
            return kt.args[0]
    return None


def _follow_to_matmul(softmax: fx.Node, views: bool = False):
    """SoftMax -> (casts, dropout, with ``views`` reshapes)* -> MatMul: the nodes after the
    softmax, or None."""
    chain, n = [], softmax
    while True:
        u = single_user(n)
        if u is None or u.op != "call_function":
            return None
        chain.append(u)
        if u.target in DROPOUT:
            d = args_of(u)
            _check_dropout(u, d["p"] if d["train"] else 0.0)   # eval-mode nn.Dropout: train=False
        elif u.target in (aten.matmul.default, aten.bmm.default) and u.args[0] is n:
            return chain
        elif u.target not in CASTS and not (views and u.target in _VIEWS):
            return None
        n = u


def _fail(softmax, what, at) -> None:
    raise PatternError(f"find_attention: {describe_node(softmax)} looks like attention but does "
                       f"not match exactly: {what}; found {describe_node(at)}. Use "
                       f"attn_implementation='sdpa' or 'eager' as HF ships them.")
