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
same atoms. Anything else (query-dependent terms, ``or``, offsets other than these) raises
`UnsupportedMaskError`.

Counts: ``classify_masks.causal``, ``.window``, ``.two-sided window``, ``.padding``,
``.documents``.

One module on purpose (~400 lines): the abstract interpreter and the classifier of its
terms are one proof; apart, neither can be read or tested alone.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.fx as fx

from fxdisagg.errors import UnsupportedMaskError
from fxdisagg.graph import describe_node, seq_dims, val
from fxdisagg.ir import OPS, args_of, make_node, set_args
from fxdisagg.pipeline import PassContext

aten = torch.ops.aten

_COMPARE = {aten.le.Tensor: "le", aten.le.Scalar: "le", aten.lt.Tensor: "lt", aten.lt.Scalar: "lt",
            aten.ge.Tensor: "ge", aten.ge.Scalar: "ge", aten.gt.Tensor: "gt", aten.gt.Scalar: "gt",
            aten.eq.Tensor: "eq", aten.eq.Scalar: "eq", aten.ne.Tensor: "ne", aten.ne.Scalar: "ne"}
_AND = {aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default}
_ARITH = {aten.add.Tensor: "add", aten.add.Scalar: "add", aten.sub.Tensor: "sub", aten.sub.Scalar: "sub"}
_SAME = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device,
         aten.clone.default, aten.contiguous.default, aten.alias.default}


class Unclassifiable(Exception):
    """Internal: the mask is not provably one of the supported atoms (becomes
    `UnsupportedMaskError` naming the layer)."""


class Vars:
    """Union-find over index variables: broadcasting two axes together unifies them."""

    def __init__(self):
        self.parent: dict[int, int] = {}
        self.fresh = itertools.count()

    def new(self) -> int:
        v = next(self.fresh)
        self.parent[v] = v
        return v

    def find(self, v):
        if v is None:
            return None
        while self.parent[v] != v:
            v = self.parent[v]
        return v

    def union(self, a, b):
        if a is None or b is None:
            return a if b is None else b
        ra, rb = self.find(a), self.find(b)
        self.parent[rb] = ra
        return ra


@dataclasses.dataclass(frozen=True)
class Term:
    """A tensor as an expression of index variables. ``dims[d]`` is the variable that
    indexes tensor dim d, or None for a broadcast (size-1 or expanded) dim.

    expr forms: ("const", x) | ("idx", var) | ("feat", node, vars) | (op, *args)."""

    dims: tuple
    expr: tuple


# -- abstract interpretation ---------------------------------------------------------------
class Interpreter:
    def __init__(self, seq):
        self.seq = seq
        self.vars = Vars()
        self.memo: dict[fx.Node, Term] = {}

    def term(self, a) -> Term:
        if isinstance(a, (bool, int, float)):
            return Term((), ("const", a))
        if not isinstance(a, fx.Node):
            raise Unclassifiable(f"unexpected argument {a!r}")
        if a not in self.memo:
            self.memo[a] = self._eval(a)
        return self.memo[a]

    def _eval(self, n: fx.Node) -> Term:
        t = n.target
        if n.op != "call_function":
            return self._opaque(n)
        if t is aten.arange.default and len(n.args) == 1:
            v = self.vars.new()
            return Term((v,), ("idx", v))
        if t in _ARITH and n.args[1] == 0:
            return self.term(n.args[0])  # HF's `arange(N) + past_length` with no past
        if t in _ARITH:
            return self._broadcast(n, _ARITH[t], n.args[:2])
        if t is aten.unsqueeze.default:
            x = self.term(n.args[0])
            d = n.args[1] % (len(x.dims) + 1)
            return Term(x.dims[:d] + (None,) + x.dims[d:], x.expr)
        if t is aten.expand.default:
            x = self.term(n.args[0])
            return Term((None,) * (len(n.args[1]) - len(x.dims)) + x.dims, x.expr)
        if t is aten.slice.Tensor:
            return self._slice(n)
        if t is aten.index.Tensor:
            return self._index(n)
        if t in _COMPARE:
            return self._broadcast(n, _COMPARE[t], n.args[:2])
        if t in _AND:
            return self._broadcast(n, "and", n.args[:2])
        if t in _SAME:
            return self.term(n.args[0])
        if t is aten.abs.default:
            x = self.term(n.args[0])
            return Term(x.dims, ("abs", x.expr))
        if t is aten.new_ones.default and n.args[1] == []:
            return Term((), ("const", True))
        if t in (aten.zeros.default,) and n.args[0] == []:
            return Term((), ("const", 0.0))
        if t is aten.full.default and n.args[0] == []:
            return Term((), ("const", n.args[1]))
        if t in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar):
            return self._broadcast(n, "where", n.args[:3])
        return self._opaque(n)

    def _opaque(self, n: fx.Node) -> Term:
        """A token-indexed tensor of the graph used as is: a leaf with a fresh var per dim."""
        v = val(n)
        if not isinstance(v, torch.Tensor) or len(seq_dims(n, self.seq)) != 1 or v.dim() > 2:
            raise Unclassifiable(f"{describe_node(n)} is not a per-token tensor")
        dims = tuple(None if (isinstance(s, int) and s == 1) else self.vars.new() for s in v.shape)
        return Term(dims, ("feat", n, dims))

    def _slice(self, n: fx.Node) -> Term:
        a = args_of(n)
        x = self.term(a["self"])
        dim, start, end, step = a["dim"], a["start"], a["end"], a["step"]
        size = val(a["self"]).shape[dim]
        if start in (0, None) and step == 1 and (end is None or end >= 2 ** 62 or
                                                 _same_size(end, size)):
            return x
        raise Unclassifiable(f"{describe_node(n)} slices the mask")

    def _index(self, n: fx.Node) -> Term:
        base = self.term(n.args[0])
        idx = [self.term(i) for i in n.args[1]]
        if any(i is None for i in n.args[1]) or len(idx) != len(base.dims):
            raise Unclassifiable(f"{describe_node(n)}: only full advanced indexing is understood")
        subst = {}
        for bvar, it in zip(base.dims, idx):
            if it.expr[0] != "idx":
                raise Unclassifiable(f"{describe_node(n)} indexes by a computed tensor")
            if bvar is not None:
                subst[self.vars.find(bvar)] = it.expr[1]
        dims = self._broadcast_dims([i.dims for i in idx])
        return Term(dims, _substitute(base.expr, subst, self.vars))

    def _broadcast_dims(self, dimss) -> tuple:
        rank = max(len(d) for d in dimss)
        out = []
        for pos in range(rank):
            v = None
            for d in dimss:
                k = pos - (rank - len(d))
                if k >= 0:
                    v = self.vars.union(v, d[k])
            out.append(v)
        return tuple(out)

    def _broadcast(self, n, op, args) -> Term:
        terms = [self.term(a) for a in args]
        return Term(self._broadcast_dims([t.dims for t in terms]), (op, *[t.expr for t in terms]))


def _same_size(a, b) -> bool:
    if isinstance(a, fx.Node):
        a = val(a)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - symbolic comparison undecidable
        return False


def _substitute(expr, subst, vars_: Vars):
    kind = expr[0]
    if kind == "idx":
        return ("idx", subst.get(vars_.find(expr[1]), expr[1]))
    if kind == "feat":
        return ("feat", expr[1], tuple(None if v is None else subst.get(vars_.find(v), v) for v in expr[2]))
    if kind == "const":
        return expr
    return (kind, *[_substitute(e, subst, vars_) for e in expr[1:]])


# -- classification ----------------------------------------------------------------------------
@dataclasses.dataclass
class Features:
    causal: bool = False
    window: int | None = None
    window_ahead: int | None = None  # keys at most window_ahead - 1 positions ahead
    pos: fx.Node | None = None      # None: the token index
    doc: fx.Node | None = None
    valid: fx.Node | None = None
    kinds: list = dataclasses.field(default_factory=list)


class Classifier:
    """Turns the mask Term into `Features`, given which variables are Q, K and batch."""

    def __init__(self, vars_: Vars, q, k, b):
        self.vars, self.q, self.k, self.b = vars_, vars_.find(q), vars_.find(k), vars_.find(b)
        self.f = Features()
        self.pos_source = "unset"

    def classify(self, expr) -> Features:
        if expr[0] == "where":
            cond, a, b = expr[1:]
            if a == ("const", 0.0) or a == ("const", 0):
                # HF fills with finfo(dtype).min: -3.4e38 (fp32, bf16) or -65504 (fp16)
                if b[0] == "const" and b[1] <= torch.finfo(torch.float16).min:
                    expr = cond
        for atom in self._conjuncts(expr):
            self._atom(atom)
        return self.f

    def _conjuncts(self, e):
        if e[0] == "and":
            return [a for x in e[1:] for a in self._conjuncts(x)]
        return [e]

    def _axis(self, var):
        r = self.vars.find(var)
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
        raise Unclassifiable(f"mask term {_show(e)} is not causal, window, document or padding")

    def _token_axis(self, feat):
        axes = [self._axis(v) for v in feat[2] if v is not None]
        tok = [a for a in axes if a in ("Q", "K")]
        if len(tok) != 1 or any(a is None for a in axes):
            raise Unclassifiable(f"{_show(feat)} is not indexed by (batch, token)")
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
                raise Unclassifiable(f"{_show(e)} is not a query or key position")
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
        raise Unclassifiable(f"{_show(e)} is not a linear function of positions")

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
            raise Unclassifiable(f"comparison {_show(e)} is not causal or a sliding window")
        if self.pos_source not in (None, "unset"):
            self.f.pos = self.pos_source


    def _two_sided(self, op, e) -> None:
        """``|Q - K| <= w`` (or ``< w``) over positions: keys at most w behind and w ahead."""
        inner, bound = self._linear(e[1][1]), self._linear(e[2])
        if op not in ("le", "lt") or set(bound) != {"c"} or \
                (inner.get("Q", 0), inner.get("K", 0)) not in ((1, -1), (-1, 1)) or inner.get("c", 0):
            raise Unclassifiable(f"comparison {_show(e)} is not a two-sided window |q - k| <= w")
        w = bound["c"] + (1 if op == "le" else 0)      # |Q - K| < w
        self.f.window = w if self.f.window is None else min(self.f.window, w)
        self.f.window_ahead = w if self.f.window_ahead is None else min(self.f.window_ahead, w)
        self.f.kinds.append("two-sided window")
        if self.pos_source not in (None, "unset"):
            self.f.pos = self.pos_source


def _show(e) -> str:
    if e[0] == "feat":
        return f"{e[1].name}[...]"
    if e[0] in ("idx", "const"):
        return f"{e[0]}({e[1]})"
    return f"{e[0]}({', '.join(_show(x) for x in e[1:])})"


# -- the pass ---------------------------------------------------------------------------------
def classify_masks(gm: fx.GraphModule, ctx: PassContext) -> fx.GraphModule:
    for layer, node in enumerate(gm.graph.find_nodes(op="call_function", target=OPS.attention)):
        a = args_of(node)
        if a["mask"] is None:
            if a["causal"]:
                ctx.count("classify_masks.causal")
            continue
        feats = _classify(node, a["mask"], ctx.seq, layer)
        _rewrite(gm, node, feats)
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
        if dims[1] is not None:
            raise Unclassifiable("the mask depends on the head")
        return Classifier(interp.vars, dims[2], dims[3], dims[0]).classify(term.expr)
    except Unclassifiable as e:
        raise UnsupportedMaskError(
            f"classify_masks: the attention mask of layer {layer} ({describe_node(node)}) "
            f"could not be classified into per-token features: {e}. fxdisagg supports causal, "
            f"sliding-window, key-padding and packed-document masks as HF builds them; "
            f"pass attention_mask with 0/1 values or open an issue with the dump.") from None


def _rewrite(gm, node, f: Features) -> None:
    g = gm.graph
    with g.inserting_before(node):
        pos = _per_token(g, f.pos)
        doc = _per_token(g, f.doc)
        valid = _per_token(g, f.valid)
        if valid is not None and val(valid).dtype != torch.bool:
            valid = _created(g, aten.ne.Scalar, (valid, 0), torch.ne(val(valid), 0))
    causal = bool(args_of(node)["causal"] or f.causal)
    set_args(node, mask=None, q_pos=pos, k_pos=pos, q_doc=doc, k_doc=doc, k_valid=valid,
             causal=causal, window=f.window, window_ahead=f.window_ahead)


def _per_token(g, n):
    """A feature as [B, N] or [N]: a [1, N] source is squeezed."""
    if n is None:
        return None
    shape = val(n).shape
    if len(shape) == 2 and isinstance(shape[0], int) and shape[0] == 1:
        return _created(g, aten.select.int, (n, 0, 0), val(n)[0])
    return n


def _created(g, target, args, v):
    return make_node(g, target, args, val=v, created_by="classify_masks")


def _check_no_dense_mask(gm, ctx) -> None:
    for n in gm.graph.nodes:
        if n.op == "call_function" and len(seq_dims(n, ctx.seq)) >= 2:
            raise UnsupportedMaskError(
                f"classify_masks: {describe_node(n)} still builds an [N, N] tensor after "
                f"classification; fxdisagg does not materialise token x token tensors")
