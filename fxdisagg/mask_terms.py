"""Abstract interpretation of an attention mask's subgraph: every tensor becomes a `Term`,
an expression over index variables (one per broadcast axis, unified when broadcasting
aligns two axes) whose leaves are the graph's token-indexed tensors (``feat``), tensors
without a token dim (``static``: ALiBi's per-head slopes), token indices (``idx``) and
constants. `passes/classify_masks.py` classifies the Term of each mask; this module only
says what the mask computes, in a form where "depends on the query only through its
position" can be read off.

Ops the interpreter understands: arange, add/sub/mul/div, comparisons, and, where, abs,
unsqueeze/expand, full-range slices, a constant lower-triangular (or band) bool buffer
read at ``[:N, :N]`` (the indices it stands for: K <= Q, and Q - K < W for a band of W),
advanced indexing by index variables, and casts and
copies (identity: masks are bool or small integers, exact in any dtype; a score bias that a
model rounds to a low-precision dtype is applied by the kernels in fp32, more exact than
the model's own rounding). Anything else
becomes a leaf if it is a per-token or token-free tensor, and is `Unclassifiable` if not.
"""

from __future__ import annotations

import dataclasses
import itertools

import torch
import torch.fx as fx

from fxdisagg.graph import attr_value, describe_node, seq_dims, val
from fxdisagg.ir import args_of

aten = torch.ops.aten

_COMPARE = {aten.le.Tensor: "le", aten.le.Scalar: "le", aten.lt.Tensor: "lt", aten.lt.Scalar: "lt",
            aten.ge.Tensor: "ge", aten.ge.Scalar: "ge", aten.gt.Tensor: "gt", aten.gt.Scalar: "gt",
            aten.eq.Tensor: "eq", aten.eq.Scalar: "eq", aten.ne.Tensor: "ne", aten.ne.Scalar: "ne"}
_AND = {aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default}
_ARITH = {aten.add.Tensor: "add", aten.add.Scalar: "add", aten.sub.Tensor: "sub", aten.sub.Scalar: "sub"}
_SCALE = {aten.mul.Tensor: "mul", aten.mul.Scalar: "mul", aten.div.Tensor: "div", aten.div.Scalar: "div"}
IDENTITY_OPS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device,
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
        if t in _SCALE:
            return self._broadcast(n, _SCALE[t], n.args[:2])
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
        if t in IDENTITY_OPS:
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
        """A tensor of the graph used as is: a leaf with a fresh var per dim. A per-token
        tensor is a ``feat``; one without a token dim (ALiBi's per-head slopes) ``static``."""
        v = val(n)
        if not isinstance(v, torch.Tensor) or v.dim() > 2:
            raise Unclassifiable(f"{describe_node(n)} is not a per-token tensor")
        token_dims = len(seq_dims(n, self.seq))
        if token_dims > 1:
            raise Unclassifiable(f"{describe_node(n)} is not a per-token tensor")
        dims = tuple(None if (isinstance(s, int) and s == 1) else self.vars.new() for s in v.shape)
        return Term(dims, ("feat" if token_dims else "static", n, dims))

    def _slice(self, n: fx.Node) -> Term:
        a = args_of(n)
        window = _lower_triangle(n, self.seq)
        if window is not False:
            return self._triangle(n, window)
        x = self.term(a["self"])
        dim, start, end, step = a["dim"], a["start"], a["end"], a["step"]
        size = val(a["self"]).shape[dim]
        if start in (0, None) and step == 1 and (end is None or end >= 2 ** 62 or
                                                 _same_size(end, size)):
            return x
        raise Unclassifiable(f"{describe_node(n)} slices the mask")

    def _triangle(self, n: fx.Node, window: int | None) -> Term:
        """A causal (``window``: sliding) buffer read at [:N, :N]: K <= Q (and Q - K < W)
        over token indices, Q and K fresh variables of its last two dims."""
        q, k = self.vars.new(), self.vars.new()
        expr = ("le", ("idx", k), ("idx", q))
        if window is not None:
            expr = ("and", expr, ("lt", ("sub", ("idx", q), ("idx", k)), ("const", window)))
        return Term((None,) * (val(n).dim() - 2) + (q, k), expr)

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


def _lower_triangle(n: fx.Node, seq):
    """For ``buf[..., :N, :N]`` of a constant bool buffer ``buf`` ``[1, .., M, M]`` (the
    older HF spelling of causal masks, read through ``slice`` nodes): None if ``buf`` is
    lower-triangular (causal), W if it is the band of the last W keys (GPT-Neo's local
    layers), False for anything else (the slice is not such a read)."""
    slices, root = {}, n
    while root.op == "call_function" and root.target is aten.slice.Tensor:
        a = args_of(root)
        slices[a["dim"] % val(root).dim()] = (a["start"], a["end"], a["step"])
        root = a["self"]
    if root.op != "get_attr" or val(n).dim() < 2:
        return False
    buf = attr_value(root)
    last = (val(n).dim() - 2, val(n).dim() - 1)
    if not isinstance(buf, torch.Tensor) or buf.dtype != torch.bool or buf.dim() != val(n).dim() \
            or any(s != 1 for s in buf.shape[:-2]) or buf.shape[-1] != buf.shape[-2] \
            or set(slices) != set(last) \
            or not all(_prefix(slices[d], val(n).shape[d], seq) for d in last):
        return False
    m = buf.reshape(buf.shape[-2:])
    tri = torch.ones_like(m).tril()
    if torch.equal(m, tri):
        return None
    w = int(m[-1].sum())
    return w if 0 < w and torch.equal(m, tri & ~tri.tril(-w)) else False


def _prefix(sl, size, seq) -> bool:
    """A slice ``[:N]`` (start 0 or None, step 1) to the token length N."""
    start, _, step = sl
    return start in (0, None) and step == 1 and isinstance(size, torch.SymInt) \
        and size.node.expr == seq


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
    if kind in ("feat", "static"):
        return (kind, expr[1], tuple(None if v is None else subst.get(vars_.find(v), v) for v in expr[2]))
    if kind == "const":
        return expr
    return (kind, *[_substitute(e, subst, vars_) for e in expr[1:]])


def show(e) -> str:
    if e[0] in ("feat", "static"):
        return f"{e[1].name}[...]"
    if e[0] in ("idx", "const"):
        return f"{e[0]}({e[1]})"
    return f"{e[0]}({', '.join(show(x) for x in e[1:] if isinstance(x, tuple))})"
