"""classify_masks: an attention mask built in the graph becomes per-token features.

Requires: ``fxdisagg::attention`` nodes carrying their raw mask (`find_attention`).
Guarantees: every attention has ``mask=None`` and its masking expressed as features that
travel with q and k (a few ints per token): positions (causal, sliding window), document
ids (packed sequences) and key validity (padding). The ``[B, 1, N, N]`` mask the model built
is dead and removed; no node with two sequence dims is left. A mask that cannot be proven
separable and classified is refused with an error naming the layer - it is never replaced
by a plain causal mask.

How the classification is proven. The mask's subgraph is evaluated abstractly: every tensor
becomes a `Term`, a symbolic expression of *index variables* (one per broadcast axis, unified
when broadcasting aligns two axes) over leaves that are token-indexed tensors of the graph
(``attention_mask``, cumsums of position ids, ...). At the attention the last two axes are
the query axis Q and the key axis K. The boolean expression is split into a conjunction of
atoms, each of which must be one of:

    K - Q <= 0 over positions p          causal        (HF: kv_idx <= q_idx)
    Q - K <  W over positions p          sliding window W
    |Q - K| <= w over positions p        two-sided window (encoders' local attention)
    d[Q] == d[K]                         packed documents
    v[K]                                 key padding (validity)
    Q >= 0 over token indices            trivially true

where p, d, v are token-indexed tensors. Additive float masks ``where(m, 0, min)`` are the
same atoms. A float mask may also add one score bias: ``slope[H] * p[K]`` (times
constants) is ALiBi, the slopes a constant of the graph (evaluated here) and p the key's
token index or ``(cumsum(m) - 1) * m`` of an input mask m; the latter is exact only when
each row of m has its ones in one run, an input contract (`fxdisagg.contracts`) checked on
every call. Anything else (query-dependent terms, ``or``, offsets other than these, other
biases) raises `UnsupportedMaskError`.

Counts: ``classify_masks.causal``, ``.window``, ``.two-sided window``, ``.padding``,
``.documents``, ``.alibi``.

The abstract interpretation lives in `fxdisagg.mask_terms`; this module classifies its
Terms and rewrites the attentions.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from fxdisagg.contracts import OnesInOneRun
from fxdisagg.errors import UnsupportedMaskError
from fxdisagg.graph import attr_value, describe_node, seq_dims, val
from fxdisagg.ir import OPS, args_of, make_node, set_args
from fxdisagg.mask_terms import IDENTITY_OPS, Interpreter, Unclassifiable, Vars, show
from fxdisagg.pipeline import PassContext

aten = torch.ops.aten


# -- classification ----------------------------------------------------------------------------
@dataclasses.dataclass
class Features:
    causal: bool = False
    window: int | None = None
    window_ahead: int | None = None  # keys at most window_ahead - 1 positions ahead
    pos: fx.Node | None = None      # None: the token index
    doc: fx.Node | None = None
    valid: fx.Node | None = None
    alibi: list | None = None       # ALiBi slopes, one per head
    ones_in_one_run: fx.Node | None = None  # an input whose 1s must be one run per row
    kinds: list = dataclasses.field(default_factory=list)


class Classifier:
    """Turns the mask Term into `Features`, given which variables are Q, K, batch and head."""

    def __init__(self, vars_: Vars, q, k, b, h=None):
        self.vars, self.q, self.k, self.b = vars_, vars_.find(q), vars_.find(k), vars_.find(b)
        self.h = vars_.find(h)
        self.f = Features()
        self.pos_source = "unset"

    def classify(self, expr) -> Features:
        """A sum of masks (``where(c, 0, min)`` or boolean) and at most one score bias."""
        for term in self._summands(expr):
            if term[0] in ("mul", "div"):
                self._bias(term)
            else:
                self._mask(term)
        if self.f.alibi is not None and self.f.pos is not None:
            raise Unclassifiable("ALiBi is proven only with token-index positions; this mask "
                                 "takes its positions from a tensor")
        return self.f

    def _summands(self, e):
        if e[0] == "add":
            return [t for x in e[1:] for t in self._summands(x)]
        return [e]

    def _mask(self, expr) -> None:
        if expr[0] == "where":
            cond, a, b = expr[1:]
            if a == ("const", 0.0) or a == ("const", 0):
                # HF fills with finfo(dtype).min: -3.4e38 (fp32, bf16) or -65504 (fp16)
                if b[0] == "const" and b[1] <= torch.finfo(torch.float16).min:
                    expr = cond
        for atom in self._conjuncts(expr):
            self._atom(atom)

    # -- ALiBi: slope[head] * key position ------------------------------------------------------
    def _bias(self, e) -> None:
        """A score term ``slope[h] * p[k]`` (times constants): ALiBi. p must be the key's
        token index, or ``(cumsum(m) - 1) * m`` of an input mask m (Bloom, Falcon), which
        equals the token index up to a constant per row when m's ones form one run per
        row: that is recorded for `fxdisagg.contracts` to check on every call."""
        factors, coef = self._factors(e)
        slopes = [f for f in factors if f[0] == "static"]
        rest = [f for f in factors if f[0] != "static"]
        if self.f.alibi is not None or len(slopes) != 1 or \
                {self._axis(v) for v in slopes[0][2] if v is not None} != {"H"}:
            raise Unclassifiable(f"score term {show(e)} is not ALiBi (a per-head slope times "
                                 f"a key position)")
        values = _static_value(slopes[0][1]).double().flatten() * coef
        self._alibi_positions(rest, e)
        self.f.alibi = [float(x) for x in values]
        self.f.kinds.append("alibi")

    def _factors(self, e):
        """A product as (non-constant factors, constant coefficient)."""
        if e[0] == "mul":
            fa, ca = self._factors(e[1])
            fb, cb = self._factors(e[2])
            return fa + fb, ca * cb
        if e[0] == "div" and e[2][0] == "const":
            f, c = self._factors(e[1])
            return f, c / e[2][1]
        if e[0] == "const":
            return [], float(e[1])
        return [e], 1.0

    def _alibi_positions(self, rest, e) -> None:
        if len(rest) == 1 and rest[0][0] == "idx" and self._axis(rest[0][1]) == "K":
            return                                # the key's token index
        subs = [f for f in rest if f[0] == "sub" and f[1][0] == "feat" and f[2] == ("const", 1)]
        feats = [f for f in rest if f[0] == "feat"]
        if len(rest) == 2 and len(subs) == 1 and len(feats) == 1:
            cumsum, mask = subs[0][1][1], feats[0][1]
            if self._token_axis(feats[0]) == "K" and self._token_axis(subs[0][1]) == "K" \
                    and _is_cumsum_of(cumsum, mask) and mask.op == "placeholder":
                self.f.ones_in_one_run = mask
                return
        raise Unclassifiable(f"the ALiBi positions in {show(e)} are neither the key's token "
                             f"index nor (cumsum(mask) - 1) * mask of an input mask")

    def _conjuncts(self, e):
        if e[0] == "and":
            return [a for x in e[1:] for a in self._conjuncts(x)]
        return [e]

    def _axis(self, var):
        r = self.vars.find(var)
        if r is not None and r == self.h:
            return "H"
        return "Q" if r == self.q else "K" if r == self.k else "B" if r == self.b else None

    def _atom(self, e) -> None:
        if e == ("const", True):
            return
        if e[0] in ("le", "lt", "ge", "gt"):
            return self._compare(e)
        if e[0] == "eq" and e[1][0] == "feat" and e[2][0] == "feat" and e[1][1] is e[2][1]:
            axes = {self._token_axis(e[1]), self._token_axis(e[2])}
            if axes == {"Q", "K"} and self.f.doc in (None, e[1][1]):
                self.f.doc = e[1][1]
                self.f.kinds.append("documents")
                return
        if e[0] == "feat" and self._token_axis(e) == "K" and self.f.valid is None:
            self.f.valid = e[1]
            self.f.kinds.append("padding")
            return
        raise Unclassifiable(f"mask term {show(e)} is not causal, window, document or padding")

    def _token_axis(self, feat):
        axes = [self._axis(v) for v in feat[2] if v is not None]
        tok = [a for a in axes if a in ("Q", "K")]
        if len(tok) != 1 or any(a is None for a in axes):
            raise Unclassifiable(f"{show(feat)} is not indexed by (batch, token)")
        return tok[0]

    def _linear(self, e) -> dict:
        """e as {("Q"|"K"): +-1, "c": const} over one position source."""
        kind = e[0]
        if kind == "const":
            return {"c": e[1]}
        if kind in ("idx", "feat"):
            source = None if kind == "idx" else e[1]
            axis = self._axis(e[1]) if kind == "idx" else self._token_axis(e)
            if axis not in ("Q", "K"):
                raise Unclassifiable(f"{show(e)} is not a query or key position")
            if self.pos_source not in ("unset", source):
                raise Unclassifiable("positions come from two different tensors")
            self.pos_source = source
            return {axis: 1, "c": 0}
        if kind in ("add", "sub"):
            a, b = self._linear(e[1]), self._linear(e[2])
            sign = 1 if kind == "add" else -1
            out = dict(a)
            for key, coef in b.items():
                out[key] = out.get(key, 0) + sign * coef
            return out
        raise Unclassifiable(f"{show(e)} is not a linear function of positions")

    def _compare(self, e) -> None:
        op = e[0]
        if e[2][0] == "abs":                       # w >= |x|  ->  |x| <= w
            e = ({"ge": "le", "gt": "lt", "le": "ge", "lt": "gt"}[op], e[2], e[1])
            op = e[0]
        if e[1][0] == "abs":
            return self._two_sided(op, e)
        lin = self._linear(("sub", e[1], e[2]))  # lhs - rhs  (op)  0
        if op in ("ge", "gt"):
            lin = {k: -v for k, v in lin.items()}
            op = "le" if op == "ge" else "lt"
        c = lin.get("c", 0)
        if op == "lt":                            # integers: x < 0  <=>  x + 1 <= 0
            c, op = c + 1, "le"
        qc, kc = lin.get("Q", 0), lin.get("K", 0)
        if (qc, kc) == (-1, 1) and c == 0:        # K - Q <= 0
            self.f.causal = True
            self.f.kinds.append("causal")
        elif (qc, kc) == (1, -1) and c < 0:       # Q - K + c <= 0  <=>  Q - K < 1 - c
            self.f.window = 1 - c if self.f.window is None else min(self.f.window, 1 - c)
            self.f.kinds.append("window")
        elif (qc, kc) == (-1, 0) and c <= 0 and self.pos_source is None:
            pass                                  # -Q + c <= 0: token index >= -c >= 0 always
        else:
            raise Unclassifiable(f"comparison {show(e)} is not causal or a sliding window")
        if self.pos_source not in (None, "unset"):
            self.f.pos = self.pos_source


    def _two_sided(self, op, e) -> None:
        """``|Q - K| <= w`` (or ``< w``) over positions: keys at most w behind and w ahead."""
        inner, bound = self._linear(e[1][1]), self._linear(e[2])
        if op not in ("le", "lt") or set(bound) != {"c"} or \
                (inner.get("Q", 0), inner.get("K", 0)) not in ((1, -1), (-1, 1)) or inner.get("c", 0):
            raise Unclassifiable(f"comparison {show(e)} is not a two-sided window |q - k| <= w")
        w = bound["c"] + (1 if op == "le" else 0)      # |Q - K| < w
        self.f.window = w if self.f.window is None else min(self.f.window, w)
        self.f.window_ahead = w if self.f.window_ahead is None else min(self.f.window_ahead, w)
        self.f.kinds.append("two-sided window")
        if self.pos_source not in (None, "unset"):
            self.f.pos = self.pos_source


def _is_cumsum_of(node: fx.Node, source: fx.Node) -> bool:
    """``node`` is a cumsum over the last dim of ``source`` (through casts)."""
    if node.target is not aten.cumsum.default or args_of(node)["dim"] not in (-1, val(node).dim() - 1):
        return False
    x = node.args[0]
    while isinstance(x, fx.Node) and x.target in IDENTITY_OPS:
        x = x.args[0]
    return x is source


def _static_value(node: fx.Node) -> torch.Tensor:
    """Evaluate a node that depends on no input (ALiBi slopes: pow, arange, full, cat)."""
    order: dict[fx.Node, None] = {}

    def visit(n):
        if n not in order:
            for a in n.all_input_nodes:
                visit(a)
            order[n] = None
    visit(node)
    env: dict[fx.Node, object] = {}
    for n in order:
        if n.op == "get_attr":
            env[n] = attr_value(n)
        elif n.op == "call_function":
            env[n] = n.target(*fx.node.map_arg(n.args, env.__getitem__),
                              **fx.node.map_arg(n.kwargs, env.__getitem__))
        else:
            raise Unclassifiable(f"the ALiBi slopes {describe_node(node)} depend on the input "
                                 f"{n.name}; fxdisagg needs them constant")
    return env[node]


# -- the pass ---------------------------------------------------------------------------------
def classify_masks(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    per_token: dict[fx.Node, fx.Node] = {}     # one [N] view of each feature, for every layer
    for layer, node in enumerate(gm.graph.find_nodes(op="call_function", target=OPS.attention)):
        a = args_of(node)
        if a["mask"] is None:
            if a["causal"]:
                ctx.count("classify_masks.causal")
            continue
        feats = _classify(node, a["mask"], ctx.seq, layer)
        _rewrite(gm, node, feats, per_token)
        if feats.ones_in_one_run is not None:
            ctx.contracts.add(OnesInOneRun(feats.ones_in_one_run.target, f"layer {layer}'s ALiBi"))
        for kind in feats.kinds:
            ctx.count(f"classify_masks.{kind}")
    gm.graph.eliminate_dead_code()
    _check_no_dense_mask(gm, ctx)
    return gm


def _classify(node, mask, seq, layer) -> Features:
    interp = Interpreter(seq)
    try:
        term = interp.term(mask)
        dims = (None,) * (4 - len(term.dims)) + term.dims
        return Classifier(interp.vars, dims[2], dims[3], dims[0], dims[1]).classify(term.expr)
    except Unclassifiable as e:
        raise UnsupportedMaskError(
            f"classify_masks: the attention mask of layer {layer} ({describe_node(node)}) "
            f"could not be classified into per-token features: {e}. fxdisagg supports causal, "
            f"sliding-window, key-padding and packed-document masks as HF builds them; "
            f"pass attention_mask with 0/1 values or open an issue with the dump.") from None


def _rewrite(gm, node, f: Features, per_token: dict) -> None:
    g = gm.graph
    with g.inserting_before(node):
        pos = _per_token(g, f.pos, per_token)
        doc = _per_token(g, f.doc, per_token)
        valid = _per_token(g, f.valid, per_token)
        if valid is not None and val(valid).dtype != torch.bool:
            valid = _created(g, aten.ne.Scalar, (valid, 0), torch.ne(val(valid), 0))
    causal = bool(args_of(node)["causal"] or f.causal)
    set_args(node, mask=None, q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc, k_valid=valid,
             causal=causal, window=f.window, window_ahead=f.window_ahead, alibi=f.alibi)


def _per_token(g, n, made: dict):
    """A feature as [B, N] or [N]: a [1, N] source is squeezed, once for all the layers
    that read it (``made``: source -> its squeezed node, placed before the first reader)."""
    if n is None:
        return None
    shape = val(n).shape
    if not (len(shape) == 2 and isinstance(shape[0], int) and shape[0] == 1):
        return n
    if n not in made:
        made[n] = _created(g, aten.select.int, (n, 0, 0), val(n)[0])
    return made[n]


def _created(g, target, args, v):
    return make_node(g, target, args, val=v, created_by="classify_masks")


def _check_no_dense_mask(gm, ctx) -> None:
    for n in gm.graph.nodes:
        if n.op == "call_function" and len(seq_dims(n, ctx.seq)) >= 2:
            raise UnsupportedMaskError(
                f"classify_masks: {describe_node(n)} still builds an [N, N] tensor after "
                f"classification; fxdisagg does not materialise token x token tensors")
